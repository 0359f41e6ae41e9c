"""Small contract-conforming preprocess outputs built with pyarrow (no Spark), and ways to break them.

The layout and the split.json / manifest.json keys follow spark_jobs.preprocess /
spark_jobs.splits: split.json has strategy, global_cut, cut_ts, valid_cut_ts,
tables{name: {events, sessions, items, users}}, n_items, n_users; manifest.json
has parameters.min_session_length, events{...} and splits{name: split.json}.
"""
from __future__ import annotations

import datetime as dt
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from spark_jobs import contract as C

T0 = dt.datetime(2014, 4, 1, tzinfo=dt.timezone.utc)
DAY = 86_400


def _iso(sec: float) -> str:
    return (T0 + dt.timedelta(seconds=sec)).isoformat()


def make_events(n_sessions: int = 60, seed: int = 0) -> pd.DataFrame:
    """Sessions of 2..5 events over 10 days; users own several sessions; 25 items."""
    rng = np.random.default_rng(seed)
    rows = []
    for s in range(n_sessions):
        start = s * (10 * DAY / n_sessions) + rng.integers(0, 600)
        n = int(rng.integers(2, 6))
        for j in range(n):
            rows.append({"session_id": 100 + s, "user_id": s % 12, "item_id": 5000 + int(rng.integers(0, 25)),
                         "ts": start + 60 * j, "seq": j})
    return pd.DataFrame(rows)


def to_table(df: pd.DataFrame, schema: pa.Schema = C.EVENT_SCHEMA) -> pa.Table:
    d = df.copy()
    if "ts" in d and schema is C.EVENT_SCHEMA and not pd.api.types.is_datetime64_any_dtype(d["ts"]):
        d["ts"] = pd.to_datetime(T0) + pd.to_timedelta(d["ts"], unit="s")
    return pa.Table.from_pandas(d[[f.name for f in schema]], schema=schema, preserve_index=False)


def write_table(path: Path, t: pa.Table | pd.DataFrame, schema: pa.Schema = C.EVENT_SCHEMA) -> None:
    if isinstance(t, pd.DataFrame):
        t = to_table(t, schema)
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    pq.write_table(t, path / "part-00000.parquet")
    (path / "_SUCCESS").write_text("")  # as Spark leaves it: must be ignored


def counts(df: pd.DataFrame) -> dict:
    return {"events": len(df), "sessions": int(df.session_id.nunique()), "items": int(df.item_id.nunique()),
            "users": int(df.user_id.nunique())}


def _renumber(df: pd.DataFrame) -> pd.DataFrame:
    df = df.sort_values(["session_id", "seq"]).copy()
    df["seq"] = df.groupby("session_id").cumcount().astype("int32")
    return df


def _restrict(df: pd.DataFrame, items: set, min_len: int = 2) -> pd.DataFrame:
    df = df[df.item_id.isin(items)]
    ln = df.groupby("session_id").size()
    return _renumber(df[df.session_id.isin(ln[ln >= min_len].index)])


