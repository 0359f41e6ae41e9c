"""Issue 13: every official GRU4Rec best setting -- speed, compute-bound limit, memory, accuracy.

For each of the six best parameter files of the official GRU4Rec_PyTorch_Official repository
(``paramfiles/``: rsc15 xe 100, yoochoose xe, rees46 xe, retailrocket / diginetica / coveo
bpr-max), mapped key by key onto ``GRU4RecConfig`` (:data:`KEY_MAP`, :func:`our_config`), this
script trains on SPLIT_DIR's ``train_full`` with this project and with the official code (a
scratch checkout, run from there and never copied here: its license forbids reuse), same data,
epochs, seed and thread count, one run after the other, interleaved per setting (the order of the
two codes alternates from one setting to the next), and evaluates each run on ``test`` (full
ranking over the training items, conservative ties; this project's ``evaluation.evaluate`` for our
runs, the official ``run.py -l -t ... -e conservative`` for the official ones). Each training and
each evaluation is its own child process: its peak RSS is ``ru_maxrss`` from ``os.wait4``.

    python -m benchmarks.gru4rec_settings                         # SPLIT_DIR /tmp/rsc15split/splits/time
    python -m benchmarks.gru4rec_settings --split SPLIT_DIR --official /tmp/official --threads 2 \\
        --epochs 10 --work /tmp/gru4rec_settings --out benchmarks/results/gru4rec_settings.json
    python -m benchmarks.gru4rec_settings --report-only           # JSON + table from the records file

Speed: training events/s per epoch (this project: ``history.json``; official: its printed epoch
seconds, with the true events of the epoch = rows - sessions of its training TSV, not its printed
``e/s``, which counts every step as a full batch); the figure reported is the median over the
steady-state epochs 2..E. ``*_pooled`` in the summary = the same epochs as one figure (their events
over their seconds): the official code refills its sample store (10M ids) every
10,000,000 / n_sample steps, which slows one epoch in three at batch 32; the median leaves such
epochs out, the pooled figure counts them. Evaluation events/s: this project's ``eval_seconds``
(the scoring loop) and the official "Evaluation took" (its ``batch_eval``, printed to 0.01 s:
at ~0.1 s that figure is good to ~5%), each over the 10,152 test predictions.

FLOP model (:func:`step_products`, :func:`flops_per_step`): the matrix products one full-batch
training step really needs, forward + backward, 2 FLOPs per multiply-add, for batch B, GRU layers
H_1..H_L, n_sample S extra negatives, tied embedding (the input of layer 1 is an item row of the
output table, of size H_L):

* each GRU layer i (input size I_i = H_L for i = 1 with a tied embedding, H_{i-1} above):
  - input product  x·W_ihᵀ  [B, I_i] x [I_i, 3H_i]: forward, weight gradient, and input gradient
    (the input is a trained embedding row or the layer below): 3 x 2·B·I_i·3H_i;
  - hidden product h·W_hhᵀ  [B, H_i] x [H_i, 3H_i]: forward and weight gradient only -- GRU4Rec
    does not backpropagate through time (the carried state is a constant), so there is no
    gradient into the previous hidden state: 2 x 2·B·H_i·3H_i;
* output scores against the B in-batch targets + S sampled items, out·Wy[cols]ᵀ
  [B, H_L] x [H_L, B+S]: forward, dOut = dS·Wy[cols] and dWy[cols] = dSᵀ·out: 3 x 2·B·H_L·(B+S).

(A separate embedding of size E would make I_1 = E; a one-hot input makes layer 1's input product
a row gather, 0 FLOPs.) Element-wise work (gates, softmax, the optimizer) and gathers are not
counted: the limit is what the products alone would allow. This project scores only the U unique
rows of [targets, samples] (U < B+S), so it can in principle beat this "limit" on the output part.

Compute-bound limit: every product above (each backward product at its own shape) is timed with
``torch.mm`` on this machine at the same thread count as the runs (best of 7 loops of >= 20 ms,
``benchmarks.rnn_speed_common.mm_seconds``), right before each code's run, so each code is measured
against the limit of its own moment ("limit drift": how far the two timings of a setting differ;
the products' rates drift on a shared VM), and limit events/s = B / Σ_products (FLOPs_p / rate_p)
= B / Σ_products seconds_p. Tail steps (the batch shrinking at the end of an epoch) are charged
nothing extra; ``full_batch_share`` in the records (events / (steps·B)) says how much of an epoch
ran at a smaller batch. The same limit with each product timed on ONE thread and multiplied by the
thread count (``limit_1t_x_threads``) is recorded too: this project's whole-step path runs
independent single-threaded products on the two cores, where two-thread ``torch.mm`` on these
skinny shapes can be slower than that.

Evaluation limit (:func:`eval_products`): both codes score 512 test sessions per step: per
layer the input and hidden products [512, I_i] x [I_i, 3H_i] and [512, H_i] x [H_i, 3H_i], then
the full-catalogue scores [512, H_L] x [H_L, n_items], forward only; timed the same way, limit
events/s = 512 / Σ seconds. The official evaluation already computes exactly these products, so
``eval limit / official`` is the most ANY implementation of the same full ranking could gain over
it at fp32 on this CPU (ranking, gathers and gates counted as free).

Optimizer traffic (:func:`optimizer_floor`): the products-only limit charges nothing for the
optimizer, but IndexedAdagrad(+momentum), the official optimizer, must read and write each weight
and its accumulator (and momentum) every step it updates them: the whole dense GRU block
(:func:`dense_params`) and the expected number of distinct output rows a step touches
(:func:`expected_unique_rows`: inputs and targets at the training events' item frequencies,
negatives at support^sample_alpha). Those bytes (:func:`optimizer_bytes`) at the stream bandwidth
measured here with ``torch.add`` on arrays of the same total size give its time per step; "limit
with optimizer" = B / (products + that time). A model, not a bound (a code could overlap the update
with other work); it says how much of the gap to the products-only limit is the update's memory
traffic alone.

Goals checked per setting (issue 13): this project >= 70% of the limit; never slower than the
official code; >= 4x the official code on the rsc15 setting; evaluation >= 3x the official.
Training memory against the data size: ``benchmarks/gru4rec_memory.py``.

The official side: the scratch checkout (commit recorded) carries the patches described in
benchmarks/README_gru4rec.md (``LC_SEED`` / ``LC_THREADS`` seeding and thread count, float32 init
under NumPy 2, per-step loss logging); its model is saved with ``-s`` and evaluated by a second
``run.py -l`` process (``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1``: it pickles the whole GRU4Rec object).
``/tmp/measure_stop`` appearing stops the measurement at once (the running child is terminated);
what was recorded stays in the records file.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.gru4rec_loss_settings_accuracy import OFFICIAL_COMMIT, write_tsvs
from benchmarks.machine import cpu_label
from benchmarks.rnn_speed_common import Product, loop_seconds, mm_seconds

ROOT = Path(__file__).resolve().parents[1]
STOP_FILE = Path("/tmp/measure_stop")

#: the six official best files (GRU4Rec_PyTorch_Official @ d1fc311, paramfiles/), values verbatim;
#: checked against the checkout's files at run time (:func:`check_paramfiles`)
OFFICIAL_BEST = {
    "rsc15": ("rsc15_xe_shared_100_best.py", dict(
        loss="cross-entropy", constrained_embedding=True, embedding=0, elu_param=0, layers=[100], n_epochs=10,
        batch_size=32, dropout_p_embed=0.0, dropout_p_hidden=0.4, learning_rate=0.2, momentum=0.2, n_sample=2048,
        sample_alpha=0.5, bpreg=0.0, logq=1.0)),
    "yoochoose": ("yoochoose_xe_shared_best.py", dict(
        loss="cross-entropy", constrained_embedding=True, embedding=0, elu_param=0, layers=[480], n_epochs=10,
        batch_size=48, dropout_p_embed=0.0, dropout_p_hidden=0.2, learning_rate=0.07, momentum=0.0, n_sample=2048,
        sample_alpha=0.2, bpreg=0.0, logq=1.0)),
    "rees46": ("rees46_xe_shared_best.py", dict(
        loss="cross-entropy", constrained_embedding=True, embedding=0, elu_param=0, layers=[512], n_epochs=10,
        batch_size=240, dropout_p_embed=0.45, dropout_p_hidden=0.0, learning_rate=0.065, momentum=0.0,
        n_sample=2048, sample_alpha=0.5, bpreg=0.0, logq=1.0)),
    "retailrocket": ("retailrocket_bprmax_shared_best.py", dict(
        loss="bpr-max", constrained_embedding=True, embedding=0, elu_param=0.5, layers=[224], n_epochs=10,
        batch_size=80, dropout_p_embed=0.5, dropout_p_hidden=0.05, learning_rate=0.05, momentum=0.4, n_sample=2048,
        sample_alpha=0.4, bpreg=1.95, logq=0.0)),
    "diginetica": ("diginetica_bprmax_shared_best.py", dict(
        loss="bpr-max", constrained_embedding=True, embedding=0, elu_param=1, layers=[512], n_epochs=10,
        batch_size=128, dropout_p_embed=0.5, dropout_p_hidden=0.3, learning_rate=0.05, momentum=0.15,
        n_sample=2048, sample_alpha=0.3, bpreg=0.9, logq=0.0)),
    "coveo": ("coveo_bprmax_shared_best.py", dict(
        loss="bpr-max", constrained_embedding=True, embedding=0, elu_param=1, layers=[512], n_epochs=10,
        batch_size=144, dropout_p_embed=0.35, dropout_p_hidden=0.0, learning_rate=0.05, momentum=0.4,
        n_sample=2048, sample_alpha=0.2, bpreg=1.85, logq=0.0)),
}
#: measurement order: the issue's headline setting first, then by cost
SETTING_ORDER = ["rsc15", "retailrocket", "yoochoose", "diginetica", "coveo", "rees46"]

#: official key -> our GRU4RecConfig key, and how the value maps
KEY_MAP = [
    ("loss", "loss", "same names (cross-entropy, bpr-max)"),
    ("constrained_embedding", "embedding", "True (+ embedding 0) -> tied"),
    ("embedding", "embedding / embedding_dim", "0 with constrained_embedding -> tied (no separate table)"),
    ("elu_param", "final_act", "bpr-max: elu-<elu_param>; cross-entropy: unused by the official xe loss "
                               "(it applies no activation before its softmax) -> softmax"),
    ("layers", "layers", "same"),
    ("n_epochs", "n_epochs", "same (the runs may use fewer: --epochs)"),
    ("batch_size", "batch_size", "same"),
    ("dropout_p_embed", "dropout_embed", "same (drop probability)"),
    ("dropout_p_hidden", "dropout_hidden", "same (drop probability)"),
    ("learning_rate", "learning_rate", "same; optimizer adagrad (official IndexedAdagradM, eps 1e-6 = adagrad_eps)"),
    ("momentum", "momentum", "same (official IndexedAdagradM momentum; ours: nesterov false)"),
    ("n_sample", "n_sample", "same"),
    ("sample_alpha", "sample_alpha", "same"),
    ("bpreg", "bpreg", "same (0 for cross-entropy: unused)"),
    ("logq", "logq", "same (0 for bpr-max: unused)"),
    ("(run.py -ss, not in the file) sample_cache_max_size 10,000,000", "sample_store_size",
     "10,000,000 (our default; no effect since the negatives are drawn per chunk from a counter stream, training.rng)"),
    ("(fit default) compatibility_mode=True: NumPy-seeded init", "seed (partly)",
     "same distribution (Glorot-uniform per gate block, zero biases), but NO EQUIVALENT of its NumPy random "
     "stream: the same seed gives other initial weights in the two codes"),
    ("(iterator default) session_order time", "session_order", "time (our default)"),
]


def read_paramfile(official: Path, fname: str) -> dict:
    """``gru4rec_params`` of an official parameter file (a Python file with one OrderedDict)."""
    ns: dict = {}
    exec(compile((official / "paramfiles" / fname).read_text(), fname, "exec"), ns)
    return dict(ns["gru4rec_params"])


def check_paramfiles(official: Path) -> None:
    for name, (fname, params) in OFFICIAL_BEST.items():
        got = read_paramfile(official, fname)
        if got != params:
            raise SystemExit(f"{name}: {official}/paramfiles/{fname} differs from OFFICIAL_BEST:\n{got}\n{params}")


def our_config(p: dict) -> dict:
    """GRU4RecConfig values (typed, for a JSON --config file) of an official parameter set."""
    if p["constrained_embedding"]:
        emb = {"embedding": "tied"}
    elif p["embedding"]:
        emb = {"embedding": "separate", "embedding_dim": int(p["embedding"])}
    else:
        emb = {"embedding": "onehot"}
    if p["loss"] == "cross-entropy":
        act = "softmax"
    else:
        act = f"elu-{p['elu_param']:g}" if p["elu_param"] > 0 else "linear"
    return {"loss": p["loss"], **emb, "final_act": act, "layers": list(p["layers"]), "n_epochs": int(p["n_epochs"]),
            "batch_size": int(p["batch_size"]), "dropout_embed": float(p["dropout_p_embed"]),
            "dropout_hidden": float(p["dropout_p_hidden"]), "optimizer": "adagrad",
            "learning_rate": float(p["learning_rate"]), "momentum": float(p["momentum"]),
            "n_sample": int(p["n_sample"]), "sample_alpha": float(p["sample_alpha"]), "bpreg": float(p["bpreg"]),
            "logq": float(p["logq"]), "sample_store_size": 10_000_000, "session_order": "time"}


def official_param_string(p: dict, epochs: int) -> str:
    """run.py ``-ps`` string: the file's values verbatim (lists joined with /), n_epochs replaced."""
    q = dict(p, n_epochs=epochs)
    return ",".join(f"{k}={'/'.join(map(str, v)) if isinstance(v, list) else v}" for k, v in q.items())


