"""Train / validation / test split strategies, recent fractions and indices.

Every strategy but ``user_90_5_5_events`` assigns whole sessions to ``train``,
``valid`` or ``test`` (a session is in exactly one) and ``train_full = train +
the validation sessions before filtering`` (what the final model trains on).
Then, for all strategies alike (GRU4Rec's rule): test events whose item is not
in ``train_full`` are removed and test sessions left with fewer than 2 events
are dropped; validation is filtered the same way against ``train``.

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
``user_90_5_5``          Donkers, session-aligned: per user, chronological: a session is
                         train when the events of the user's earlier sessions are fewer
                         than 90% of the user's events, else valid when fewer than 95%,
                         else test (whole sessions). Leaks (marked).
``user_90_5_5_events``   Donkers as in the paper: each user's event sequence cut by event
                         count, first ceil(0.9 N) events train, up to ceil(0.95 N) valid,
                         the last floor(N / 20) test; a session straddling a cut is cut
                         into pieces (below). Leaks (marked).
``random_users``         Villatel: users drawn at random (seeded) 80/10/10.

**The two Donkers splits.** A user's event sequence is the user's sessions in
order of start (ties: session id), each in ``seq`` order -- the chronological
order whenever a user's sessions do not overlap in time (always when sessions
come from ``--sessionize-by-user``). With N the user's events and ``r`` an
event's 0-based rank in that sequence, an event is *train* when
``r < 0.9 N``, else *valid* when ``r < 0.95 N``, else *test*, compared exactly
in integers (``r * 10 < 9 * N``, ``r * 20 < 19 * N``; ``train_frac`` /
``valid_frac`` as fractions of denominator <= 10^6). So train holds ceil(0.9 N)
events, valid ceil(0.95 N) - ceil(0.9 N), test floor(N / 20): N = 100 gives
90 / 5 / 5, N = 20 gives 18 / 1 / 1, N = 10 gives 9 / 1 / 0, N < 10 all train.
``user_90_5_5`` gives each whole session the part of its *first* event;
``user_90_5_5_events`` gives every event its own part. They coincide for a user
whose cuts fall on session boundaries and differ exactly on the sessions that
straddle a cut (tests/spark_jobs/test_splits_user_events.py). Events without a
user (anonymous sessions) are train, whole, in both.

**Pieces** (``user_90_5_5_events``). A session straddling a cut falls into up to
three pieces: a train prefix, a valid middle, a test suffix (each a run of
consecutive ``seq``). Tables:

- ``train``: the train pieces; the session keeps its id and ``seq`` (a prefix).
- ``train_full``: each user's first ceil(0.95 N) events, i.e. the train and the
  valid piece of a session *joined* (a prefix again, original id and ``seq``).
- ``valid`` / ``test``: the valid / test pieces, ``seq`` renumbered from 0 as in
  every strategy. Their session ids are offset so that a session id is in one
  of train/valid/test only (the splits gate) and a test piece is never taken
  for a history session of ``train_full``: valid id = ``session_id + M``, test
  id = ``session_id + 2 M`` with ``M = max(session_id) + 1`` of the input
  (``session_id_offset`` in split.json; ``id mod M`` is the original). This
  holds for every valid/test session of this split, cut or not, so each table
  stays sorted by session id. The ids come in the ``_sid_f`` column of
  :func:`split` (like ``_seq_f``): a writer must take valid/test session ids from it.
- Short pieces: a piece that is not its whole session is dropped from its table
  when it has fewer than ``min_session_length`` events (the preprocessing
  filter's minimum, the rule every table already meets; 0 or 1 = keep all),
  counted in split.json ``dropped_pieces``. train_full's piece is the joined
  prefix, judged on its own length. Then the item rule above applies to
  valid/test pieces as to any valid/test session: items must be in the
  *written* ``train`` (valid) or ``train_full`` (test) table, and at least
  ``min_test_session_length`` (2) events must be left. So a 1-event valid or
  test piece never survives, and a user with fewer than 40 events has no test session.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

from pyspark.sql import DataFrame
from pyspark.sql import functions as F
from pyspark.sql.window import Window

from spark_jobs.contract import DEFAULT_RECENT_FRACTIONS

STRATEGIES = ["time", "time_strict", "last_session", "last_session_global", "user_90_5_5", "user_90_5_5_events",
              "random_users"]
#: The strategy that cuts sessions into pieces (module docstring).
EVENT_CUT = "user_90_5_5_events"
DAY_US = 86_400 * 1_000_000


@dataclass(frozen=True)
class SplitConfig:
    strategy: str = "time"
    test_days: float = 1.0  # 86400 s, as GRU4Rec on RSC15
    valid_days: float | None = None  # defaults to test_days
    end_ts: str | None = None  # ISO-8601: the scheduled data-interval end (exclusive)
    cut_ts: str | None = None  # explicit cut for last_session_global
    test_fraction: float = 0.1  # last_session_global when no cut_ts
    train_frac: float = 0.9  # user_90_5_5(_events): 0.9 / 0.05 / 0.05
    valid_frac: float = 0.05
    user_fracs: tuple[float, float, float] = (0.8, 0.1, 0.1)  # random_users
    seed: int = 42
    min_test_session_length: int = 2
    #: the preprocessing filter's minimum session length (0 = off): user_90_5_5_events drops
    #: pieces of a cut session shorter than this (module docstring, "Pieces")
    min_session_length: int = 0
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


def _assign(sess: DataFrame, cfg: SplitConfig) -> tuple[DataFrame, dict]:
    """Label every session 'train' | 'valid' | 'test' | 'drop' (the time strategies: :func:`_time_parts`)."""
    s = cfg.strategy
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
            # A user whose sessions before the test cut all lie after the validation cut, with no
            # history before it, lost them all to 'drop' above: no history is left, so no test either.
            kept = (sess.where(F.col("part").isin("train", "valid")).select("user_id").distinct()
                    .withColumn("_k", F.lit(True)))
            sess = (sess.join(kept, "user_id", "left")
                    .withColumn("part", F.when((F.col("part") == "test") & F.col("_k").isNull(), "drop")
                                .otherwise(F.col("part"))).drop("_k"))
        return sess, {"global_cut": True, "cut_ts": _iso(cut), "valid_cut_ts": _iso(vcut)}
    if s == "user_90_5_5":
        (a1, b1), (a2, b2) = _cut_fractions(cfg)
        before, total = _user_before_total()
        # exact: before / total < a / b  <=>  before * b < total * a (the first event's rank)
        part = (F.when(F.col("user_id").isNull(), "train").when(before * b1 < total * a1, "train")
                .when(before * b2 < total * a2, "valid").otherwise("test"))
        return sess.withColumn("part", part), {"global_cut": False, "leaks_through_time": True}
    if s == "random_users":
        a, b, _ = cfg.user_fracs
        key = F.coalesce(F.col("user_id"), -F.col("session_id") - 1)
        u = F.pmod(F.xxhash64(key, F.lit(cfg.seed)), F.lit(1_000_000)) / F.lit(1_000_000.0)
        part = F.when(u < a, "train").when(u < a + b, "valid").otherwise("test")
        return sess.withColumn("part", part), {"global_cut": False, "leaks_through_time": True}
    raise ValueError(f"unknown split strategy {s!r}; choose one of {', '.join(STRATEGIES)}")


def _cut_fractions(cfg: SplitConfig) -> tuple[tuple[int, int], tuple[int, int]]:
    """``train_frac`` and ``train_frac + valid_frac`` as exact ``(numerator, denominator)``
    (denominators <= 10^6: 0.9 -> 9/10, 0.95 -> 19/20), so the cuts are integer comparisons."""
    t = Fraction(cfg.train_frac).limit_denominator(10**6)
    c = (t + Fraction(cfg.valid_frac).limit_denominator(10**6)).limit_denominator(10**6)
    if not (0 < t <= c <= 1):
        raise ValueError(f"split {cfg.strategy}: need 0 < train_frac and 0 <= valid_frac with "
                         f"train_frac + valid_frac <= 1, got {cfg.train_frac} / {cfg.valid_frac}")
    return (t.numerator, t.denominator), (c.numerator, c.denominator)


def _user_before_total():
    """Per session: events of the user's earlier sessions (order: start, then session id) and
    the user's events in all, as long columns over a session table."""
    w = Window.partitionBy("user_id").orderBy("start_us", "session_id")
    before = F.coalesce(F.sum("length").over(w.rowsBetween(Window.unboundedPreceding, -1)), F.lit(0)).cast("long")
    total = F.sum("length").over(Window.partitionBy("user_id")).cast("long")
    return before, total


