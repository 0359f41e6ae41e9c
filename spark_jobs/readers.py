"""Readers: every supported raw format -> one canonical event DataFrame.

Each reader returns a :class:`ReadResult` with

* ``events``: ``session_key, user_key, item_key`` (raw ids: strings, or int64
  where the source is typed), ``ts``
  (timestamp, UTC), ``event_type`` (string, nullable), ``_file_idx`` (int,
  index of the input file) and ``_ord`` (long, original order inside the file);
* ``quarantine``: rejected rows as ``file, line, reason, raw``;
* ``status``: one row per input row, ``_file_idx`` and ``status`` (null =
  good, ``skip:<why>`` for rows skipped on purpose such as header lines,
  blank lines or non-item actions, ``bad:<reason>`` for quarantined rows),
  so one aggregation counts everything and nothing is dropped silently.

Ids stay strings here; :func:`spark_jobs.ids.encode_ids` turns them into the
contract's int64 ids. Supported formats (``--format``):

=============== ==============================================================
``gru4rec``     GRU4Rec / session-rec TSV ``SessionId<TAB>ItemId<TAB>Time`` (Unix s)
``yoochoose``   raw ``yoochoose-clicks.dat``: ``SessionId,ISO-8601,ItemId,Category``
``trivago``     trivago RecSys Challenge 2019 (Parquet or CSV), item actions only
``diginetica``  ``session_id;user_id;item_id;timeframe;eventdate`` (header)
``movielens``   ``u.data`` (TAB), ``ratings.dat`` (``::``) or RecBole ``.inter``
``lastfm``      Last.fm-1K ``userid<TAB>ISO<TAB>artid<TAB>artname<TAB>traid<TAB>traname``
``synthetic``   Parquet written by :mod:`spark_jobs.generate` (sessionized by user)
``csv|tsv``     generic delimited text with a ``--columns`` mapping
``parquet``     generic Parquet with a ``--columns`` mapping
=============== ==============================================================
"""
from __future__ import annotations

import glob
import os
from dataclasses import dataclass

from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F

#: The canonical columns every reader produces.
CANONICAL = ["session_key", "user_key", "item_key", "ts", "event_type", "_file_idx", "_ord"]
QUARANTINE_COLUMNS = ["file", "line", "reason", "raw"]

#: trivago actions whose ``reference`` is an item id.
TRIVAGO_ITEM_ACTIONS = [
    "clickout item",
    "interaction item rating",
    "interaction item info",
    "interaction item image",
    "interaction item deals",
    "search for item",
]

FORMATS = ["gru4rec", "session-rec", "yoochoose", "trivago", "diginetica", "movielens", "recbole",
           "lastfm", "synthetic", "csv", "tsv", "parquet"]


class InputError(ValueError):
    """Raised for input that cannot be read at all (no files, wrong header...)."""


class InputChangedError(InputError):
    """An input file changed (grew, was rewritten) while the job read it."""


#: Magic bytes of containers that a text format cannot read when the file name hides them
#: (Spark picks a decompression codec by the file's extension only).
_MAGIC = [(b"\x1f\x8b", "gzip-compressed", (".gz",)), (b"BZh", "bzip2-compressed", (".bz2",)),
          (b"PK\x03\x04", "a zip archive", ()), (b"(\xb5/\xfd", "zstd-compressed", (".zst",)),
          (b"PAR1", "a Parquet file", ())]


def check_text_inputs(files: list[str]) -> None:
    """Fail on a local file whose first bytes show binary content a text reader would turn
    into garbage rows: a compressed file without its extension (``.csv`` holding gzip), a
    zip archive, a Parquet file. Reads a few bytes per file."""
    for f in files:
        if "://" in f and not f.startswith("file://"):
            continue
        try:
            with open(f.removeprefix("file://"), "rb") as fh:
                head = fh.read(4)
        except OSError as e:
            raise InputError(f"{f}: cannot be read: {e}") from None
        for magic, what, exts in _MAGIC:
            if head.startswith(magic) and not f.endswith(exts or ("\0",)):
                hint = (f"Spark decompresses by file name: rename it to end in {exts[0]}" if exts
                        else "it is not a text file for this format")
                raise InputError(f"{f}: line 1: the file is {what}, but its name does not say so ({hint})")


