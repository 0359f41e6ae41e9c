"""Support filtering iterated to a fixed point.

One round applies, in order and each only when configured: minimum item
support (events per item), minimum session length, minimum and maximum
number of sessions per user. Removing rows in one step can push other items,
sessions or users below their threshold, so rounds repeat until a round
removes nothing. Counts after every step are returned for the manifest.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

from pyspark.sql import DataFrame
from pyspark.sql import functions as F

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FilterConfig:
    min_item_support: int = 0  # 5 (GRU4Rec), 10 / 20 (HRNN)
    min_session_length: int = 0  # 2 (GRU4Rec), 3 (HRNN)
    min_sessions_per_user: int = 0  # 5 (HRNN)
    max_sessions_per_user: int = 0  # 199 (HRNN on XING); 0 = no maximum
    max_rounds: int = 50

    def is_noop(self) -> bool:
        return not (self.min_item_support > 1 or self.min_session_length > 1
                    or self.min_sessions_per_user > 1 or self.max_sessions_per_user > 0)


def stats_dict(r) -> dict:
    return {"events": int(r["events"]), "sessions": int(r["sessions"]), "items": int(r["items"]),
            "users": int(r["users"]), "ts_min": r["ts_min"].isoformat() if r["ts_min"] else None,
            "ts_max": r["ts_max"].isoformat() if r["ts_max"] else None}


def table_counts(df: DataFrame) -> dict:
    """events / sessions / items / users and the time range of a (materialised) table.

    Two scans: one aggregation per session (its user, size and time range;
    local in the session layout) from which events, sessions, users and the
    time range follow, and one per item. A session has at most one user
    (sessionized by user, or sessions with several users were quarantined),
    so counting distinct users over sessions counts them over events.
    """
    sess = df.groupBy("session_id").agg(F.first("user_id", ignorenulls=True).alias("user_id"),
                                        F.count(F.lit(1)).alias("n"), F.min("ts").alias("lo"),
                                        F.max("ts").alias("hi"))
    r = sess.agg(F.sum("n").alias("events"), F.count(F.col("session_id")).alias("sessions"),
                 F.count_distinct("user_id").alias("users"), F.min("lo").alias("ts_min"),
                 F.max("hi").alias("ts_max")).first()
    d = {k: r[k] for k in ("events", "sessions", "users", "ts_min", "ts_max")}
    d["events"] = d["events"] or 0
    d["items"] = df.where(F.col("item_id").isNotNull()).select("item_id").distinct().count() if d["events"] else 0
    return stats_dict(d)


def _violators(df: DataFrame, key: str, counted: str | None, lo: int, hi: int = 0) -> DataFrame:
    """Keys with fewer than ``lo`` (or more than ``hi``, 0 = unbounded) rows / distinct ``counted``."""
    base = df.where(F.col(key).isNotNull())
    if counted is None:
        sizes = base.groupBy(key).agg(F.count(F.lit(1)).alias("_n"), F.count(F.lit(1)).alias("_rows"))
    else:
        # (key, counted) pairs first: in the session layout that is a local aggregation
        sizes = (base.groupBy(key, counted).agg(F.count(F.lit(1)).alias("_r"))
                 .groupBy(key).agg(F.count(F.lit(1)).alias("_n"), F.sum("_r").alias("_rows")))
    bad = F.col("_n") < lo
    if hi:
        bad = bad | (F.col("_n") > hi)
    # _rows: the events of each key, so the rows a step removes are counted, not inferred
    return sizes.where(bad).select(key, F.col("_rows").cast("long").alias("_rows"))


#: Above this many keys to remove, a removal is a shuffle join instead of a broadcast one.
MAX_BROADCAST_KEYS = 2_000_000


def apply_filters(df: DataFrame, cfg: FilterConfig, counts: dict | None = None,
                  checkpoint=None) -> tuple[DataFrame, list[dict]]:
    """Filter to a fixed point. Returns (filtered, steps) where each step records counts.

    ``df`` should be in the session layout of :func:`spark_jobs.sessionize.to_layout`
    (range-partitioned by session, sorted); ``counts`` are its
    :func:`table_counts` when the caller has them. A step first counts the keys
    it would remove (a small aggregate); only when there are some does it
    remove them, materialise the result with ``checkpoint`` (default
    :func:`spark_jobs.sessionize.checkpoint`) so the plan does not grow, and
    recount. Removals keep the layout: short sessions are dropped with a
    per-session window, items and users with a broadcast anti-join (rows
    without a user are never removed by the per-user rule). Rounds repeat
    until one removes nothing.
    """
    from pyspark.sql.window import Window

    from spark_jobs.sessionize import checkpoint as layout_checkpoint, to_layout

    checkpoint = checkpoint or layout_checkpoint
    steps: list[dict] = []
    if cfg.is_noop():
        return df, steps
    current = df
    counts = counts or table_counts(current)
    plan = []
    if cfg.min_item_support > 1:
        plan.append(("min_item_support", "item_id", None, cfg.min_item_support, 0))
    if cfg.min_session_length > 1:
        plan.append(("min_session_length", "session_id", None, cfg.min_session_length, 0))
    if cfg.min_sessions_per_user > 1 or cfg.max_sessions_per_user > 0:
        plan.append(("sessions_per_user", "user_id", "session_id", max(cfg.min_sessions_per_user, 1),
                     cfg.max_sessions_per_user))
    for rnd in range(1, cfg.max_rounds + 1):
        changed = False
        for name, key, counted, lo, hi in plan:
            cached = _violators(current, key, counted, lo, hi).cache()
            agg = cached.agg(F.count(F.lit(1)).alias("k"), F.sum("_rows").alias("r")).first()
            n_keys, n_rows = int(agg["k"]), int(agg["r"] or 0)
            drop = cached.select(key)
            if n_keys:
                if key == "session_id":
                    n = F.count(F.lit(1)).over(Window.partitionBy("session_id"))
                    current = checkpoint(current.withColumn("_n", n).where(F.col("_n") >= lo).drop("_n"))
                elif n_keys <= MAX_BROADCAST_KEYS:
                    current = checkpoint(current.join(F.broadcast(drop), key, "left_anti"))
                else:
                    current = to_layout(current.join(drop, key, "left_anti"))
                counts = table_counts(current)
                changed = True
            cached.unpersist()
            steps.append({"round": rnd, "step": name, "removed_keys": n_keys, "removed_events": n_rows, **counts})
            log.info("filter round %d %-20s removed %d %s(s): events=%d sessions=%d items=%d users=%d", rnd, name,
                     n_keys, key, counts["events"], counts["sessions"], counts["items"], counts["users"])
        if not changed:
            return current, steps
    raise RuntimeError(f"filters did not reach a fixed point within {cfg.max_rounds} rounds")
