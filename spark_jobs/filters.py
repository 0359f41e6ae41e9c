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


def table_stats_by(df: DataFrame, group: str) -> dict[str, dict]:
    """:func:`table_counts` for every value of ``group`` (e.g. the table name), without
    several ``countDistinct`` in one aggregation: one small job per counted column."""
    base = {r[group]: {"events": r["events"], "ts_min": r["ts_min"], "ts_max": r["ts_max"]}
            for r in df.groupBy(group).agg(F.count(F.lit(1)).alias("events"), F.min("ts").alias("ts_min"),
                                           F.max("ts").alias("ts_max")).collect()}
    for name, col in (("sessions", "session_id"), ("items", "item_id"), ("users", "user_id")):
        for d in base.values():
            d[name] = 0
        pairs = df.where(F.col(col).isNotNull()).select(group, col).distinct()
        for r in pairs.groupBy(group).count().collect():
            base[r[group]][name] = r["count"]
    return {k: stats_dict(v) for k, v in base.items()}


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


def _violators(df: DataFrame, key: str, counted: str | None, lo: int, hi: int = 0) -> DataFrame:
    """Keys with fewer than ``lo`` (or more than ``hi``, 0 = unbounded) rows / distinct ``counted``."""
    agg = F.count(F.lit(1)) if counted is None else F.countDistinct(counted)
    sizes = df.where(F.col(key).isNotNull()).groupBy(key).agg(agg.alias("_n"))
    bad = F.col("_n") < lo
    if hi:
        bad = bad | (F.col("_n") > hi)
    return sizes.where(bad).select(key)


def apply_filters(df: DataFrame, cfg: FilterConfig, counts: dict | None = None,
                  checkpoint=None) -> tuple[DataFrame, list[dict]]:
    """Filter to a fixed point. Returns (filtered, steps) where each step records counts.

    ``df`` should already be materialised (cached / checkpointed); ``counts``
    are its :func:`table_counts` when the caller has them. A step first counts
    the keys it would remove (a small aggregate); only when there are some does
    it remove them (an anti-join; rows without a user are never removed by the
    per-user rule), materialise the result with ``checkpoint`` (default
    ``localCheckpoint``) so the plan does not grow, and recount. Rounds repeat
    until one removes nothing.
    """
    checkpoint = checkpoint or (lambda d: d.localCheckpoint(eager=True))
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
            drop = _violators(current, key, counted, lo, hi).cache()
            n_keys = drop.count()
            if n_keys:
                current = checkpoint(current.join(drop, key, "left_anti"))
                counts = table_counts(current)
                changed = True
            drop.unpersist()
            steps.append({"round": rnd, "step": name, "removed_keys": n_keys, **counts})
            log.info("filter round %d %-20s removed %d %s(s): events=%d sessions=%d items=%d users=%d", rnd, name,
                     n_keys, key, counts["events"], counts["sessions"], counts["items"], counts["users"])
        if not changed:
            return current, steps
    raise RuntimeError(f"filters did not reach a fixed point within {cfg.max_rounds} rounds")