@dataclass
class ReadResult:
    events: DataFrame
    quarantine: DataFrame
    files: list[str]
    #: columns whose ids are not integers and must be dictionary-encoded
    string_ids: tuple[str, ...] = ()
    #: whether the source carries its own session ids
    has_sessions: bool = True
    #: ``_file_idx``, ``status`` for every input row (see module docstring)
    status: DataFrame | None = None


# --------------------------------------------------------------------------- files

def expand_inputs(inputs: list[str] | str) -> list[str]:
    """Expand local globs and directories; keep URIs (``hdfs://``, ``s3a://``) as given.

    The order given on the command line is kept (it is the "original order"
    used to break timestamp ties); a glob expands in sorted order.
    """
    if isinstance(inputs, str):
        inputs = [inputs]
    out: list[str] = []
    for pattern in inputs:
        if "://" in pattern and not pattern.startswith("file://"):
            out.append(pattern)
            continue
        pattern = pattern.removeprefix("file://")
        matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        if not matches:
            raise InputError(f"input {pattern!r} matches no file")
        for m in matches:
            if not os.path.exists(m):
                raise InputError(f"input file {m!r} does not exist")
            out.append(os.path.abspath(m))
    if not out:
        raise InputError("no input files given")
    return out


def _list_data_files(path: str) -> list[str]:
    """Data files under a local directory (skipping Spark/Hadoop markers), or the file itself."""
    if not os.path.isdir(path):
        return [path]
    files = []
    for root, dirs, names in os.walk(path):
        dirs[:] = sorted(d for d in dirs if not d.startswith((".", "_")))
        files += [os.path.join(root, n) for n in sorted(names) if not n.startswith((".", "_"))]
    return files


def input_files(inputs: list[str] | str) -> list[str]:
    files: list[str] = []
    for p in expand_inputs(inputs):
        files += _list_data_files(p) if "://" not in p else [p]
    return files


# --------------------------------------------------------------------------- text

def _read_text(spark: SparkSession, files: list[str]) -> DataFrame:
    """All lines of all files with file index, original order and block offset."""
    parts = []
    for i, f in enumerate(files):
        df = spark.read.text(f).select(
            F.col("value"),
            F.lit(i).cast("int").alias("_file_idx"),
            F.lit(f).alias("_file"),
            F.monotonically_increasing_id().alias("_ord"),
            F.col("_metadata.file_block_start").alias("_block"),
        )
        parts.append(df)
    out = parts[0]
    for p in parts[1:]:
        out = out.unionByName(p)
    # Windows line ends: strip a trailing CR so the last field parses.
    return out.withColumn("value", F.regexp_replace("value", "\r$", ""))


def attach_line_numbers(rows: DataFrame, lines: DataFrame) -> DataFrame:
    """Add a 1-based ``line`` to ``rows`` (a subset of ``lines``) from ``_ord``/``_block``.

    Rows of one file block are consecutive in ``monotonically_increasing_id``
    order, so line = lines in earlier blocks + offset inside the block + 1.
    Only called for quarantined rows, so the block table costs one cheap
    aggregation and never touches the good rows.
    """
    from pyspark.sql.window import Window

    blocks = lines.groupBy("_file_idx", "_block").agg(
        F.min("_ord").alias("_bmin"), F.count(F.lit(1)).alias("_bn")
    )
    w = Window.partitionBy("_file_idx").orderBy("_block").rowsBetween(Window.unboundedPreceding, -1)
    blocks = blocks.withColumn("_before", F.coalesce(F.sum("_bn").over(w), F.lit(0)))
    return (
        rows.join(F.broadcast(blocks), ["_file_idx", "_block"])
        .withColumn("line", (F.col("_before") + F.col("_ord") - F.col("_bmin") + 1).cast("long"))
        .drop("_bmin", "_bn", "_before")
    )


def _id(c: Column) -> Column:
    """A trimmed id string; empty and ``NA``/``null`` markers become null."""
    t = F.trim(c)
    return F.when((t == "") | t.isin("NA", "null", "NULL", "None", "nan"), F.lit(None)).otherwise(t)


def _int_id_ok(c: Column) -> Column:
    """An integer that fits in int64 and is not negative (raw ids are never negative)."""
    v = c.try_cast("long")
    return c.isNotNull() & c.rlike(r"^-?\d+$") & v.isNotNull() & (v >= 0)


