"""Train / validation / test split strategies, recent fractions and indices.

Every strategy assigns whole sessions to ``train``, ``valid`` or ``test``
(a session is in exactly one) and ``train_full = train + the validation
sessions before filtering`` (what the final model trains on). Then, for all
strategies alike (GRU4Rec's rule): test events whose item is not in
``train_full`` are removed and test sessions left with fewer than 2 events are
dropped; validation is filtered the same way against ``train``.

Strategies (``--split``):

``time``                 GRU4Rec: test = sessions whose *last* event is in the final
                         ``test_days``; validation = the same rule inside train. Test
                         sessions may start before the last training event, so this
                         is *not* a strict global cut (``global_cut: false``).
``time_strict``          global time cut at ``end - test_days``: train sessions end before
                         the cut, test sessions start at/after it, sessions straddling
                         the cut are dropped (counted). No leakage through time.
``last_session``         HRNN: the last session of each user is test, the one before is
                         validation. Leaks through time (marked).
``last_session_global``  global-cut variant: cut at the (1 - test_fraction) quantile of
                         session starts; each user's first session starting at/after the
                         cut is test (users with training history only).
``user_90_5_5``          Donkers: per user, chronological, session-aligned: sessions
                         starting within the first 90% of the user's events are train,
                         the next 5% validation, the rest test. Leaks (marked).
``random_users``         Villatel: users drawn at random (seeded) 80/10/10.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from pyspark.sql import DataFrame
from pyspark.sql import functions as F
from pyspark.sql.window import Window

from spark_jobs.contract import DEFAULT_RECENT_FRACTIONS

STRATEGIES = ["time", "time_strict", "last_session", "last_session_global", "user_90_5_5", "random_users"]
DAY_US = 86_400 * 1_000_000


@dataclass(frozen=True)
class SplitConfig:
    strategy: str = "time"
    test_days: float = 1.0  # 86400 s, as GRU4Rec on RSC15
    valid_days: float | None = None  # defaults to test_days
    end_ts: str | None = None  # ISO-8601: the scheduled data-interval end (exclusive)
    cut_ts: str | None = None  # explicit cut for last_session_global
    test_fraction: float = 0.1  # last_session_global when no cut_ts
    train_frac: float = 0.9  # user_90_5_5: 0.9 / 0.05 / 0.05
    valid_frac: float = 0.05
    user_fracs: tuple[float, float, float] = (0.8, 0.1, 0.1)  # random_users
    seed: int = 42
    min_test_session_length: int = 2
    recent_fractions: tuple[int, ...] = DEFAULT_RECENT_FRACTIONS


def sessions_table(events: DataFrame) -> DataFrame:
    """One row per session: user, start, end (as epoch micros) and length."""
    return events.groupBy("session_id").agg(
        F.first("user_id", ignorenulls=True).alias("user_id"),
        F.min(F.unix_micros("ts")).alias("start_us"),
        F.max(F.unix_micros("ts")).alias("end_us"),
        F.count(F.lit(1)).alias("length"),
    )


def _max_us(df: DataFrame, col: str = "end_us") -> int | None:
    v = df.agg(F.max(col)).collect()[0][0]
    return None if v is None else int(v)


def _iso(us: int | None) -> str | None:
    if us is None:
        return None
    import datetime as dt

    return (dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc) + dt.timedelta(microseconds=us)).isoformat()


def _to_us(ts: str) -> int:
    import datetime as dt

    t = dt.datetime.fromisoformat(ts.replace("Z", "+00:00"))
    if t.tzinfo is None:
        t = t.replace(tzinfo=dt.timezone.utc)
    return round(t.timestamp() * 1_000_000)


def _assign_time(sess: DataFrame, days: float, end_us: int | None, strict: bool):
    """(labelled sessions, meta): label 'test' / 'train' / 'drop' for one time cut."""
    tmax = end_us if end_us is not None else _max_us(sess)
    if tmax is None:
        return sess.withColumn("part", F.lit("train")), {"cut_ts": None}
    cut = tmax - int(round(days * DAY_US))
    if strict:
        part = (F.when(F.col("end_us") < cut, "train").when(F.col("start_us") >= cut, "test").otherwise("drop"))
    else:
        # GRU4Rec: train iff the session's last event is before tmax - days.
        part = F.when(F.col("end_us") < cut, "train").otherwise("test")
    return sess.withColumn("part", part), {"cut_ts": _iso(cut), "tmax_ts": _iso(tmax)}


def _assign(sess: DataFrame, cfg: SplitConfig) -> tuple[DataFrame, dict]:
    """Label every session 'train' | 'valid' | 'test' | 'drop'."""
    s = cfg.strategy
    vdays = cfg.valid_days if cfg.valid_days is not None else cfg.test_days
    end_us = _to_us(cfg.end_ts) if cfg.end_ts else None
    if s in ("time", "time_strict"):
        strict = s == "time_strict"
        sess, meta = _assign_time(sess, cfg.test_days, end_us, strict)
        sess = sess.cache()
        tr = sess.where("part = 'train'")
        tr2, vmeta = _assign_time(tr, vdays, None, strict)
        lab = tr2.select("session_id", F.when(F.col("part") == "test", "valid").otherwise(F.col("part")).alias("p2"))
        sess = sess.join(lab, "session_id", "left").withColumn("part", F.coalesce("p2", "part")).drop("p2")
        meta.update({"global_cut": strict, "valid_cut_ts": vmeta.get("cut_ts")})
        return sess, meta
    if s == "last_session":
        w = Window.partitionBy("user_id").orderBy(F.col("start_us").desc(), F.col("session_id").desc())
        r = F.row_number().over(w)
        n = F.count(F.lit(1)).over(Window.partitionBy("user_id"))
        part = (F.when(F.col("user_id").isNull(), "train").when((r == 1) & (n >= 2), "test")
                .when((r == 2) & (n >= 3), "valid").otherwise("train"))
        return sess.withColumn("part", part), {"global_cut": False, "leaks_through_time": True}
    if s == "last_session_global":
        cut = _to_us(cfg.cut_ts) if cfg.cut_ts else _quantile_start(sess, 1.0 - cfg.test_fraction)
        sess, meta = _first_after_cut(sess, cut, "test")
        tr = sess.where("part = 'train'")
        vcut = _quantile_start(tr, 1.0 - cfg.test_fraction) if tr.take(1) else None
        if vcut is not None:
            tr2, _ = _first_after_cut(tr, vcut, "valid")
            lab = tr2.select("session_id", F.col("part").alias("p2"))
            sess = sess.join(lab, "session_id", "left").withColumn("part", F.coalesce("p2", "part")).drop("p2")
        return sess, {"global_cut": True, "cut_ts": _iso(cut), "valid_cut_ts": _iso(vcut)}
    if s == "user_90_5_5":
        w = Window.partitionBy("user_id").orderBy("start_us", "session_id")
        before = F.coalesce(F.sum("length").over(w.rowsBetween(Window.unboundedPreceding, -1)), F.lit(0))
        total = F.sum("length").over(Window.partitionBy("user_id"))
        frac = before / total
        part = (F.when(F.col("user_id").isNull(), "train").when(frac < cfg.train_frac, "train")
                .when(frac < cfg.train_frac + cfg.valid_frac, "valid").otherwise("test"))
        return sess.withColumn("part", part), {"global_cut": False, "leaks_through_time": True}
    if s == "random_users":
        a, b, _ = cfg.user_fracs
        key = F.coalesce(F.col("user_id"), -F.col("session_id") - 1)
        u = F.pmod(F.xxhash64(key, F.lit(cfg.seed)), F.lit(1_000_000)) / F.lit(1_000_000.0)
        part = F.when(u < a, "train").when(u < a + b, "valid").otherwise("test")
        return sess.withColumn("part", part), {"global_cut": False, "leaks_through_time": True}
    raise ValueError(f"unknown split strategy {s!r}; choose one of {', '.join(STRATEGIES)}")


def _quantile_start(sess: DataFrame, q: float) -> int:
    v = sess.approxQuantile("start_us", [q], 0.0)  # relative error 0: exact and deterministic
    if not v:
        raise ValueError("cannot place a time cut: no sessions")
    return int(v[0])


def _first_after_cut(sess: DataFrame, cut: int, label: str):
    """Train = sessions ending before ``cut``; ``label`` = each user's first session at/after it."""
    has_hist = sess.where(F.col("end_us") < cut).select("user_id").distinct().withColumn("_h", F.lit(True))
    after = F.col("start_us") >= cut
    s = sess.join(has_hist, "user_id", "left")
    s = s.withColumn("_r", F.when(after, F.row_number().over(Window.partitionBy("user_id", after).orderBy("start_us", "session_id"))))
    part = (F.when(F.col("end_us") < cut, "train")
            .when(after & (F.col("_r") == 1) & F.col("_h").isNotNull() & F.col("user_id").isNotNull(), label)
            .otherwise("drop"))
    return s.withColumn("part", part).drop("_h", "_r"), {"cut_ts": _iso(cut)}


