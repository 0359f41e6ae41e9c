"""Training / evaluation speed and memory of Tan, Xu & Liu's models (issue 16), each as a
fraction of its compute-bound limit on the machine at hand, and the memory of M3's soft labels.

    python -m benchmarks.tan_speed --data rsc15-100k=SPLIT_DIR --data gen10M=SPLIT_DIR \
        [--models tan,tan_teacher,tan_distill,tan_emb] [--steps 40] [--min-seconds 0] [--rounds 1] [--threads 1] \
        [--eval-sessions 2000] [--set KEY=VALUE] [--work /tmp/bench/tan_speed] \
        [--out benchmarks/results/tan_speed.json]

``--data NAME=SPLIT_DIR`` (a split of ``spark_jobs.preprocess``). Models (``training.families.tan``):
``tan`` = M1; M2 is ``tan`` fine-tuned on ``train_recent_<k>`` (``--init-from``): the same family,
config and step (only the table and the starting weights differ), so its step cost is M1's and
it is not measured separately; ``tan_teacher`` = M3's teacher (M1 on the reversed futures);
``tan_distill`` = M3's student, whose every step also runs the frozen teacher; ``tan_emb`` = M4.
M3 and M4 need a source checkpoint (``teacher_run``, ``item_embeddings_from``): a randomly
initialised ``tan_teacher`` / ``tan`` of the split's item index is written in the trainer's
checkpoint format under ``--work`` (the weights do not matter for speed). ``--set`` applies to
every model and to the sources (e.g. ``hidden=1000``; ``softmax=sampled`` for ``tan`` /
``tan_teacher`` only: M3 and M4 refuse it). The family's default is the paper's full softmax
at any catalogue size (it never switches to the sampled one by itself).

For every dataset x model, in a fresh process (so peak RSS is that setting's own), with
``benchmarks.rnn_speed_common``:

* **rounds**: with ``--rounds R`` every setting runs R times, the settings taken round-robin;
  a row is the setting's fastest round (the JSON keeps every round's events/s and load);
* **training**: ``--steps`` optimizer steps (at least ``--min-seconds`` of them) of the real
  loop (``fam.batches`` -> ``fam.loss`` -> backward -> the trainer's ``AutogradRunner``
  optimizer and schedule) on ``train_full`` after 3 warm-up steps, crossing into the next
  epoch if needed; events/s = (prefix, label) examples / wall second (the ``n`` of
  ``fam.loss``: about ``batch_size`` = 512 a step);
* **compute-bound limit**: the events/s if a step were only its matrix products, each timed
  with ``torch.mm`` at its shape on this machine (2 FLOPs per multiply-add; a product with
  gradients costs its forward, a weight-gradient product ``[k, m] x [m, n]`` and an input-gradient
  product ``[m, n] x [n, k]``, each timed at that shape; ``limit (as fwd)`` in the JSON times the
  two backward products at the forward's shape, as ``seqrnn_speed`` does). The shapes are
  those of the MEAN timed batch (how the family batches: ``R`` rows -- one per session for
  its prefixes of <= max_len inputs, one per longer prefix --, ``rows_t`` of them still
  running at step t of the packed GRU, ``N`` examples read at (row, col)):

  - M1: GRU input products of all real inputs at once ``[sum(lengths), E] x [E, 3H]``; the
    recurrent product per step ``[rows_t, H] x [H, 3H]`` for t < max_len (19; no input
    gradient at t = 0: h_0 = 0 is a constant); the output ``[N, H] x [H, n_items]`` (full
    softmax) or ``[N, H] x [H, N + n_sample]`` (``softmax=sampled``: the batch's targets and the
    shared negatives);
  - M3 student: M1's products plus the teacher's forward only (no gradients) over its
    privileged rows (the same three kinds at the teacher's shapes, output ``[N_future, H] x
    [H, n_items]`` for the examples whose label has a future); the soft-label cross-entropy
    is element-wise (no product);
  - M4: the GRU (its input products need no input gradient: the item table E is fixed), the
    hidden layer ``[R*T, H] x [H, emb_hidden]`` and the output ``[R*T, emb_hidden] x
    [emb_hidden, d]`` -- the family applies its head to every padded position of the
    ``[R, T]`` rows, of which only N are read (``m4_head_positions`` vs ``events_per_step``
    in the JSON) -- and the cosine loss against ``E[targets]`` (element-wise: training has NO
    product over the n_items catalogue; only scoring has);

  element-wise work (gates, softmax, cross-entropy, Adam, gathers) counts 0 FLOPs, so the
  fraction is its cost;
* **evaluation**: the one evaluation loop (``evaluation.loop.evaluate_sessions``, full
  ranking, the family's scorer: a window of max_len inputs) on the first ``--eval-sessions``
  test sessions: events/s and microseconds of prediction per event;
* **memory**: RSS after building the family (data, model, optimizer, M3's teacher), after the
  warm-up steps and after the timed ones (/proc/self/statm), peak RSS after the training loop
  and at the end (``resource.getrusage``); for
  ``tan_distill`` the bytes of every soft-label tensor ``q = softmax(teacher / T)`` [examples
  with a future, n_items] float32 the step allocated (read off the tensor returned by the
  family's ``soft_labels``, wrapped here -- ``tan.py`` is not touched), max and mean over the
  timed steps, next to ``n_items x batch_size x 4`` (one batch) and to what all of the table's
  prefixes with a future would take held at once.

Prints a markdown table and writes ``--out`` (JSON: CPU label from ``benchmarks.machine``, the
1-minute load average per row -- the 2 cores may be shared: compare models within one run --,
command, rows).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from benchmarks.rnn_speed_common import (Product, build_family, eval_speed, fastest_rounds, markdown_table,
                                         peak_rss_mb, products_bound, rss_now_mb, run_in_processes, timed_steps, write_report)

ROOT = Path(__file__).resolve().parents[1]
MODELS = ["tan", "tan_distill", "tan_emb"]
PAPER_NAME = {"tan": "M1 (= M2's step)", "tan_teacher": "M3 teacher", "tan_distill": "M3", "tan_emb": "M4"}
SOURCES = {"tan_distill": ("teacher_run", "tan_teacher"), "tan_emb": ("item_embeddings_from", "tan")}


#: keys of the sampled softmax, not passed to the source checkpoints (M3 / M4 refuse them)
SOFTMAX_KEYS = ("softmax", "n_sample", "sample_alpha")


def make_source(work: Path, name: str, split: str, model: str, sets: list[str]) -> Path:
    """A randomly initialised ``model`` checkpoint (``tan_teacher`` or ``tan``) of ``split``'s
    item index, in the trainer's format: WORK/NAME/source-MODEL/model.pt."""
    import torch

    from training import checkpoint as ck
    from training.config import config_to_dict, resolve_config
    from training.data import read_item_index
    from training.families.tan import TanRNN

    index = read_item_index(split)
    cfg = resolve_config(model, overrides={"device": "cpu"},
                         sets=[s for s in sets if s.partition("=")[0].strip() not in SOFTMAX_KEYS])
    net = TanRNN(index.n_items, cfg.embedding, cfg.hidden)
    net.reset_parameters(torch.Generator().manual_seed(1))
    run = work / name / f"source-{model}"
    ck.save_checkpoint(run, {"model": model, "config": config_to_dict(cfg), "optimizer": {}, "epoch": 0,
                             "history": [], "state_dict": {k: v.detach().clone() for k, v in net.state_dict().items()},
                             "item_index": ck.item_index_to_ckpt(index)})
    return run


