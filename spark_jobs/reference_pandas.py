"""Single-process pandas REFERENCE of the preprocessing (not the production path).

Run::

    python -m spark_jobs.reference_pandas --input /tmp/clicks --format synthetic \\
        --split time --test-days 1 --min-item-support 5 --min-session-length 2 --out /tmp/ref

    python -m spark_jobs.reference_pandas --format gru4rec --split time --test-days 1 \\
        --input ../shared/data/rsc15-100k/yoochoose-clicks-100k_train_full.txt \\
                ../shared/data/rsc15-100k/yoochoose-clicks-100k_test.txt --out /tmp/rsc15-ref

It exists for two reasons: it is the **baseline** of the scale benchmark
(``benchmarks/preprocess_scale.py``), and an **independent oracle** for the
Spark jobs (``spark_jobs.sessionize`` / ``filters`` / ``splits``): written from
the issue's definitions with vectorised pandas/numpy (sort, shift, cumsum,
groupby) and no Spark, so that a test can compare both outputs row for row.
It holds the whole dataset in memory (peak ~250 bytes per event plus
~150 MB for the interpreter: 0.39 GB at 1M events) and uses one core; split
tables are built and written one at a time. Only the GRU4Rec time split is
implemented, and the readers cover ``synthetic`` (generator Parquet),
``gru4rec`` (TSV) and ``yoochoose`` (raw clicks CSV).

Semantics (identical to the Spark job by construction, checked by tests):

* **Original order** = input files in sorted order, then row order; it breaks
  timestamp ties everywhere: events are ordered by (ts, original order).
* **Sessionize by user**: per user, a new session starts when the gap to the
  previous event is strictly greater than ``idle_gap_s`` (a gap of exactly
  30 min stays in the session). Session ids are dense from 0 in order of the
  session's first event (ts, original order). Sources with session ids keep them.
* **Remove repeats** (optional, HRNN): drop an event whose previous event in the
  same session has the same item.
* **Filters**, each only when set (> 1, or max > 0), in this order per round:
  item support (events per item) >= n; session length >= n; min <= sessions per
  user <= max (events without a user are kept). Rounds repeat until one removes
  nothing (a fixed point); counts after every step are recorded.
* **GRU4Rec time split**: ``tmax`` = last timestamp; test = sessions whose last
  event is >= ``tmax - test_days*86400 s``; the rest is ``train_full``. Inside
  train_full the same rule (with ``valid_days``) gives ``train`` and the raw
  validation sessions. ``test`` keeps only items seen in ``train_full`` and then
  sessions with >= 2 events; ``valid`` likewise against ``train``. ``seq`` is
  renumbered 0.. after removals. ``train_recent_<k>`` holds the most recent
  ceil(n/k) train_full sessions (by start, then session id).
* ``item_index``: item_idx 0 = most supported in train_full (ties by item_id);
  ``user_index``: by user_id, with the number of train_full sessions.

Output: the layout of :mod:`spark_jobs.contract` (``events/``, ``splits/time/*``,
``manifest.json``), one Parquet file per table, written to a temporary sibling
folder and swapped in atomically.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import shutil
import sys
import time
import uuid
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from spark_jobs import contract as C

DAY_US = 86_400 * 1_000_000
#: marks "no user" inside int64 columns (nulls in the written Parquet)
NO_USER = np.iinfo(np.int64).min
FORMATS = ("synthetic", "gru4rec", "yoochoose")


class InputError(ValueError):
    """The input cannot be read (missing files, wrong header, bad values)."""


# --------------------------------------------------------------------------- reading

def list_files(inputs: list[str] | str) -> list[str]:
    """Files in the given order; a directory expands to its data files in sorted order.

    Names starting with ``.`` or ``_`` (markers, metadata) are skipped, as Spark does.
    """
    import glob

    if isinstance(inputs, str):
        inputs = [inputs]
    files: list[str] = []
    for pattern in inputs:
        matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        if not matches:
            raise InputError(f"input {pattern!r} matches no file")
        for m in matches:
            if not os.path.exists(m):
                raise InputError(f"input file {m!r} does not exist")
            if os.path.isdir(m):
                for root, dirs, names in os.walk(m):
                    dirs[:] = sorted(d for d in dirs if not d.startswith((".", "_")))
                    files += [os.path.join(root, n) for n in sorted(names) if not n.startswith((".", "_"))]
            else:
                files.append(os.path.abspath(m))
    if not files:
        raise InputError(f"no input files in {inputs}")
    return files


def read_events(inputs: list[str] | str, fmt: str) -> tuple[pd.DataFrame, bool]:
    """Read raw events -> (frame with user_id, session_id, item_id, ts [int64 us]; has_sessions).

    Row order of the frame is the original order (files in order, then rows).
    """
    files = list_files(inputs)
    if fmt == "synthetic":
        parts = []
        for f in files:
            t = pq.read_table(f, columns=["user_id", "item_id", "ts"])
            for c in ("user_id", "item_id", "ts"):
                if t[c].null_count:
                    raise InputError(f"{f}: {t[c].null_count} row(s) with a missing {c}")
            parts.append(t.set_column(2, "ts", t["ts"].cast(pa.timestamp("us", tz="UTC")).cast(pa.int64())))
        t = pa.concat_tables(parts).combine_chunks()
        del parts
        n = t.num_rows
        df = pd.DataFrame(
            {
                "session_id": np.full(n, -1, dtype=np.int64),
                "user_id": t["user_id"].to_numpy(),
                "item_id": t["item_id"].to_numpy(),
                "ts": t["ts"].to_numpy(),
            }
        )
        return df, False
    if fmt == "gru4rec":
        parts = []
        for f in files:
            with open(f) as fh:
                head = fh.readline().rstrip("\n")
            if head.split("\t") != ["SessionId", "ItemId", "Time"]:
                raise InputError(f"{f}: expected header 'SessionId<TAB>ItemId<TAB>Time', got {head[:80]!r}")
            d = pd.read_csv(f, sep="\t", dtype={"SessionId": np.int64, "ItemId": np.int64, "Time": np.float64})
            parts.append(d)
        d = pd.concat(parts, ignore_index=True)
        df = pd.DataFrame(
            {
                "session_id": d["SessionId"].to_numpy(),
                "user_id": np.full(len(d), NO_USER, dtype=np.int64),
                "item_id": d["ItemId"].to_numpy(),
                # Unix seconds with a ms fraction -> exact microseconds
                "ts": np.rint(d["Time"].to_numpy() * 1_000_000).astype(np.int64),
            }
        )
        return df, True
    if fmt == "yoochoose":
        import pyarrow.csv as pacsv

        opts = pacsv.ConvertOptions(column_types={"SessionId": pa.int64(), "Timestamp": pa.timestamp("us", tz="UTC"),
                                                  "ItemId": pa.int64(), "Category": pa.string()})
        parts = []
        for f in files:
            try:
                parts.append(pacsv.read_csv(f, read_options=pacsv.ReadOptions(
                    column_names=["SessionId", "Timestamp", "ItemId", "Category"]), convert_options=opts))
            except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
                raise InputError(f"{f}: not a yoochoose-clicks file ({e})") from e
        t = pa.concat_tables(parts)
        df = pd.DataFrame(
            {
                "session_id": t["SessionId"].to_numpy(),
                "user_id": np.full(t.num_rows, NO_USER, dtype=np.int64),
                "item_id": t["ItemId"].to_numpy(),
                "ts": t["Timestamp"].cast(pa.int64()).to_numpy(),
            }
        )
        return df, True
    raise InputError(f"unknown format {fmt!r}; the reference reads {', '.join(FORMATS)}")


# --------------------------------------------------------------------------- steps

def counts(df: pd.DataFrame) -> dict:
    """events / sessions / items / users (distinct, users without null) and the time range."""
    users = df["user_id"]
    n_users = int(users[users != NO_USER].nunique())
    return {
        "events": int(len(df)),
        "sessions": int(df["session_id"].nunique()),
        "items": int(df["item_id"].nunique()),
        "users": n_users,
        "ts_min": _iso(int(df["ts"].min())) if len(df) else None,
        "ts_max": _iso(int(df["ts"].max())) if len(df) else None,
    }


def _iso(us: int | None) -> str | None:
    if us is None:
        return None
    return (dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc) + dt.timedelta(microseconds=us)).isoformat()


def _seq(session_ids: np.ndarray) -> np.ndarray:
    """0-based position inside each run of equal session ids (input grouped by session)."""
    n = session_ids.size
    first = np.ones(n, dtype=bool)
    first[1:] = session_ids[1:] != session_ids[:-1]
    idx = np.arange(n, dtype=np.int64)
    return (idx - np.maximum.accumulate(np.where(first, idx, 0))).astype(np.int32)


def sessionize(df: pd.DataFrame, *, by_user: bool, idle_gap_s: float = 1800.0, remove_repeats: bool = False) -> tuple[pd.DataFrame, dict]:
    """Assign sessions (by user idle gap, or keep the given ids) and ``seq``.

    ``df`` rows must be in original order. Returns the frame sorted by
    (session_id, ts, original order) with column ``_ord`` (original position)
    and ``seq``, plus info (repeats removed).
    """
    n = len(df)
    user = df["user_id"].to_numpy()
    ts = df["ts"].to_numpy()
    info = {"by_user": by_user, "removed_repeats": 0}
    # np.lexsort is stable, so rows with equal keys keep their original order:
    # sorting by (key, ts) is sorting by (key, ts, original order).
    if by_user:
        if (user == NO_USER).any():
            raise ValueError(f"{int((user == NO_USER).sum())} events have no user id: cannot sessionize by user")
        order = np.lexsort((ts, user))
        u, t = user[order], ts[order]
        new = np.ones(n, dtype=bool)
        # strictly greater: a gap of exactly idle_gap_s stays in the session
        new[1:] = (u[1:] != u[:-1]) | ((t[1:] - t[:-1]) > int(round(idle_gap_s * 1_000_000)))
        del u, t
        sno = np.cumsum(new) - 1
        starts = np.flatnonzero(new)
        del new
        # dense ids in order of each session's first event (ts, original order)
        rank = np.empty(starts.size, dtype=np.int64)
        rank[np.lexsort((order[starts], ts[order[starts]]))] = np.arange(starts.size)
        sid_sorted = rank[sno]
        del sno, rank, starts
        # rows are grouped by session in (ts, original order) already: a stable
        # sort on the id only moves whole sessions
        o2 = np.argsort(sid_sorted, kind="stable")
        order, sid = order[o2], sid_sorted[o2]
        del o2, sid_sorted
    else:
        order = np.lexsort((ts, df["session_id"].to_numpy()))
        sid = df["session_id"].to_numpy()[order]
    out = pd.DataFrame({"session_id": sid, "user_id": user[order], "item_id": df["item_id"].to_numpy()[order],
                        "ts": ts[order], "_ord": order.astype(np.int64)})
    del order, sid
    if remove_repeats:
        s = out["session_id"].to_numpy()
        it = out["item_id"].to_numpy()
        rep = np.zeros(n, dtype=bool)
        rep[1:] = (s[1:] == s[:-1]) & (it[1:] == it[:-1])
        info["removed_repeats"] = int(rep.sum())
        out = out[~rep].reset_index(drop=True)
    out["seq"] = _seq(out["session_id"].to_numpy())
    return out, info


def _keep_by_size(df: pd.DataFrame, key: str, lo: int, hi: int = 0) -> pd.DataFrame:
    n = df.groupby(key, sort=False)[key].transform("size").to_numpy()
    keep = n >= lo
    if hi:
        keep &= n <= hi
    return df[keep]


def _keep_users(df: pd.DataFrame, lo: int, hi: int) -> pd.DataFrame:
    sess = df[["session_id", "user_id"]].drop_duplicates("session_id")
    per_user = sess.groupby("user_id", sort=False).size()
    ok = per_user.index[(per_user >= lo) & ((per_user <= hi) if hi else True)]
    keep = df["user_id"].isin(ok).to_numpy() | (df["user_id"].to_numpy() == NO_USER)  # no user: kept
    return df[keep]


def apply_filters(
    df: pd.DataFrame,
    min_item_support: int = 0,
    min_session_length: int = 0,
    min_sessions_per_user: int = 0,
    max_sessions_per_user: int = 0,
    max_rounds: int = 50,
) -> tuple[pd.DataFrame, list[dict]]:
    """Filter to a fixed point (see the module docstring for the order); returns (df, steps)."""
    plan = []
    if min_item_support > 1:
        plan.append(("min_item_support", lambda d: _keep_by_size(d, "item_id", min_item_support)))
    if min_session_length > 1:
        plan.append(("min_session_length", lambda d: _keep_by_size(d, "session_id", min_session_length)))
    if min_sessions_per_user > 1 or max_sessions_per_user > 0:
        plan.append(("sessions_per_user", lambda d: _keep_users(d, max(min_sessions_per_user, 1), max_sessions_per_user)))
    steps: list[dict] = []
    if not plan:
        return df, steps
    for rnd in range(1, max_rounds + 1):
        start_n = len(df)
        for name, fn in plan:
            df = fn(df)
            steps.append({"round": rnd, "step": name, **counts(df)})
        if len(df) == start_n:
            df = df.reset_index(drop=True)
            df["seq"] = _seq(df["session_id"].to_numpy())
            return df, steps
    raise RuntimeError(f"filters did not reach a fixed point within {max_rounds} rounds")


def _restrict(ev: pd.DataFrame, items: np.ndarray, min_len: int) -> pd.DataFrame:
    kept = ev[ev["item_id"].isin(items).to_numpy()]
    if min_len > 1:
        kept = _keep_by_size(kept, "session_id", min_len)
    kept = kept.reset_index(drop=True)
    kept["seq"] = _seq(kept["session_id"].to_numpy())
    return kept


def split_lazily(
    ev: pd.DataFrame,
    test_days: float = 1.0,
    valid_days: float | None = None,
    min_test_session_length: int = 2,
    recent_fractions: tuple[int, ...] = C.DEFAULT_RECENT_FRACTIONS,
) -> tuple[dict[str, Callable[[], pd.DataFrame]], dict]:
    """GRU4Rec time split of events sorted by (session_id, seq).

    Returns (name -> function building that table, meta). Tables are built one
    at a time on demand because at YOOCHOOSE size holding all of them at once
    (train_full and train_recent_1 are near-copies of the input) would
    multiply the peak memory.
    """
    vdays = test_days if valid_days is None else valid_days
    g = ev.groupby("session_id", sort=True)["ts"]
    sess_ids = g.min().index.to_numpy()
    start, end = g.min().to_numpy(), g.max().to_numpy()
    if sess_ids.size == 0:
        raise ValueError("nothing to split: no events left after filtering")
    tmax = int(end.max())
    cut = tmax - int(round(test_days * DAY_US))
    is_test = end >= cut  # GRU4Rec: a session belongs to test iff its LAST event is in the window
    vcut = None
    is_valid = np.zeros(sess_ids.size, dtype=bool)
    if (~is_test).any():
        vcut = int(end[~is_test].max()) - int(round(vdays * DAY_US))
        is_valid = ~is_test & (end >= vcut)
    part = np.where(is_test, 2, np.where(is_valid, 1, 0)).astype(np.int8)  # 0 train, 1 valid, 2 test
    # sess_ids is sorted (groupby sort=True): a binary search maps events to their session
    ev_sess = np.searchsorted(sess_ids, ev["session_id"].to_numpy())
    ev_part = part[ev_sess]
    items = ev["item_id"].to_numpy()

    def take(mask) -> pd.DataFrame:
        return ev[mask].reset_index(drop=True)

    tables: dict[str, Callable[[], pd.DataFrame]] = {
        C.TRAIN: lambda: take(ev_part == 0),
        C.VALID: lambda: _restrict(take(ev_part == 1), np.unique(items[ev_part == 0]), min_test_session_length),
        C.TEST: lambda: _restrict(take(ev_part == 2), np.unique(items[ev_part <= 1]), min_test_session_length),
        C.TRAIN_FULL: lambda: take(ev_part <= 1),
    }
    full = np.flatnonzero(part <= 1)
    if recent_fractions and full.size:
        # recency rank of train_full sessions: start desc, then session id desc (0 = most recent)
        order = np.lexsort((-sess_ids[full], -start[full]))
        rank = np.full(sess_ids.size, np.iinfo(np.int64).max, dtype=np.int64)
        rank[full[order]] = np.arange(full.size)
        for k in recent_fractions:
            n_keep = math.ceil(full.size / k)
            tables[C.recent_table(k)] = lambda n_keep=n_keep: take(rank[ev_sess] < n_keep)
    meta = {
        "strategy": "time",
        "cut_ts": _iso(cut),
        "tmax_ts": _iso(tmax),
        "valid_cut_ts": _iso(vcut),
        "global_cut": False,
        "leaks_through_time": True,
        "dropped_sessions": 0,
    }
    return tables, meta


def time_split(ev: pd.DataFrame, test_days: float = 1.0, valid_days: float | None = None,
               min_test_session_length: int = 2,
               recent_fractions: tuple[int, ...] = C.DEFAULT_RECENT_FRACTIONS) -> tuple[dict[str, pd.DataFrame], dict]:
    """:func:`split_lazily` with every table built: (name -> frame, meta)."""
    lazy, meta = split_lazily(ev, test_days, valid_days, min_test_session_length, recent_fractions)
    return {name: make() for name, make in lazy.items()}, meta


def item_index(train_full: pd.DataFrame) -> pd.DataFrame:
    sup = train_full.groupby("item_id").size().rename("support").reset_index()
    sup = sup.sort_values(["support", "item_id"], ascending=[False, True], kind="stable", ignore_index=True)
    sup["item_idx"] = np.arange(len(sup), dtype=np.int32)
    return sup[["item_id", "item_idx", "support"]]


def user_index(train_full: pd.DataFrame) -> pd.DataFrame:
    u = train_full[train_full["user_id"] != NO_USER]
    n = u.groupby("user_id", sort=True)["session_id"].nunique().rename("n_sessions").reset_index()
    n["user_idx"] = np.arange(len(n), dtype=np.int32)
    return n[["user_id", "user_idx", "n_sessions"]]


# --------------------------------------------------------------------------- writing

def to_arrow(df: pd.DataFrame) -> pa.Table:
    """Contract events table from a reference frame (already sorted by session_id, seq)."""
    user = df["user_id"].to_numpy()
    no_user = user == NO_USER
    return pa.table(
        {
            "session_id": pa.array(df["session_id"].to_numpy(), pa.int64()),
            "user_id": pa.array(user, pa.int64(), mask=no_user if no_user.any() else None),
            "item_id": pa.array(df["item_id"].to_numpy(), pa.int64()),
            "ts": pa.array(df["ts"].to_numpy(), pa.int64()).cast(pa.timestamp("us", tz="UTC")),
            "seq": pa.array(df["seq"].to_numpy(), pa.int32()),
        },
        schema=C.EVENT_SCHEMA,
    )


def _write_table(t: pa.Table, folder: Path) -> None:
    folder.mkdir(parents=True)
    pq.write_table(t, folder / "part-00000.parquet")


def preprocess(
    inputs: list[str] | str,
    fmt: str,
    out: str | Path | None,
    *,
    sessionize_by_user: bool = False,
    idle_gap_minutes: float = 30.0,
    remove_repeats: bool = False,
    min_item_support: int = 0,
    min_session_length: int = 0,
    min_sessions_per_user: int = 0,
    max_sessions_per_user: int = 0,
    test_days: float = 1.0,
    valid_days: float | None = None,
    recent_fractions: tuple[int, ...] = C.DEFAULT_RECENT_FRACTIONS,
    keep_tables: bool = True,
) -> tuple[dict, dict[str, pd.DataFrame]]:
    """Read, sessionize, filter, split; write to ``out`` (atomically) unless None.

    Returns (manifest, tables): ``events`` and every split table when
    ``keep_tables`` (tests), else an empty dict (the CLI: one table in memory at a time).
    """
    t0 = time.perf_counter()
    raw, has_sessions = read_events(inputs, fmt)
    by_user = sessionize_by_user or not has_sessions
    steps: list[dict] = []
    ev, info = sessionize(raw, by_user=by_user, idle_gap_s=idle_gap_minutes * 60.0, remove_repeats=remove_repeats)
    del raw
    ev = ev.drop(columns="_ord")  # ev stays sorted by (session, ts, original order): no longer needed
    steps.append({"step": "sessionized", "by_user": by_user, **counts(ev)})
    if remove_repeats:
        steps.append({"step": "remove_repeats", "removed": info["removed_repeats"], **counts(ev)})
    ev, fsteps = apply_filters(ev, min_item_support, min_session_length, min_sessions_per_user, max_sessions_per_user)
    steps += fsteps
    final = counts(ev)
    steps.append({"step": "final", **final})
    lazy, meta = split_lazily(ev, test_days, valid_days, 2, tuple(recent_fractions))
    tmp = None
    if out is not None:
        out = Path(out).resolve()
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.tmp-{uuid.uuid4().hex[:8]}")
    kept: dict[str, pd.DataFrame] = {C.EVENTS_DIR: ev} if keep_tables else {}
    stats: dict[str, dict] = {}
    try:
        split_dir = None
        if tmp is not None:
            _write_table(to_arrow(ev), tmp / C.EVENTS_DIR)
            split_dir = tmp / C.SPLITS_DIR / "time"
        for name, make in lazy.items():
            t = make()
            stats[name] = counts(t)
            if name == C.TRAIN_FULL:
                items, users = item_index(t), user_index(t)
            if split_dir is not None:
                _write_table(to_arrow(t), split_dir / name)
            if keep_tables:
                kept[name] = t
            del t
        split_meta = {**meta, "tables": stats, "n_items": len(items), "n_users": len(users),
                      "recent_fractions": list(recent_fractions)}
        manifest = {
            "implementation": "spark_jobs.reference_pandas",
            "inputs": list_files(inputs),
            "format": fmt,
            "parameters": {
                "sessionize_by_user": sessionize_by_user, "idle_gap_minutes": idle_gap_minutes,
                "remove_repeats": remove_repeats, "min_item_support": min_item_support,
                "min_session_length": min_session_length, "min_sessions_per_user": min_sessions_per_user,
                "max_sessions_per_user": max_sessions_per_user, "test_days": test_days, "valid_days": valid_days,
                "recent_fractions": list(recent_fractions),
            },
            "steps": steps,
            "events": final,
            "splits": {"time": split_meta},
        }
        if tmp is not None:
            _write_table(pa.Table.from_pandas(items, schema=C.ITEM_INDEX_SCHEMA, preserve_index=False), split_dir / C.ITEM_INDEX)
            _write_table(pa.Table.from_pandas(users, schema=C.USER_INDEX_SCHEMA, preserve_index=False), split_dir / C.USER_INDEX)
            (split_dir / C.SPLIT_META).write_text(json.dumps(split_meta, indent=2, sort_keys=True))
            manifest["seconds"] = round(time.perf_counter() - t0, 3)
            (tmp / C.MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
            C.replace_dir(tmp, out)
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    manifest.setdefault("seconds", round(time.perf_counter() - t0, 3))
    return manifest, kept


def compare_outputs(a: str | Path, b: str | Path, split: str = "time") -> dict[str, str | None]:
    """Row-level comparison of two preprocessing outputs (e.g. Spark's and this reference's).

    For ``events`` and every split table present in either: None when both hold
    the same rows (all contract columns, order-insensitive), else a short
    description of the first difference. Used by the benchmark and by tests.
    """
    import pyarrow.dataset as pds

    def load(root: Path, rel: str) -> pd.DataFrame | None:
        p = root / rel
        if not p.exists():
            return None
        t = pds.dataset(p, format="parquet").to_table(columns=C.EVENT_COLUMNS)
        d = pd.DataFrame({c: t[c].cast(pa.int64()).to_numpy(zero_copy_only=False) if c != "user_id"
                          else t[c].fill_null(NO_USER).to_numpy() for c in C.EVENT_COLUMNS})
        return d.sort_values(C.EVENT_COLUMNS, ignore_index=True)

    a, b = Path(a), Path(b)
    names = {C.EVENTS_DIR}
    for root in (a, b):
        d = root / C.SPLITS_DIR / split
        if d.exists():
            names |= {f"{C.SPLITS_DIR}/{split}/{p.name}" for p in d.iterdir()
                      if p.is_dir() and p.name not in (C.ITEM_INDEX, C.USER_INDEX)}
    result: dict[str, str | None] = {}
    for rel in sorted(names):
        x, y = load(a, rel), load(b, rel)
        if x is None or y is None:
            result[rel] = f"missing in {a if x is None else b}"
        elif len(x) != len(y):
            result[rel] = f"{len(x)} vs {len(y)} rows"
        else:
            diff = (x.to_numpy() != y.to_numpy()).any(axis=1)
            result[rel] = None if not diff.any() else (
                f"{int(diff.sum())} rows differ, first: {x[diff].iloc[0].to_dict()} vs {y[diff].iloc[0].to_dict()}")
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m spark_jobs.reference_pandas", description=__doc__.split("\n\n")[0])
    a = p.add_argument
    a("--input", nargs="+", required=True, help="files, directories or globs (order = original order)")
    a("--format", choices=FORMATS, required=True)
    a("--out", required=True, help="output directory (replaced atomically)")
    a("--split", choices=["time"], default="time", help="only the GRU4Rec time split is implemented here")
    a("--sessionize-by-user", action="store_true")
    a("--idle-gap-minutes", type=float, default=30.0)
    a("--remove-repeats", action="store_true")
    a("--min-item-support", type=int, default=0)
    a("--min-session-length", type=int, default=0)
    a("--min-sessions-per-user", type=int, default=0)
    a("--max-sessions-per-user", type=int, default=0)
    a("--test-days", type=float, default=1.0)
    a("--valid-days", type=float, default=None)
    a("--recent-fractions", default=",".join(map(str, C.DEFAULT_RECENT_FRACTIONS)))
    args = p.parse_args(argv)
    fr = tuple(int(x) for x in args.recent_fractions.split(",") if x.strip())
    try:
        manifest, _ = preprocess(
            args.input, args.format, args.out, sessionize_by_user=args.sessionize_by_user,
            idle_gap_minutes=args.idle_gap_minutes, remove_repeats=args.remove_repeats,
            min_item_support=args.min_item_support, min_session_length=args.min_session_length,
            min_sessions_per_user=args.min_sessions_per_user, max_sessions_per_user=args.max_sessions_per_user,
            test_days=args.test_days, valid_days=args.valid_days, recent_fractions=fr, keep_tables=False,
        )
    except (InputError, ValueError) as e:
        print(f"reference preprocess failed: {e}", file=sys.stderr)
        return 2
    print(f"{'table':<20}{'events':>11}{'sessions':>10}{'items':>8}{'users':>9}")
    for st in manifest["steps"]:
        name = st["step"] if "round" not in st else f"r{st['round']}:{st['step']}"
        print(f"{name:<20}{st['events']:>11}{st['sessions']:>10}{st['items']:>8}{st['users']:>9}")
    for name, c in manifest["splits"]["time"]["tables"].items():
        print(f"{'time/' + name:<20}{c['events']:>11}{c['sessions']:>10}{c['items']:>8}{c['users']:>9}")
    print(f"wrote {os.path.abspath(args.out)} in {manifest['seconds']:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
