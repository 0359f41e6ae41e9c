"""Raw clickstream -> sessionized, filtered, time-split Parquet (the data contract).

Run it (``local[*]`` unless a master is configured)::

    python -m spark_jobs.preprocess \\
        --input ../shared/data/rsc15-100k/yoochoose-clicks-100k_train_full.txt \\
                ../shared/data/rsc15-100k/yoochoose-clicks-100k_test.txt \\
        --format gru4rec --split time --test-days 1 --out data/rsc15

    python -m spark_jobs.preprocess --config conf/preprocess.yaml --out data/x
    spark-submit --master spark://host:7077 spark_jobs/preprocess.py --input ... --out ...

Steps: read (bad rows -> ``OUT/quarantine``), encode ids, sessionize (given ids
or 30-min idle split per user), optional removal of consecutive repeats,
support filters to a fixed point, split + recent fractions, item/user index,
``manifest.json``. The whole output is built in a temporary sibling folder and
swapped in at the end, so a re-run replaces ``OUT`` atomically. A run killed between
the two renames of that swap leaves ``OUT`` missing: the next run first renames the
previous output back (:func:`spark_jobs.contract.recover_dir`). A full disk (or a
file-size limit) on the output fails the job with :class:`OutputDiskFull` naming
``OUT``; the temporary folder is removed and ``OUT`` is left as it was. When a file has
too many bad rows, the rejected rows of that run are kept in
``OUT.quarantine/<UTC time>-<id>/`` (one folder per failed run, names sort by time).

Row accounting (``manifest.json`` ``accounting``, :mod:`spark_jobs.accounting`): every row
read is skipped, quarantined, removed by a named step or written; the job checks it step by
step and fails with ``RowAccountingError`` naming the step when it does not add up. An input
file that changes while the job reads it fails the job (``InputChangedError``).
"""
from __future__ import annotations

import argparse
import dataclasses
import errno
import hashlib
import json
import logging
import os
import platform
import shutil
import sys
import uuid
from dataclasses import dataclass, field
from typing import Any

if __package__ in (None, ""):  # run as a script: spark-submit spark_jobs/preprocess.py
    # Python put this file's folder (spark_jobs/) first on sys.path, where contract.py, filters.py ...
    # could shadow top-level modules of the same names; the package is imported from the project root.
    _here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _here]
    sys.path.insert(0, os.path.dirname(_here))

from spark_jobs import contract as C  # noqa: E402

log = logging.getLogger("spark_jobs.preprocess")


class QuarantineThresholdExceeded(RuntimeError):
    """Too many bad rows in an input file."""


class OutputDiskFull(OSError):
    """The output could not be written: no space left on its device (or a file-size / quota limit)."""


#: what the OS (or the JVM, in its exception text) says when a write hits a full disk or a limit
_DISK_FULL = {errno.ENOSPC: "No space left on device", errno.EFBIG: "File too large",
              errno.EDQUOT: "Disk quota exceeded"}