#: Per-session columns of :func:`_assign_event_cut`: ``_n_tr`` / ``_n_full`` = how many of the
#: session's first events (by seq) are train / train + valid; ``_ok_*`` = that piece survives
#: the short-piece rule (train, train_full's joined prefix, valid, test).
PIECE_COLUMNS = ["_n_tr", "_n_full", "_ok_tr", "_ok_full", "_ok_va", "_ok_te"]


def _assign_event_cut(sess: DataFrame, cfg: SplitConfig) -> tuple[DataFrame, dict]:
    """``user_90_5_5_events`` on the session table (module docstring): per session the lengths of
    its train prefix and its train + valid prefix, and which pieces are long enough to keep.

    An event at ``seq`` in the session is train when ``seq < _n_tr``, valid when
    ``seq < _n_full``, else test: with B the user's events in earlier sessions and N the
    user's events, its rank ``B + seq`` is below ``ceil(N a / b)`` exactly when
    ``(B + seq) * b < N * a``.
    """
    (a1, b1), (a2, b2) = _cut_fractions(cfg)
    before, total = _user_before_total()
    x = sess.withColumn("_b", before).withColumn("_N", total)
    L, B = F.col("length").cast("long"), F.col("_b")

    def prefix(a, b):  # events of this session with rank < ceil(N a / b), clamped to [0, L]
        cut = F.expr(f"(_N * {a} + {b - 1}) div {b}")
        return F.least(F.greatest(cut - B, F.lit(0)), L)

    anon = F.col("user_id").isNull()
    x = (x.withColumn("_n_tr", F.when(anon, L).otherwise(prefix(a1, b1)))
         .withColumn("_n_full", F.when(anon, L).otherwise(prefix(a2, b2))))
    msl = int(cfg.min_session_length)
    n_tr, n_full = F.col("_n_tr"), F.col("_n_full")
    lens = {"train": n_tr, "train_full": n_full, "valid": n_full - n_tr, "test": L - n_full}

    def ok(n):  # a whole session always passes (it met the filters); a piece needs msl events
        return (n == L) | (n >= msl)

    for name, col in (("_ok_tr", "train"), ("_ok_full", "train_full"), ("_ok_va", "valid"), ("_ok_te", "test")):
        x = x.withColumn(name, ok(lens[col]))
    oks = {"train": "_ok_tr", "train_full": "_ok_full", "valid": "_ok_va", "test": "_ok_te"}
    cut = (F.when(n_tr > 0, 1).otherwise(0) + F.when(n_full > n_tr, 1).otherwise(0)
           + F.when(L > n_full, 1).otherwise(0)) > 1
    aggs = [F.sum(cut.cast("long")).alias("cut_sessions"), F.max("session_id").alias("max_sid")]
    for t, n in lens.items():
        dropped = (n > 0) & ~F.col(oks[t])
        aggs += [F.sum(dropped.cast("long")).alias(f"p_{t}"), F.sum(F.when(dropped, n).otherwise(0)).alias(f"e_{t}")]
    none_left = ~(((n_tr > 0) & F.col("_ok_tr")) | ((n_full > 0) & F.col("_ok_full"))
                  | ((L > n_full) & F.col("_ok_te")))
    aggs.append(F.sum(none_left.cast("long")).alias("gone"))
    r = x.agg(*aggs).first()
    max_sid = -1 if r["max_sid"] is None else int(r["max_sid"])
    if max_sid >= (2**63 - 1) // 3 - 1:
        raise ValueError(f"split {EVENT_CUT}: session ids up to {max_sid} leave no room for the valid/test "
                         f"piece ids (session_id + k * (max + 1), k = 1, 2) in int64")
    meta = {"global_cut": False, "leaks_through_time": True, "session_id_offset": max_sid + 1,
            "cut_sessions": int(r["cut_sessions"] or 0),
            "dropped_pieces": {t: int(r[f"p_{t}"] or 0) for t in lens},
            "dropped_piece_events": {t: int(r[f"e_{t}"] or 0) for t in lens},
            "min_piece_length": msl, "_dropped_sessions": int(r["gone"] or 0)}
    return x.select("session_id", "start_us", *PIECE_COLUMNS), meta


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