# ---- the FLOP model ----------------------------------------------------------------------

def step_products(layers: list[int], batch: int, n_sample: int, embedding: str = "tied",
                  embedding_dim: int = 0) -> list[tuple[str, Product]]:
    """(label, Product) of one full-batch training step (module docstring). ``Product.grads``:
    2 = weight and input gradient, 1 = weight gradient only (the hidden product: no BPTT)."""
    B, H = batch, list(layers)
    prods = []
    for i, h in enumerate(H):
        if i == 0:
            n_in = H[-1] if embedding == "tied" else embedding_dim if embedding == "separate" else 0
        else:
            n_in = H[i - 1]
        if n_in:
            prods.append((f"layer{i + 1} input [B,{n_in}]x[{n_in},3x{h}]", Product(B, n_in, 3 * h, 2)))
        prods.append((f"layer{i + 1} hidden [B,{h}]x[{h},3x{h}] (no grad into h)", Product(B, h, 3 * h, 1)))
    prods.append((f"scores [B,{H[-1]}]x[{H[-1]},B+{n_sample}]", Product(B, H[-1], B + n_sample, 2)))
    return prods


def eval_products(layers: list[int], n_items: int, rows: int = 512) -> list[tuple[str, Product]]:
    """(label, Product) of one evaluation step of ``rows`` events (both codes score 512 test
    sessions at a time): each GRU layer's input and hidden products (forward only; the tied
    embedding's input is an item row of size H_L) and the full-catalogue scores [rows, H_L] x
    [H_L, n_items]. Ranking, gathers and the gates are not counted."""
    prods = []
    for i, h in enumerate(layers):
        n_in = layers[-1] if i == 0 else layers[i - 1]
        prods.append((f"layer{i + 1} input [R,{n_in}]x[{n_in},3x{h}]", Product(rows, n_in, 3 * h, 0)))
        prods.append((f"layer{i + 1} hidden [R,{h}]x[{h},3x{h}]", Product(rows, h, 3 * h, 0)))
    prods.append((f"scores [R,{layers[-1]}]x[{layers[-1]},{n_items} items]", Product(rows, layers[-1], n_items, 0)))
    return prods