def split(events: DataFrame, cfg: SplitConfig) -> tuple[DataFrame, list[str], dict]:
    """Assign every event to the tables of the split in one pass.

    Returns ``(tagged, names, meta)``: ``tagged`` is ``events`` plus ``_tables``
    (array of the table names the event belongs to: ``train``, ``valid``,
    ``test``, ``train_full``, ``train_recent_<k>``) and ``_seq_f`` (its position
    among the kept events of a filtered valid/test session). Computing
    membership as columns, instead of one DataFrame per table, lets the writer
    produce all tables with a single sorted write.
    """
    sess = sessions_table(events).cache()
    labelled, meta = _assign(sess, cfg)
    labelled = labelled.select("session_id", "part", "start_us")
    full_sess = labelled.where(F.col("part").isin("train", "valid"))
    n_full = full_sess.count()
    # Recent fractions (Tan et al.): rank train_full sessions from the most recent start.
    ranked = full_sess.withColumn(
        "_r", F.row_number().over(Window.orderBy(F.col("start_us").desc(), F.col("session_id").desc()))
    ).select("session_id", "_r")
    lab = labelled.join(ranked, "session_id", "left").drop("start_us").localCheckpoint(eager=True)
    n_drop = lab.where("part = 'drop'").count()
    # Materialised once: the item sets below and the windows all read it.
    ev = events.join(lab, "session_id").localCheckpoint(eager=True)
    part = F.col("part")
    train_items = ev.where(part == "train").select("item_id").distinct().withColumn("_in_train", F.lit(True))
    full_items = (ev.where(part.isin("train", "valid")).select("item_id").distinct()
                  .withColumn("_in_full", F.lit(True)))
    ev = ev.join(train_items, "item_id", "left").join(full_items, "item_id", "left")
    # GRU4Rec's rule: valid keeps items seen in train, test items seen in train_full;
    # then sessions with fewer than min_test_session_length kept events are dropped.
    keep = ((part == "valid") & F.col("_in_train").isNotNull()) | ((part == "test") & F.col("_in_full").isNotNull())
    w = Window.partitionBy("session_id").orderBy("seq")
    ev = ev.withColumn("_keep", keep.cast("int"))
    ev = ev.withColumn("_seq_f", (F.sum("_keep").over(w.rowsBetween(Window.unboundedPreceding, 0)) - 1).cast("int"))
    ev = ev.withColumn("_n_keep", F.sum("_keep").over(Window.partitionBy("session_id")))
    ok = (F.col("_keep") == 1) & (F.col("_n_keep") >= cfg.min_test_session_length)
    names = ["train", "valid", "test", "train_full"]
    members = [
        F.when(part == "train", F.lit("train")),
        F.when((part == "valid") & ok, F.lit("valid")),
        F.when((part == "test") & ok, F.lit("test")),
        F.when(part.isin("train", "valid"), F.lit("train_full")),
    ]
    for k in cfg.recent_fractions if n_full else ():
        names.append(f"train_recent_{k}")
        members.append(F.when(part.isin("train", "valid") & (F.col("_r") <= math.ceil(n_full / k)),
                              F.lit(f"train_recent_{k}")))
    tagged = ev.withColumn("_tables", F.array_compact(F.array(*members))).drop(
        "part", "_r", "_in_train", "_in_full", "_keep", "_n_keep")
    meta.update({"strategy": cfg.strategy, "dropped_sessions": n_drop,
                 "leaks_through_time": not meta.get("global_cut", False)})
    return tagged, names, meta


