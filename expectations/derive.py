"""Small derived frames that Great Expectations validates (pure functions, no GX here).

GX's built-in expectations check one column (or a pair) of one batch. The
quality gates also need ordering, per-session and cross-table facts ("ts
non-decreasing within a session", "a session is in exactly one of
train/valid/test", "max(train ts) <= cut"). Each such fact is computed here,
with pyarrow + numpy, into a narrow pandas frame whose columns GX then checks
with ordinary expectations (``expect_column_values_to_be_between`` ...), so
every gate shows up in the GX result and the Data Docs with its observed value
and the offending rows.

Memory: only the columns a gate needs are read (Parquet column projection);
per-row frames hold ~5 numeric columns (about 40 bytes per event), per-session
and per-table frames are far smaller. Tables written by ``spark_jobs`` are
already sorted by (session_id, seq), so the session arithmetic below is
vectorised numpy over sorted arrays (a sort happens only when the order is
broken, which the gate then reports).
"""
from __future__ import annotations

import datetime as dt
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

from spark_jobs import contract as C

US = 1_000_000


class ContractError(ValueError):
    """A table cannot even be read as the data contract describes (missing dir, unreadable Parquet)."""


# --------------------------------------------------------------------------- reading
def open_table(path: str | Path) -> pads.Dataset:
    """A Parquet dataset (a folder of part files, hive partitions allowed, or one file)."""
    p = Path(path)
    if not p.exists():
        raise ContractError(f"table {p} does not exist")
    try:
        return pads.dataset(str(p), format="parquet", partitioning="hive")
    except (pa.ArrowInvalid, OSError) as e:
        raise ContractError(f"table {p} is not readable Parquet: {e}") from e


def read_columns(path_or_table, columns: Iterable[str]) -> pa.Table:
    """Read only ``columns`` that exist (missing ones are reported by the schema frame)."""
    if isinstance(path_or_table, pa.Table):
        t = path_or_table
        return t.select([c for c in columns if c in t.column_names])
    if isinstance(path_or_table, pd.DataFrame):
        t = pa.Table.from_pandas(path_or_table, preserve_index=False)
        return t.select([c for c in columns if c in t.column_names])
    ds = open_table(path_or_table)
    names = set(ds.schema.names)
    return ds.to_table(columns=[c for c in columns if c in names])


def column(source, name: str) -> pa.ChunkedArray | None:
    """One column of a table (read on its own from Parquet, so columns are never all held
    twice: as Arrow and as numpy); None when the table lacks it."""
    if isinstance(source, pa.Table):
        return source.column(name) if name in source.column_names else None
    if isinstance(source, pd.DataFrame):
        return pa.chunked_array([pa.Array.from_pandas(source[name])]) if name in source.columns else None
    ds = open_table(source)
    return ds.to_table(columns=[name]).column(name) if name in ds.schema.names else None


def table_schema(path_or_table) -> pa.Schema:
    if isinstance(path_or_table, pa.Table):
        return path_or_table.schema
    if isinstance(path_or_table, pd.DataFrame):
        return pa.Schema.from_pandas(path_or_table, preserve_index=False)
    return open_table(path_or_table).schema


def count_rows(path_or_table) -> int:
    if isinstance(path_or_table, (pa.Table, pd.DataFrame)):
        return len(path_or_table)
    return open_table(path_or_table).count_rows()


# --------------------------------------------------------------------------- helpers
def ts_to_us(col: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """Timestamps as float64 epoch microseconds, NaN where null or unparseable.

    A contract-conforming column is ``timestamp[us, UTC]``; anything else
    (strings, other units) is parsed leniently so that the gate can report the
    rows that do not parse instead of crashing on the first one.
    """
    t = col.type
    if pa.types.is_timestamp(t):
        v = pc.cast(col, pa.timestamp("us", tz=t.tz)).cast(pa.int64())
        return v.to_numpy(zero_copy_only=False).astype("float64") if v.null_count == 0 else \
            pc.cast(v, pa.float64()).to_numpy(zero_copy_only=False)
    s = pd.to_datetime(pd.Series(col.to_pandas()), errors="coerce", utc=True)
    out = s.astype("int64").to_numpy().astype("float64") / 1_000 if s.dt.unit == "ns" else \
        s.astype("int64").to_numpy().astype("float64")
    out[s.isna().to_numpy()] = np.nan
    return out


def iso(us: float | None) -> str | None:
    if us is None or (isinstance(us, float) and math.isnan(us)):
        return None
    return (dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc) + dt.timedelta(microseconds=int(us))).isoformat()


