"""Evaluate any trained model (any family) on a SPLIT_DIR table (protocol v2).

Run::

    python -m evaluation.evaluate --model-dir RUN_DIR --data SPLIT_DIR --out EVAL_DIR \
        [--table test] [--ties conservative|optimistic|median] [--ks 1,5,10,20] [--slots 512] \
        [--mode session|user] [--history-tables train_full]

Modes (``evaluation.loop``): ``session`` (default) starts every test session from
a zero state; ``user`` walks each user's sessions in time order, one user per
slot, after feeding the user's sessions of the ``--history-tables`` through the
model unscored (HRNN bootstrap). Default history: ``train_full`` for
``--table test`` (it already holds the validation sessions) and ``train`` for
``--table valid`` (``train_full`` would contain the validation table itself).
Users without history are evaluated from a fresh state and counted
(``n_users_without_history``). ``--history-tables`` is ignored in session mode.

Uses the checkpoint's own item index: test events with items unknown to the
model are removed first, then sessions left with < 2 events are dropped
(checklist item 7). Writes into EVAL_DIR (each file atomically):

* ``metrics.json``: recall_at_K, mrr_at_K, precision_at_K, ndcg_at_K for every K
  (tie mode ``ties``); recall_at_K_n_N for N = 1, 5, 20 and K <= 20 (Villatel et
  al.; always the conservative tie rule); coverage_at_20 (fraction of the items
  that appear in at least one top-20 list) and mean_popularity_at_20 (mean
  training support of the recommended top-20 items); counts (n_events,
  n_sessions, n_users, dropped_*), mode, tie mode, device, evaluation events/s,
  and ``test_digest``: sha256 of the sorted (session_id, position,
  target_item_id) rows (little-endian int64 triples), equal iff two runs
  predicted the same events; the model's cost: ``n_parameters``,
  ``model_bytes``, ``fit_seconds`` (``model_cost``) and its prediction latency
  (``latency``), from the wall time of each ``scorer.step`` call of the loop
  (one batch: one event for each active slot; CUDA synchronised before each
  clock read): ``latency_ms_p50`` / ``latency_ms_p99`` (ms per call),
  ``latency_batch_rows_p50`` (median rows per call: the loop's ``--slots``
  rows while the slots are full, fewer at the tail, so compare latencies at
  the same ``--slots``) and ``predict_us_per_event`` (all step seconds / the
  events fed, scored + unscored history, in microseconds); percentiles are
  numpy's ``method="linear"`` (interpolated between the two nearest calls);
  None when nothing was stepped;
* ``breakdown_length.csv`` / ``breakdown_position.csv`` (+ ``breakdowns.json``):
  the same metrics (+ recall_at_K_n_N) by session length (2-5, 6-25, 26+) and by
  1-based input position (1-2, 3-4, 5-9, 10+); ``breakdown_position_coarse.csv``
  (key ``position_coarse``): 1-2, 3-4, 5+; in user mode also
  ``breakdown_user_history.csv`` (key ``user_history``; history sessions of the
  user: 0-6 / 7+, where 0 = user unseen in the history tables);
* ``recall_per_step.csv`` / ``.json``: recall@K of the item d steps ahead,
  d = 1..20, with the number of predictions that have such an item;
* ``per_event.parquet``: one row per prediction (session_id, position,
  session_length, target item_id, n_greater, n_ties, rank, user_id (null when
  unknown; only when the table has users or in user mode), user_history_sessions
  (user mode), hit_at_K_n_N for N = 5, 20) for significance tests.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from evaluation.loop import MODES, evaluate_sessions
from evaluation.stats import events_digest
from evaluation.metrics import (DEFAULT_KS, DEFAULT_NS, TIE_MODES, coverage_and_popularity, future_hits,
                                metrics_from_ranks,
                                rank_from_counts, recall_at_k_n, recall_per_step)
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
#: Quadrana et al.'s coarse positions (1-2 / 3-4 / 5+); a separate partition so that each
#: breakdown's rows still sum to n_events
POSITION_BUCKETS_COARSE = ((1, 2), (3, 4), (5, None))
#: user history length in sessions (user mode), Quadrana et al.'s short / long histories
HISTORY_BUCKETS = ((0, 6), (7, None))
#: catalogues larger than this are scored in blocks of this many items (evaluation.loop, "Blocked
#: ranking"): 512 slots x 65,536 items = 128 MiB of scores at a time
DEFAULT_BLOCK_ITEMS = 65_536
FUTURE_STEPS = 20  # Recall@K,N for N up to this, and recall per future step d = 1..this
PER_EVENT_NS = (5, 20)


def _label(lo, hi) -> str:
    return f"{lo}-{hi}" if hi is not None else f"{lo}+"


def breakdown(rank: np.ndarray, values: np.ndarray, buckets, ks, future_rank=None,
              top_k: int = 20) -> list[dict]:
    """Metrics per bucket ``lo <= value <= hi`` (``hi`` None: no upper bound)."""
    rows = []
    for lo, hi in buckets:
        sel = (values >= lo) & ((values <= hi) if hi is not None else True)
        row = {"bucket": _label(lo, hi), "n_events": int(sel.sum())}
        if sel.any():
            row.update(metrics_from_ranks(rank[sel], ks))
            if future_rank is not None:
                row.update(recall_at_k_n(future_rank[sel], ks, DEFAULT_NS, top_k))
        rows.append(row)
    return rows


def default_history_tables(table: str) -> list[str]:
    """train_full for test (it holds the validation sessions too), train for valid."""
    return [C.TRAIN] if table == C.VALID else [C.TRAIN_FULL]


def _write_csv(path: Path, rows: list[dict]) -> None:
    cols = sorted({k for r in rows for k in r},
                  key=lambda k: (k not in ("bucket", "step"), k != "n_events", k))

    def w(tmp):
        with open(tmp, "w") as f:
            f.write(",".join(cols) + "\n")
            for r in rows:
                f.write(",".join("" if r.get(c) is None else str(r.get(c)) for c in cols) + "\n")

    C.atomic_write(path, w)


def model_cost(model_dir, ckpt: dict) -> dict:
    """What a model costs, for the results tables: ``n_parameters`` (elements of its
    floating-point tensors: weights, or a kNN's similarity values), ``model_bytes`` (every
    tensor of its state, index arrays included) and ``fit_seconds`` (the training run's wall
    time from ``history.json``, None when the run did not record it)."""
    sd = ckpt.get("state_dict") or {}
    tensors = [v for v in sd.values() if isinstance(v, torch.Tensor)]
    fit = None
    hist = Path(model_dir) / "history.json"
    if Path(model_dir).is_dir() and hist.exists():
        fit = json.loads(hist.read_text()).get("run", {}).get("fit_seconds")
    return {"n_parameters": int(sum(t.numel() for t in tensors if t.is_floating_point())),
            "model_bytes": int(sum(t.numel() * t.element_size() for t in tensors)),
            "fit_seconds": fit}


#: numpy percentile method of the latency figures (linear interpolation between order statistics)
LATENCY_PERCENTILE_METHOD = "linear"


def latency(step_seconds: np.ndarray, step_rows: np.ndarray, n_events_fed: int) -> dict:
    """Prediction latency from the loop's per-``scorer.step`` timings (module docstring):
    p50 / p99 ms per call, median rows per call, microseconds per event fed; None when no
    call was made."""
    if not len(step_seconds):
        return dict.fromkeys(("latency_ms_p50", "latency_ms_p99", "latency_batch_rows_p50",
                              "predict_us_per_event"))
    ms = np.asarray(step_seconds, np.float64) * 1e3
    p50, p99 = np.percentile(ms, [50, 99], method=LATENCY_PERCENTILE_METHOD)
    return {"latency_ms_p50": float(p50), "latency_ms_p99": float(p99),
            "latency_batch_rows_p50": float(np.percentile(step_rows, 50, method=LATENCY_PERCENTILE_METHOD)),
            "predict_us_per_event": float(ms.sum() * 1e3 / max(n_events_fed, 1))}


def evaluate(model_dir, data_dir, out, table: str = "test", ties: str = "conservative",
             ks=DEFAULT_KS, n_slots: int = 512, device: str = "auto", mode: str = "session",
             history_tables=None, only_items=None, block_items: int | None = None) -> dict:
    """Evaluate one checkpoint on one table (module docstring). ``only_items``: evaluate only
    on events whose items are in it (paired comparisons of models with different item
    indexes, evaluation/selection.py); the events dropped for it count as unknown."""
    if ties not in TIE_MODES:
        raise ValueError(f"--ties must be one of {TIE_MODES}")
    if mode not in MODES:
        raise ValueError(f"--mode must be one of {MODES}")
    out = Path(out)
    ckpt = ck.load_checkpoint(model_dir)
    index = ck.item_index_from_ckpt(ckpt["item_index"])
    dev = pick_device(device)
    scorer = load_scorer(ckpt, dev)
    data = read_events(data_dir, table, index, min_session_length=2, only_items=only_items)
    history, hist_names = [], []
    if mode == "user":
        hist_names = list(history_tables) if history_tables else default_history_tables(table)
        for h in hist_names:
            hd = read_events(data_dir, h, index, min_session_length=2, only_items=only_items)
            if hd.user_ids is None:
                log.warning("history table %s has no user ids: nothing to bootstrap from it", h)
            history.append(hd)
        if data.user_ids is None:
            log.warning("table %s has no user ids: user mode evaluates every session as a new user", table)
    top_k = max(20, max(ks))
    if block_items is None:
        block_items = int(os.environ.get("RNNREC_EVAL_BLOCK_ITEMS", DEFAULT_BLOCK_ITEMS))
    res = evaluate_sessions(scorer, data, n_slots=n_slots, mode=mode, history=history, block_items=block_items,
                            n_future=FUTURE_STEPS, top_k=top_k)
    rank = rank_from_counts(res.greater.astype(np.float64), res.ties.astype(np.float64), ties)
    metrics = metrics_from_ranks(rank, ks)
    metrics.update(recall_at_k_n(res.future_rank, ks, DEFAULT_NS, top_k))
    lengths = np.diff(data.offsets)[res.session_idx]
    pos1 = res.position + 1  # 1-based position of the event the prediction is made after
    fr = res.future_rank
    by_len = breakdown(rank, lengths, LENGTH_BUCKETS, ks, fr, top_k)
    by_pos = breakdown(rank, pos1, POSITION_BUCKETS, ks, fr, top_k)
    by_pos_c = breakdown(rank, pos1, POSITION_BUCKETS_COARSE, ks, fr, top_k)
    by_hist = breakdown(rank, res.user_history, HISTORY_BUCKETS, ks, fr, top_k) \
        if res.user_history is not None else None
    per_step = recall_per_step(fr, ks, top_k)
    coverage, popularity = coverage_and_popularity(res.top_counts, index.support)
    sess_ids = data.session_ids[res.session_idx]
    tgt_ids = index.item_ids[res.target]
    if mode == "user":
        n_users = res.n_users
    else:
        n_users = int(len(np.unique(res.user[res.user >= 0]))) if res.user is not None else 0
    metrics.update({
        "ties": ties, "table": table, "model": ckpt["model"], "epoch": int(ckpt["epoch"]),
        "mode": mode, "n_events": res.n_events, "n_sessions": int(len(np.unique(res.session_idx))),
        "n_users": n_users, "n_users_without_history": res.n_users_without_history,
        "history_tables": hist_names, "n_history_sessions": res.n_history_sessions,
        "n_history_events_fed": res.n_history_steps,
        "n_items_ranked": index.n_items, "dropped_unknown_events": data.n_unknown_dropped,
        "dropped_short_sessions": data.n_short_dropped, "eval_seconds": res.seconds,
        "eval_events_per_s": res.n_events / max(res.seconds, 1e-9), "device": str(dev),
        "n_slots": n_slots, "ties_recall_at_k_n": "conservative", "n_future": FUTURE_STEPS,
        "block_items": res.block_items,
        "rank_path": res.rank_path,
        f"coverage_at_{top_k}": coverage, f"mean_popularity_at_{top_k}": popularity,
        "test_digest": events_digest(sess_ids, res.position, tgt_ids),
        **model_cost(model_dir, ckpt),
        **latency(res.step_seconds, res.step_rows, res.n_events + res.n_history_steps),
    })
    out.mkdir(parents=True, exist_ok=True)
    ck.write_json(out / "metrics.json", metrics)
    bd = {"session_length": by_len, "position": by_pos, "position_coarse": by_pos_c}
    if by_hist is not None:
        bd["user_history"] = by_hist
        _write_csv(out / "breakdown_user_history.csv", by_hist)
    ck.write_json(out / "breakdowns.json", bd)
    _write_csv(out / "breakdown_length.csv", by_len)
    _write_csv(out / "breakdown_position.csv", by_pos)
    _write_csv(out / "breakdown_position_coarse.csv", by_pos_c)
    ck.write_json(out / "recall_per_step.json", per_step)
    _write_csv(out / "recall_per_step.csv", per_step)
    cols = {
        "session_id": pa.array(sess_ids, pa.int64()),
        "position": pa.array(res.position.astype(np.int32), pa.int32()),
        "session_length": pa.array(lengths.astype(np.int32), pa.int32()),
        "target_item_id": pa.array(tgt_ids, pa.int64()),
        "n_greater": pa.array(res.greater.astype(np.int64), pa.int64()),
        "n_ties": pa.array(res.ties.astype(np.int64), pa.int64()),
        "rank": pa.array(rank, pa.float64()),
    }
    if res.user is not None:
        cols["user_id"] = pa.array(res.user, pa.int64(), mask=res.user < 0)
    if res.user_history is not None:
        cols["user_history_sessions"] = pa.array(res.user_history.astype(np.int32), pa.int32())
    for k in ks:
        for n in PER_EVENT_NS:
            if k <= top_k:
                cols[f"hit_at_{k}_n_{n}"] = pa.array(future_hits(fr, k, n), pa.bool_())
    per_event = pa.table(cols)
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
    ap.add_argument("--block-items", type=int, default=None,
                    help=f"score catalogues larger than this in blocks of this many items (memory: slots x "
                         f"block instead of slots x items; models with output factors, e.g. GRU4Rec); "
                         f"default $RNNREC_EVAL_BLOCK_ITEMS or {DEFAULT_BLOCK_ITEMS}; 0 = never")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--mode", default="session", choices=MODES,
                    help="session: each session from a zero state; user: a user's sessions in time "
                         "order after an unscored bootstrap on the history tables")
    ap.add_argument("--history-tables", default=None,
                    help="comma-separated history tables for --mode user (default: train_full for "
                         "--table test, train for --table valid)")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    ks = tuple(int(k) for k in a.ks.split(",") if k.strip())
    if not ks or min(ks) < 1:
        ap.error("--ks must be positive integers, e.g. 1,5,10,20")
    hist = [h.strip() for h in a.history_tables.split(",") if h.strip()] if a.history_tables else None
    m = evaluate(a.model_dir, a.data, a.out, a.table, a.ties, ks, a.slots, a.device, a.mode, hist,
                 block_items=a.block_items)
    print(" ".join(f"{k}={m[k]:.4f}" for k in sorted(m) if k.startswith(("recall_at", "mrr_at"))))
    print(f"{m['n_events']} events, {m['eval_events_per_s']:.0f} events/s, ties={m['ties']}")
    if m["latency_ms_p50"] is not None:
        print(f"scorer.step: p50 {m['latency_ms_p50']:.3f} ms, p99 {m['latency_ms_p99']:.3f} ms per batch of "
              f"{m['latency_batch_rows_p50']:.0f} rows (median), {m['predict_us_per_event']:.2f} us/event")
    return 0


if __name__ == "__main__":
    sys.exit(main())