def product_flops(p: Product) -> int:
    """Forward + the gradient products taken through it: (1 + grads) x 2·m·k·n."""
    return (1 + p.grads) * 2 * p.m * p.k * p.n


def flops_per_step(layers: list[int], batch: int, n_sample: int, embedding: str = "tied",
                   embedding_dim: int = 0) -> int:
    return sum(product_flops(p) for _, p in step_products(layers, batch, n_sample, embedding, embedding_dim))


def dense_params(layers: list[int], embedding_in: int) -> int:
    """GRU weights and biases (the dense block the optimizer updates in full every step): per
    layer W_ih [3H, I], W_hh [3H, H], b_ih and b_hh [3H]; I = ``embedding_in`` for layer 1."""
    n, i_in = 0, embedding_in
    for h in layers:
        n += 3 * h * i_in + 3 * h * h + 6 * h
        i_in = h
    return n


def expected_unique_rows(event_p: np.ndarray, sample_p: np.ndarray, batch: int, n_sample: int) -> float:
    """Expected number of distinct output rows one step touches: the B inputs and B targets (each
    an item with the training events' frequencies ``event_p``) and the n_sample negatives (drawn
    with ``sample_p``), all independent: sum over items of 1 - P(item drawn by none of them)."""
    miss = (1.0 - sample_p) ** n_sample * (1.0 - event_p) ** (2 * batch)
    return float(np.sum(1.0 - miss))