#: Membership bits of ``_mask`` (recent fractions take the bits from 16 upwards).
TABLE_BITS = {"train": 1, "valid": 2, "test": 4, "train_full": 8}


def _time_parts(sess: DataFrame, cfg: SplitConfig) -> tuple:
    """``time`` / ``time_strict`` as one column expression over a session's ``start_us`` / ``end_us``.

    Same rules as :func:`_assign_time` applied twice (test cut, then the
    validation cut inside train), with the cuts computed first as scalars, so
    the label can be evaluated on every event (per-session window columns)
    without joining a session table back to the events.
    """
    strict = cfg.strategy == "time_strict"
    vdays = cfg.valid_days if cfg.valid_days is not None else cfg.test_days
    end, start = F.col("end_us"), F.col("start_us")
    tmax = _to_us(cfg.end_ts) if cfg.end_ts else _max_us(sess)
    if tmax is None:
        return F.lit("train"), {"cut_ts": None, "global_cut": strict, "valid_cut_ts": None}
    cut = tmax - int(round(cfg.test_days * DAY_US))
    vmax = _max_us(sess.where(end < cut))
    vcut = None if vmax is None else vmax - int(round(vdays * DAY_US))
    if strict:
        inner = F.lit("train") if vcut is None else (
            F.when(end < vcut, "train").when(start >= vcut, "valid").otherwise("drop"))
        part = F.when(end < cut, inner).when(start >= cut, "test").otherwise("drop")
    else:
        inner = F.lit("train") if vcut is None else F.when(end < vcut, "train").otherwise("valid")
        part = F.when(end < cut, inner).otherwise("test")
    return part, {"cut_ts": _iso(cut), "tmax_ts": _iso(tmax), "global_cut": strict, "valid_cut_ts": _iso(vcut)}