# ----------------------------------------------------------------------------- shapes
class BatchShapes:
    """Per timed batch: examples N, rows R, padded width T, rows still running at each GRU
    step, and the same for the teacher's privileged rows (M3)."""

    def __init__(self, max_len: int, teacher_max_len: int = 0):
        self.max_len, self.teacher_max_len = max_len, teacher_max_len
        self.n, self.rows, self.width, self.inputs, self.run = [], [], [], [], []
        self.t_n, self.t_inputs, self.t_run = [], [], []

    @staticmethod
    def _running(lengths, max_len: int):
        import numpy as np

        return (np.asarray(lengths)[:, None] > np.arange(max_len)).sum(0)

    def add(self, b) -> None:
        import numpy as np

        self.n.append(len(b.targets))
        self.rows.append(b.rows.inputs.shape[0])
        self.width.append(b.rows.inputs.shape[1])
        self.inputs.append(int(b.rows.lengths.sum()))
        self.run.append(self._running(b.rows.lengths, self.max_len))
        if self.teacher_max_len:
            t = getattr(b, "teacher", None)
            self.t_n.append(0 if t is None else len(t.row))
            self.t_inputs.append(0 if t is None else int(t.lengths.sum()))
            self.t_run.append(np.zeros(self.teacher_max_len, np.int64) if t is None
                              else self._running(t.lengths, self.teacher_max_len))

    def mean(self) -> dict:
        """The mean batch, counts rounded to integers."""
        import numpy as np

        def r(x):
            return int(round(float(np.mean(x)))) if len(x) else 0

        out = {"events_per_step": r(self.n), "rows_per_step": r(self.rows), "width": r(self.width),
               "inputs_per_step": r(self.inputs),
               "running_per_t": [int(round(v)) for v in np.mean(self.run, 0)] if self.run else [],
               "m4_head_positions": r(np.asarray(self.rows) * np.asarray(self.width)) if self.rows else 0}
        if self.teacher_max_len:
            out.update(teacher_examples_per_step=r(self.t_n), teacher_inputs_per_step=r(self.t_inputs),
                       teacher_running_per_t=[int(round(v)) for v in np.mean(self.t_run, 0)] if self.t_run else [])
        return out