def explode_tables(tagged: DataFrame) -> DataFrame:
    """One row per (event, table) with the table's own ``seq`` (renumbered in valid/test)."""
    out = tagged.withColumn("_table", F.explode("_tables"))
    seq = F.when(F.col("_table").isin("valid", "test"), F.col("_seq_f")).otherwise(F.col("seq")).cast("int")
    return out.withColumn("seq", seq).drop("_tables", "_seq_f")


def item_index(train_full: DataFrame) -> DataFrame:
    """item_id -> dense item_idx (0 = most supported; ties by item_id) with support."""
    sup = train_full.groupBy("item_id").agg(F.count(F.lit(1)).alias("support"))
    w = Window.orderBy(F.col("support").desc(), F.col("item_id"))
    return sup.withColumn("item_idx", (F.row_number().over(w) - 1).cast("int")).select("item_id", "item_idx", "support")


def user_index(train_full: DataFrame) -> DataFrame:
    """user_id -> dense user_idx (by user_id) with the number of training sessions."""
    u = (train_full.where(F.col("user_id").isNotNull()).groupBy("user_id")
         .agg(F.countDistinct("session_id").cast("long").alias("n_sessions")))
    w = Window.orderBy("user_id")
    return u.withColumn("user_idx", (F.row_number().over(w) - 1).cast("int")).select("user_id", "user_idx", "n_sessions")
