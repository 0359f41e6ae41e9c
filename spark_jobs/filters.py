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


def count_exprs() -> list:
    """Aggregations for events / sessions / items / users / time range."""
    return [F.count(F.lit(1)).alias("events"), F.countDistinct("session_id").alias("sessions"),
            F.countDistinct("item_id").alias("items"), F.countDistinct("user_id").alias("users"),
            F.min("ts").alias("ts_min"), F.max("ts").alias("ts_max")]


def stats_dict(r) -> dict:
    return {"events": int(r["events"]), "sessions": int(r["sessions"]), "items": int(r["items"]),
            "users": int(r["users"]), "ts_min": r["ts_min"].isoformat() if r["ts_min"] else None,
            "ts_max": r["ts_max"].isoformat() if r["ts_max"] else None}


def table_counts(df: DataFrame) -> dict:
    """events / sessions / items / users and the time range of a (cached) table.

    Four small jobs instead of one: several ``countDistinct`` in one
    aggregation make Spark expand every row once per distinct column, which
    costs more than scanning a cached table four times.
    """
    r = df.agg(F.count(F.lit(1)).alias("events"), F.min("ts").alias("ts_min"), F.max("ts").alias("ts_max")).first()
    d = {k: r[k] for k in ("events", "ts_min", "ts_max")}
    for name, col in (("sessions", "session_id"), ("items", "item_id"), ("users", "user_id")):
        d[name] = df.where(F.col(col).isNotNull()).select(col).distinct().count() if d["events"] else 0
    return stats_dict(d)


def _keep_by_count(df: DataFrame, key: str, counted: str | None, lo: int, hi: int = 0) -> DataFrame:
    """Keep rows whose ``key`` has between lo and hi (0 = unbounded) rows / distinct ``counted``."""
    agg = F.count(F.lit(1)) if counted is None else F.countDistinct(counted)
    sizes = df.groupBy(key).agg(agg.alias("_n"))
    cond = F.col("_n") >= lo
    if hi:
        cond = cond & (F.col("_n") <= hi)
    keep = sizes.where(cond).select(key)
    if key == "user_id":
        # Events without a user cannot be judged by a per-user rule: keep them.
        return df.join(keep, key, "left_semi").unionByName(df.where(F.col(key).isNull()))
    return df.join(keep, key, "left_semi")


def apply_filters(df: DataFrame, cfg: FilterConfig, checkpoint=None) -> tuple[DataFrame, list[dict]]:
    """Filter to a fixed point. Returns (filtered, steps) where each step records counts.

    ``checkpoint(df)`` materialises an intermediate result (cache + count) so
    that the plan does not grow with every round; by default ``localCheckpoint``.
    """
    checkpoint = checkpoint or (lambda d: d.localCheckpoint(eager=True))
    steps: list[dict] = []
    if cfg.is_noop():
        return df, steps
    current = checkpoint(df)
    n = current.count()
    for rnd in range(1, cfg.max_rounds + 1):
        start_n = n
        plan = []
        if cfg.min_item_support > 1:
            plan.append(("min_item_support", lambda d: _keep_by_count(d, "item_id", None, cfg.min_item_support)))
        if cfg.min_session_length > 1:
            plan.append(("min_session_length", lambda d: _keep_by_count(d, "session_id", None, cfg.min_session_length)))
        if cfg.min_sessions_per_user > 1 or cfg.max_sessions_per_user > 0:
            plan.append(("sessions_per_user", lambda d: _keep_by_count(
                d, "user_id", "session_id", max(cfg.min_sessions_per_user, 1), cfg.max_sessions_per_user)))
        for name, fn in plan:
            current = checkpoint(fn(current))
            counts = table_counts(current)
            n = counts["events"]
            steps.append({"round": rnd, "step": name, **counts})
            log.info("filter round %d %-20s events=%d sessions=%d items=%d users=%d",
                     rnd, name, counts["events"], counts["sessions"], counts["items"], counts["users"])
        if n == start_n:
            return current, steps
    raise RuntimeError(f"filters did not reach a fixed point within {cfg.max_rounds} rounds")