def disk_full_reason(e: BaseException) -> str | None:
    """The disk-full / file-too-large reason behind ``e`` (its causes, and the Java exception text
    Py4J carries), or None when the failure is something else."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in _DISK_FULL:
            return _DISK_FULL[e.errno]
        try:
            text = str(e)
        except Exception:  # a Java object that cannot be printed any more
            text = ""
        for reason in _DISK_FULL.values():
            if reason in text:
                return reason
        e = e.__cause__ or e.__context__
    return None


def disk_full_error(e: BaseException, out: str, tmp: str, spark=None) -> OutputDiskFull | None:
    """A clear :class:`OutputDiskFull` for a job that failed on a full disk (None for other failures).

    It says whether the write that failed was the output's (the temp folder ``tmp`` is named
    in the error: Spark's "Task failed while writing rows to file:<tmp>/...") or somewhere else
    (Spark's scratch space ``spark.local.dir``: shuffle and checkpoint files)."""
    reason = disk_full_reason(e)
    if reason is None:
        return None
    in_output, seen, x = False, set(), e
    while x is not None and id(x) not in seen and not in_output:
        seen.add(id(x))
        try:
            in_output = tmp in str(x) or str(getattr(x, "filename", None) or "").startswith(tmp)
        except Exception:
            pass
        x = x.__cause__ or x.__context__
    try:
        free = f"{shutil.disk_usage(os.path.dirname(out)).free} bytes free on the output's device"
    except OSError:
        free = "free space on the output's device unknown"
    state = "left as it was" if os.path.exists(out) else "not created"
    if in_output:
        msg = (f"cannot write the output {out}: {reason} (while writing {tmp}; the partial output was removed, "
               f"{free}; {out} was {state}). Free space on that device (or raise the limit) and re-run")
    else:
        try:
            local = spark.sparkContext.getConf().get("spark.local.dir", None) if spark is not None else None
        except Exception:
            local = None
        local = local or os.environ.get("SPARK_LOCAL_DIRS") or "/tmp"
        msg = (f"the output {out} was not written: {reason} outside the output, in Spark's scratch space "
               f"(spark.local.dir {local}) or under a file-size limit; {out} was {state} and the partial output "
               f"{tmp} was removed ({free}). Free space there (or raise the limit) and re-run")
    err = OutputDiskFull(msg)
    err.errno = next(k for k, v in _DISK_FULL.items() if v == reason)
    return err


def quarantine_keep_dir(out: str) -> str:
    """A new folder for one failed run's rejected rows: ``OUT.quarantine/<UTC time>-<id>``.

    One folder per failed run, so the next failed run of the same interval does not
    overwrite it; the names sort by time (microseconds, then a random id)."""
    import datetime as dt

    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
    return os.path.join(out.rstrip("/") + ".quarantine", f"{stamp}-{uuid.uuid4().hex[:8]}")


@dataclass
class PreprocessConfig:
    input: list[str] = field(default_factory=list)
    format: str = "gru4rec"
    out: str = ""
    split: str = "time"
    # reader options (generic formats)
    columns: str | None = None
    ts_unit: str = "s"
    delimiter: str | None = None
    header: bool = True
    encode_ids: list[str] = field(default_factory=list)
    # sessionize
    sessionize_by_user: bool = False  # ignore the source's session ids, split by idle gap per user
    idle_gap_minutes: float = 30.0
    remove_repeats: bool = False
    # filters (0 = off)
    min_item_support: int = 0
    min_session_length: int = 0
    min_sessions_per_user: int = 0
    max_sessions_per_user: int = 0
    # split
    test_days: float = 1.0
    valid_days: float | None = None
    end_ts: str | None = None
    cut_ts: str | None = None
    test_fraction: float = 0.1
    seed: int = 42
    recent_fractions: list[int] = field(default_factory=lambda: list(C.DEFAULT_RECENT_FRACTIONS))
    # bad input
    max_bad_fraction: float = 0.01
    #: plausible event times: earlier rows (a zero or truncated epoch) are quarantined; "" = no bound
    ts_min: str | None = "1990-01-01T00:00:00+00:00"
    #: later rows are quarantined as "in the future"; None = the job's start time; "" = no bound
    ts_max: str | None = None
    spark_conf: dict[str, str] = field(default_factory=dict)


# --------------------------------------------------------------------------- helpers

def file_checksum(path: str) -> dict:
    if "://" in path and not path.startswith("file://"):
        return {"path": path, "sha256": None, "bytes": None}
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return {"path": path, "sha256": h.hexdigest(), "bytes": os.path.getsize(path)}


def _write(df, path: str, sort_cols: list[str] | None = None, single_file: bool = False) -> None:
    if sort_cols:
        df = df.orderBy(*sort_cols)
    if single_file:
        df = df.coalesce(1)
    df.write.mode("overwrite").parquet(path)


def write_split_tables(tagged, names: list[str], columns: list[str], targets: dict[str, str]) -> dict[str, dict]:
    """Write every table of a split result in one scan and return its counts.

    ``tagged`` (from :func:`spark_jobs.splits.split`) is materialised in the
    output order. Each event is emitted once per table it belongs to (its
    ``_mask`` bits) and all tables are written by one job with a partitioned
    write whose per-table writers stay open side by side
    (``spark.sql.maxConcurrentOutputFileWriters``): no sort, so every file keeps
    the contract order, and the checkpoint is scanned once instead of once per
    table. The partition folders are then renamed to the ``targets``. A target
    may be any table name of ``names`` or :data:`contract.EVENTS_DIR` (every
    event). The counts of all tables come from three scans over the membership
    bits (:func:`spark_jobs.splits.mask_stats`). ``train_recent_1`` holds exactly
    the ``train_full`` rows, so its files are hard links to (or copies of)
    ``train_full``'s.
    """
    from pyspark.sql import functions as F

    from spark_jobs.splits import mask_stats, table_bit

    stats = mask_stats(tagged, names)
    linked = {n for n in names if n == C.recent_table(1) and C.TRAIN_FULL in names and C.TRAIN_FULL in targets}
    order = [n for n in targets if n not in linked]
    if order:
        def member(name):
            if name == C.EVENTS_DIR:
                return F.lit(True)
            return F.col("_mask").bitwiseAND(F.lit(table_bit(names, name))) != 0

        idx = F.array(*[F.when(member(n), F.lit(i)) for i, n in enumerate(order)])
        renumbered = [i for i, n in enumerate(order) if n in (C.VALID, C.TEST)]
        seq = (F.when(F.col("_t").isin(renumbered), F.col("_seq_f")).otherwise(F.col("seq"))
               if renumbered else F.col("seq"))
        # valid/test session ids of a split that cuts sessions (user_90_5_5_events): _sid_f
        sid = (F.when(F.col("_t").isin(renumbered), F.col("_sid_f")).otherwise(F.col("session_id"))
               if renumbered and "_sid_f" in tagged.columns else F.col("session_id"))
        rows = tagged.withColumn("_t", F.explode(F.filter(idx, lambda x: x.isNotNull())))
        rows = rows.select(*[seq.cast("int").alias("seq") if c == "seq" else sid.alias("session_id")
                             if c == "session_id" else F.col(c) for c in columns], "_t")
        stage = os.path.join(os.path.dirname(targets[order[0]]), f"_stage-{uuid.uuid4().hex[:8]}")
        spark = tagged.sparkSession
        # One open writer per table in every task instead of a sort by table: the rows keep their order.
        conf = {"spark.sql.maxConcurrentOutputFileWriters": str(len(order) + 1)}
        old = {k: spark.conf.get(k, None) for k in conf}
        for k, v in conf.items():
            spark.conf.set(k, v)
        try:
            rows.write.mode("overwrite").partitionBy("_t").parquet(stage)
        finally:
            for k, v in old.items():
                spark.conf.unset(k) if v is None else spark.conf.set(k, v)
        schema_only = None
        for i, name in enumerate(order):
            os.makedirs(os.path.dirname(targets[name]), exist_ok=True)
            if os.path.exists(targets[name]):
                shutil.rmtree(targets[name])
            src = os.path.join(stage, f"_t={i}")
            if os.path.isdir(src):
                os.rename(src, targets[name])
            else:  # an empty table: no partition folder; write an empty frame with the schema
                schema_only = schema_only if schema_only is not None else rows.drop("_t").limit(0)
                schema_only.write.mode("overwrite").parquet(targets[name])
        shutil.rmtree(stage, ignore_errors=True)
    for name in linked:
        os.makedirs(os.path.dirname(targets[name]), exist_ok=True)
        if os.path.exists(targets[name]):
            shutil.rmtree(targets[name])
        shutil.copytree(targets[C.TRAIN_FULL], targets[name], copy_function=_link_or_copy)
    return stats


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:  # a filesystem without hard links
        shutil.copy2(src, dst)


def input_state(files: list[str]) -> dict[str, tuple[int, int]]:
    """(size, mtime_ns) of every local input file: compared before and after reading."""
    out = {}
    for f in files:
        if "://" in f and not f.startswith("file://"):
            continue
        st = os.stat(f.removeprefix("file://"))
        out[f] = (st.st_size, st.st_mtime_ns)
    return out


def check_inputs_unchanged(before: dict[str, tuple[int, int]], when: str) -> None:
    """Raise :class:`~spark_jobs.readers.InputChangedError` naming a file that changed since ``before``.

    Spark reads a file once per action, each time up to the length it listed (and one
    line beyond), so a file that grows while the job runs gives counts that disagree
    between actions: the job fails instead of writing an output that mixes versions.
    """
    import datetime as dt

    from spark_jobs.readers import InputChangedError

    now = input_state(list(before))
    for f, (size, mtime) in before.items():
        if now.get(f) != (size, mtime):
            n_size, n_mtime = now.get(f, (None, None))

            def t(ns):
                return dt.datetime.fromtimestamp(ns / 1e9, dt.timezone.utc).isoformat() if ns else "?"

            raise InputChangedError(
                f"{f}: the file changed while the job read it ({size} bytes, modified {t(mtime)} at the start; "
                f"{n_size} bytes, modified {t(n_mtime)} {when}), so the rows read may mix two versions. "
                f"Write input files under a temporary name and rename them into place when complete, then re-run.")


def ts_bounds(cfg: "PreprocessConfig", now=None):
    """``(lo_us, hi_us, lo_label)`` for the readers' plausible-time check, and the bounds as ISO text."""
    import datetime as dt

    from spark_jobs.splits import _to_us

    now = now or dt.datetime.now(dt.timezone.utc)
    lo = _to_us(cfg.ts_min) if cfg.ts_min else None
    hi = _to_us(cfg.ts_max) if cfg.ts_max else (int(now.timestamp() * 1_000_000) if cfg.ts_max is None else None)

    def iso(us):
        return None if us is None else dt.datetime.fromtimestamp(us / 1e6, dt.timezone.utc).isoformat()

    label = iso(lo).replace("T00:00:00+00:00", "") if lo is not None else None
    return (lo, hi, label), {"ts_min": iso(lo), "ts_max": iso(hi)}


def jvm_cpu_seconds(spark) -> float | None:
    """User + system CPU seconds of the JVM this driver launched (local mode, Linux); else None."""
    try:
        pid = spark.sparkContext._gateway.proc.pid
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (AttributeError, OSError, ValueError, IndexError):
        return None


def input_bytes(inputs: list[str]) -> int | None:
    """Total size of the input files; None when any is remote or cannot be listed."""
    from spark_jobs import readers

    try:
        files = readers.input_files(inputs)
    except Exception:  # the job itself reports bad inputs, with context
        return None
    if not files or any("://" in f and not f.startswith("file://") for f in files):
        return None
    try:
        return sum(os.path.getsize(f.removeprefix("file://")) for f in files)
    except OSError:
        return None


def versions() -> dict:
    import pyarrow
    import pyspark

    return {"python": platform.python_version(), "pyspark": pyspark.__version__, "pyarrow": pyarrow.__version__}


# --------------------------------------------------------------------------- the job

def run(cfg: PreprocessConfig, spark=None) -> dict:
    """Run the whole preprocessing; returns the manifest (also written to OUT)."""
    from spark_jobs.session import get_spark, sizing_conf
    from spark_jobs.splits import STRATEGIES

    if not cfg.out:
        raise ValueError("--out is required")
    if cfg.split not in STRATEGIES:
        raise ValueError(f"unknown --split {cfg.split!r}; choose one of {', '.join(STRATEGIES)}")
    if spark is None:
        # partitions and JVM flags sized from the input; explicit settings win
        conf = {**sizing_conf(input_bytes(cfg.input)), **cfg.spark_conf}
        spark = get_spark("rnnrec-preprocess", conf)
    out = os.path.abspath(cfg.out)
    tmp = f"{out}.tmp-{uuid.uuid4().hex[:8]}"
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    restored = C.recover_dir(out)
    if restored is not None:
        log.warning("restored the previous output %s from %s: an earlier run was killed while swapping it",
                    out, restored)
    try:
        manifest = _run(spark, cfg, tmp)
        C.replace_dir(tmp, out)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        full = disk_full_error(e, out, tmp, spark) if isinstance(e, Exception) else None
        if full is not None:
            raise full from e
        raise
    return manifest


def _run(spark, cfg: PreprocessConfig, tmp: str) -> dict:
    import time

    from pyspark.sql import functions as F

    from spark_jobs import readers, sessionize as S
    from spark_jobs.accounting import Ledger
    from spark_jobs.filters import FilterConfig, apply_filters, table_counts
    from spark_jobs.session import driver_settings
    from spark_jobs.splits import SplitConfig, item_index, split, user_index

    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    cpu_timings: dict[str, float] = {}
    cpu_start = jvm_cpu_seconds(spark)

    def lap(name: str) -> None:
        timings[name] = round(time.perf_counter() - t_start - sum(timings.values()), 2)
        cpu = jvm_cpu_seconds(spark)
        if cpu is not None and cpu_start is not None:
            cpu_timings[name] = round(cpu - cpu_start - sum(cpu_timings.values()), 2)
        log.info("%s done in %.1f s (JVM CPU %s s)", name, timings[name], cpu_timings.get(name, "n/a"))

    os.makedirs(tmp)
    steps: list[dict] = []
    files = readers.input_files(cfg.input)
    # What the job is about to read: checksums now (not after the run), and size + mtime to
    # notice a file that changes while it is read.
    state = input_state(files)
    inputs = [file_checksum(f) for f in files]
    ts_range, ts_iso = ts_bounds(cfg)
    ledger = Ledger()
    log.info("reading %d file(s) as %s", len(files), cfg.format)
    res = readers.read_events(
        spark, cfg.input, cfg.format, columns=cfg.columns, ts_unit=cfg.ts_unit, delimiter=cfg.delimiter,
        header=cfg.header, encode_ids=tuple(cfg.encode_ids), ts_range=ts_range,
    )

    # ---- bad input: one pass counts good / skipped / bad rows per file
    counts = res.status.groupBy("_file_idx", "status").count().collect()
    per_file = [{"file": f, "rows": 0, "quarantined": 0} for f in files]
    skipped: dict[str, int] = {}
    reasons: dict[str, int] = {}
    # per file: every row read, skipped / quarantined by reason (the accounting section)
    acc_files = [{"rows_read": 0, "skipped": {}, "quarantined": {}} for _ in files]
    for r in counts:
        st, n, pf, af = r["status"], r["count"], per_file[r["_file_idx"]], acc_files[r["_file_idx"]]
        af["rows_read"] += n
        if st is None:
            pf["rows"] += n
        elif st.startswith("skip:"):
            skipped[st[5:]] = skipped.get(st[5:], 0) + n
            af["skipped"][st[5:]] = af["skipped"].get(st[5:], 0) + n
        else:
            pf["rows"] += n
            pf["quarantined"] += n
            reasons[st[4:]] = reasons.get(st[4:], 0) + n
            af["quarantined"][st[4:]] = af["quarantined"].get(st[4:], 0) + n
    n_read = sum(af["rows_read"] for af in acc_files)
    n_valid = sum(pf["rows"] - pf["quarantined"] for pf in per_file)
    ledger.step("read", {**{f"skipped: {k}": v for k, v in sorted(skipped.items())},
                         **{f"quarantined: {k}": v for k, v in sorted(reasons.items())}},
                rows_out=n_valid, rows_in=n_read)
    n_bad = sum(pf["quarantined"] for pf in per_file)
    quarantine = res.quarantine
    if n_bad:
        quarantine = quarantine.cache()
        quarantine.orderBy("file", "line").coalesce(1).write.mode("overwrite").parquet(
            os.path.join(tmp, C.QUARANTINE_DIR))
    for pf in per_file:
        if pf["rows"] and pf["quarantined"] / pf["rows"] > cfg.max_bad_fraction:
            per_reason = (quarantine.where(F.col("file") == pf["file"]).groupBy("reason").count()
                          .orderBy(F.desc("count")).limit(3).collect())
            top = "; ".join(f"{r['count']} x {r['reason']}" for r in per_reason)
            first = quarantine.where(F.col("file") == pf["file"]).orderBy("line").first()
            keep = quarantine_keep_dir(os.path.join(os.path.dirname(tmp), os.path.basename(cfg.out.rstrip("/"))))
            os.makedirs(os.path.dirname(keep), exist_ok=True)
            shutil.move(os.path.join(tmp, C.QUARANTINE_DIR), keep)
            raise QuarantineThresholdExceeded(
                f"{pf['file']}: {pf['quarantined']} of {pf['rows']} rows are bad "
                f"({pf['quarantined'] / pf['rows']:.2%} > {cfg.max_bad_fraction:.2%}); "
                f"first at line {first['line']}: {first['reason']}. Reasons: {top}. "
                f"Rejected rows are in {keep}"
            )
    if n_bad:
        log.warning("quarantined %d bad row(s) -> %s", n_bad, os.path.join(cfg.out, C.QUARANTINE_DIR))
    check_inputs_unchanged(state, "after the read")

    lap("read")
    # ---- ids and sessions
    raw_ev = res.events
    if cfg.end_ts:
        # A scheduled run sees only data before its interval end (no peeking at the future), and
        # before the ids are encoded: events that arrive later must not change this interval's
        # id maps (a re-run of a past interval on a grown input gives the same bytes)
        from spark_jobs.splits import _to_us

        late = raw_ev.where(F.unix_micros("ts") >= _to_us(cfg.end_ts)).count()
        raw_ev = raw_ev.where(F.unix_micros("ts") < _to_us(cfg.end_ts))
        steps.append({"step": "before_end_ts", "end_ts": cfg.end_ts, "removed": late})
        ledger.step("before_end_ts", {"at or after end_ts": late})
    ev, id_maps = S.encode_ids(raw_ev, res.string_ids)
    for name, m in id_maps.items():
        m.write.mode("overwrite").parquet(os.path.join(tmp, "id_maps", name))
    if not ev.take(1):
        raise readers.InputError(f"no valid events in the input ({len(files)} file(s): {', '.join(files[:3])}"
                                 f"{'...' if len(files) > 3 else ''}); quarantined rows: {n_bad}")
    by_user = cfg.sessionize_by_user or not res.has_sessions
    if by_user:
        # Formats without session ids already quarantine rows without a user.
        n_no_user = ev.where(F.col("user_id").isNull()).count() if res.has_sessions else 0
        if n_no_user:
            raise ValueError(
                f"{n_no_user} events have no user id, so they cannot be sessionized by user "
                f"(use the source's session ids, i.e. drop --sessionize-by-user)")
        ev = S.sessionize_by_user(ev.drop("session_id"), cfg.idle_gap_minutes * 60.0)
    else:
        # A session id shared by several users (seen in DIGINETICA) is a data error: its rows go
        # to quarantine (counted like unparseable rows), the rest of the data is kept.
        conflict = S.session_users(ev) if ev.where(F.col("user_id").isNotNull()).take(1) else None
        n_conflict_rows = 0
        conflict_reason = "session has more than one user id"
        if conflict is not None and conflict.take(1):
            conflict = conflict.cache()
            bad_ev = ev.join(conflict, "session_id", "left_semi")
            for r in bad_ev.groupBy("_file_idx").count().collect():
                q = acc_files[r["_file_idx"]]["quarantined"]
                q[conflict_reason] = q.get(conflict_reason, 0) + r["count"]
                n_conflict_rows += r["count"]
            file_col = F.element_at(F.array(*[F.lit(f) for f in files]), F.col("_file_idx") + 1)
            (bad_ev.select(file_col.alias("file"), F.lit(None).cast("long").alias("line"),
                           F.lit("session has more than one user id").alias("reason"),
                           F.to_json(F.struct("session_id", "user_id", "item_id", "ts")).alias("raw"))
             .coalesce(1).write.mode("append").parquet(os.path.join(tmp, C.QUARANTINE_DIR)))
            ev = ev.join(conflict, "session_id", "left_anti")
            n_bad += n_conflict_rows
            reasons[conflict_reason] = n_conflict_rows
            total = sum(pf["rows"] for pf in per_file)
            log.warning("quarantined %d row(s) of %d session(s) with more than one user id",
                        n_conflict_rows, conflict.count())
            if n_conflict_rows / max(total, 1) > cfg.max_bad_fraction:
                raise QuarantineThresholdExceeded(
                    f"{n_conflict_rows} of {total} rows belong to sessions with more than one user id "
                    f"(> {cfg.max_bad_fraction:.2%}); re-sessionize with --sessionize-by-user")
        ledger.step("session_user_conflicts", {f"quarantined: {conflict_reason}": n_conflict_rows})
    # One shuffle into the layout every later step keeps (by session, in output order).
    ev = S.to_layout(ev)
    read_counts = table_counts(ev)
    steps.append({"step": "sessionized", "by_user": by_user, **read_counts})
    # ids encoded and sessions built: a join that lost or duplicated rows shows here
    ledger.step("sessionize", {}, rows_out=read_counts["events"])
    removed_repeats = 0
    if cfg.remove_repeats:
        ev, repeats = S.drop_consecutive_repeats(ev)
        n_repeats = repeats.count()
        ev = S.checkpoint(ev)
        rep_counts = table_counts(ev)
        removed_repeats = read_counts["events"] - rep_counts["events"]
        steps.append({"step": "remove_repeats", "removed": removed_repeats, **rep_counts})
        ledger.step("remove_repeats", {"consecutive repeat": n_repeats}, rows_out=rep_counts["events"])

    lap("sessionize")
    # ---- filters to a fixed point
    fcfg = FilterConfig(cfg.min_item_support, cfg.min_session_length, cfg.min_sessions_per_user,
                        cfg.max_sessions_per_user)
    last = steps[-1]
    ev, fsteps = apply_filters(ev, fcfg, {k: last[k] for k in ("events", "sessions", "items", "users", "ts_min", "ts_max")})
    steps += fsteps
    for st in fsteps:
        ledger.step(f"r{st['round']}:{st['step']}", {st["step"]: st["removed_events"]}, rows_out=st["events"])
    # events each input file contributes to the output (one scan of the materialised table)
    per_file_written = {r["_file_idx"]: r["count"] for r in ev.groupBy("_file_idx").count().collect()}
    cols = list(C.EVENT_COLUMNS) + (["event_type"] if ev.where(F.col("event_type").isNotNull()).take(1) else [])
    # seq stays a lazy per-session window (no shuffle in the layout); the split materialises it.
    ev = S.add_seq(ev).select(*cols, "_file_idx", "_ord")
    # The last filter step (or the sessionized table when nothing was filtered) already counted this table.
    last = steps[-1]
    final_counts = {k: last[k] for k in ("events", "sessions", "items", "users", "ts_min", "ts_max")}
    steps.append({"step": "final", **final_counts})

    lap("filter")
    # ---- split
    scfg = SplitConfig(strategy=cfg.split, test_days=cfg.test_days, valid_days=cfg.valid_days, end_ts=cfg.end_ts,
                       cut_ts=cfg.cut_ts, test_fraction=cfg.test_fraction, seed=cfg.seed,
                       min_session_length=cfg.min_session_length, recent_fractions=tuple(cfg.recent_fractions))
    tagged, names, meta = split(ev, scfg)
    split_dir = os.path.join(tmp, C.SPLITS_DIR, cfg.split)
    targets = {C.EVENTS_DIR: os.path.join(tmp, C.EVENTS_DIR), **{name: os.path.join(split_dir, name) for name in names}}
    table_stats = write_split_tables(tagged, names, cols, targets)
    n_written = spark.read.parquet(targets[C.EVENTS_DIR]).count()  # Parquet footers only
    ledger.step("write", {}, rows_out=n_written)
    for i, (f, af) in enumerate(zip(files, acc_files)):
        ledger.add_file(f, af["rows_read"], af["skipped"], af["quarantined"], per_file_written.get(i, 0))
    ledger.check_files()
    for name, st in table_stats.items():
        log.info("%-18s events=%-9d sessions=%-8d items=%-7d users=%d", name, st["events"], st["sessions"],
                 st["items"], st["users"])
    # the written table: a columnar read of two columns instead of another scan of every event
    train_full = spark.read.parquet(targets[C.TRAIN_FULL])
    _write(item_index(train_full), os.path.join(split_dir, C.ITEM_INDEX), ["item_idx"], single_file=True)
    _write(user_index(train_full), os.path.join(split_dir, C.USER_INDEX), ["user_idx"], single_file=True)
    n_items, n_users = table_stats[C.TRAIN_FULL]["items"], table_stats[C.TRAIN_FULL]["users"]
    split_meta = {**meta, "tables": table_stats, "n_items": n_items, "n_users": n_users,
                  "recent_fractions": list(cfg.recent_fractions)}
    with open(os.path.join(split_dir, C.SPLIT_META), "w") as f:
        json.dump(split_meta, f, indent=2, sort_keys=True)

    lap("split")
    check_inputs_unchanged(state, "at the end of the job")
    manifest = {
        "timings_s": timings,
        # CPU seconds of the local JVM per phase: on a shared machine less skewed than wall time
        "jvm_cpu_s": cpu_timings,
        "inputs": inputs,
        "format": cfg.format,
        "parameters": dataclasses.asdict(cfg),
        "read": {"per_file": per_file, "quarantined": n_bad, "skipped": skipped,
                 "quarantine_reasons": reasons, "plausible_ts": ts_iso},
        # every row read = skipped + quarantined + removed by a named step + written (checked above)
        "accounting": ledger.to_dict(),
        "steps": steps,
        "events": final_counts,
        "splits": {cfg.split: split_meta},
        "versions": versions(),
        "spark_master": spark.sparkContext.master,
        # the driver's effective settings (under spark-submit they come from its command line)
        "spark": driver_settings(spark),
    }
    with open(os.path.join(tmp, C.MANIFEST), "w") as f:
        json.dump(manifest, f, indent=2, sort_keys=True, default=str)
    return manifest


# --------------------------------------------------------------------------- CLI

def _spark_conf(items: list[str]) -> dict[str, str]:
    try:
        return C.parse_key_values(items, "--spark-conf")
    except ValueError as e:
        raise SystemExit(str(e)) from None


def build_parser() -> argparse.ArgumentParser:
    from spark_jobs.readers import FORMATS
    from spark_jobs.splits import STRATEGIES

    p = argparse.ArgumentParser(prog="python -m spark_jobs.preprocess", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--config", help="YAML file with any of the options below (underscored names); flags override it")
    a("--input", nargs="+", help="files, directories or globs (order = original order for ties)")
    a("--format", choices=FORMATS)
    a("--out", help="output directory (replaced atomically)")
    a("--split", choices=STRATEGIES)
    a("--columns", help="generic formats: item_id=COL,ts=COL[,user_id=COL][,session_id=COL][,event_type=COL]")
    a("--ts-unit", choices=["s", "ms", "us", "iso"])
    a("--delimiter")
    a("--no-header", dest="header", action="store_const", const=False)
    a("--encode-ids", help="comma list of id columns that are strings (user_id,item_id,session_id)")
    a("--sessionize-by-user", action="store_const", const=True,
      help="ignore the source's session ids and split each user's events at idle gaps")
    a("--idle-gap-minutes", type=float)
    a("--remove-repeats", action="store_const", const=True, help="drop consecutive repeats of an item (HRNN)")
    a("--min-item-support", type=int)
    a("--min-session-length", type=int)
    a("--min-sessions-per-user", type=int)
    a("--max-sessions-per-user", type=int)
    a("--test-days", type=float)
    a("--valid-days", type=float)
    a("--end-ts", help="ISO-8601 end (exclusive) of the data interval; later events are ignored")
    a("--cut-ts", help="explicit cut for last_session_global")
    a("--test-fraction", type=float)
    a("--seed", type=int)
    a("--recent-fractions", help="comma list of k for train_recent_<k> (1/k of train_full), e.g. 256,64,16,4,1")
    a("--max-bad-fraction", type=float, help="fail when more than this fraction of a file's rows is bad (0.01)")
    a("--ts-min", help="quarantine events before this time (ISO-8601; default 1990-01-01; '' = no bound)")
    a("--ts-max", help="quarantine events after this time (ISO-8601; default: the job's start; '' = no bound)")
    a("--spark-conf", action="append", default=[], help="extra Spark setting key=value (repeatable)")
    a("-v", "--verbose", action="store_true")
    return p


def config_from_args(argv: list[str] | None = None) -> PreprocessConfig:
    args = build_parser().parse_args(argv)
    values: dict[str, Any] = {}
    if args.config:
        import yaml

        with open(args.config) as f:
            loaded = yaml.safe_load(f) or {}
        known = {f.name for f in dataclasses.fields(PreprocessConfig)}
        unknown = set(loaded) - known
        if unknown:
            raise SystemExit(f"{args.config}: unknown option(s) {sorted(unknown)}")
        values.update(loaded)
    for k, v in vars(args).items():
        if k in ("config", "verbose", "spark_conf") or v is None:
            continue
        values[k] = v
    if args.spark_conf:
        values["spark_conf"] = {**values.get("spark_conf", {}), **_spark_conf(args.spark_conf)}
    for k in ("encode_ids", "recent_fractions"):
        if isinstance(values.get(k), str):
            values[k] = [x.strip() for x in values[k].split(",") if x.strip()]
    if "recent_fractions" in values:
        values["recent_fractions"] = [int(x) for x in values["recent_fractions"]]
    if isinstance(values.get("input"), str):
        values["input"] = [values["input"]]
    cfg = PreprocessConfig(**values)
    missing = [n for n in ("input", "format", "out") if not getattr(cfg, n)]
    if missing:
        raise SystemExit("missing required option(s): " + ", ".join("--" + m for m in missing))
    return cfg


def summary(manifest: dict) -> str:
    lines = [f"{'table':<20}{'events':>10}{'sessions':>10}{'items':>8}{'users':>8}"]
    r = manifest["read"]
    lines.insert(0, f"read: quarantined {r['quarantined']} row(s); skipped {r['skipped']}")
    for st in manifest["steps"]:
        name = st["step"] if "round" not in st else f"r{st['round']}:{st['step']}"
        if "events" not in st:  # a step counted only by what it removed (before_end_ts)
            lines.append(f"{name:<20}{'-' + str(st.get('removed', 0)):>10}")
            continue
        lines.append(f"{name:<20}{st['events']:>10}{st['sessions']:>10}{st['items']:>8}{st['users']:>8}")
    for sname, sm in manifest["splits"].items():
        for t, c in sm["tables"].items():
            lines.append(f"{sname + '/' + t:<20}{c['events']:>10}{c['sessions']:>10}{c['items']:>8}{c['users']:>8}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    cfg = config_from_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("py4j").setLevel(logging.WARNING)
    from spark_jobs.accounting import RowAccountingError
    from spark_jobs.readers import InputError

    try:
        manifest = run(cfg)
    except (InputError, QuarantineThresholdExceeded, RowAccountingError, ValueError, OutputDiskFull) as e:
        print(f"preprocess failed: {e}", file=sys.stderr)
        return 2
    print(summary(manifest))
    print(f"wrote {os.path.abspath(cfg.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