def _int_id_problem(c: Column, name: str) -> Column:
    """Why a non-null id string is not a valid int64 id (null when it is)."""
    v = c.try_cast("long")
    return (F.when(~c.rlike(r"^-?\d+$"), F.concat(F.lit(f"{name} id is not an integer: "), F.substring(c, 1, 40)))
            .when(v.isNull(), F.concat(F.lit(f"{name} id does not fit in int64: "), F.substring(c, 1, 40)))
            .when(v < 0, F.concat(F.lit(f"{name} id is negative: "), c)))


def _ts_range_checks(ts: Column, ts_range) -> list[tuple[Column, Column]]:
    """Quarantine checks for implausible times: ``ts_range = (lo_us, hi_us, lo_label)``,
    either bound None = unbounded. Timestamps before ``lo`` (a truncated or zero epoch) and
    after ``hi`` (the job's start: the future) are not events that happened."""
    if not ts_range:
        return []
    lo, hi, lo_label = ts_range
    out = []
    us = F.unix_micros(ts)
    if lo is not None:
        out.append((ts.isNotNull() & (us < F.lit(lo)), F.lit(f"timestamp before {lo_label}")))
    if hi is not None:
        out.append((ts.isNotNull() & (us > F.lit(hi)), F.lit("timestamp in the future")))
    return out


def epoch_seconds_to_ts(c: Column) -> Column:
    """Unix seconds (with fraction) -> timestamp, exact to the microsecond."""
    micros = F.round(c.try_cast("double") * F.lit(1_000_000)).try_cast("long")
    return F.when(micros.isNotNull(), F.timestamp_micros(micros))


def iso_to_ts(c: Column) -> Column:
    return F.trim(c).try_cast("timestamp")


def _parse_delimited(
    spark: SparkSession,
    files: list[str],
    *,
    sep: str,
    n_cols: int,
    build: "callable",
    header: str | None = None,
    header_prefix: str | None = None,
    string_ids: tuple[str, ...] = (),
    has_sessions: bool = True,
    min_cols: int | None = None,
    ts_range=None,
) -> ReadResult:
    """Shared machinery for the line-based formats.

    ``build(fields)`` maps the split fields (a Spark array column) to a dict
    of canonical column expressions; rows where any check fails go to
    quarantine with the first failing reason.
    """
    import re

    lines = _read_text(spark, files)
    is_header = F.lit(False)
    if header is not None:
        is_header = F.col("value") == F.lit(header)
    if header_prefix is not None:
        is_header = is_header | F.col("value").startswith(header_prefix)
    is_blank = F.trim(F.col("value")) == ""
    fields = F.split(F.col("value"), re.escape(sep), -1)
    body = lines.withColumn("_f", fields).withColumn("_n", F.size("_f"))
    cols = build(F.col("_f"))
    for name, expr in cols.items():
        body = body.withColumn(name, expr)
    lo = min_cols if min_cols is not None else n_cols
    count_msg = f"expected {n_cols} {sep!r}-separated columns" if lo == n_cols else f"expected {lo}-{n_cols} columns"
    checks: list[tuple[Column, Column]] = [
        (F.col("value").contains("\ufffd"), F.lit("non-UTF-8 bytes")),
        ((F.col("_n") < lo) | (F.col("_n") > n_cols),
         F.concat(F.lit(count_msg + ", got "), F.col("_n").cast("string"))),
        (F.col("item_key").isNull(), F.lit("missing item id")),
        (F.col("ts").isNull(), F.lit("unparseable timestamp")),
    ]
    if has_sessions:
        checks.append((F.col("session_key").isNull(), F.lit("missing session id")))
    else:
        checks.append((F.col("user_key").isNull(), F.lit("missing user id")))
    for c in ("session_key", "user_key", "item_key"):
        if c not in string_ids and c in cols:
            nm = c.split("_")[0]
            checks.append((F.col(c).isNotNull() & ~_int_id_ok(F.col(c)), _int_id_problem(F.col(c), nm)))
    checks += _ts_range_checks(F.col("ts"), ts_range)  # a well-formed row at an implausible time
    reason = F.lit(None).cast("string")
    for cond, msg in reversed(checks):
        reason = F.when(cond, msg).otherwise(reason)
    status = (F.when(is_header, F.lit("skip:header_line")).when(is_blank, F.lit("skip:blank_line"))
              .otherwise(F.concat(F.lit("bad:"), reason)))
    body = body.withColumn("status", status)
    bad = body.filter(F.col("status").startswith("bad:")).withColumn("reason", F.substring("status", 5, 10_000))
    quarantine = attach_line_numbers(bad.select("_file_idx", "_file", "_ord", "_block", "reason", "value"), lines)
    quarantine = quarantine.select(
        F.col("_file").alias("file"), "line", "reason", F.substring("value", 1, 500).alias("raw")
    )
    good = body.filter(F.col("status").isNull())
    for c in ("session_key", "user_key", "event_type"):
        if c not in cols:
            good = good.withColumn(c, F.lit(None).cast("string"))
    events = good.select(*CANONICAL)
    return ReadResult(events, quarantine, files, string_ids, has_sessions, body.select("_file_idx", "status"))