def split(events: DataFrame, cfg: SplitConfig) -> tuple[DataFrame, list[str], dict]:
    """Assign every event to the tables of the split in one pass.

    ``events`` is in the session layout of :func:`spark_jobs.sessionize.to_layout`
    (with ``seq``, ``_file_idx``, ``_ord``). Returns ``(tagged, names, meta)``:
    ``tagged`` is ``events`` (less ``_file_idx``/``_ord``) plus ``_mask`` (bit ``TABLE_BITS[name]`` /
    ``1 << (4 + i)`` for ``train_recent_<k_i>``: the tables the event belongs
    to) and ``_seq_f`` (its position among the kept events of a filtered
    valid/test session), materialised and still in the session layout, so
    every table is a filter of it written without another sort. With
    ``user_90_5_5_events`` it also has ``_sid_f``: the event's session id in the
    valid/test tables (``session_id`` offset, module docstring); a writer must
    take the valid/test session ids from it as it takes ``seq`` from ``_seq_f``.

    The time strategies label events with per-session window columns and
    scalar cuts (no shuffle); the others label the small session table and
    join it back (one shuffle of the events, then the layout is restored).
    """
    from spark_jobs.sessionize import ORDER, checkpoint, to_layout

    # Every per-session window below uses the one ordered spec (frames differ), so Spark
    # evaluates them in as few passes as possible (with ``seq``'s row_number in the first).
    w = Window.partitionBy("session_id").orderBy(*ORDER)
    ws = w.rowsBetween(Window.unboundedPreceding, Window.unboundedFollowing)
    ev = (events.withColumn("start_us", F.min(F.unix_micros("ts")).over(ws))
          .withColumn("end_us", F.max(F.unix_micros("ts")).over(ws)))
    sess = checkpoint(sessions_table(events))
    in_layout = cfg.strategy in ("time", "time_strict")
    pieces = cfg.strategy == EVENT_CUT
    if in_layout:
        part_expr, meta = _time_parts(sess, cfg)
        labelled = sess.withColumn("part", part_expr)
        ev = ev.withColumn("part", part_expr)
    elif pieces:
        labelled, meta = _assign_event_cut(sess, cfg)
        n_drop = meta.pop("_dropped_sessions")
        labelled = checkpoint(labelled)
        ev = ev.join(labelled.select("session_id", *PIECE_COLUMNS), "session_id")
    else:
        labelled, meta = _assign(sess, cfg)
        labelled = checkpoint(labelled.select("session_id", "part", "start_us"))
        ev = ev.join(labelled.select("session_id", "part"), "session_id")
    if pieces:
        full_sess = labelled.where((F.col("_n_full") > 0) & F.col("_ok_full")).select("session_id", "start_us")
    else:
        full_sess = labelled.where(F.col("part").isin("train", "valid")).select("session_id", "start_us")
        n_drop = labelled.where("part = 'drop'").count()
    n_full = full_sess.count()
    # Recent fractions (Tan et al.): train_full sessions ranked from the most recent start
    # (ties: larger session id first); recent_k = the first ceil(n_full / k). Only the k
    # boundary sessions are looked up, so the test is a comparison on every event.
    bounds: dict[int, tuple[int, int]] = {}
    ks = [k for k in cfg.recent_fractions] if n_full else []
    if ks:
        at = sessions_at_ranks(full_sess, sorted({math.ceil(n_full / k) - 1 for k in ks}))
        bounds = {k: at[math.ceil(n_full / k) - 1] for k in ks}
    if not in_layout:
        # The join moved the events: restore the layout once, before the windows below.
        ev = to_layout(ev)
    part = F.col("part")
    if pieces:
        # The event's own part (its piece); membership also needs the piece to be kept.
        seq = F.col("seq")
        ev = ev.withColumn("part", F.when(seq < F.col("_n_tr"), "train").when(seq < F.col("_n_full"), "valid")
                           .otherwise("test"))
        in_train = (part == "train") & F.col("_ok_tr")
        full = part.isin("train", "valid") & F.col("_ok_full")
        valid_c, test_c = (part == "valid") & F.col("_ok_va"), (part == "test") & F.col("_ok_te")
    else:
        in_train, full = part == "train", part.isin("train", "valid")
        valid_c, test_c = part == "valid", part == "test"
    # Items of the train / train_full tables: one small aggregation, broadcast to every event.
    item_flags = checkpoint(ev.groupBy("item_id").agg(
        F.max(in_train.cast("int")).alias("_in_train"),
        F.max(full.cast("int")).alias("_in_full")))
    ev = ev.join(F.broadcast(item_flags), "item_id", "left")
    # GRU4Rec's rule: valid keeps items seen in train, test items seen in train_full;
    # then sessions with fewer than min_test_session_length kept events are dropped.
    keep = ((valid_c & (F.col("_in_train") == 1)) | (test_c & (F.col("_in_full") == 1)))
    ev = ev.withColumn("_keep", keep.cast("int"))
    cum = F.sum("_keep").over(w.rowsBetween(Window.unboundedPreceding, 0))
    if pieces:
        # A session's valid piece precedes its test piece: the test piece counts from its own start.
        kept_valid = F.sum(F.when(part == "valid", F.col("_keep")).otherwise(0)).over(ws)
        kept_test = F.sum(F.when(part == "test", F.col("_keep")).otherwise(0)).over(ws)
        ev = ev.withColumn("_kv", kept_valid).withColumn("_kt", kept_test)
        ev = ev.withColumn("_seq_f", (cum - 1 - F.when(part == "test", F.col("_kv")).otherwise(0)).cast("int"))
        ev = ev.withColumn("_n_keep", F.when(part == "valid", F.col("_kv")).otherwise(F.col("_kt")))
        off = int(meta["session_id_offset"])
        ev = ev.withColumn("_sid_f", F.when(part == "valid", F.col("session_id") + F.lit(off))
                           .when(part == "test", F.col("session_id") + F.lit(2 * off))
                           .otherwise(F.col("session_id")).cast("long"))
    else:
        ev = ev.withColumn("_seq_f", (cum - 1).cast("int"))
        ev = ev.withColumn("_n_keep", F.sum("_keep").over(ws))
    ok = (F.col("_keep") == 1) & (F.col("_n_keep") >= cfg.min_test_session_length)
    names = ["train", "valid", "test", "train_full"]
    mask = (F.when(in_train, TABLE_BITS["train"]).otherwise(0)
            + F.when((part == "valid") & ok, TABLE_BITS["valid"]).otherwise(0)
            + F.when((part == "test") & ok, TABLE_BITS["test"]).otherwise(0)
            + F.when(full, TABLE_BITS["train_full"]).otherwise(0))
    for i, k in enumerate(ks):
        names.append(f"train_recent_{k}")
        b_start, b_sid = bounds[k]
        recent = full & ((F.col("start_us") > b_start) | ((F.col("start_us") == b_start) & (F.col("session_id") >= b_sid)))
        mask = mask + F.when(recent, 1 << (4 + i)).otherwise(0)
    # The original-order columns are spent (rows are in final order): not materialised.
    tagged = ev.withColumn("_mask", mask.cast("long")).drop(
        "part", "start_us", "end_us", "_in_train", "_in_full", "_keep", "_n_keep", "_kv", "_kt", *PIECE_COLUMNS,
        "_file_idx", "_ord")
    meta.update({"strategy": cfg.strategy, "dropped_sessions": n_drop,
                 "leaks_through_time": not meta.get("global_cut", False)})
    return checkpoint(tagged), names, meta


