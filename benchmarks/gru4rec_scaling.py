"""GRU4Rec training throughput vs batch size and hidden size, and evaluation throughput.

Run (from the repo root; SPLIT_DIR from spark_jobs.preprocess on rsc15-100k)::

    python -m benchmarks.gru4rec_scaling SPLIT_DIR --out benchmarks/gru4rec_scaling.json \
        [--threads 1] [--events 20000] [--batch 32,64,128,256,512] [--hidden 100,250,500,1000]

Each configuration trains on the first ~``--events`` training examples of
``train_full`` (one warm-up pass, then one timed pass) with the official best
setting otherwise. Records wall-clock events/s AND events per CPU-second of
this process (the latter is what a quiet core would give when the machine is
shared), plus the machine's load average at the time.
"""
from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch

from benchmarks.machine import cpu_info
from evaluation.loop import evaluate_sessions
from training.config import resolve_config
from training.data import read_events, read_item_index, table_support
from training.families.gru4rec import GRU4RecFamily
from training.family import TrainContext
from training.scoring import RNNScorer
from training.trainer import make_runner


def _truncate(data, n_events):
    k = int(np.searchsorted(data.offsets, n_events))
    data.offsets = data.offsets[: k + 1]
    data.session_ids = data.session_ids[:k]
    data.start_ts = data.start_ts[:k]
    data.items = data.items[: data.offsets[-1]]
    return data


def measure(split, sets, n_events):
    cfg = resolve_config("gru4rec", None, None, sets)
    idx = read_item_index(split)
    data = _truncate(read_events(split, "train_full", idx), n_events)
    fam = GRU4RecFamily(cfg, TrainContext(idx, data, table_support(data, idx.n_items), torch.device("cpu")))
    fam.init_weights(torch.Generator().manual_seed(cfg.seed))
    runner = make_runner(fam, cfg, torch.device("cpu"))
    fam.path = runner.path
    runner.run_epoch(0)  # warm-up
    c0, t0 = time.process_time(), time.perf_counter()
    st = runner.run_epoch(1)
    cpu, wall = time.process_time() - c0, time.perf_counter() - t0
    return fam, {"events": st["events"], "wall_s": wall, "events_per_s": st["events"] / wall,
                 "cpu_s": cpu, "events_per_cpu_s": st["events"] / cpu, "load1": os.getloadavg()[0]}


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("split")
    ap.add_argument("--out", required=True)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--events", type=int, default=20000)
    ap.add_argument("--batch", default="32,64,128,256,512")
    ap.add_argument("--hidden", default="100,250,500,1000")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    rows = []
    for b in [int(x) for x in a.batch.split(",")]:
        _, r = measure(a.split, [f"batch_size={b}"], a.events)
        rows.append({"batch_size": b, "hidden": 100, **r})
        print(rows[-1], flush=True)
    for h in [int(x) for x in a.hidden.split(",")]:
        fam, r = measure(a.split, [f"layers={h}"], a.events)
        rows.append({"batch_size": 32, "hidden": h, **r})
        print(rows[-1], flush=True)
    # evaluation throughput: full ranking over all items, conservative ties
    fam, _ = measure(a.split, [], a.events)
    test = read_events(a.split, "test", fam.ctx.index)
    c0 = time.process_time()
    res = evaluate_sessions(RNNScorer(fam.model, torch.device("cpu")), test, n_slots=512)
    cpu = time.process_time() - c0
    ev = {"eval_events": res.n_events, "eval_wall_s": res.seconds, "eval_events_per_s": res.n_events / res.seconds,
          "eval_events_per_cpu_s": res.n_events / cpu, "load1": os.getloadavg()[0]}
    print(ev, flush=True)
    out = {"threads": a.threads, "torch": torch.__version__, "cpu_count": os.cpu_count(), "machine": cpu_info(),
           "train_path": fam.path,
           "train": rows, "eval": ev}
    from spark_jobs.contract import write_json

    write_json(a.out, out)


if __name__ == "__main__":
    main()
