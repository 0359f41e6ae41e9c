"""Evaluate any trained model (any family) on a SPLIT_DIR table.

Run::

    python -m evaluation.evaluate --model-dir RUN_DIR --data SPLIT_DIR --out EVAL_DIR \
        [--table test] [--ties conservative|optimistic|median] [--ks 1,5,10,20] [--slots 512]

Uses the checkpoint's own item index: test events with items unknown to the
model are removed first, then sessions left with < 2 events are dropped
(checklist item 7). Writes into EVAL_DIR (each file atomically):

* ``metrics.json``: recall_at_K, mrr_at_K, precision_at_K for every K, plus
  counts, tie mode, device and evaluation events/s;
* ``breakdown_length.csv`` / ``breakdown_position.csv``: the same metrics by
  session-length bucket and by position in the session (+ ``breakdowns.json``);
* ``per_event.parquet``: one row per prediction (session_id, position,
  session_length, target item_id, n_greater, n_ties, rank) for significance tests.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from evaluation.loop import evaluate_sessions
from evaluation.metrics import DEFAULT_KS, TIE_MODES, metrics_from_ranks, rank_from_counts
from spark_jobs import contract as C
from training import checkpoint as ck
from training.data import read_events
from training.registry import load_scorer
from training.device import pick_device

log = logging.getLogger("evaluation")

#: session-length buckets (Villatel et al.: 2-5, 6-25, 26+) and input-position buckets
#: (Quadrana et al.: first 2 events, 3rd-4th, later; later split once more at 10)
LENGTH_BUCKETS = ((2, 5), (6, 25), (26, None))
POSITION_BUCKETS = ((1, 2), (3, 4), (5, 9), (10, None))


def _bucket_labels(values: np.ndarray, buckets) -> np.ndarray:
    labels = np.full(len(values), "", dtype=object)
    for lo, hi in buckets:
        sel = (values >= lo) & ((values <= hi) if hi is not None else True)
        labels[sel] = f"{lo}-{hi}" if hi is not None else f"{lo}+"
    return labels


def breakdown(rank: np.ndarray, labels: np.ndarray, buckets, ks) -> list[dict]:
    rows = []
    for lo, hi in buckets:
        lab = f"{lo}-{hi}" if hi is not None else f"{lo}+"
        sel = labels == lab
        row = {"bucket": lab, "n_events": int(sel.sum())}
        if sel.any():
            row.update(metrics_from_ranks(rank[sel], ks))
        rows.append(row)
    return rows


def _write_csv(path: Path, rows: list[dict]) -> None:
    cols = sorted({k for r in rows for k in r}, key=lambda k: (k != "bucket", k != "n_events", k))

    def w(tmp):
        with open(tmp, "w") as f:
            f.write(",".join(cols) + "\n")
            for r in rows:
                f.write(",".join("" if r.get(c) is None else str(r.get(c)) for c in cols) + "\n")

    C.atomic_write(path, w)


def evaluate(model_dir, data_dir, out, table: str = "test", ties: str = "conservative",
             ks=DEFAULT_KS, n_slots: int = 512, device: str = "auto") -> dict:
    if ties not in TIE_MODES:
        raise ValueError(f"--ties must be one of {TIE_MODES}")
    out = Path(out)
    ckpt = ck.load_checkpoint(model_dir)
    index = ck.item_index_from_ckpt(ckpt["item_index"])
    dev = pick_device(device)
    scorer = load_scorer(ckpt, dev)
    data = read_events(data_dir, table, index, min_session_length=2)
    res = evaluate_sessions(scorer, data, n_slots=n_slots)
    rank = rank_from_counts(res.greater.astype(np.float64), res.ties.astype(np.float64), ties)
    metrics = metrics_from_ranks(rank, ks)
    lengths = np.diff(data.offsets)[res.session_idx]
    pos1 = res.position + 1  # 1-based position of the event the prediction is made after
    by_len = breakdown(rank, _bucket_labels(lengths, LENGTH_BUCKETS), LENGTH_BUCKETS, ks)
    by_pos = breakdown(rank, _bucket_labels(pos1, POSITION_BUCKETS), POSITION_BUCKETS, ks)
    metrics.update({
        "ties": ties, "table": table, "model": ckpt["model"], "epoch": int(ckpt["epoch"]),
        "n_events": res.n_events, "n_sessions": int(len(np.unique(res.session_idx))),
        "n_items_ranked": index.n_items, "dropped_unknown_events": data.n_unknown_dropped,
        "dropped_short_sessions": data.n_short_dropped, "eval_seconds": res.seconds,
        "eval_events_per_s": res.n_events / max(res.seconds, 1e-9), "device": str(dev),
        "n_slots": n_slots,
    })
    out.mkdir(parents=True, exist_ok=True)
    ck.write_json(out / "metrics.json", metrics)
    ck.write_json(out / "breakdowns.json", {"session_length": by_len, "position": by_pos})
    _write_csv(out / "breakdown_length.csv", by_len)
    _write_csv(out / "breakdown_position.csv", by_pos)
    per_event = pa.table({
        "session_id": pa.array(data.session_ids[res.session_idx], pa.int64()),
        "position": pa.array(res.position.astype(np.int32), pa.int32()),
        "session_length": pa.array(lengths.astype(np.int32), pa.int32()),
        "target_item_id": pa.array(index.item_ids[res.target], pa.int64()),
        "n_greater": pa.array(res.greater.astype(np.int64), pa.int64()),
        "n_ties": pa.array(res.ties.astype(np.int64), pa.int64()),
        "rank": pa.array(rank, pa.float64()),
    })
    C.atomic_write(out / "per_event.parquet", lambda tmp: pq.write_table(per_event, tmp))
    return metrics


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m evaluation.evaluate", description=__doc__.split("\n")[0])
    ap.add_argument("--model-dir", required=True, help="run dir (model.pt) or a checkpoint file")
    ap.add_argument("--data", required=True, help="SPLIT_DIR")
    ap.add_argument("--out", required=True)
    ap.add_argument("--table", default="test", help="test (default) or valid")
    ap.add_argument("--ties", default="conservative", choices=TIE_MODES)
    ap.add_argument("--ks", default=",".join(map(str, DEFAULT_KS)))
    ap.add_argument("--slots", type=int, default=512, help="sessions evaluated in parallel")
    ap.add_argument("--device", default="auto")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    ks = tuple(int(k) for k in a.ks.split(",") if k.strip())
    if not ks or min(ks) < 1:
        ap.error("--ks must be positive integers, e.g. 1,5,10,20")
    m = evaluate(a.model_dir, a.data, a.out, a.table, a.ties, ks, a.slots, a.device)
    print(" ".join(f"{k}={m[k]:.4f}" for k in sorted(m) if k.startswith(("recall_at", "mrr_at"))))
    print(f"{m['n_events']} events, {m['eval_events_per_s']:.0f} events/s, ties={m['ties']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