def _get(f: Column, i: int) -> Column:
    return F.get(f, i)


# --------------------------------------------------------------------------- formats

def read_gru4rec(spark, files, ts_range=None, **_):
    return _parse_delimited(
        spark, files, ts_range=ts_range, sep="\t", n_cols=3, header="SessionId\tItemId\tTime",
        build=lambda f: {
            "session_key": _id(_get(f, 0)),
            "item_key": _id(_get(f, 1)),
            "ts": epoch_seconds_to_ts(_get(f, 2)),
        },
    )


def read_yoochoose(spark, files, ts_range=None, **_):
    # Category is a sales category ('0', '1'..'12', 'S', or a brand id): not an event type.
    return _parse_delimited(
        spark, files, ts_range=ts_range, sep=",", n_cols=4,
        build=lambda f: {
            "session_key": _id(_get(f, 0)),
            "ts": iso_to_ts(_get(f, 1)),
            "item_key": _id(_get(f, 2)),
        },
    )


def read_diginetica(spark, files, ts_range=None, **_):
    def build(f):
        day = F.trim(_get(f, 4)).try_cast("date")
        ms = F.trim(_get(f, 3)).try_cast("long")
        micros = F.unix_micros(day.cast("timestamp")) + ms * F.lit(1000)
        return {
            "session_key": _id(_get(f, 0)),
            "user_key": _id(_get(f, 1)),
            "item_key": _id(_get(f, 2)),
            "ts": F.when(day.isNotNull() & ms.isNotNull(), F.timestamp_micros(micros)),
        }

    return _parse_delimited(spark, files, ts_range=ts_range, sep=";", n_cols=5,
                            header="session_id;user_id;item_id;timeframe;eventdate", build=build)


def read_movielens(spark, files, ts_range=None, **_):
    """MovieLens: each file by its name: ``*.dat`` uses ``::``, ``*.inter`` is RecBole, else ``u.data``."""
    results = []
    for f in files:
        if f.endswith(".inter"):
            results.append(read_recbole(spark, [f], ts_range=ts_range))
        else:
            sep = "::" if f.endswith(".dat") else "\t"
            results.append(_parse_delimited(
                spark, [f], ts_range=ts_range, sep=sep, n_cols=4, has_sessions=False,
                build=lambda c: {
                    "user_key": _id(_get(c, 0)),
                    "item_key": _id(_get(c, 1)),
                    "ts": epoch_seconds_to_ts(_get(c, 3)),
                },
            ))
    return _concat(results, files)


def read_recbole(spark, files, ts_range=None, **_):
    # RecBole atomic files: header "user_id:token<TAB>item_id:token<TAB>rating:float<TAB>timestamp:float".
    return _parse_delimited(
        spark, files, ts_range=ts_range, sep="\t", n_cols=4, min_cols=3, header_prefix="user_id:token",
        has_sessions=False,
        build=lambda c: {
            "user_key": _id(_get(c, 0)),
            "item_key": _id(_get(c, 1)),
            "ts": epoch_seconds_to_ts(F.coalesce(_get(c, 3), _get(c, 2))),
        },
    )