def optimizer_bytes(n_dense: int, unique_rows: float, width: int, momentum: bool) -> float:
    """Bytes the Adagrad(+momentum) update must read and write per step at the least: the weight
    and its accumulator (and momentum), float32, each read once and written once, over the dense
    block and the touched output rows (width floats + the bias). The gradient is not counted (an
    update fused into its product need not store it)."""
    per = 4 * 2 * (3 if momentum else 2)
    return per * (n_dense + unique_rows * (width + 1))


def stream_bandwidth(nbytes: float, threads: int) -> float:
    """Bytes/s of ``torch.add(a, b, out=a)`` (read a and b, write a: 12 B per float) on float32
    arrays of ``nbytes`` in all, at ``threads`` threads (:func:`loop_seconds`)."""
    import torch

    torch.set_num_threads(threads)
    n = max(1 << 14, int(nbytes / 8))
    a, b = torch.rand(n), torch.rand(n)
    return 12 * n / loop_seconds(lambda: torch.add(a, b, out=a))


def item_distributions(split: Path, sample_alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """(training events' item frequencies, negatives' distribution support^sample_alpha) of
    SPLIT_DIR's ``train_full``."""
    from training.data import read_events, read_item_index, table_support

    idx = read_item_index(split)
    sup = np.asarray(table_support(read_events(split, "train_full", idx), idx.n_items), float)
    sample_p = sup ** sample_alpha
    return sup / sup.sum(), sample_p / sample_p.sum()


def optimizer_floor(p: dict, event_p: np.ndarray, sample_p: np.ndarray, threads: int, limit: dict) -> dict:
    """The optimizer's state traffic per step (:func:`optimizer_bytes`) at the stream bandwidth
    measured here on arrays of that size, and the limit with it added to the products' time."""
    H = p["layers"][-1]
    u = expected_unique_rows(event_p, sample_p, p["batch_size"], p["n_sample"])
    nbytes = optimizer_bytes(dense_params(p["layers"], H), u, H, p["momentum"] > 0)
    bw = stream_bandwidth(nbytes, threads)
    sec = nbytes / bw
    return {"expected_unique_rows": u, "bytes_per_step": nbytes, "stream_bytes_per_s": bw, "seconds": sec,
            "limit_with_optimizer_events_per_s": p["batch_size"] / (limit["limit_step_seconds"] + sec)}


def measure_limit(prods: list[tuple[str, Product]], batch: int, threads: int, cache: dict) -> dict:
    """Limit events/s at ``threads`` torch threads (the brief's definition) and with each product
    on one thread x ``threads`` (both cores busy with independent products). ``cache``: (threads,
    m, k, n) -> seconds."""
    import torch

    out = {}
    for label, t in (("limit", threads), ("limit_1t", 1)):
        torch.set_num_threads(t)
        secs, parts = 0.0, []
        for name, p in prods:
            for s in p.shapes("own"):
                key = (t, *s)
                if key not in cache:
                    cache[key] = mm_seconds(*s)
                secs += cache[key]
                parts.append({"product": name, "shape": list(s), "seconds": cache[key],
                              "gflop_s": 2 * s[0] * s[1] * s[2] / cache[key] / 1e9})
        out[f"{label}_events_per_s"] = batch / secs
        out[f"{label}_step_seconds"] = secs
        out[f"{label}_products"] = parts
    torch.set_num_threads(threads)
    out["limit_1t_x_threads_events_per_s"] = out.pop("limit_1t_events_per_s") * threads
    flops = sum(product_flops(p) for _, p in prods)
    out["gflop_s_at_shapes"] = flops / out["limit_step_seconds"] / 1e9
    return out


# ---- child processes ---------------------------------------------------------------------

class Stopped(Exception):
    pass


def machine_state() -> dict:
    up = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    return {"uptime": up, "loadavg": list(os.getloadavg())}


def run_child(cmd: list[str], cwd: Path, env: dict, log: Path) -> dict:
    """Run ``cmd`` to completion (stdout + stderr to ``log``); its wall seconds, CPU seconds and
    peak RSS (``ru_maxrss`` of this child alone, from ``os.wait4``). Terminates it and raises
    :class:`Stopped` if STOP_FILE appears."""
    log.parent.mkdir(parents=True, exist_ok=True)
    before = machine_state()
    with open(log, "w") as f:
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT)
        while True:
            pid, status, ru = os.wait4(p.pid, os.WNOHANG)
            if pid:
                break
            if STOP_FILE.exists():
                p.terminate()
                os.wait4(p.pid, 0)
                p.returncode = -15
                raise Stopped(f"{STOP_FILE} appeared during {' '.join(cmd)}")
            time.sleep(0.5)
        wall = time.perf_counter() - t0
    p.returncode = os.waitstatus_to_exitcode(status)
    return {"rc": p.returncode, "wall_seconds": round(wall, 2), "cpu_seconds": round(ru.ru_utime + ru.ru_stime, 2),
            "peak_rss_mb": round(ru.ru_maxrss / 1024, 1), "machine_before": before, "machine_after": machine_state()}