def gru_products(inputs: int, running: list[int], E: int, H: int, grads: int, input_grads: int) -> list[Product]:
    """One GRU layer (torch.nn.GRU, packed): input products of all real inputs at once, the
    recurrent product [rows_t, H] x [H, 3H] per step (h_0 = 0 needs no input gradient)."""
    prods = [Product(inputs, E, 3 * H, min(grads, input_grads))]
    for t, rows in enumerate(running):
        if rows:
            prods.append(Product(rows, H, 3 * H, min(grads, 1 if t == 0 else 2)))
    return prods


def tan_products(model: str, cfg, n_items: int, shp: dict, teacher_cfg=None) -> list[Product]:
    """Every matrix product of the mean training step of ``model`` (module docstring)."""
    E, H, N = cfg.embedding, cfg.hidden, shp["events_per_step"]
    fixed_table = model == "tan_emb"
    prods = gru_products(shp["inputs_per_step"], shp["running_per_t"], E, H, 2, 1 if fixed_table else 2)
    if model == "tan_emb":
        P = shp["m4_head_positions"]
        prods += [Product(P, H, cfg.emb_hidden), Product(P, cfg.emb_hidden, E)]
        return prods
    if cfg.softmax == "sampled":
        prods.append(Product(N, H, N + cfg.n_sample))
    else:
        prods.append(Product(N, H, n_items))
    if model == "tan_distill":
        tE, tH = teacher_cfg.embedding, teacher_cfg.hidden
        prods += gru_products(shp["teacher_inputs_per_step"], shp["teacher_running_per_t"], tE, tH, 0, 0)
        prods.append(Product(shp["teacher_examples_per_step"], tH, n_items, 0))
    return prods