def read_lastfm(spark, files, ts_range=None, **_):
    def build(f):
        track = _id(_get(f, 4))
        # Some plays have no MusicBrainz track id: fall back to "artist / track name".
        fallback = F.when(_id(_get(f, 5)).isNotNull(),
                          F.concat_ws(" / ", F.trim(_get(f, 3)), F.trim(_get(f, 5))))
        return {
            "user_key": _id(_get(f, 0)),
            "ts": iso_to_ts(_get(f, 1)),
            "item_key": F.coalesce(track, fallback),
        }

    return _parse_delimited(spark, files, ts_range=ts_range, sep="\t", n_cols=6, build=build,
                            string_ids=("user_key", "item_key"), has_sessions=False)


def _parquet_with_row_numbers(spark: SparkSession, files: list[str]) -> DataFrame:
    """All rows of all Parquet ``files`` with ``_file_idx``, ``_file`` and ``_ord`` (row index in the file).

    One scan over all files (a union of one scan per file costs a schema job
    and a plan per file: minutes at 150 files); each row's file index comes
    from the path Spark reports for it, qualified the way Hadoop does.
    """
    if len(set(files)) != len(files):  # the same file twice: only a union reads it twice
        parts = [_parquet_with_row_numbers(spark, [f]).withColumn("_file_idx", F.lit(i).cast("int"))
                 for i, f in enumerate(files)]
        out = parts[0]
        for p in parts[1:]:
            out = out.unionByName(p, allowMissingColumns=True)
        return out
    reader = spark.read.option("mergeSchema", "true") if len(files) > 1 else spark.read
    df = reader.parquet(*files)
    jvm, conf = spark.sparkContext._jvm, spark.sparkContext._jsc.hadoopConfiguration()
    keys: dict[str, int] = {}
    for i, f in enumerate(files):
        jp = jvm.org.apache.hadoop.fs.Path(f)
        q = jp.getFileSystem(conf).makeQualified(jp)
        # a listed local file reads "file:/x/y" (what the scan reports), a qualified one "file:///x/y"
        for k in (jvm.org.apache.hadoop.fs.Path(q.toString()).toUri().toString(), q.toUri().toString()):
            keys.setdefault(k, i)
    # A broadcast hash join, not a literal map: a map lookup compares the path with every key.
    paths = spark.createDataFrame(list(keys.items()), "_fp string, _fidx int")
    df = (df.withColumn("_fp", F.col("_metadata.file_path")).withColumn("_ord", F.col("_metadata.row_index"))
          .join(F.broadcast(paths), "_fp", "left"))
    idx = F.coalesce(F.col("_fidx"), F.raise_error(F.concat(F.lit("cannot match the scanned file to an input: "),
                                                           F.col("_fp"))))
    return (df.withColumn("_file_idx", idx.cast("int"))
            .withColumn("_file", F.element_at(F.array(*[F.lit(f) for f in files]), F.col("_file_idx") + 1))
            .drop("_fp", "_fidx"))