def child_env(threads: int, **extra) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), **extra)
    env.pop("LC_OUT", None)
    return env


def median_steady(per_epoch: list[float]) -> float:
    """Median over epochs 2..E (all of them when there is one epoch)."""
    return statistics.median(per_epoch[1:] if len(per_epoch) > 1 else per_epoch)


def tsv_events(path: Path) -> tuple[int, int]:
    """(rows, sessions) of an official-format TSV: an epoch / a test pass has rows - sessions events."""
    import pandas as pd
    d = pd.read_csv(path, sep="\t", usecols=["SessionId"])
    return len(d), int(d.SessionId.nunique())


def run_ours(name: str, split: Path, epochs: int, threads: int, seed: int, work: Path) -> dict:
    d = work / f"ours_{name}_e{epochs}"
    d.mkdir(parents=True, exist_ok=True)
    cfg = our_config(OFFICIAL_BEST[name][1])
    (d / "config.json").write_text(json.dumps(cfg, indent=1))
    sets = [f"seed={seed}", f"num_threads={threads}", f"n_epochs={epochs}"]
    train_cmd = [sys.executable, "-m", "training.train", "--model", "gru4rec", "--data", str(split),
                 "--out", str(d / "run"), "--config", str(d / "config.json"), "--no-progress"] + \
        [a for s in sets for a in ("--set", s)]
    env = child_env(threads)
    tr = run_child(train_cmd, ROOT, env, d / "train.log")
    if tr["rc"]:
        raise SystemExit(f"ours {name}: training failed, see {d / 'train.log'}")
    hist = json.loads((d / "run" / "history.json").read_text())["epochs"]
    eval_cmd = [sys.executable, "-m", "evaluation.evaluate", "--model-dir", str(d / "run"), "--data", str(split),
                "--out", str(d / "eval")]
    ev = run_child(eval_cmd, ROOT, env, d / "eval.log")
    if ev["rc"]:
        raise SystemExit(f"ours {name}: evaluation failed, see {d / 'eval.log'}")
    m = json.loads((d / "eval" / "metrics.json").read_text())
    per = [h["events_per_s"] for h in hist]
    return {"train_path": hist[-1].get("train_path"), "config": cfg,
            "epoch_events": [h["events"] for h in hist], "epoch_steps": [h["steps"] for h in hist],
            "epoch_seconds": [round(h["seconds"], 3) for h in hist], "epoch_events_per_s": [round(v, 1) for v in per],
            "train_events_per_s": round(median_steady(per), 1), "final_loss": hist[-1]["loss"],
            "recall_at_20": m["recall_at_20"], "mrr_at_20": m["mrr_at_20"], "eval_events": m["n_events"],
            "eval_seconds": m["eval_seconds"], "eval_events_per_s": round(m["eval_events_per_s"], 1),
            "ties": m["ties"], "n_items_ranked": m["n_items_ranked"],
            "peak_rss_train_mb": tr["peak_rss_mb"], "peak_rss_eval_mb": ev["peak_rss_mb"],
            "train_process": tr, "eval_process": ev,
            "command": " ".join(train_cmd[1:]).replace(str(d), "RUN") + " && " +
                       " ".join(eval_cmd[1:]).replace(str(d), "RUN") + f"  (OMP_NUM_THREADS={threads})"}


EPOCH_RE = re.compile(r"Epoch(\d+) --> loss: ([0-9.eE+-]+|nan)\s+\(([0-9.]+)s\)\s+\[([0-9.]+) mb/s \| ([0-9.]+) e/s\]")


