"""Sessionize: canonical raw events -> contract events (session_id, user_id, item_id, ts, seq).

Pure DataFrame functions. Sessions come from the source's own session ids when
it has them (unless ``by_user=True``); otherwise, per user, a new session
starts after an idle gap strictly greater than ``idle_gap_s`` (30 min default:
a gap of exactly 30 min stays in the session). Events are ordered by
(ts, original file order), so equal timestamps keep the order of the input.

Run as part of ``python -m spark_jobs.preprocess``.
"""
from __future__ import annotations

from pyspark.sql import DataFrame
from pyspark.sql import functions as F
from pyspark.sql.window import Window

ORDER = ["ts", "_file_idx", "_ord"]


def encode_ids(df: DataFrame, columns: tuple[str, ...]) -> tuple[DataFrame, dict[str, DataFrame]]:
    """Cast integer ids to int64; dictionary-encode string ids into dense int64 ids.

    Returns the frame with ``session_id/user_id/item_id`` (int64) and, for each
    encoded column, the ``(raw, id)`` mapping so that ids can be traced back.
    The mapping is sorted by the raw string, so it is deterministic.
    """
    maps: dict[str, DataFrame] = {}
    for key in ("session_key", "user_key", "item_key"):
        out = key.replace("_key", "_id")
        if key in columns:
            mapping = (
                df.select(F.col(key).alias("raw")).where(F.col("raw").isNotNull()).distinct()
                .withColumn("id", (F.row_number().over(Window.orderBy("raw")) - 1).cast("long"))
            )
            maps[out] = mapping
            df = df.join(F.broadcast(mapping) if key != "item_key" else mapping,
                         df[key] == mapping["raw"], "left").drop("raw").withColumnRenamed("id", out).drop(key)
        else:
            # try_cast: ids were validated by the reader; with ANSI casts Spark may evaluate
            # the cast before the filter that removed header and bad rows.
            df = df.withColumn(out, F.col(key).try_cast("long")).drop(key)
    return df, maps


def drop_consecutive_repeats(df: DataFrame) -> tuple[DataFrame, DataFrame]:
    """Remove an event when the previous event of its session has the same item (HRNN).

    Returns (kept, removed) so the removed count can be logged.
    """
    w = Window.partitionBy("session_id").orderBy(*ORDER)
    marked = df.withColumn("_prev_item", F.lag("item_id").over(w))
    rep = F.col("_prev_item").isNotNull() & (F.col("_prev_item") == F.col("item_id"))
    return marked.filter(~rep).drop("_prev_item"), marked.filter(rep).drop("_prev_item")


def checkpoint(df: DataFrame) -> DataFrame:
    """``localCheckpoint`` that keeps the frame's partitioning and sort order known to the planner.

    Under adaptive execution a checkpointed frame reports an unknown
    partitioning, so every later window or aggregation by session would
    shuffle and sort all events again. Checkpointing with AQE switched off for
    that one job keeps the (range) partitioning and the ordering, and later
    per-session windows, aggregations and filters run without any shuffle.
    """
    from pyspark import StorageLevel

    spark = df.sparkSession
    # The checkpoint names its columns by the analysed plan; removing "redundant" aliases
    # would leave the partitioning on attributes it does not output (so it would be ignored).
    rule = "org.apache.spark.sql.catalyst.optimizer.RemoveRedundantAliases"
    excluded = spark.conf.get("spark.sql.optimizer.excludedRules", None)
    conf = {"spark.sql.adaptive.enabled": "false",
            "spark.sql.optimizer.excludedRules": f"{excluded},{rule}" if excluded else rule}
    old = {k: spark.conf.get(k, None) for k in conf}
    for k, v in conf.items():
        spark.conf.set(k, v)
    try:
        # On local disk (in practice the page cache), serialized: tens of millions of rows kept
        # as objects on the heap cost more in garbage collection than reading them back.
        return df.localCheckpoint(eager=True, storageLevel=StorageLevel.DISK_ONLY)
    finally:
        for k, v in old.items():
            if v is None:
                spark.conf.unset(k)
            else:
                spark.conf.set(k, v)


#: The events layout every step after sessionization keeps: range-partitioned by
#: session id and sorted by (session_id, ts, original order), i.e. the output order.
LAYOUT = ["session_id", *ORDER]


def to_layout(df: DataFrame) -> DataFrame:
    """Range-partition by session, sort by :data:`LAYOUT` and materialise (one shuffle)."""
    return checkpoint(df.repartitionByRange("session_id").sortWithinPartitions(*LAYOUT))


def with_position(df: DataFrame, order: list, name: str) -> DataFrame:
    """Add ``name`` = 0-based position of each row in the (total, deterministic) ``order``.

    A global sort plus per-partition offsets, instead of ``row_number`` over a
    window without partitioning (which pulls every row into one task). The
    result is materialised, so positions are stable for every later use.
    """
    s = checkpoint(df.orderBy(*order).withColumn("_pid", F.spark_partition_id())
                   .withColumn("_mono", F.monotonically_increasing_id()))
    sizes = sorted((r["_pid"], r["count"]) for r in s.groupBy("_pid").count().collect())
    base, acc = [], 0
    for pid, n in sizes:
        # monotonically_increasing_id = (partition index << 33) + row number inside the partition
        base += [F.lit(pid), F.lit(acc - (pid << 33))]
        acc += n
    if not base:
        return s.withColumn(name, F.lit(None).cast("long")).drop("_pid", "_mono")
    return s.withColumn(name, (F.create_map(*base)[F.col("_pid")] + F.col("_mono")).cast("long")).drop("_pid", "_mono")


def sessionize_by_user(df: DataFrame, idle_gap_s: float = 1800.0) -> DataFrame:
    """Split each user's events into sessions at idle gaps > ``idle_gap_s``.

    Session ids are dense int64, assigned in order of (session start, user,
    session number) so re-runs give the same ids. Events without a user id
    cannot be sessionized by user and must be handled by the caller.

    One shuffle of the events (by user, for the gap window); the session ids
    come from sorting only the sessions' first events, and are joined back
    by (user, session number) without moving the events again.
    """
    w = Window.partitionBy("user_id").orderBy(*ORDER)
    gap_us = F.unix_micros("ts") - F.unix_micros(F.lag("ts").over(w))
    new = F.when(gap_us.isNull() | (gap_us > F.lit(int(idle_gap_s * 1_000_000))), 1).otherwise(0)
    x = checkpoint(df.withColumn("_new", new).withColumn("_sno", F.sum("_new").over(w)))
    starts = x.where(F.col("_new") == 1).select("user_id", "_sno", *ORDER)
    ids = with_position(starts, [*ORDER, "user_id", "_sno"], "session_id").select("user_id", "_sno", "session_id")
    # x is hash-partitioned by user: only the (small) session table is shuffled for this join.
    return x.join(ids.hint("shuffle_hash"), ["user_id", "_sno"]).drop("_sno", "_new")


def session_users(df: DataFrame) -> DataFrame:
    """Sessions whose events carry more than one distinct user id (a data error)."""
    return (df.where(F.col("user_id").isNotNull()).groupBy("session_id")
            .agg(F.countDistinct("user_id").alias("n_users")).where("n_users > 1"))


def add_seq(df: DataFrame) -> DataFrame:
    """``seq`` = 0-based position in the session by (ts, original order)."""
    w = Window.partitionBy("session_id").orderBy(*ORDER)
    return df.withColumn("seq", (F.row_number().over(w) - 1).cast("int"))