def _structured(df: DataFrame, cols: dict[str, Column], *, string_ids=(), has_sessions=True,
                files: list[str], skip: tuple[Column, str] | None = None, ts_range=None) -> ReadResult:
    """Quarantine logic for typed sources (Parquet): nulls and unparseable values."""
    for name, expr in cols.items():
        df = df.withColumn(name, expr)
    checks = [(F.col("item_key").isNull(), F.lit("missing item id")),
              (F.col("ts").isNull(), F.lit("unparseable or missing timestamp"))]
    if has_sessions:
        checks.append((F.col("session_key").isNull(), F.lit("missing session id")))
    else:
        checks.append((F.col("user_key").isNull(), F.lit("missing user id")))
    types = dict(df.select(*[F.col(c) for c in cols]).dtypes)
    for c in ("session_key", "user_key", "item_key"):
        nm = c.split("_")[0]
        if c in cols and c not in string_ids and types[c] == "string":  # strings must hold int64 integers
            checks.append((F.col(c).isNotNull() & ~_int_id_ok(F.col(c)), _int_id_problem(F.col(c), nm)))
        elif c in cols and c not in string_ids and types[c] in ("tinyint", "smallint", "int", "bigint"):
            checks.append((F.col(c) < 0, F.concat(F.lit(f"{nm} id is negative: "), F.col(c).cast("string"))))
    checks += _ts_range_checks(F.col("ts"), ts_range)
    reason = F.lit(None).cast("string")
    for cond, msg in reversed(checks):
        reason = F.when(cond, msg).otherwise(reason)
    df = df.withColumn("reason", reason)
    status = F.when(F.col("reason").isNotNull(), F.concat(F.lit("bad:"), F.col("reason")))
    if skip is not None:
        df = df.withColumn("reason", F.when(~skip[0], F.col("reason")))
        status = F.when(skip[0], F.lit("skip:" + skip[1])).otherwise(status)
    df = df.withColumn("status", status)
    raw_cols = [c for c in df.columns if not c.startswith("_") and c not in cols and c not in ("reason", "status")]
    quarantine = df.filter(F.col("reason").isNotNull()).select(
        F.col("_file").alias("file"), (F.col("_ord") + 1).alias("line"), "reason",
        F.substring(F.to_json(F.struct(*raw_cols)), 1, 500).alias("raw"),
    )
    good = df.filter(F.col("status").isNull())
    for c in ("session_key", "user_key", "event_type"):
        if c not in cols:
            good = good.withColumn(c, F.lit(None).cast("long" if c != "event_type" else "string"))
    return ReadResult(good.select(*CANONICAL), quarantine, files, tuple(string_ids), has_sessions,
                      df.select("_file_idx", "status"))


def read_trivago(spark, files, ts_range=None, **_):
    if all(f.endswith((".csv", ".csv.gz")) for f in files):
        parts = [spark.read.option("header", True).csv(f)
                 .withColumn("_file_idx", F.lit(i).cast("int")).withColumn("_file", F.lit(f))
                 .withColumn("_ord", F.monotonically_increasing_id()) for i, f in enumerate(files)]
        df = parts[0]
        for p in parts[1:]:
            df = df.unionByName(p)
    else:
        df = _parquet_with_row_numbers(spark, files)
    not_item = ~F.coalesce(F.col("action_type").isin(TRIVAGO_ITEM_ACTIONS), F.lit(False))
    cols = {
        "session_key": _id(F.col("session_id").cast("string")),
        "user_key": _id(F.col("user_id").cast("string")),
        "item_key": _id(F.col("reference").cast("string")),
        "ts": epoch_seconds_to_ts(F.col("timestamp")),
        "event_type": F.col("action_type"),
    }
    return _structured(df, cols, string_ids=("session_key", "user_key"), files=files,
                       skip=(not_item, "non_item_action"), ts_range=ts_range)


def read_synthetic(spark, files, ts_range=None, **_):
    """Generator output: user_id, item_id, ts (+ ground-truth session_id, ignored: we sessionize)."""
    df = _parquet_with_row_numbers(spark, files)
    cols = {"user_key": F.col("user_id").cast("long"), "item_key": F.col("item_id").cast("long"),
            "ts": F.col("ts").cast("timestamp")}
    return _structured(df, cols, has_sessions=False, files=files, ts_range=ts_range)


# --------------------------------------------------------------------------- generic

def parse_columns(spec: str | dict | None) -> dict[str, str]:
    """``"item_id=iid,ts=time,user_id=uid"`` -> {"item_key": "iid", ...}."""
    if not spec:
        raise InputError("generic formats need --columns, e.g. item_id=item,ts=time,user_id=user")
    from spark_jobs.contract import parse_key_values

    try:
        pairs = spec.items() if isinstance(spec, dict) else parse_key_values(spec, "--columns").items()
    except ValueError as e:
        raise InputError(str(e)) from None
    out = {}
    for k, v in pairs:
        k = k.strip()
        if k not in ("session_id", "user_id", "item_id", "ts", "event_type"):
            raise InputError(f"--columns: unknown target column {k!r} (use session_id,user_id,item_id,ts,event_type)")
        out[k.replace("_id", "_key")] = str(v).strip()
    if "item_key" not in out or "ts" not in out:
        raise InputError("--columns must map at least item_id and ts")
    if "session_key" not in out and "user_key" not in out:
        raise InputError("--columns must map session_id or user_id (sessions are built per user otherwise)")
    return out