def run_official(name: str, split: Path, epochs: int, threads: int, seed: int, work: Path, official: Path,
                 tsv_dir: Path) -> dict:
    d = work / f"official_{name}_e{epochs}"
    d.mkdir(parents=True, exist_ok=True)
    train_tsv, test_tsv = write_tsvs(split, tsv_dir)
    rows, sessions = tsv_events(train_tsv)
    trows, tsessions = tsv_events(test_tsv)
    model = d / "model.pt"
    ps = official_param_string(OFFICIAL_BEST[name][1], epochs)
    env = child_env(threads, LC_SEED=str(seed), LC_THREADS=str(threads), TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD="1")
    train_cmd = [sys.executable, "run.py", str(train_tsv), "-ps", ps, "-d", "cpu", "-s", str(model)]
    tr = run_child(train_cmd, official, env, d / "train.log")
    out = (d / "train.log").read_text()
    if tr["rc"] or "Total training time" not in out:
        raise SystemExit(f"official {name}: training failed, see {d / 'train.log'}")
    ep = [(float(m.group(3)), float(m.group(4)), float(m.group(2))) for m in EPOCH_RE.finditer(out)]
    events = rows - sessions
    per = [events / s for s, _, _ in ep]
    eval_cmd = [sys.executable, "run.py", str(model), "-l", "-t", str(test_tsv), "-m", "20", "-e", "conservative",
                "-d", "cpu"]
    ev = run_child(eval_cmd, official, env, d / "eval.log")
    eo = (d / "eval.log").read_text()
    m = re.search(r"Recall@20: ([0-9.]+) MRR@20: ([0-9.]+)", eo)
    t = re.search(r"Evaluation took ([0-9.]+)s", eo)
    if ev["rc"] or not m:
        raise SystemExit(f"official {name}: evaluation failed, see {d / 'eval.log'}")
    eval_secs = float(t.group(1))
    t_ev = trows - tsessions
    model.unlink(missing_ok=True)
    return {"epoch_events": [events] * len(ep), "epoch_steps": [round(mbs * s) for s, mbs, _ in ep],
            "epoch_seconds": [s for s, _, _ in ep], "epoch_events_per_s": [round(v, 1) for v in per],
            "train_events_per_s": round(median_steady(per), 1), "final_loss": ep[-1][2] if ep else None,
            "recall_at_20": float(m.group(1)), "mrr_at_20": float(m.group(2)), "eval_events": t_ev,
            "eval_seconds": eval_secs, "eval_events_per_s": round(t_ev / eval_secs, 1) if eval_secs > 0 else None,
            "ties": "conservative", "peak_rss_train_mb": tr["peak_rss_mb"], "peak_rss_eval_mb": ev["peak_rss_mb"],
            "train_process": tr, "eval_process": ev,
            "command": (f"cd {official} && LC_SEED={seed} LC_THREADS={threads} OMP_NUM_THREADS={threads} python "
                        + " ".join(train_cmd[1:]).replace(str(d), "RUN") +
                        f" && TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 OMP_NUM_THREADS={threads} python "
                        + " ".join(eval_cmd[1:]).replace(str(d), "RUN"))}


def commits(official: Path) -> dict:
    def git(*a, cwd):
        return subprocess.run(["git", *a], cwd=cwd, capture_output=True, text=True).stdout.strip()
    diff = git("diff", cwd=official)
    return {"ours_commit": git("rev-parse", "HEAD", cwd=ROOT),
            "ours_training_code_dirty": bool(git("status", "--porcelain", "training", "evaluation", cwd=ROOT)),
            "official_commit": git("rev-parse", "HEAD", cwd=official),
            "official_scratch_patch_sha256": hashlib.sha256(diff.encode()).hexdigest() if diff else None,
            "official_scratch_patch_files": git("diff", "--stat", cwd=official).splitlines()[:-1]}


def append(records: Path, rec: dict) -> None:
    records.parent.mkdir(parents=True, exist_ok=True)
    with open(records, "a") as f:
        f.write(json.dumps(rec) + "\n")


# ---- report ------------------------------------------------------------------------------