def parse_ts(v) -> float | None:
    """ISO-8601 string, datetime or epoch seconds -> epoch microseconds (None stays None)."""
    if v is None:
        return None
    if isinstance(v, (int, float)):
        return float(v) * US
    if isinstance(v, str):
        try:
            return float(v) * US
        except ValueError:
            pass
    if isinstance(v, dt.datetime):
        t = v
    else:
        t = dt.datetime.fromisoformat(str(v).replace("Z", "+00:00"))
    if t.tzinfo is None:
        t = t.replace(tzinfo=dt.timezone.utc)
    return float(round(t.timestamp() * US))


def _ints(col, fill: int) -> np.ndarray:
    """int64 numpy array, nulls replaced by ``fill`` (null ids are reported by other expectations)."""
    if col.null_count:
        col = pc.fill_null(col, fill)
    return np.asarray(pc.cast(col, pa.int64()).to_numpy(zero_copy_only=False), dtype=np.int64)


def _session_runs(sid: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For a session-sorted id array: (is_first_row mask, run starts, run lengths)."""
    n = len(sid)
    new = np.empty(n, dtype=bool)
    if n:
        new[0] = True
        np.not_equal(sid[1:], sid[:-1], out=new[1:])
    starts = np.flatnonzero(new)
    lengths = np.diff(np.append(starts, n))
    return new, starts, lengths


# --------------------------------------------------------------------------- schema
def schema_frame(schema: pa.Schema, contract: pa.Schema) -> pd.DataFrame:
    """One row per contract column: the type the contract wants vs the type found."""
    rows = []
    for f in contract:
        if f.name in schema.names:
            got = schema.field(f.name).type
            # Spark and pyarrow spell the UTC zone differently ("UTC", "+00:00", "Etc/UTC").
            if pa.types.is_timestamp(got) and pa.types.is_timestamp(f.type) and got.unit == f.type.unit \
                    and (got.tz or "").upper() in ("UTC", "+00:00", "ETC/UTC", "Z"):
                got = f.type
            observed = str(got)
        else:
            observed = "MISSING"
        rows.append({"column": f.name, "contract_type": str(f.type), "observed_type": observed})
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------- events (raw_events suite)
def _duplicates(sid: np.ndarray, ts: np.ndarray, item: np.ndarray, user: np.ndarray | None,
                etype: np.ndarray | None = None) -> np.ndarray:
    """1 where an earlier row has the same session, ts, item, user (and event type), else 0.

    In the contract's order (session, then non-decreasing ts) exact duplicates
    sit in one run of equal (session, ts), so only rows in such runs (rare) are
    compared: a few bytes per event instead of a hash table over all of them.
    A table out of that order is sorted first (an index of 8 bytes per event).
    """
    n = len(sid)
    dup = np.zeros(n, dtype=np.int8)
    if n < 2:
        return dup
    tsn = np.nan_to_num(ts, nan=-np.inf)
    if not bool(np.all((sid[1:] > sid[:-1]) | ((sid[1:] == sid[:-1]) & (tsn[1:] >= tsn[:-1])))):
        order = np.lexsort((tsn, sid))
        dup[order] = _duplicates(sid[order], ts[order], item[order], None if user is None else user[order],
                                 None if etype is None else etype[order])
        return dup
    same = (sid[1:] == sid[:-1]) & (ts[1:] == ts[:-1])
    if not same.any():
        return dup
    cand = np.zeros(n, dtype=bool)
    cand[1:] |= same
    cand[:-1] |= same
    idx = np.flatnonzero(cand)
    sub = pd.DataFrame({"s": sid[idx], "t": ts[idx], "i": item[idx]})
    if user is not None:
        sub["u"] = user[idx]
    if etype is not None:
        sub["e"] = etype[idx]
    dup[idx] = sub.duplicated(keep="first").to_numpy().astype(np.int8)
    return dup


def events_frame(source) -> pd.DataFrame:
    """Per event: ``session_id``, ``item_id``, ``seq``, ``ts_s`` (epoch seconds, NaN if it
    does not parse) and ``is_duplicate`` (1 if an earlier row is the same event: equal
    in every column but ``seq``, the position we assign).

    Nullable ids become float64 with NaN (so GX sees the nulls); ``user_id`` is only
    used for duplicates (it may be null by contract). Columns are converted one at
    a time and dropped from the Arrow table to keep one copy in memory.
    """
    n = count_rows(source)
    out = {}
    for c in ("session_id", "item_id", "seq"):
        col = column(source, c)
        if col is not None:
            out[c] = col.to_numpy(zero_copy_only=False) if col.null_count == 0 else \
                pc.cast(col, pa.float64()).to_numpy(zero_copy_only=False)
            del col
    ts_col = column(source, "ts")
    ts_us = ts_to_us(ts_col) if ts_col is not None else np.full(n, np.nan)
    del ts_col
    user = column(source, "user_id")
    if "session_id" in out and "item_id" in out:
        u = None if user is None or user.null_count == n else \
            pc.cast(user, pa.float64()).to_numpy(zero_copy_only=False)
        et = column(source, "event_type")  # optional column: part of the event's identity
        codes = None if et is None else \
            pc.fill_null(pc.dictionary_encode(et).combine_chunks().indices, -1).to_numpy(zero_copy_only=False)
        dup = _duplicates(out["session_id"], ts_us, out["item_id"], u, codes)
        del u, codes
    else:
        dup = np.zeros(n, dtype=np.int8)
    out["ts_s"] = ts_us / US
    del ts_us
    out["is_duplicate"] = dup
    return pd.DataFrame(out, copy=False)


# --------------------------------------------------------------------------- sessions suite
@dataclass
class SessionFrames:
    events: pd.DataFrame  # per event: session_id, seq, ts_step_s, seq_offset
    sessions: pd.DataFrame  # per session: session_id, length, n_users, start, end


def session_frames(source) -> SessionFrames:
    """Order and shape of sessions.

    Rows are taken in (session_id, seq) order -- the order the contract
    promises and ``seq`` states. Then per event ``ts_step_s`` = ts minus the
    previous event's ts in the same session (0 for the first; must be >= 0)
    and ``seq_offset`` = seq minus the 0-based position (must be 0: seq
    contiguous from 0); per session its length and the number of distinct
    non-null user ids (must be <= 1; anonymous rows of a logged-in session are
    fine, as in DIGINETICA where a session can start before the login).
    """
    n = count_rows(source)
    sid = _ints(column(source, "session_id"), -1)
    seq = _ints(column(source, "seq"), -1)
    ts = ts_to_us(column(source, "ts"))
    user = column(source, "user_id")
    has_user = user is not None
    # Written sorted by (session_id, seq): check cheaply and sort only if not.
    ordered = n < 2 or bool(np.all((sid[1:] > sid[:-1]) | ((sid[1:] == sid[:-1]) & (seq[1:] >= seq[:-1]))))
    order = None if ordered else np.lexsort((seq, sid))
    if order is not None:
        sid, seq, ts = sid[order], seq[order], ts[order]
    new, starts, lengths = _session_runs(sid)
    pos = np.arange(n, dtype=np.int64) - np.repeat(starts, lengths)
    step = np.zeros(n, dtype=np.float64)
    if n > 1:
        step[1:] = (ts[1:] - ts[:-1]) / US
    step[new] = 0.0
    seq_offset = seq - pos
    del pos
    ev = pd.DataFrame({"session_id": sid, "seq": seq.astype(np.int32), "ts_step_s": step,
                       "seq_offset": seq_offset.astype(np.int32)}, copy=False)
    del seq_offset, step
    if len(starts):
        start = np.minimum.reduceat(np.nan_to_num(ts, nan=np.inf), starts)
        end = np.maximum.reduceat(np.nan_to_num(ts, nan=-np.inf), starts)
    else:
        start = end = np.empty(0)
    n_users = np.zeros(len(starts), dtype=np.int64)
    if has_user and len(starts):
        nulls = user.is_null().to_numpy(zero_copy_only=False)
        u = _ints(user, 0)
        if order is not None:
            u, nulls = u[order], nulls[order]
        big, small = np.iinfo(np.int64).max, np.iinfo(np.int64).min
        umin = np.minimum.reduceat(np.where(nulls, big, u), starts)
        umax = np.maximum.reduceat(np.where(nulls, small, u), starts)
        any_user = umax != small
        n_users = any_user.astype(np.int64)
        multi = any_user & (umin != umax)
        if multi.any():  # exact count only where it is > 1 (rare; offending sessions)
            idx = np.flatnonzero(np.repeat(multi, lengths) & ~nulls)
            exact = pd.DataFrame({"s": sid[idx], "u": u[idx]}).groupby("s")["u"].nunique()
            n_users[multi] = exact.loc[sid[starts[multi]]].to_numpy()
    ss = pd.DataFrame({"session_id": sid[starts], "length": lengths.astype(np.int64), "n_users": n_users,
                       "start_s": start / US, "end_s": end / US})
    return SessionFrames(ev, ss)


# --------------------------------------------------------------------------- splits suite
def load_json(path: str | Path | None) -> dict:
    if path is None:
        return {}
    p = Path(path)
    if not p.exists():
        raise ContractError(f"{p} does not exist")
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ContractError(f"{p} is not valid JSON: {e}") from e


def split_tables(split_dir: Path) -> list[str]:
    """Events tables present in a SPLIT_DIR (train, valid, test, train_full, train_recent_k)."""
    names = [C.TRAIN, C.VALID, C.TEST, C.TRAIN_FULL]
    rec = sorted((p.name for p in split_dir.glob("train_recent_*") if p.is_dir()),
                 key=lambda s: -int(s.rsplit("_", 1)[1]) if s.rsplit("_", 1)[1].isdigit() else 0)
    return [n for n in names if (split_dir / n).is_dir()] + rec


def observed_counts(path) -> dict:
    """events / sessions / items / users of one events table (the figures the manifest states)."""
    t = read_columns(path, ["session_id", "item_id", "user_id"])
    out = {"events": t.num_rows}
    for key, col in (("sessions", "session_id"), ("items", "item_id"), ("users", "user_id")):
        if col in t.column_names:
            out[key] = int(pc.count_distinct(t.column(col), mode="only_valid").as_py())
    return out


def counts_frame(observed: dict[str, dict], stated: dict[str, tuple[str, dict, list[str]]]) -> pd.DataFrame:
    """One row per (source, table, figure): observed count vs the count a manifest states.

    ``stated``: source name ("split.json", "manifest.json") -> (its path, {table: counts},
    the tables it must describe). A table in scope that the source does not mention gets
    ``stated = -1`` (itself a failure: the manifest must describe every table it hands over).
    """
    rows = []
    for source, (_spath, tables, scope) in stated.items():
        for table in scope:
            obs = observed[table]
            st = tables.get(table)
            for fig, val in obs.items():
                if st is not None and fig not in st:
                    continue  # the source does not state this figure
                sv = -1 if st is None else st.get(fig)
                rows.append({"source": source, "table": table, "figure": fig,
                             "observed": int(val), "stated": -1 if sv is None else int(sv)})
    return pd.DataFrame(rows, columns=["source", "table", "figure", "observed", "stated"])


def membership_frame(split_dir: Path) -> pd.DataFrame:
    """Per session of train/valid/test: in how many of the three tables it appears."""
    parts = []
    for i, name in enumerate((C.TRAIN, C.VALID, C.TEST)):
        p = split_dir / name
        if not p.is_dir():
            continue
        u = pc.unique(read_columns(p, ["session_id"]).column("session_id")).drop_null()
        parts.append(pd.DataFrame({"session_id": u.to_numpy(zero_copy_only=False),
                                   "bit": np.int8(1 << i)}))
    if not parts:
        return pd.DataFrame({"session_id": pd.Series([], dtype="int64"), "n_tables": pd.Series([], dtype="int64"),
                             "tables": pd.Series([], dtype="object")})
    allp = pd.concat(parts, ignore_index=True)
    g = allp.groupby("session_id", sort=False)["bit"].agg(["sum", "count"])
    names = {1: "train", 2: "valid", 4: "test"}
    label = g["sum"].map(lambda b: "+".join(v for k, v in names.items() if b & k))
    return pd.DataFrame({"session_id": g.index.to_numpy(), "n_tables": g["count"].to_numpy(),
                         "tables": label.to_numpy()})


def item_index_ids(split_dir: Path) -> np.ndarray:
    return _ints(read_columns(split_dir / C.ITEM_INDEX, ["item_id"]).column("item_id"), -1)


def eval_items_frame(split_dir: Path, index_ids: np.ndarray) -> pd.DataFrame:
    """Distinct (table, item_id) of valid and test with ``in_index`` (1 if in the item index)."""
    rows = []
    for name in (C.VALID, C.TEST):
        p = split_dir / name
        if not p.is_dir():
            continue
        t = read_columns(p, ["item_id"])
        vc = pc.value_counts(t.column("item_id")).flatten()
        ids = vc[0].to_numpy(zero_copy_only=False)
        ids = np.asarray(pd.Series(ids).fillna(-1), dtype=np.int64)
        rows.append(pd.DataFrame({"table": name, "item_id": ids, "events": vc[1].to_numpy(zero_copy_only=False),
                                  "in_index": np.isin(ids, index_ids).astype("int8")}))
    if not rows:
        return pd.DataFrame({"table": [], "item_id": [], "events": [], "in_index": []})
    return pd.concat(rows, ignore_index=True)


def _ts_range(path) -> tuple[float, float]:
    us = ts_to_us(read_columns(path, ["ts"]).column("ts"))
    if not len(us) or np.all(np.isnan(us)):
        return (math.nan, math.nan)
    return float(np.nanmin(us)), float(np.nanmax(us))


def leakage_frame(split_dir: Path, meta: dict) -> pd.DataFrame:
    """Time-cut checks as rows ``(check, earlier_s, later_s)``; each must satisfy later >= earlier.

    Always (when ``cut_ts`` is stated): every training event is before the cut
    (``train_full`` vs ``cut_ts``; ``train`` vs ``valid_cut_ts``). For global-cut
    splits (``global_cut: true``) also: no test event before the cut and
    max(train_full ts) <= min(test ts); likewise train vs valid. GRU4Rec's
    ``time`` split assigns by session *end*, so its test sessions may start
    before the cut (``global_cut: false``): only the training side is checked.
    """
    rows = []
    glob = bool(meta.get("global_cut"))
    rng = {n: _ts_range(split_dir / n) for n in (C.TRAIN, C.VALID, C.TEST, C.TRAIN_FULL) if (split_dir / n).is_dir()}

    def add(check, earlier, later, strict):
        if earlier is None or later is None or math.isnan(earlier) or math.isnan(later):
            return
        rows.append({"check": check, "earlier": iso(earlier), "later": iso(later),
                     "earlier_us": int(earlier), "later_us": int(later),
                     # integer microseconds: "later > earlier" is "later >= earlier + 1 us"
                     "earlier_bound_us": int(earlier) + (1 if strict else 0)})

    for train, evalt, cut_key in ((C.TRAIN_FULL, C.TEST, "cut_ts"), (C.TRAIN, C.VALID, "valid_cut_ts")):
        cut = parse_ts(meta.get(cut_key))
        if train not in rng:
            continue
        tmax = rng[train][1]
        if cut is not None:
            add(f"max({train}.ts) < {cut_key}", tmax, cut, True)
        if glob and evalt in rng:
            tmin = rng[evalt][0]
            if cut is not None:
                add(f"{cut_key} <= min({evalt}.ts)", cut, tmin, False)
            add(f"max({train}.ts) <= min({evalt}.ts)", tmax, tmin, False)
    return pd.DataFrame(rows, columns=["check", "earlier", "later", "earlier_us", "later_us", "earlier_bound_us"])


def _session_starts(path) -> pd.DataFrame:
    """Per session of an events table: first ts (start) and length, indexed by session_id."""
    sid = _ints(column(path, "session_id"), -1)
    ts = ts_to_us(column(path, "ts"))
    if len(sid) > 1 and not bool(np.all(sid[1:] >= sid[:-1])):  # contract order is by session
        order = np.argsort(sid, kind="stable")
        sid, ts = sid[order], ts[order]
    _, starts, lengths = _session_runs(sid)
    first = np.minimum.reduceat(np.nan_to_num(ts, nan=np.inf), starts) if len(starts) else np.empty(0)
    return pd.DataFrame({"start": first, "length": lengths}, index=pd.Index(sid[starts], name="session_id"))


def recent_frame(split_dir: Path, tables: list[str]) -> pd.DataFrame:
    """Per ``train_recent_<k>`` table: is it the most recent ceil(N/k) whole sessions of train_full?

    Columns: ``sessions`` vs ``expected_sessions`` = ceil(N/k) (N = train_full
    sessions); ``foreign_sessions`` (not in train_full) and ``partial_sessions``
    (event count differs from train_full) must be 0; ``oldest_kept_start_s`` must
    be >= ``newest_dropped_start_s`` (recency by session start, as spark_jobs.splits).
    """
    rec = [t for t in tables if t.startswith("train_recent_")]
    cols = ["table", "k", "sessions", "expected_sessions", "foreign_sessions", "partial_sessions",
            "oldest_kept_start_s", "newest_dropped_start_s", "oldest_kept_start", "newest_dropped_start"]
    if not rec or not (split_dir / C.TRAIN_FULL).is_dir():
        return pd.DataFrame(columns=cols)
    full = _session_starts(split_dir / C.TRAIN_FULL)
    n_full = len(full)
    rows = []
    for name in rec:
        k = int(name.rsplit("_", 1)[1])
        r = _session_starts(split_dir / name)
        inter = r.join(full, how="left", rsuffix="_full")
        foreign = int(inter["length_full"].isna().sum())
        partial = int(((inter["length_full"] != inter["length"]) & inter["length_full"].notna()).sum())
        kept = full.index.isin(r.index)
        oldest_kept = float(full["start"][kept].min()) if kept.any() else math.nan
        newest_dropped = float(full["start"][~kept].max()) if (~kept).any() else -math.inf
        rows.append({"table": name, "k": k, "sessions": len(r), "expected_sessions": math.ceil(n_full / k),
                     "foreign_sessions": foreign, "partial_sessions": partial,
                     "oldest_kept_start_s": oldest_kept / US,
                     "newest_dropped_start_s": newest_dropped / US if np.isfinite(newest_dropped) else -1e18,
                     "oldest_kept_start": iso(oldest_kept),
                     "newest_dropped_start": iso(newest_dropped) if np.isfinite(newest_dropped) else None})
    return pd.DataFrame(rows, columns=cols)


# --------------------------------------------------------------------------- model inputs suite
def index_frame(path, id_col: str, idx_col: str, extra: str) -> pd.DataFrame:
    """The index table as read (``idx`` stays float when it holds NaN, so the gate can see it)."""
    t = read_columns(path, [id_col, idx_col, extra])
    out = {}
    for c in (id_col, idx_col, extra):
        if c in t.column_names:
            col = t.column(c)
            out[c] = col.to_numpy(zero_copy_only=False) if col.null_count == 0 and not pa.types.is_floating(col.type) \
                else pc.cast(col, pa.float64()).to_numpy(zero_copy_only=False)
    return pd.DataFrame(out)


def indexed_items_frame(split_dir: Path, index: pd.DataFrame) -> pd.DataFrame:
    """Distinct (table, item_id) of every split table mapped through the item index
    (``item_idx`` NaN where the item is not indexed): what the batchers will feed the model."""
    m = pd.Series(index["item_idx"].to_numpy(dtype="float64"), index=index["item_id"].to_numpy()) \
        if len(index) and "item_idx" in index and "item_id" in index else pd.Series(dtype="float64")
    m = m[~m.index.duplicated()]
    rows = []
    for name in split_tables(split_dir):
        u = pc.unique(read_columns(split_dir / name, ["item_id"]).column("item_id")).drop_null()
        ids = u.to_numpy(zero_copy_only=False)
        rows.append(pd.DataFrame({"table": name, "item_id": ids,
                                  "item_idx": m.reindex(ids).to_numpy(dtype="float64")}))
    if not rows:
        return pd.DataFrame({"table": [], "item_id": [], "item_idx": []})
    return pd.concat(rows, ignore_index=True)


# --------------------------------------------------------------------------- accounting suite
LEDGER_COLUMNS = ["kind", "name", "rows_in", "removed", "rows_out", "out_plus_removed", "gap_in", "gap_out"]


def _removed_total(removed) -> int:
    return int(sum(removed.values())) if isinstance(removed, dict) else int(removed or 0)


def ledger_frame(manifest: dict, events_rows: int | None) -> pd.DataFrame:
    """The manifest's ``accounting`` section as rows GX can check, one per step, file and total.

    ``out_plus_removed`` = rows out + rows removed (must equal ``rows_in``); ``gap_in`` = rows in
    minus what the previous step handed over (the first step: minus the rows of all files);
    ``gap_out`` is 0 except on the last step (its rows out minus ``events_rows``, the rows
    observed in ``OUT/events``) and on the ``total`` row (rows written per file, summed, minus
    the last step's rows out). A manifest without the section gives an empty frame.
    """
    acc = manifest.get("accounting") or {}
    steps, files = acc.get("steps") or [], acc.get("files") or []
    rows = []
    read_total = sum(int(f.get("rows_read", 0)) for f in files)
    prev_out = read_total
    for i, s in enumerate(steps):
        rin, rout, rem = int(s["rows_in"]), int(s["rows_out"]), _removed_total(s.get("removed"))
        last = i == len(steps) - 1
        rows.append({"kind": "step", "name": s["step"], "rows_in": rin, "removed": rem, "rows_out": rout,
                     "out_plus_removed": rout + rem, "gap_in": rin - prev_out,
                     "gap_out": (rout - events_rows) if last and events_rows is not None else 0})
        prev_out = rout
    for f in files:
        rem = _removed_total(f.get("skipped")) + _removed_total(f.get("quarantined")) + int(f.get("removed", 0))
        rows.append({"kind": "file", "name": f["file"], "rows_in": int(f["rows_read"]),
                     "removed": int(f.get("removed", 0)), "rows_out": int(f["written"]),
                     "out_plus_removed": int(f["written"]) + rem, "gap_in": 0, "gap_out": 0})
    if steps and files:
        written = sum(int(f["written"]) for f in files)
        rem = sum(_removed_total(s.get("removed")) for s in steps)
        rows.append({"kind": "total", "name": "all files", "rows_in": read_total, "removed": rem,
                     "rows_out": written, "out_plus_removed": written + rem,
                     "gap_in": read_total - int(steps[0]["rows_in"]), "gap_out": written - int(steps[-1]["rows_out"])})
    return pd.DataFrame(rows, columns=LEDGER_COLUMNS).astype(
        {c: "int64" for c in LEDGER_COLUMNS[2:]}) if rows else pd.DataFrame(
        {c: pd.Series(dtype="object" if c in ("kind", "name") else "int64") for c in LEDGER_COLUMNS})