def _ts_expr(c: Column, unit: str) -> Column:
    if unit == "iso":
        return iso_to_ts(c.cast("string"))
    scale = {"s": 1, "ms": 1e-3, "us": 1e-6}[unit]
    return epoch_seconds_to_ts(c.try_cast("double") * F.lit(scale))


def read_generic(spark, files, *, fmt: str, columns=None, ts_unit: str = "s", delimiter: str | None = None,
                 header: bool = True, encode_ids: tuple[str, ...] = (), ts_range=None, **_):
    mapping = parse_columns(columns)
    string_ids = tuple(c.replace("_id", "_key") for c in encode_ids)
    has_sessions = "session_key" in mapping
    if fmt == "parquet":
        df = _parquet_with_row_numbers(spark, files)
        missing = [v for v in mapping.values() if v not in df.columns]
        if missing:
            raise InputError(f"{files[0]}: columns {missing} not found (has {df.columns})")
        cols = {}
        for k, v in mapping.items():
            if k == "ts":
                dt = dict(df.dtypes)[v]
                cols[k] = F.col(v).cast("timestamp") if dt.startswith("timestamp") or dt == "date" else _ts_expr(F.col(v), ts_unit)
            elif dict(df.dtypes)[v] in ("tinyint", "smallint", "int", "bigint") and k != "event_type":
                cols[k] = F.col(v).cast("long")
            else:
                cols[k] = _id(F.col(v).cast("string"))
        return _structured(df, cols, string_ids=string_ids, has_sessions=has_sessions, files=files,
                           ts_range=ts_range)
    sep = delimiter or ("\t" if fmt == "tsv" else ",")
    if header:
        first = spark.read.text(files[0]).limit(1).collect()
        if not first:
            raise InputError(f"{files[0]}: empty file, expected a header line")
        names = [n.strip() for n in first[0]["value"].rstrip("\r").split(sep)]
        header_line = first[0]["value"].rstrip("\r")
    else:
        names = [str(i) for i in range(len(mapping) + 8)]
        header_line = None
    pos = {}
    for k, v in mapping.items():
        if v in names:
            pos[k] = names.index(v)
        elif v.isdigit():
            pos[k] = int(v)
        else:
            raise InputError(f"{files[0]}: column {v!r} not in header {names}")
    n_cols = len(names) if header else max(pos.values()) + 1

    def build(f):
        out = {}
        for k, i in pos.items():
            out[k] = _ts_expr(_get(f, i), ts_unit) if k == "ts" else _id(_get(f, i))
        return out

    return _parse_delimited(spark, files, sep=sep, n_cols=n_cols, header=header_line, build=build,
                            string_ids=string_ids, has_sessions=has_sessions, ts_range=ts_range,
                            min_cols=None if header else max(pos.values()) + 1)


def _concat(results: list[ReadResult], files: list[str]) -> ReadResult:
    """Join per-file results (file indices are re-based to the position in ``files``)."""
    first = results[0]
    ev, q, st = first.events, first.quarantine, first.status
    for i, r in enumerate(results[1:], start=1):
        ev = ev.unionByName(r.events.withColumn("_file_idx", F.lit(i).cast("int")))
        q = q.unionByName(r.quarantine)
        st = st.unionByName(r.status.withColumn("_file_idx", F.lit(i).cast("int")))
    return ReadResult(ev, q, files, first.string_ids, first.has_sessions, st)


READERS = {
    "gru4rec": read_gru4rec,
    "session-rec": read_gru4rec,
    "yoochoose": read_yoochoose,
    "trivago": read_trivago,
    "diginetica": read_diginetica,
    "movielens": read_movielens,
    "recbole": read_recbole,
    "lastfm": read_lastfm,
    "synthetic": read_synthetic,
}


def read_events(spark: SparkSession, inputs: list[str] | str, fmt: str, **options) -> ReadResult:
    """Read ``inputs`` (files, directories or globs) in format ``fmt``."""
    if fmt not in FORMATS:
        raise InputError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    files = input_files(inputs)
    if fmt not in ("parquet", "synthetic") and not (fmt == "trivago" and not all(
            f.endswith((".csv", ".csv.gz")) for f in files)):
        check_text_inputs(files)
    if fmt in ("csv", "tsv", "parquet"):
        return read_generic(spark, files, fmt=fmt, **options)
    return READERS[fmt](spark, files, **options)