def summarise(recs: list[dict]) -> list[dict]:
    """One row per setting with both codes side by side and the goals."""
    by: dict = {}
    for r in recs:
        by.setdefault(r["setting"], {})[r["code"]] = r  # the last record of each wins
    rows = []
    for name in [s for s in SETTING_ORDER if s in by]:
        o, f = by[name].get("ours"), by[name].get("official")
        any_r = o or f
        lims = [r["limit"]["limit_events_per_s"] for r in (o, f) if r is not None]
        row = {"setting": name, "paramfile": OFFICIAL_BEST[name][0], "epochs": any_r["epochs"],
               "limit_spread": max(lims) / min(lims) - 1,
               "threads": any_r["threads"], "limit_events_per_s": any_r["limit"]["limit_events_per_s"],
               "limit_1t_x_threads_events_per_s": any_r["limit"]["limit_1t_x_threads_events_per_s"],
               "flops_per_event": any_r["flops_per_step"] / OFFICIAL_BEST[name][1]["batch_size"]}
        for code, r in (("ours", o), ("official", f)):
            if r is None:
                continue
            for k in ("train_events_per_s", "peak_rss_train_mb", "peak_rss_eval_mb", "recall_at_20", "mrr_at_20",
                      "eval_events_per_s", "train_path"):
                if k in r:
                    row[f"{code}_{k}"] = r[k]
            # against the limit timed right before this code's run (older records: the setting's one)
            row[f"{code}_limit_events_per_s"] = r["limit"]["limit_events_per_s"]
            row[f"{code}_fraction_of_limit"] = r["train_events_per_s"] / r["limit"]["limit_events_per_s"]
            # the same epochs as one figure: their events over their seconds (slow epochs weigh in)
            ks = slice(1, None) if len(r["epoch_seconds"]) > 1 else slice(None)
            row[f"{code}_train_events_per_s_pooled"] = sum(r["epoch_events"][ks]) / sum(r["epoch_seconds"][ks])
            row[f"{code}_epoch_events_per_s"] = r["epoch_events_per_s"]
            ev, st = r["epoch_events"][0], r["epoch_steps"][0]
            row["full_batch_share"] = ev / (st * OFFICIAL_BEST[name][1]["batch_size"]) if st else None
        if "optimizer_floor" in any_r:
            of = any_r["optimizer_floor"]
            row["optimizer_floor"] = of
            row["limit_with_optimizer_events_per_s"] = of["limit_with_optimizer_events_per_s"]
            for code, r in (("ours", o), ("official", f)):
                if r is not None and "optimizer_floor" in r:
                    row[f"{code}_fraction_of_limit_with_optimizer"] = (
                        r["train_events_per_s"] / r["optimizer_floor"]["limit_with_optimizer_events_per_s"])
        if "eval_limit" in any_r:
            row["eval_limit_events_per_s"] = any_r["eval_limit"]["limit_events_per_s"]
            for code, r in (("ours", o), ("official", f)):
                if r is not None and r.get("eval_events_per_s"):
                    row[f"{code}_eval_fraction_of_limit"] = r["eval_events_per_s"] / row["eval_limit_events_per_s"]
            if f and f.get("eval_events_per_s"):
                # the most any code could gain over the official's evaluation: the products alone
                row["eval_max_speedup_possible"] = row["eval_limit_events_per_s"] / f["eval_events_per_s"]
        if o and f:
            row["speedup_train"] = o["train_events_per_s"] / f["train_events_per_s"]
            row["speedup_train_pooled"] = row["ours_train_events_per_s_pooled"] / row["official_train_events_per_s_pooled"]
            row["speedup_eval"] = (o["eval_events_per_s"] / f["eval_events_per_s"]
                                   if f.get("eval_events_per_s") else None)
            row["goal_70pct_of_limit"] = row["ours_fraction_of_limit"] >= 0.70
            row["goal_not_slower_than_official"] = row["speedup_train"] >= 1.0
            if name == "rsc15":
                row["goal_4x_official"] = row["speedup_train"] >= 4.0
            if row.get("speedup_eval") is not None:
                row["goal_eval_3x_official"] = row["speedup_eval"] >= 3.0
        rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    h = ("| setting | code | path | train events/s (median ep. 2-E) | limit events/s | of limit | ours / official "
         "| peak RSS train / eval (MB) | Recall@20 | MRR@20 | eval events/s |")
    out = [h, "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        for code in ("ours", "official"):
            if f"{code}_train_events_per_s" not in r:
                continue
            sp = (f"{r['speedup_train']:.2f}x train, {r['speedup_eval']:.2f}x eval"
                  if code == "ours" and r.get("speedup_train") else "")
            out.append(f"| {r['setting']} | {code} | {r.get(code + '_train_path', 'autograd (official)')} | "
                       f"{r[code + '_train_events_per_s']:,.0f} | {r[code + '_limit_events_per_s']:,.0f} | "
                       f"{100 * r[code + '_fraction_of_limit']:.0f}% | {sp} | "
                       f"{r[code + '_peak_rss_train_mb']:,.0f} / {r[code + '_peak_rss_eval_mb']:,.0f} | "
                       f"{r[code + '_recall_at_20']:.4f} | {r[code + '_mrr_at_20']:.4f} | "
                       f"{r[code + '_eval_events_per_s']:,.0f} |")
    return "\n".join(out)


def goals_table(rows: list[dict]) -> str:
    yn = lambda v: "—" if v is None else ("yes" if v else "**no**")
    pct = lambda v: "—" if v is None else f"{100 * v:.0f}%"
    out = ["| setting | ours % of limit (>= 70%) | limit drift | ours / official train (>= 1) | rsc15: >= 4x | limit (1 thread x T) "
           "| eval: ours / official (>= 3x) | eval limit events/s | eval % of limit: ours / official "
           "| eval limit / official (most any code could gain) | optimizer traffic per step (MB, us) "
           "| ours % of products + optimizer traffic |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "speedup_train" not in r:
            continue
        ev = f"{r['speedup_eval']:.2f}x {yn(r.get('goal_eval_3x_official'))}" if r.get("speedup_eval") else "—"
        el = f"{r['eval_limit_events_per_s']:,.0f}" if r.get("eval_limit_events_per_s") else "—"
        mx = f"{r['eval_max_speedup_possible']:.2f}x" if r.get("eval_max_speedup_possible") else "—"
        of = r.get("optimizer_floor")
        opt = f"{of['bytes_per_step'] / 2 ** 20:.1f}, {of['seconds'] * 1e6:.0f}" if of else "—"
        out.append(f"| {r['setting']} | {100 * r['ours_fraction_of_limit']:.0f}% {yn(r['goal_70pct_of_limit'])} | "
                   f"{pct(r.get('limit_spread'))} | "
                   f"{r['speedup_train']:.2f}x {yn(r['goal_not_slower_than_official'])} | "
                   f"{yn(r.get('goal_4x_official'))} | {r['limit_1t_x_threads_events_per_s']:,.0f} | {ev} | {el} | "
                   f"{pct(r.get('ours_eval_fraction_of_limit'))} / {pct(r.get('official_eval_fraction_of_limit'))} | "
                   f"{mx} | {opt} | {pct(r.get('ours_fraction_of_limit_with_optimizer'))} |")
    return "\n".join(out)


def mapping_table() -> str:
    names = SETTING_ORDER
    out = ["| official key | " + " | ".join(names) + " | our key | mapping |",
           "|---|" + "---|" * len(names) + "---|---|"]
    for ok, ours, note in KEY_MAP:
        vals = [str(OFFICIAL_BEST[n][1][ok]) if ok in OFFICIAL_BEST[n][1] else "" for n in names]
        out.append(f"| {ok} | " + " | ".join(vals) + f" | {ours} | {note} |")
    return "\n".join(out)


def write_report(records: Path, out: Path, command: str) -> None:
    recs = [json.loads(l) for l in records.read_text().splitlines() if l.strip()]
    measured_by = sorted({r["driver_command"] for r in recs})
    rows = summarise(recs)
    t, g, mp = table(rows), goals_table(rows), mapping_table()
    print(mp + "\n\n" + t + "\n\n" + g)
    settings = {n: {"paramfile": f, "official_params": p, "our_config": our_config(p),
                    "products": [{"label": l, "m": q.m, "k": q.k, "n": q.n, "grads": q.grads,
                                  "flops": product_flops(q)} for l, q in
                                 step_products(p["layers"], p["batch_size"], p["n_sample"])],
                    "flops_per_step": flops_per_step(p["layers"], p["batch_size"], p["n_sample"])}
                for n, (f, p) in OFFICIAL_BEST.items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "issue": 13, "what": "every official GRU4Rec best setting: training speed, compute-bound limit, peak RSS, "
                             "Recall@20 / MRR@20, evaluation speed; this project vs the official code",
        "command": measured_by[0] if len(measured_by) == 1 else measured_by, "report_command": command,
        "settings_measured": [r["setting"] for r in rows],
        "settings_not_measured": [n for n in SETTING_ORDER if n not in {r["setting"] for r in rows}],
        "official_commit_expected": OFFICIAL_COMMIT,
        "flop_model": __doc__.split("FLOP model")[1].split("Goals checked")[0].strip(),
        "key_map": [{"official": a, "ours": b, "note": c} for a, b, c in KEY_MAP], "settings": settings,
        "summary": rows, "table": t, "goals_table": g, "mapping_table": mp, "records": recs}, indent=1) + "\n")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--split", type=Path, default=Path("/tmp/rsc15split/splits/time"),
                    help="SPLIT_DIR (the Spark job's splits/time, benchmarks/README_gru4rec.md)")
    ap.add_argument("--official", type=Path, default=Path("/tmp/official"), help="scratch checkout of the official code")
    ap.add_argument("--settings", nargs="+", default=SETTING_ORDER, choices=SETTING_ORDER)
    ap.add_argument("--codes", nargs="+", default=["ours", "official"], choices=["ours", "official"])
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--work", type=Path, default=Path("/tmp/gru4rec_settings"))
    ap.add_argument("--tsv-dir", type=Path, help="official-format TSVs of SPLIT_DIR (default WORK/tsv)")
    ap.add_argument("--records", type=Path, help="JSON-lines file the runs append to (default WORK/records.jsonl)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "gru4rec_settings.json")
    ap.add_argument("--report-only", action="store_true", help="only rebuild the JSON + tables from the records")
    a = ap.parse_args(argv)
    records = a.records or a.work / "records.jsonl"
    command = "python -m benchmarks.gru4rec_settings " + " ".join(argv if argv is not None else sys.argv[1:])
    if not a.report_only:
        import torch

        check_paramfiles(a.official)
        torch.set_num_threads(a.threads)
        cm = commits(a.official)
        cache: dict = {}
        try:
            for i, name in enumerate(a.settings):
                p = OFFICIAL_BEST[name][1]
                prods = step_products(p["layers"], p["batch_size"], p["n_sample"])
                n_items = json.loads((a.split / "split.json").read_text())["n_items"]
                event_p, sample_p = item_distributions(a.split, p["sample_alpha"])
                codes = a.codes if i % 2 == 0 else a.codes[::-1]
                for code in codes:
                    if STOP_FILE.exists():
                        raise Stopped(f"{STOP_FILE} exists")
                    # the limits are timed again right before each code's run (the products' rates
                    # drift on a shared VM: the two figures of a setting show by how much)
                    cache.clear()
                    lim = measure_limit(prods, p["batch_size"], a.threads, cache)
                    elim = measure_limit(eval_products(p["layers"], n_items), 512, a.threads, cache)
                    opt = optimizer_floor(p, event_p, sample_p, a.threads, lim)
                    print(f"[{time.strftime('%H:%M:%S')}] {name}: {code} ...", file=sys.stderr, flush=True)
                    if code == "ours":
                        res = run_ours(name, a.split, a.epochs, a.threads, a.seed, a.work)
                    else:
                        res = run_official(name, a.split, a.epochs, a.threads, a.seed, a.work, a.official,
                                           a.tsv_dir or a.work / "tsv")
                    rec = {"setting": name, "code": code, "paramfile": OFFICIAL_BEST[name][0], "epochs": a.epochs,
                           "seed": a.seed, "threads": a.threads, "split": str(a.split), "machine": cpu_label(),
                           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), **cm,
                           "flops_per_step": flops_per_step(p["layers"], p["batch_size"], p["n_sample"]),
                           "limit": lim, "fraction_of_limit": res["train_events_per_s"] / lim["limit_events_per_s"],
                           "eval_limit": elim, "optimizer_floor": opt,
                           "driver_command": command, **res}
                    append(records, rec)
                    print(f"  {name} {code}: {res['train_events_per_s']:,.0f} events/s "
                          f"({100 * rec['fraction_of_limit']:.0f}% of {lim['limit_events_per_s']:,.0f}), "
                          f"R@20 {res['recall_at_20']:.4f} MRR@20 {res['mrr_at_20']:.4f}, "
                          f"RSS {res['peak_rss_train_mb']:.0f}/{res['peak_rss_eval_mb']:.0f} MB, "
                          f"eval {res['eval_events_per_s']:,.0f} events/s", file=sys.stderr, flush=True)
        except Stopped as e:
            print(f"stopped: {e}", file=sys.stderr)
    if records.exists():
        write_report(records, a.out, command)


if __name__ == "__main__":
    main()