# ----------------------------------------------------------------------------- one setting
def one(name: str, split: str, model: str, source: str | None, sets: list[str], steps: int, min_seconds: float,
        threads: int, eval_sessions: int) -> dict:
    import numpy as np

    from training import checkpoint as ck
    from training.config import config_from_dict

    load_start = os.getloadavg()[0]
    over = {SOURCES[model][0]: source} if model in SOURCES else {}
    fam_cls, fam, cfg, index, data, runner = build_family(model, split, threads, over, sets=sets)
    rss_build = {"rss_after_build_mb": rss_now_mb(), "peak_rss_build_mb": peak_rss_mb()}
    teacher_cfg = None
    if model == "tan_distill":
        teacher_cfg = config_from_dict(ck.load_checkpoint(source)["config"])
    shapes = BatchShapes(cfg.max_len, teacher_cfg.max_len if teacher_cfg is not None else 0)
    state = {"timed": False}
    soft = []  # per timed step: (bytes of q, its storage bytes, rows of q, examples of the batch)
    if model == "tan_distill":
        orig = fam.soft_labels

        def soft_labels(b):  # the family's own method, its result measured
            q = orig(b)
            if state["timed"]:
                soft.append((0, 0, 0, len(b.targets)) if q is None else
                            (q.numel() * q.element_size(), q.untyped_storage().nbytes(), int(q.shape[0]),
                             len(b.targets)))
            return q

        fam.soft_labels = soft_labels

    def on_batch(b, timed):
        state["timed"] = timed
        if timed:
            shapes.add(b)

    tr = timed_steps(fam, cfg, runner, steps, min_seconds=min_seconds, on_batch=on_batch)
    shp = shapes.mean()
    prods = tan_products(model, cfg, index.n_items, shp, teacher_cfg)
    cache: dict = {}
    cb = products_bound(prods, shp["events_per_step"], backward="own", cache=cache)
    cb_fwd = products_bound(prods, shp["events_per_step"], backward="as_forward", cache=cache)
    ev = eval_speed(fam_cls, fam, cfg, model, index, split, eval_sessions)
    eps = tr["train_events_per_s"]
    lens = data.lengths
    row = {"load_average_start": load_start, "dataset": name, "model": model, "paper": PAPER_NAME.get(model, model),
           "n_items": index.n_items, "train_events": int(data.n_events), "train_sessions": int(data.n_sessions),
           "train_prefixes": int(np.maximum(lens - 1, 0).sum()), **rss_build, **tr, **shp,
           "softmax": None if model == "tan_emb" else cfg.softmax,
           "compute_bound_events_per_s": cb["events_per_s"], "fraction_of_limit": eps / cb["events_per_s"],
           "compute_bound_as_forward_events_per_s": cb_fwd["events_per_s"],
           "fraction_of_limit_as_forward": eps / cb_fwd["events_per_s"],
           "flops_per_event": cb["flops_per_event"], "gflops_at_shapes": cb["gflops_at_shapes"],
           "limit_step_seconds": cb["step_seconds"], "products": [[p.m, p.k, p.n, p.grads] for p in prods],
           **ev, "peak_rss_mb": peak_rss_mb(),
           "n_parameters": sum(p.numel() for p in fam.model.parameters() if p.requires_grad),
           "batch_size": cfg.batch_size, "hidden": cfg.hidden, "embedding": cfg.embedding, "max_len": cfg.max_len,
           "threads": threads, "sets": sets}
    if model == "tan_distill":
        b = np.array([s[0] for s in soft], np.float64)
        row.update(soft_label_bytes_max=float(b.max()) if len(b) else 0.0,
                   soft_label_bytes_mean=float(b.mean()) if len(b) else 0.0,
                   soft_label_storage_bytes_max=float(max((s[1] for s in soft), default=0)),
                   soft_label_rows_max=max((s[2] for s in soft), default=0),
                   soft_label_rows_mean=float(np.mean([s[2] for s in soft])) if soft else 0.0,
                   batch_examples_max=max((s[3] for s in soft), default=0),
                   soft_label_one_batch_bytes=float(index.n_items * cfg.batch_size * 4),
                   # every prefix whose label has a future (x_2..x_{n-1}), held at once
                   soft_label_all_prefixes_bytes=float(np.maximum(lens - 2, 0).sum()) * index.n_items * 4,
                   teacher_hidden=teacher_cfg.hidden, teacher_max_len=teacher_cfg.max_len,
                   teacher_source="random initialisation (weights do not matter for speed)")
    if model == "tan_emb":
        row["item_embeddings_source"] = "random initialisation of a tan checkpoint (weights do not matter for speed)"
    row["load_average"] = os.getloadavg()[0]
    return row


# ----------------------------------------------------------------------------- report
def _mb(x: float) -> str:
    return f"{x / 2**20:,.1f}"