def sessions_at_ranks(sess: DataFrame, ranks: list[int], buckets: int = 1 << 16,
                      max_collect: int = 2_000_000) -> dict[int, tuple[int, int]]:
    """``(start_us, session_id)`` of the sessions at 0-based ``ranks`` in the order
    (``start_us`` desc, ``session_id`` desc), exactly, without sorting every session.

    A histogram of start times over ``buckets`` equal-width buckets (one small
    aggregation) locates the bucket of each rank; only the sessions of those
    buckets are collected and sorted on the driver. When they are too many
    (start times piled into a few buckets), one global sort with positions
    (:func:`spark_jobs.sessionize.with_position`) does it instead.
    """
    from spark_jobs.sessionize import with_position

    order = [F.col("start_us").desc(), F.col("session_id").desc()]
    lo, hi = sess.agg(F.min("start_us"), F.max("start_us")).first()
    out: dict[int, tuple[int, int]] = {}
    if lo is None:
        return out
    width = max(1, -(-(hi - lo + 1) // buckets))
    b = F.floor((F.lit(hi) - F.col("start_us")) / F.lit(width)).cast("long")  # 0 = latest starts
    hist = sorted((r[0], r[1]) for r in sess.groupBy(b.alias("_b")).count().collect())
    where: dict[int, list[tuple[int, int]]] = {}  # bucket -> [(rank, offset in bucket)]
    before, i = 0, 0
    for r in sorted(ranks):
        while i < len(hist) and before + hist[i][1] <= r:
            before += hist[i][1]
            i += 1
        if i == len(hist):
            raise ValueError(f"rank {r} is past the {before} sessions")
        where.setdefault(hist[i][0], []).append((r, r - before))
    sizes = dict(hist)
    if sum(sizes[k] for k in where) > max_collect:
        ranked = with_position(sess, order, "_r")
        rows = ranked.where(F.col("_r").isin(list(ranks))).collect()
        return {x["_r"]: (x["start_us"], x["session_id"]) for x in rows}
    rows = sess.where(b.isin(list(where))).select(b.alias("_b"), "start_us", "session_id").collect()
    per: dict[int, list[tuple[int, int]]] = {}
    for x in rows:
        per.setdefault(x["_b"], []).append((x["start_us"], x["session_id"]))
    for k, wanted in where.items():
        ordered = sorted(per[k], reverse=True)
        for r, off in wanted:
            out[r] = ordered[off]
    return out


def table_bit(names: list[str], name: str) -> int:
    """The ``_mask`` bit of table ``name`` in a :func:`split` result."""
    if name in TABLE_BITS:
        return TABLE_BITS[name]
    return 1 << (4 + names.index(name) - len(TABLE_BITS))


def select_table(tagged: DataFrame, names: list[str], name: str, columns: list[str]) -> DataFrame:
    """One table of a :func:`split` result with its own ``seq`` (renumbered in valid/test) and
    session ids (``_sid_f`` in valid/test where the split has it)."""
    rows = tagged.where((F.col("_mask").bitwiseAND(F.lit(table_bit(names, name)))) != 0)
    evals = name in ("valid", "test")
    seq = F.col("_seq_f") if evals else F.col("seq")
    sid = F.col("_sid_f") if evals and "_sid_f" in tagged.columns else F.col("session_id")
    return rows.select(*[seq.cast("int").alias("seq") if c == "seq" else sid.alias("session_id") if c == "session_id"
                         else F.col(c) for c in columns])


def mask_stats(tagged: DataFrame, names: list[str]) -> dict[str, dict]:
    """events / sessions / items / users and time range of every table of a :func:`split` result.

    Three scans in all (events and time range; sessions, whose OR-ed bits also
    give the users; items), instead of one set of counts per table.
    """
    from spark_jobs.filters import stats_dict

    bits = {n: table_bit(names, n) for n in names}

    def has(col, b):
        return F.col(col).bitwiseAND(F.lit(b)) != 0

    aggs = []
    for n, b in bits.items():
        aggs += [F.sum(has("_mask", b).cast("long")).alias(f"e_{b}"),
                 F.min(F.when(has("_mask", b), F.col("ts"))).alias(f"lo_{b}"),
                 F.max(F.when(has("_mask", b), F.col("ts"))).alias(f"hi_{b}")]
    r = tagged.agg(*aggs).first()
    out = {n: {"events": r[f"e_{b}"] or 0, "ts_min": r[f"lo_{b}"], "ts_max": r[f"hi_{b}"]} for n, b in bits.items()}
    # Sessions (a local aggregation in the session layout), then users from the sessions
    # (a session has at most one user), then items.
    per_sess = tagged.groupBy("session_id").agg(F.bit_or("_mask").alias("_m"),
                                                F.first("user_id", ignorenulls=True).alias("user_id")).cache()
    per_user = per_sess.where(F.col("user_id").isNotNull()).groupBy("user_id").agg(F.bit_or("_m").alias("_m"))
    per_item = tagged.where(F.col("item_id").isNotNull()).groupBy("item_id").agg(F.bit_or("_mask").alias("_m"))
    for stat, per_key in (("sessions", per_sess), ("users", per_user), ("items", per_item)):
        r = per_key.agg(*[F.sum(has("_m", b).cast("long")).alias(f"n_{b}") for b in bits.values()]).first()
        for n, b in bits.items():
            out[n][stat] = r[f"n_{b}"] or 0
    per_sess.unpersist()
    return {n: stats_dict(d) for n, d in out.items()}


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