def build_out(root: Path, strategy: str = "time", n_sessions: int = 60, recent=(4, 1)) -> Path:
    """Write OUT/{events, splits/<strategy>/..., manifest.json}; return OUT."""
    out = Path(root)
    ev = make_events(n_sessions)
    sess = ev.groupby("session_id").agg(start=("ts", "min"), end=("ts", "max"))
    tmax = ev.ts.max()
    cut = tmax - 2 * DAY
    vcut = cut - 2 * DAY
    glob = strategy == "time_strict"
    if glob:  # global cut: train ends before it, test starts at/after it, straddlers dropped
        part = np.where(sess.end < cut, "train", np.where(sess.start >= cut, "test", "drop"))
        part = np.where((part == "train") & (sess.start >= vcut), "valid",
                        np.where((part == "train") & (sess.end >= vcut), "drop", part))
    else:  # GRU4Rec: by session end
        part = np.where(sess.end < cut, np.where(sess.end < vcut, "train", "valid"), "test")
    lab = pd.Series(part, index=sess.index)
    ev = ev.assign(part=ev.session_id.map(lab))
    train = ev[ev.part == "train"].drop(columns="part")
    valid_raw = ev[ev.part == "valid"].drop(columns="part")
    test_raw = ev[ev.part == "test"].drop(columns="part")
    train_full = _renumber(pd.concat([train, valid_raw]))
    tables = {"train": _renumber(train), "valid": _restrict(valid_raw, set(train.item_id)),
              "test": _restrict(test_raw, set(train_full.item_id)), "train_full": train_full}
    fs = train_full.groupby("session_id").ts.min().reset_index().sort_values(["ts", "session_id"], ascending=False)
    for k in recent:
        keep = set(fs.session_id.iloc[: math.ceil(len(fs) / k)])
        tables[C.recent_table(k)] = train_full[train_full.session_id.isin(keep)]
    events = _renumber(ev.drop(columns="part"))
    sd = out / C.SPLITS_DIR / strategy
    write_table(out / C.EVENTS_DIR, events)
    for name, df in tables.items():
        write_table(sd / name, df)
    sup = train_full.groupby("item_id").size().rename("support").reset_index()
    sup = sup.sort_values(["support", "item_id"], ascending=[False, True]).reset_index(drop=True)
    sup["item_idx"] = np.arange(len(sup), dtype="int32")
    write_table(sd / C.ITEM_INDEX, sup, C.ITEM_INDEX_SCHEMA)
    us = train_full.groupby("user_id").session_id.nunique().rename("n_sessions").reset_index()
    us["user_idx"] = np.arange(len(us), dtype="int32")
    write_table(sd / C.USER_INDEX, us, C.USER_INDEX_SCHEMA)
    meta = {"strategy": strategy, "global_cut": glob, "cut_ts": _iso(cut), "valid_cut_ts": _iso(vcut),
            "tables": {n: counts(df) for n, df in tables.items()}, "n_items": len(sup), "n_users": len(us),
            "recent_fractions": list(recent), "leaks_through_time": not glob}
    (sd / C.SPLIT_META).write_text(json.dumps(meta, indent=2))
    n = len(events)
    manifest = {"parameters": {"min_session_length": 0, "split": strategy}, "events": counts(events),
                "splits": {strategy: meta}, "accounting": accounting(n)}
    (out / C.MANIFEST).write_text(json.dumps(manifest, indent=2))
    return out


def accounting(n: int) -> dict:
    """The manifest's row accounting for one raw file of ``n`` events + a header + one bad row."""
    return {"steps": [
        {"step": "read", "rows_in": n + 2, "rows_out": n,
         "removed": {"skipped: header_line": 1, "quarantined: unparseable timestamp": 1}},
        {"step": "sessionize", "rows_in": n, "rows_out": n, "removed": {}},
        {"step": "write", "rows_in": n, "rows_out": n, "removed": {}}],
        "files": [{"file": "raw.tsv", "rows_read": n + 2, "skipped": {"header_line": 1},
                   "quarantined": {"unparseable timestamp": 1}, "removed": 0, "written": n}]}


# --------------------------------------------------------------------------- breaking things on purpose
def read(path: Path) -> pd.DataFrame:
    return pads.dataset(str(path), format="parquet").to_table().to_pandas()


def rewrite(path: Path, df: pd.DataFrame, schema: pa.Schema = C.EVENT_SCHEMA) -> None:
    write_table(path, pa.Table.from_pandas(df, schema=schema, preserve_index=False))


def swap_ts_within_session(path: Path) -> int:
    """Out-of-order events: swap the ts of seq 0 and seq 1 of the first session with distinct ts."""
    df = read(path)
    for sid, g in df.groupby("session_id"):
        if len(g) >= 2 and g.ts.iloc[0] < g.ts.iloc[1]:
            i0, i1 = g.index[0], g.index[1]
            df.loc[[i0, i1], "ts"] = df.loc[[i1, i0], "ts"].to_numpy()
            rewrite(path, df)
            return int(sid)
    raise AssertionError("no session to break")


def edit_json(path: Path, fn) -> None:
    d = json.loads(path.read_text())
    fn(d)
    path.write_text(json.dumps(d, indent=2))
