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


def sessionize_by_user(df: DataFrame, idle_gap_s: float = 1800.0) -> DataFrame:
    """Split each user's events into sessions at idle gaps > ``idle_gap_s``.

    Session ids are dense int64, assigned in order of (session start, user,
    session number) so re-runs give the same ids. Events without a user id
    cannot be sessionized by user and must be handled by the caller.
    """
    w = Window.partitionBy("user_id").orderBy(*ORDER)
    gap_us = F.unix_micros("ts") - F.unix_micros(F.lag("ts").over(w))
    new = F.when(gap_us.isNull() | (gap_us > F.lit(int(idle_gap_s * 1_000_000))), 1).otherwise(0)
    df = df.withColumn("_new", new).withColumn("_sno", F.sum("_new").over(w)).drop("_new")
    starts = df.groupBy("user_id", "_sno").agg(F.min(F.struct(*ORDER)).alias("_start"))
    # One global ordering of sessions (a single-partition window over sessions, not events).
    starts = starts.withColumn(
        "session_id", (F.row_number().over(Window.orderBy("_start", "user_id", "_sno")) - 1).cast("long")
    ).drop("_start")
    return df.join(starts, ["user_id", "_sno"]).drop("_sno")


def session_users(df: DataFrame) -> DataFrame:
    """Sessions whose events carry more than one distinct user id (a data error)."""
    return (df.where(F.col("user_id").isNotNull()).groupBy("session_id")
            .agg(F.countDistinct("user_id").alias("n_users")).where("n_users > 1"))


def add_seq(df: DataFrame) -> DataFrame:
    """``seq`` = 0-based position in the session by (ts, original order)."""
    w = Window.partitionBy("session_id").orderBy(*ORDER)
    return df.withColumn("seq", (F.row_number().over(w) - 1).cast("int"))
