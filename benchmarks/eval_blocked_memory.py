"""Issue 13: peak memory and time of full-ranking evaluation on a large catalogue, one score
matrix per step vs blocked ranking (evaluation/loop.py, "Blocked ranking").

A GRU4Rec model with N items (random weights: the cost of ranking does not depend on what the
model learnt) is evaluated on a generated test table of S sessions, once per mode, each in its own
child process whose peak RSS is ``ru_maxrss`` from ``os.wait4``:

    python -m benchmarks.eval_blocked_memory --items 1000000 --sessions 400 --threads 2 \\
        --out benchmarks/results/eval_blocked_memory.json

Modes: ``full`` (``block_items=0``: a ``[slots, N]`` score matrix per step) and ``blocked``
(``block_items`` = 65,536 by default). Both give the same ranks (tests/evaluation/test_blocked_ranking.py);
the records hold Recall@20 / MRR@20 of both as a check.
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


def child(items: int, sessions: int, block: int, slots: int, threads: int, hidden: int, seed: int) -> dict:
    import numpy as np
    import torch

    from evaluation.loop import evaluate_sessions
    from evaluation.metrics import metrics_from_ranks, rank_from_counts
    from training.data import SessionData
    from training.families.gru4rec import GRU4RecConfig, GRU4RecModel
    from training.scoring import RNNScorer

    torch.set_num_threads(threads)
    cfg = GRU4RecConfig(layers=[hidden], batch_size=32, n_sample=0)
    m = GRU4RecModel(items, cfg)
    m.reset_parameters(torch.Generator().manual_seed(seed))
    rng = np.random.default_rng(seed)
    lens = rng.integers(2, 20, sessions)
    off = np.r_[0, np.cumsum(lens)].astype(np.int64)
    its = (rng.zipf(1.2, off[-1]) % items).astype(np.int64)
    data = SessionData(items=its, offsets=off, session_ids=np.arange(sessions), start_ts=np.arange(sessions),
                       user_ids=None)
    scorer = RNNScorer(m, torch.device("cpu"))
    t0 = time.perf_counter()
    res = evaluate_sessions(scorer, data, n_slots=slots, block_items=block)
    secs = time.perf_counter() - t0
    met = metrics_from_ranks(rank_from_counts(res.greater.astype(np.float64), res.ties.astype(np.float64),
                                              "conservative"), (20,))
    return {"seconds": secs, "n_events": int(res.n_events), "recall_at_20": met["recall_at_20"],
            "mrr_at_20": met["mrr_at_20"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.eval_blocked_memory", description=__doc__.split("\n\n")[0])
    ap.add_argument("--items", type=int, default=1_000_000)
    ap.add_argument("--sessions", type=int, default=400)
    ap.add_argument("--slots", type=int, default=512)
    ap.add_argument("--hidden", type=int, default=100)
    ap.add_argument("--block", type=int, default=65_536)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    ap.add_argument("--child", nargs=1, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        print(json.dumps(child(a.items, a.sessions, int(a.child[0]), a.slots, a.threads, a.hidden, a.seed)))
        return 0
    from benchmarks.machine import cpu_label

    recs = []
    for mode, block in (("full", 0), ("blocked", a.block)):
        cmd = [sys.executable, "-m", "benchmarks.eval_blocked_memory", "--items", str(a.items), "--sessions",
               str(a.sessions), "--slots", str(a.slots), "--hidden", str(a.hidden), "--threads", str(a.threads),
               "--seed", str(a.seed), "--child", str(block)]
        p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "OMP_NUM_THREADS": str(a.threads)})
        out = p.stdout.read()
        _, status, ru = os.wait4(p.pid, 0)
        if status != 0:
            raise SystemExit(f"{mode} run failed (status {status})")
        r = json.loads(out.strip().splitlines()[-1])
        r.update(mode=mode, block_items=block or None, peak_rss_mb=ru.ru_maxrss / 1024, items=a.items,
                 sessions=a.sessions, slots=a.slots, hidden=a.hidden, threads=a.threads,
                 score_matrix_mb=a.slots * (block or a.items) * 4 / 2**20)
        recs.append(r)
        print(f"{mode:8s} peak RSS {r['peak_rss_mb']:8.0f} MB  (one score matrix {r['score_matrix_mb']:6.0f} MB)  "
              f"{r['seconds']:6.2f} s  {r['n_events'] / r['seconds']:8.0f} events/s  R@20 {r['recall_at_20']:.4f}")
    doc = {"command": "python -m benchmarks.eval_blocked_memory " + " ".join(argv or sys.argv[1:]),
           "cpu": cpu_label(), "uptime": os.getloadavg(), "records": recs}
    if a.out:
        Path(a.out).write_text(json.dumps(doc, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
