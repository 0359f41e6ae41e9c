"""Training / evaluation speed and memory of the Villatel et al. RNNs (issue 17), each as a
fraction of its compute-bound limit on the machine at hand.

    python -m benchmarks.seqrnn_speed --data ml100k=/tmp/villatel_tables/ml100k/splits/random_users:user \
        --data rsc15-100k=/tmp/villatel_tables/rsc15-100k/splits/time:session \
        [--variants seqrnn,seqrnn_ln,...] [--steps 40] [--threads 1] [--out benchmarks/results/seqrnn_speed.json]

``--data NAME=SPLIT_DIR[:session|user]`` (the sequence kind the models train on). For every
dataset x variant, in a fresh process (so peak RSS is that setting's own):

* **training**: ``--steps`` optimizer steps of the real training loop (``fam.batches`` ->
  ``fam.loss`` -> backward -> Adam -> LR schedule) on ``train_full`` after 3 warm-up steps;
  events/s = (input, target) pairs / wall seconds;
* **evaluation**: the one evaluation loop (``evaluation.loop.evaluate_sessions``, full ranking)
  on at most ``--eval-sessions`` test sessions; events/s;
* **compute-bound limit**: the FLOPs one training event needs, forward + backward (2 FLOPs per
  multiply-add; backward = 2x forward: input and weight gradients), for every matrix product
  of the step (the full-softmax output ``[D] x [D, n_items]``, each GRU layer's input and
  recurrent products, HM-LSTM's bottom-up / recurrent / top-down products and its output
  module), each timed here at its real shape (``torch.mm``, same threads, best of 5) -> the
  events/s the machine would reach if the step were nothing but those products. Element-wise
  work (gates, layer norm, softmax) counts 0 FLOPs here, so the fraction shows its cost;
* **peak RSS** of the process (``resource.getrusage``), and the item table's size.

Prints a markdown table and writes ``--out`` (JSON, with the CPU from benchmarks.machine).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ["seqrnn", "seqrnn_re", "seqrnn_ln", "seqrnn_re_ln", "seqrnn_stack_re_ln", "hmlstm_re_ln"]


def _mm_seconds(m: int, k: int, n: int, reps: int = 7) -> float:
    """Wall time of one [m, k] @ [k, n] float32 product: best of ``reps`` timings, each a loop
    of enough products to last >= 20 ms (small products take microseconds)."""
    import torch

    a, b = torch.randn(m, k), torch.randn(k, n)
    out = torch.empty(m, n)
    torch.mm(a, b, out=out)
    t = time.perf_counter()
    torch.mm(a, b, out=out)
    loops = max(1, int(0.02 / max(time.perf_counter() - t, 1e-7)))
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        for _ in range(loops):
            torch.mm(a, b, out=out)
        best = min(best, (time.perf_counter() - t) / loops)
    return best


def compute_bound(cfg, n_items: int, rows: int, window: int) -> dict:
    """Events/s if a training step were only its matrix products (forward + 2x backward), each
    timed at its shape: per step ``rows`` sequences x ``window`` steps."""
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
    timed: dict[tuple, float] = {}
    secs = flops = 0.0
    for p in prods:
        if p not in timed:
            timed[p] = _mm_seconds(*p)
        secs += 3 * timed[p]
        flops += 3 * 2 * p[0] * p[1] * p[2]
    return {"events_per_s": M / secs, "flops_per_event": flops / M, "gflops_at_shapes": flops / secs / 1e9}


def one(name: str, split: str, variant: str, sequence: str, steps: int, threads: int, eval_sessions: int) -> dict:
    import numpy as np
    import torch

    from evaluation.loop import evaluate_sessions
    from training import registry
    from training.config import config_to_dict, resolve_config
    from training.data import read_events, read_item_index
    from training.family import TrainContext
    from training.optim import clip_grad_norm
    from training.trainer import AutogradRunner, table_support

    torch.set_num_threads(threads)
    cfg = resolve_config(variant, overrides={"sequence": sequence, "num_threads": threads, "device": "cpu"})
    index = read_item_index(split)
    data = read_events(split, "train_full", index, min_session_length=2)
    fam_cls = registry.get(variant)
    fam = fam_cls(cfg, TrainContext(index=index, data=data, support=table_support(data, index.n_items),
                                    device=torch.device("cpu")))
    fam.init_weights(torch.Generator().manual_seed(0))
    runner = AutogradRunner(fam, cfg, torch.device("cpu"))  # the trainer's optimizer and LR schedule
    opt, sched = runner.opt, runner.sched
    fam.model.train()
    it = iter(fam.batches(0))
    n_ev, t0, done = 0, None, 0
    for k in range(steps + 3):
        try:
            b = next(it)
        except StopIteration:
            break
        if k == 3:
            t0 = time.perf_counter()
        res = fam.loss(b)
        if res is None:
            continue
        loss, n = res
        loss.backward()
        if cfg.grad_clip > 0:
            clip_grad_norm(runner.params, cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        if k >= 3:
            n_ev += n
            done += 1
    train_s = time.perf_counter() - t0 if t0 is not None else float("nan")
    ckpt = {"model": variant, "config": config_to_dict(cfg), "state_dict": fam.state_dict(),
            "item_index": {"item_id": torch.from_numpy(index.item_ids)}}
    scorer = fam_cls.scorer(ckpt, torch.device("cpu"))
    test = read_events(split, "test", index, min_session_length=2)
    keep = np.arange(min(eval_sessions, test.n_sessions))
    ev_items = np.concatenate([test.items[test.offsets[s]:test.offsets[s + 1]] for s in keep])
    sub = type(test)(items=ev_items, offsets=np.r_[0, np.cumsum(np.diff(test.offsets)[keep])].astype(np.int64),
                     session_ids=test.session_ids[keep], start_ts=test.start_ts[keep],
                     user_ids=test.user_ids[keep] if test.user_ids is not None else None)
    er = evaluate_sessions(scorer, sub, n_slots=512)
    cb = compute_bound(cfg, index.n_items, min(cfg.batch_size, data.n_sessions), cfg.window)
    eps = n_ev / train_s if train_s > 0 else float("nan")
    return {"load_average": os.getloadavg()[0], "dataset": name, "variant": variant, "sequence": sequence, "n_items": index.n_items,
            "train_events": int(data.n_events), "steps_timed": done, "events_timed": n_ev,
            "train_events_per_s": eps, "compute_bound_events_per_s": cb["events_per_s"],
            "fraction_of_limit": eps / cb["events_per_s"], "flops_per_event": cb["flops_per_event"],
            "gflops_at_shapes": cb["gflops_at_shapes"], "eval_events_per_s": er.n_events / max(er.seconds, 1e-9),
            "eval_events": er.n_events, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "item_table_mb": index.n_items * cfg.embedding * 4 / 2**20 * (1 if cfg.tied else 2),
            "n_parameters": sum(p.numel() for p in fam.model.parameters()), "threads": threads}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", action="append", required=True, metavar="NAME=SPLIT_DIR[:session|user]")
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
    from benchmarks.machine import cpu_label

    rows = []
    for spec in a.data:
        name, _, rest = spec.partition("=")
        split, _, seq = rest.partition(":")
        for v in [v for v in a.variants.split(",") if v]:
            arg = json.dumps([name, split, v, seq or "session"])
            r = subprocess.run([sys.executable, "-m", "benchmarks.seqrnn_speed", "--data", spec, "--one", arg,
                                "--steps", str(a.steps), "--threads", str(a.threads),
                                "--eval-sessions", str(a.eval_sessions)],
                               cwd=ROOT, capture_output=True, text=True, check=True)
            rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
            print(f"{name} {v}: {rows[-1]['train_events_per_s']:,.0f} ev/s "
                  f"({rows[-1]['fraction_of_limit']:.0%} of {rows[-1]['compute_bound_events_per_s']:,.0f})",
                  file=sys.stderr)
    base = {r["dataset"]: r["train_events_per_s"] for r in rows if r["variant"] == "seqrnn"}
    lines = ["| data | variant | items | train ev/s | limit ev/s | fraction | vs GRU | eval ev/s | peak RSS MB |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        rel = r["train_events_per_s"] / base[r["dataset"]] if r["dataset"] in base else float("nan")
        lines.append(f"| {r['dataset']} | {r['variant']} | {r['n_items']:,} | {r['train_events_per_s']:,.0f} | "
                     f"{r['compute_bound_events_per_s']:,.0f} | {r['fraction_of_limit']:.0%} | {rel:.2f}x | "
                     f"{r['eval_events_per_s']:,.0f} | {r['peak_rss_mb']:,.0f} |")
    out = {"machine": cpu_label(), "date": time.strftime("%Y-%m-%d %H:%M"), "threads": a.threads,
           "load_average_after": os.getloadavg(),
           "command": "python -m benchmarks.seqrnn_speed " + " ".join(sys.argv[1:] if argv is None else argv),
           "rows": rows, "table": "\n".join(lines)}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=1))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
