"""Does ``torch.compile`` speed up GRU4Rec's autograd training step? (issue: keep it only if it helps)

Run (from the repo root; SPLIT_DIR from spark_jobs.preprocess on rsc15-100k)::

    python -m benchmarks.gru4rec_compile SPLIT_DIR [--threads 1] [--steps 600] [--out FILE.json]

Variants, each timed over ``--steps`` steps of the official best setting after a warm-up
of the same length (compilation happens in the warm-up):

* ``eager-sparse``: the ``torch`` path as shipped (row-sparse gradients for Wy/By, so the
  row-sparse Adagrad touches only the mini-batch's rows, as the official code);
* ``eager-dense``: the same loss with dense gradients for the item tables (every row's
  Adagrad/momentum state is updated each step: NOT the official optimizer, measured only
  because inductor cannot compile sparse gradients);
* ``compiled-dense``: ``torch.compile(loss, dynamic=True)`` of the dense-gradient loss;
* ``compiled-cell``: sparse gradients, with only the GRU cell (the element-wise gate maths)
  compiled.

Records events/s per variant and the machine (benchmarks.machine).
"""
from __future__ import annotations

import argparse
import itertools
import time

import torch

from benchmarks.machine import cpu_info
from training.config import resolve_config
from training.data import read_events, read_item_index, table_support
from training.families import gru4rec
from training.family import TrainContext
from training.trainer import AutogradRunner


def run(split, variant: str, steps: int, threads: int) -> dict:
    torch.set_num_threads(threads)
    cfg = resolve_config("gru4rec", sets=["train_path=torch"])
    idx = read_item_index(split)
    data = read_events(split, "train_full", idx)
    fam = gru4rec.GRU4RecFamily(cfg, TrainContext(idx, data, table_support(data, idx.n_items), torch.device("cpu")))
    fam.init_weights(torch.Generator().manual_seed(1))
    sparse = variant in ("eager-sparse", "compiled-cell")
    if not sparse:  # dense gradients for the item tables (see the module docstring)
        real_fwd, real_scores = fam.model.forward, fam.model.sampled_scores
        fam.model.forward = lambda x, st, masks=None, sparse=False: real_fwd(x, st, masks, False)
        fam.model.sampled_scores = lambda out, y, sparse=False: real_scores(out, y, False)
    if variant == "compiled-cell":
        gru4rec.GRU4RecModel.cell = staticmethod(torch.compile(gru4rec.GRU4RecModel.cell.__func__
                                                              if hasattr(gru4rec.GRU4RecModel.cell, "__func__")
                                                              else gru4rec.GRU4RecModel.cell, dynamic=True))
    r = AutogradRunner(fam, cfg, torch.device("cpu"))
    if variant == "compiled-dense":  # dynamic: the batch shrinks at the tail of an epoch
        r.loss_fn = torch.compile(fam.loss, dynamic=True)
    batches = fam.batches(0)

    def go(n):
        ev = 0
        for b in itertools.islice(batches, n):
            res = r.loss_fn(b)
            if res is None:
                continue
            loss, k = res
            loss.backward()
            r.opt.step()
            r.opt.zero_grad(set_to_none=True)
            ev += k
        return ev

    t0 = time.perf_counter()
    go(steps)  # warm-up (and compilation)
    warm = time.perf_counter() - t0
    t0 = time.perf_counter()
    ev = go(steps)
    secs = time.perf_counter() - t0
    return {"variant": variant, "threads": threads, "events": ev, "seconds": secs, "events_per_s": ev / secs,
            "warmup_seconds": warm}


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("split")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--variants", default="eager-sparse,eager-dense,compiled-dense,compiled-cell")
    ap.add_argument("--out")
    a = ap.parse_args(argv)
    rows = []
    for v in a.variants.split(","):
        rows.append(run(a.split, v, a.steps, a.threads))
        print(rows[-1], flush=True)
    if a.out:
        from spark_jobs.contract import write_json

        write_json(a.out, {"machine": cpu_info(), "torch": torch.__version__, "rows": rows})


if __name__ == "__main__":
    main()
