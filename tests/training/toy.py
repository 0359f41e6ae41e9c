"""Tiny SPLIT_DIRs in the contract layout for fast tests (pure pyarrow, no Spark)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from spark_jobs.contract import EVENT_SCHEMA, ITEM_INDEX_SCHEMA


def events_table(sessions: list[tuple[int, list[int]]], t0: int = 1_600_000_000, user_of=None) -> pa.Table:
    """sessions = [(session_id, [item_id, ...]), ...]; session k starts at t0 + 1000 k seconds."""
    sid, iid, ts, seq, uid = [], [], [], [], []
    for k, (s, items) in enumerate(sessions):
        for j, it in enumerate(items):
            sid.append(s)
            iid.append(it)
            ts.append((t0 + 1000 * k + 10 * j) * 1_000_000)
            seq.append(j)
            uid.append(None if user_of is None else user_of(s))
    return pa.table({"session_id": pa.array(sid, pa.int64()), "user_id": pa.array(uid, pa.int64()),
                     "item_id": pa.array(iid, pa.int64()),
                     "ts": pa.array(ts, pa.timestamp("us", tz="UTC")),
                     "seq": pa.array(seq, pa.int32())}, schema=EVENT_SCHEMA)


def write_split(root: Path, tables: dict[str, pa.Table], index_from: str = "train_full") -> Path:
    root = Path(root)
    for name, t in tables.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        pq.write_table(t, root / name / "part-0.parquet")
    src = tables[index_from]
    ids = src.column("item_id").to_numpy()
    uniq, first = np.unique(ids, return_index=True)
    order = np.argsort(first)
    items = uniq[order]
    support = np.array([(ids == i).sum() for i in items], np.int64)
    it = pa.table({"item_id": pa.array(items, pa.int64()),
                   "item_idx": pa.array(np.arange(len(items), dtype=np.int32), pa.int32()),
                   "support": pa.array(support, pa.int64())}, schema=ITEM_INDEX_SCHEMA)
    (root / "item_index").mkdir(parents=True, exist_ok=True)
    pq.write_table(it, root / "item_index" / "part-0.parquet")
    return root


def random_sessions(n_sessions: int, n_items: int, seed: int = 0, start_id: int = 1,
                    max_len: int = 8) -> list[tuple[int, list[int]]]:
    """Sessions with a learnable pattern: the next item is often item+1 (mod n_items)."""
    rng = np.random.default_rng(seed)
    out = []
    for s in range(n_sessions):
        L = int(rng.integers(1, max_len + 1))
        cur = int(rng.integers(0, n_items))
        items = []
        for _ in range(L):
            items.append(100 + cur)
            cur = (cur + 1) % n_items if rng.random() < 0.8 else int(rng.integers(0, n_items))
        out.append((start_id + s, items))
    return out


def zipf_train_context(seed: int, n_sessions: int, max_len: int, n_items: int):
    """An in-memory GRU4Rec training context: ``n_sessions`` sessions of 2..max_len-1 Zipf-drawn
    items (ids 100..), each item supported once. Returns ``TrainContext`` on the CPU."""
    import torch

    from training.data import ItemIndex, SessionData
    from training.family import TrainContext

    rng = np.random.default_rng(seed)
    lengths = rng.integers(2, max_len, size=n_sessions)
    off = np.r_[0, np.cumsum(lengths)].astype(np.int64)
    items = (rng.zipf(1.3, off[-1]) % n_items).astype(np.int64)
    data = SessionData(items=items, offsets=off, session_ids=np.arange(n_sessions), start_ts=np.arange(n_sessions),
                       user_ids=None)
    idx = ItemIndex(np.arange(n_items) + 100, np.ones(n_items, np.int64))
    return TrainContext(idx, data, np.bincount(items, minlength=n_items), torch.device("cpu"))


def toy_split(root: Path, n_train: int = 300, n_test: int = 60, n_items: int = 40, seed: int = 0) -> Path:
    train = random_sessions(n_train, n_items, seed, start_id=1)
    test = random_sessions(n_test, n_items, seed + 1, start_id=10_000)
    return write_split(root, {"train_full": events_table(train), "train": events_table(train[: n_train * 3 // 4]),
                              "test": events_table(test, t0=1_700_000_000),
                              "train_recent_4": events_table(train[-n_train // 4:])})


def logged_run(model_dir: Path, split: Path, tmp_path: Path, name: str, monkeypatch, mode: str = "user",
               user_id: int = 1000, session=(105, 106), k: int = 3):
    """Log a trained run to a local MLflow store in ``tmp_path`` (training, then an evaluation on
    ``test`` in ``mode``) and serve its logged model once: (the MLflow run, the top-``k`` items the
    pyfunc returns for ``session`` and ``user_id``)."""
    import mlflow
    import pandas as pd

    from evaluation import mlflow_logging as ml
    from evaluation.evaluate import evaluate

    monkeypatch.setenv("RNNREC_MLFLOW_SYSTEM_METRICS", "0")
    ml.configure(tmp_path)
    run_id = mlflow.MlflowClient().create_run(ml.experiment_id("toy", tmp_path)).info.run_id
    logged = ml.log_training(run_id, model_dir, name=name)
    evaluate(model_dir, split, tmp_path / "eval", device="cpu", mode=mode)
    ml.log_evaluation(run_id, tmp_path / "eval", "test")
    out = mlflow.pyfunc.load_model(logged["model_uri"]).predict(
        pd.DataFrame({"session": [list(session)], "user_id": [user_id]}), params={"k": k})
    return mlflow.MlflowClient().get_run(run_id), list(out["items"][0])
