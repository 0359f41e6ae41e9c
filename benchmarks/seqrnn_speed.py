"""Training / evaluation speed and memory of the Villatel et al. RNNs (issue 17), each as a
fraction of its compute-bound limit on the machine at hand.

    python -m benchmarks.seqrnn_speed --data ml100k=/tmp/villatel_tables/ml100k/splits/random_users:user \
        --data rsc15-100k=/tmp/villatel_tables/rsc15-100k/splits/time:session \
        [--variants seqrnn,seqrnn_ln,...] [--steps 40] [--threads 1] [--out benchmarks/results/seqrnn_speed.json]

``--data NAME=SPLIT_DIR[:session|user]`` (the sequence kind the models train on). For every
dataset x variant, in a fresh process (so peak RSS is that setting's own):

* **training**: ``--steps`` optimizer steps of the real training loop (``fam.batches`` ->
  ``fam.loss`` -> backward -> clipping -> the trainer's ``AutogradRunner`` optimizer and LR
  schedule) on ``train_full`` after 3 warm-up steps (into the next epoch if one is too short);
  events/s = (input, target) pairs / wall seconds;
* **evaluation**: the one evaluation loop (``evaluation.loop.evaluate_sessions``, full ranking)
  on at most ``--eval-sessions`` test sessions; events/s;
* **compute-bound limit**: the FLOPs one training event needs, forward + backward (2 FLOPs per
  multiply-add; backward = 2x forward: input and weight gradients), for every matrix product
  of the step (the full-softmax output ``[D] x [D, n_items]``, each GRU layer's input and
  recurrent products, HM-LSTM's bottom-up / recurrent / top-down products and its output
  module), each timed here at its real shape (``torch.mm``, same threads, best of 7) -> the
  events/s the machine would reach if the step were nothing but those products. Element-wise
  work (gates, layer norm, softmax) counts 0 FLOPs here, so the fraction shows its cost;
* **peak RSS** of the process (``resource.getrusage``), and the item table's size.

Prints a markdown table and writes ``--out`` (JSON, with the CPU from benchmarks.machine).
The machinery (product timing, the timed loop, the evaluation call, one process per setting,
the report) is ``benchmarks.rnn_speed_common``, shared with ``benchmarks.tan_speed``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from benchmarks.rnn_speed_common import (Product, build_family, eval_speed, markdown_table, peak_rss_mb,
                                         products_bound, run_in_processes, timed_steps, write_report)

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ["seqrnn", "seqrnn_re", "seqrnn_ln", "seqrnn_re_ln", "seqrnn_stack_re_ln", "hmlstm_re_ln"]


def compute_bound(cfg, n_items: int, rows: int, window: int) -> dict:
    """Events/s if a training step were only its matrix products (forward + 2x backward, each
    backward product timed at the forward's shape), each timed at its shape: per step
    ``rows`` sequences x ``window`` steps."""
    E, H, L = cfg.embedding, cfg.hidden, cfg.n_layers
    M = rows * window  # events per step
    prods = []  # (m, k, n) of one forward product; backward = 2 more of the same size
    D = (E if cfg.tied else H) if cfg.cell == "hmlstm" else H
    prods.append((M, D, n_items))  # output logits
    if cfg.cell == "gru":
        for layer in range(L):
            fan = E if layer == 0 else H
            prods.append((M, fan, 3 * H))  # input products, all steps at once
            for _ in range(window):
                prods += [(rows, H, 2 * H), (rows, H, H)]  # recurrent: [r|z], candidate (per step)
    else:
        prods.append((M, E, 4 * H + 1))  # layer 1 bottom-up for all steps
        for _ in range(window):
            for layer in range(L):
                width = 4 * H + (1 if layer < L - 1 else 0)
                prods.append((rows, H, width))  # recurrent
                if layer < L - 1:
                    prods.append((rows, H, width))  # top-down
                if layer > 0:
                    prods.append((rows, H, width))  # bottom-up from the layer below
        prods += [(M, L * H, L), (M, L * H, D)]  # output module: gates, combined projection
    return products_bound([Product(*p) for p in prods], M, backward="as_forward")


def one(name: str, split: str, variant: str, sequence: str, steps: int, threads: int, eval_sessions: int) -> dict:
    fam_cls, fam, cfg, index, data, runner = build_family(variant, split, threads, {"sequence": sequence})
    tr = timed_steps(fam, cfg, runner, steps)
    ev = eval_speed(fam_cls, fam, cfg, variant, index, split, eval_sessions)
    cb = compute_bound(cfg, index.n_items, min(cfg.batch_size, data.n_sessions), cfg.window)
    eps = tr["train_events_per_s"]
    return {"load_average": os.getloadavg()[0], "dataset": name, "variant": variant, "sequence": sequence,
            "n_items": index.n_items, "train_events": int(data.n_events), "steps_timed": tr["steps_timed"],
            "events_timed": tr["events_timed"], "train_events_per_s": eps,
            "compute_bound_events_per_s": cb["events_per_s"], "fraction_of_limit": eps / cb["events_per_s"],
            "flops_per_event": cb["flops_per_event"], "gflops_at_shapes": cb["gflops_at_shapes"],
            "eval_events_per_s": ev["eval_events_per_s"], "eval_events": ev["eval_events"],
            "peak_rss_mb": peak_rss_mb(),
            "item_table_mb": index.n_items * cfg.embedding * 4 / 2**20 * (1 if cfg.tied else 2),
            "n_parameters": sum(p.numel() for p in fam.model.parameters()), "threads": threads}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", action="append", metavar="NAME=SPLIT_DIR[:session|user]", help="required")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--eval-sessions", type=int, default=2000)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "seqrnn_speed.json"))
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: one setting, JSON on stdout
    a = ap.parse_args(argv)
    if a.one:
        name, split, variant, seq = json.loads(a.one)
        print(json.dumps(one(name, split, variant, seq, a.steps, a.threads, a.eval_sessions)))
        return 0
    if not a.data:
        ap.error("--data NAME=SPLIT_DIR[:session|user] is required")
    settings = []
    for spec in a.data:
        name, _, rest = spec.partition("=")
        split, _, seq = rest.partition(":")
        settings += [[name, split, v, seq or "session"] for v in a.variants.split(",") if v]
    rows = run_in_processes("benchmarks.seqrnn_speed", settings,
                            ["--steps", str(a.steps), "--threads", str(a.threads), "--eval-sessions", str(a.eval_sessions),
                             ],
                            lambda r: f"{r['dataset']} {r['variant']}: {r['train_events_per_s']:,.0f} ev/s "
                                      f"({r['fraction_of_limit']:.0%} of {r['compute_bound_events_per_s']:,.0f})")
    base = {r["dataset"]: r["train_events_per_s"] for r in rows if r["variant"] == "seqrnn"}

    def rel(r):
        return r["train_events_per_s"] / base[r["dataset"]] if r["dataset"] in base else float("nan")

    table = markdown_table(rows, [
        ("data", lambda r: r["dataset"], "l"), ("variant", lambda r: r["variant"], "l"),
        ("items", lambda r: f"{r['n_items']:,}", "r"), ("train ev/s", lambda r: f"{r['train_events_per_s']:,.0f}", "r"),
        ("limit ev/s", lambda r: f"{r['compute_bound_events_per_s']:,.0f}", "r"),
        ("fraction", lambda r: f"{r['fraction_of_limit']:.0%}", "r"), ("vs GRU", lambda r: f"{rel(r):.2f}x", "r"),
        ("eval ev/s", lambda r: f"{r['eval_events_per_s']:,.0f}", "r"),
        ("peak RSS MB", lambda r: f"{r['peak_rss_mb']:,.0f}", "r")])
    write_report(a.out, "python -m benchmarks.seqrnn_speed " + " ".join(sys.argv[1:] if argv is None else argv),
                 a.threads, rows, table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