def tables(rows: list[dict]) -> str:
    base = {r["dataset"]: r["train_events_per_s"] for r in rows if r["model"] == "tan"}

    def rel(r):
        return r["train_events_per_s"] / base[r["dataset"]] if r["dataset"] in base else float("nan")

    speed = markdown_table(rows, [
        ("data", lambda r: r["dataset"], "l"), ("model", lambda r: f"{r['paper']} `{r['model']}`", "l"),
        ("items", lambda r: f"{r['n_items']:,}", "r"), ("ex./step", lambda r: f"{r['events_per_step']:,}", "r"),
        ("steps", lambda r: f"{r['steps_timed']:,}", "r"),
        ("train ev/s", lambda r: f"{r['train_events_per_s']:,.0f}", "r"),
        ("all rounds", lambda r: ", ".join(f"{x:,.0f}" for x in r.get("rounds_train_events_per_s", [])), "r"),
        ("limit ev/s", lambda r: f"{r['compute_bound_events_per_s']:,.0f}", "r"),
        ("fraction", lambda r: f"{r['fraction_of_limit']:.0%}", "r"),
        ("vs M1", lambda r: f"{rel(r):.2f}x", "r"),
        ("eval ev/s", lambda r: f"{r['eval_events_per_s']:,.0f}", "r"),
        ("µs / prediction", lambda r: f"{r['predict_us_per_event']:,.0f}", "r"),
        ("peak RSS MB train / end", lambda r: f"{r['peak_rss_train_mb']:,.0f} / {r['peak_rss_mb']:,.0f}", "r"),
        ("load start / end", lambda r: f"{r['load_average_start']:.2f} / {r['load_average']:.2f}", "r")])
    m3 = [r for r in rows if r["model"] == "tan_distill"]
    if not m3:
        return speed
    m1 = {r["dataset"]: r for r in rows if r["model"] == "tan"}

    def rss(r):
        if r is None:
            return "—"
        return (f"{r['rss_after_build_mb']:,.0f} -> {r['rss_after_warmup_mb']:,.0f} -> "
                f"{r['rss_after_train_mb']:,.0f} ({r['peak_rss_train_mb']:,.0f})")

    mem = markdown_table(m3, [
        ("data", lambda r: r["dataset"], "l"), ("items", lambda r: f"{r['n_items']:,}", "r"),
        ("q rows max / mean (batch ex. max)",
         lambda r: f"{r['soft_label_rows_max']:,} / {r['soft_label_rows_mean']:,.0f} ({r['batch_examples_max']:,})", "r"),
        ("q MB max / mean", lambda r: f"{_mb(r['soft_label_bytes_max'])} / {_mb(r['soft_label_bytes_mean'])}", "r"),
        ("n_items x batch x 4 MB", lambda r: _mb(r["soft_label_one_batch_bytes"]), "r"),
        ("all prefixes' q MB", lambda r: f"{_mb(r['soft_label_all_prefixes_bytes']):s}", "r"),
        ("RSS MB built -> warm -> trained (peak), M1", lambda r: rss(m1.get(r["dataset"])), "r"),
        ("same, M3", rss, "r")])
    return speed + "\n\nM3 soft labels (per timed step):\n\n" + mem


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", action="append", metavar="NAME=SPLIT_DIR", help="required (repeatable)")
    ap.add_argument("--models", default=",".join(MODELS), help="of tan, tan_teacher, tan_distill, tan_emb")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--min-seconds", type=float, default=0.0, help="time more than --steps steps until this long")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=1,
                    help="run every setting this many times, round-robin; report each setting's fastest round")
    ap.add_argument("--eval-sessions", type=int, default=2000)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override, every model")
    ap.add_argument("--work", default="/tmp/bench/tan_speed", help="source checkpoints of M3 / M4")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "tan_speed.json"))
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: one setting, JSON on stdout
    a = ap.parse_args(argv)
    sets = a.set
    if a.one:
        name, split, model, source = json.loads(a.one)
        print(json.dumps(one(name, split, model, source, sets, a.steps, a.min_seconds, a.threads, a.eval_sessions)))
        return 0
    if not a.data:
        ap.error("--data NAME=SPLIT_DIR is required")
    models = [m for m in a.models.split(",") if m]
    bad = [m for m in models if m not in PAPER_NAME]
    if bad:
        ap.error(f"--models: {bad} not of {list(PAPER_NAME)}")
    settings = []
    for spec in a.data:
        name, sep, split = spec.partition("=")
        if not sep or not Path(split, "train_full").exists():
            ap.error(f"--data {spec!r}: expected NAME=SPLIT_DIR with SPLIT_DIR/train_full")
        for m in models:
            src = str(make_source(Path(a.work), name, split, SOURCES[m][1], sets)) if m in SOURCES else None
            settings.append([name, split, m, src])
    t0 = time.time()
    args = ["--steps", str(a.steps), "--min-seconds", str(a.min_seconds), "--threads", str(a.threads),
            "--eval-sessions", str(a.eval_sessions)] + [x for s in a.set for x in ("--set", s)]
    runs = run_in_processes("benchmarks.tan_speed", [s for _ in range(a.rounds) for s in settings], args,
                            lambda r: f"{r['dataset']} {r['model']}: {r['train_events_per_s']:,.0f} ev/s "
                                      f"({r['fraction_of_limit']:.0%} of {r['compute_bound_events_per_s']:,.0f}), "
                                      f"{r['steps_timed']} steps in {r['train_seconds']:.0f} s, "
                                      f"load {r['load_average_start']:.2f}")
    rows = fastest_rounds(runs)
    table = tables(rows)
    write_report(a.out, "python -m benchmarks.tan_speed " + " ".join(sys.argv[1:] if argv is None else argv),
                 a.threads, rows, table, wall_s=time.time() - t0, rounds=a.rounds,
                 m2="M2 = tan fine-tuned on train_recent_<k> (--init-from): same family, config and step as M1 "
                    "(only the table and the starting weights differ); its step cost is M1's, not re-measured")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
