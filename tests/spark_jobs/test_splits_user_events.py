"""``user_90_5_5_events`` (Donkers et al. 2017 as in the paper: each user's *event* sequence cut
90/5/5) against a hand-counted example, against a slow obvious loop on random data, and next to
the session-aligned ``user_90_5_5``; the CLI output through the GX gates.

Every expected table below is written out by hand (the example) or computed by
:func:`_reference` (plain Python over lists), never by ``spark_jobs.splits``.
"""
from __future__ import annotations

import datetime as dt
import math
import random

import pytest

from spark_jobs.splits import SplitConfig, select_table, split

T0 = dt.datetime(2020, 1, 1, tzinfo=dt.timezone.utc)
COLS = ["session_id", "user_id", "item_id", "ts", "seq"]
TABLES = ["train", "valid", "test", "train_full"]


def _events(spark, sessions):
    """``sessions``: [(session_id, user_id, [item, ...])] -> split input in the session layout.

    Session k starts on day k (so the listed order is the chronological order of every user's
    sessions), its events one minute apart; ``_ord`` is the row number of the listing.
    """
    from spark_jobs import sessionize as S

    rows, o = [], 0
    for day, (sid, uid, items) in enumerate(sessions):
        for i, it in enumerate(items):
            rows.append((sid, uid, it, T0 + dt.timedelta(days=day, minutes=i), 0, o))
            o += 1
    df = spark.createDataFrame(rows, "session_id long, user_id long, item_id long, ts timestamp, "
                                     "_file_idx int, _ord long")
    return S.add_seq(S.to_layout(df)).select(*COLS, "_file_idx", "_ord")


def _tables(spark, sessions, **cfg):
    """Run the split; every table as a sorted list of (session_id, seq, item_id, user_id, minute)
    with ``minute`` = minutes since T0 (the listing's time)."""
    from pyspark.sql import functions as F

    kw = dict(strategy="user_90_5_5_events", recent_fractions=())
    kw.update(cfg)
    tagged, names, meta = split(_events(spark, sessions), SplitConfig(**kw))
    out = {}
    t0 = int(T0.timestamp())
    for t in TABLES:
        df = select_table(tagged, names, t, COLS).withColumn("m", ((F.unix_timestamp("ts") - t0) / 60).cast("long"))
        out[t] = sorted((r["session_id"], r["seq"], r["item_id"], r["user_id"], r["m"]) for r in df.collect())
    return out, meta


def _sess(table):
    """{session_id: [item, ...] in seq order} of a table, checking seq is 0..n-1."""
    d = {}
    for sid, seq, item, *_ in table:
        d.setdefault(sid, []).append((seq, item))
    for sid, v in d.items():
        assert [s for s, _ in v] == list(range(len(v))), (sid, v)
    return {sid: [i for _, i in v] for sid, v in d.items()}


# --------------------------------------------------------------------------- the hand-made example
# Items 1..5 are everywhere in training; 77 is only in session 3 (its train and valid pieces), 90 is
# first seen in user 1's valid piece, 99 never before user 1's test piece. Session ids 1..9, so M = max id + 1 = 10: valid ids = id + 10, test = id + 20.
def _cyc(n, start=0):
    return [1 + (start + k) % 5 for k in range(n)]


EXAMPLE = [
    # user 1: N = 30 + 22 + 8 = 60 -> train ceil(54) = 54 events (ranks 0..53), valid ceil(57) - 54 = 3
    # (ranks 54..56), test floor(60/20) = 3 (ranks 57..59). Session 3 holds ranks 52..59: its seq 0-1
    # are train, seq 2-4 valid, seq 5-7 test (cut in three pieces).
    (1, 1, _cyc(30)),
    (2, 1, _cyc(22, 1)),
    (3, 1, [1, 77, 77, 90, 4, 5, 90, 99]),
    # user 2: N = 36 + 2 + 2 = 40 -> train 36, valid ceil(38) - 36 = 2, test 2: the cuts fall on the
    # session boundaries (rank 36 = session 5's first event, 38 = session 6's first): nothing is cut.
    (4, 2, _cyc(36, 2)),
    (5, 2, [2, 3]),
    (6, 2, [4, 5]),
    # user 3: N = 17 + 3 = 20 -> train 18, valid 1, test 1: session 8 (ranks 17, 18, 19) is cut into
    # three 1-event pieces.
    (7, 3, _cyc(17, 3)),
    (8, 3, [5, 1, 2]),
    # no user: train, whole
    (9, None, [3, 4, 5]),
]


@pytest.fixture(scope="module")
def example(spark):
    return _tables(spark, EXAMPLE)


def test_hand_counted_example_event_cut(example):
    t, meta = example
    tr, va, te, full = (_sess(t[n]) for n in TABLES)
    # train: whole sessions 1, 2, 4, 7, 9; the train prefixes of 3 (2 events) and 8 (1 event)
    assert tr == {1: _cyc(30), 2: _cyc(22, 1), 3: [1, 77], 4: _cyc(36, 2), 7: _cyc(17, 3), 8: [5], 9: [3, 4, 5]}
    assert len(t["train"]) == 30 + 22 + 2 + 36 + 17 + 1 + 3
    # valid: session 3's seq 2-4 = [77, 90, 4]; 90 is not in train -> [77, 4], renumbered 0, 1 under
    # id 13; session 5 whole (id 15); session 8's valid piece has 1 event (< 2): dropped.
    assert va == {13: [77, 4], 15: [2, 3]}
    # test: session 3's seq 5-7 = [5, 90, 99]; 90 is in train_full (valid part), 99 is not -> [5, 90];
    # session 6 whole (id 26); session 8's 1-event test piece dropped.
    assert te == {23: [5, 90], 26: [4, 5]}
    # train_full: each user's first ceil(0.95 N) events: train + valid joined under the original ids
    assert full == {1: _cyc(30), 2: _cyc(22, 1), 3: [1, 77, 77, 90, 4], 4: _cyc(36, 2), 5: [2, 3], 7: _cyc(17, 3),
                    8: [5, 1], 9: [3, 4, 5]}
    assert meta["session_id_offset"] == 10 and meta["cut_sessions"] == 2  # sessions 3 and 8
    assert meta["dropped_sessions"] == 0 and sum(meta["dropped_pieces"].values()) == 0  # min_session_length 0
    assert meta["strategy"] == "user_90_5_5_events" and meta["leaks_through_time"] is True


def test_no_unseen_items_in_valid_or_test_and_ids_disjoint(example):
    t, _ = example
    items = {n: {r[2] for r in t[n]} for n in TABLES}
    assert items["valid"] <= items["train"] and items["test"] <= items["train_full"]
    assert 90 not in items["valid"] and 90 in items["test"] and 99 not in items["test"]
    ids = {n: {r[0] for r in t[n]} for n in TABLES}
    assert not (ids["train"] & ids["valid"] or ids["train"] & ids["test"] or ids["valid"] & ids["test"])
    assert not ids["test"] & ids["train_full"]  # a test piece is never a history session
    assert sorted(i % 10 for i in ids["valid"] | ids["test"]) == [3, 3, 5, 6]  # id mod M = the original id


def test_each_users_events_stay_in_order(example):
    """Per user: every train event precedes every valid event, which precede every test event
    (day, minute of the listing), and train_full is the user's train + valid events."""
    t, _ = example
    for u in (1, 2, 3):
        when = {n: [r[4] for r in t[n] if r[3] == u] for n in TABLES}
        for a, b in (("train", "valid"), ("valid", "test"), ("train", "test"), ("train_full", "test")):
            if when[a] and when[b]:
                assert max(when[a]) < min(when[b]), (u, a, b)
        assert set(when["train"]) <= set(when["train_full"])
    # user 1's cut session 3 (day 2): train = its minutes 0-1, valid 2 and 4 (3 went: item 90), test 5-6
    day2 = 2 * 1440
    assert [r[4] - day2 for r in t["train"] if r[0] == 3] == [0, 1]
    assert [r[4] - day2 for r in t["valid"] if r[0] == 13] == [2, 4]
    assert [r[4] - day2 for r in t["test"] if r[0] == 23] == [5, 6]


def test_rerun_is_identical(spark, example):
    again, meta = _tables(spark, EXAMPLE)
    assert again == example[0] and meta == example[1]


def test_session_aligned_variant_coincides_where_no_session_straddles_a_cut(spark, example):
    """user_90_5_5 gives each whole session the part of its first event: identical for user 2
    (cuts on session boundaries), different for the cut sessions 3 and 8 (whole in train there).
    User 2 also pins the exact boundary: session 6 starts at rank 38 = 0.95 * 40, which is test
    (in floating point 38 / 40 < 0.9 + 0.05 holds, and would have made it valid)."""
    aligned, _ = _tables(spark, EXAMPLE, strategy="user_90_5_5")
    ev = example[0]
    for n in TABLES:
        a = {r for r in aligned[n] if r[3] == 2}
        e = {(r[0] % 10 if n in ("valid", "test") else r[0], *r[1:]) for r in ev[n] if r[3] == 2}
        assert a == e, n
    a_tr, a_va, a_te = (_sess(aligned[n]) for n in ("train", "valid", "test"))
    assert a_te == {6: [4, 5]} and a_va == {5: [2, 3]}
    assert a_tr[3] == [1, 77, 77, 90, 4, 5, 90, 99] and a_tr[8] == [5, 1, 2]  # whole, where the event cut splits


def test_short_pieces_are_dropped_like_short_sessions(spark):
    """min_session_length 3: a piece of a cut session with < 3 events leaves its table (whole
    sessions stay: they met the filter); train_full judges its own joined prefix. The item rule
    counts the *written* train table: 77 was only in session 3's dropped train piece."""
    t, meta = _tables(spark, EXAMPLE, min_session_length=3)
    tr, va, te, full = (_sess(t[n]) for n in TABLES)
    assert 3 not in tr and 8 not in tr  # train pieces of 2 and 1 events
    # session 3's valid piece [77, 90, 4] has 3 events, but 77 and 90 are not in train: 1 left, dropped
    assert va == {15: [2, 3]}
    assert te == {23: [5, 90], 26: [4, 5]}  # 90 is in train_full (session 3's joined prefix)
    assert full[3] == [1, 77, 77, 90, 4] and 8 not in full  # joined prefixes of 5 (kept) and 2 (dropped) events
    assert meta["dropped_pieces"] == {"train": 2, "train_full": 1, "valid": 1, "test": 1}
    assert meta["dropped_piece_events"] == {"train": 3, "train_full": 2, "valid": 1, "test": 1}
    assert meta["dropped_sessions"] == 1  # session 8: no piece left anywhere
    items_tr = {r[2] for r in t["train"]}
    assert {r[2] for r in t["valid"]} <= items_tr


# --------------------------------------------------------------------------- random data vs a slow loop
def _reference(sessions, msl, min_eval=2):
    """The rules of the module docstring, one event at a time (no Spark, no shared code)."""
    uid_of = {sid: u for sid, u, _ in sessions}
    m = max(sid for sid, _, _ in sessions) + 1
    by_user = {}
    for sid, u, items in sessions:  # listing order = chronological order
        by_user.setdefault(u, []).append((sid, items))
    part = {}  # (sid, seq) -> part
    for u, ss in by_user.items():
        n = sum(len(it) for _, it in ss)
        r = 0
        for sid, items in ss:
            for q in range(len(items)):
                if u is None or r < math.ceil(n * 9 / 10):  # exact: r < 0.9 n
                    part[sid, q] = "train"
                elif r < math.ceil(n * 19 / 20):
                    part[sid, q] = "valid"
                else:
                    part[sid, q] = "test"
                r += 1
    keep_piece = {}  # (sid, table) -> bool
    for sid, _, items in sessions:
        L = len(items)
        lens = {p: sum(1 for q in range(L) if part[sid, q] == p) for p in ("train", "valid", "test")}
        lens["train_full"] = lens["train"] + lens["valid"]
        for p, k in lens.items():
            keep_piece[sid, p] = k > 0 and (k == L or k >= msl)
    rows = {t: [] for t in TABLES}
    for sid, _, items in sessions:
        for q, it in enumerate(items):
            p = part[sid, q]
            if p == "train" and keep_piece[sid, "train"]:
                rows["train"].append((sid, q, it))
            if p in ("train", "valid") and keep_piece[sid, "train_full"]:
                rows["train_full"].append((sid, q, it))
    seen = {t: {it for _, _, it in rows[t]} for t in ("train", "train_full")}
    for p, against, k in (("valid", "train", 1), ("test", "train_full", 2)):
        for sid, _, items in sessions:
            if not keep_piece[sid, p]:
                continue
            kept = [it for q, it in enumerate(items) if part[sid, q] == p and it in seen[against]]
            if len(kept) >= min_eval:
                rows[p] += [(sid + k * m, q, it) for q, it in enumerate(kept)]
    return {t: sorted((s, q, it, uid_of[s % m]) for s, q, it in rows[t]) for t in TABLES}


def test_random_users_against_the_slow_loop(spark):
    rng = random.Random(3)
    sessions, sid = [], 0
    users = [*range(1, 31), None, None]
    plan = [(u, rng.randint(1, 12)) for u in users]
    # interleave users' sessions in time (listing order), each user's sessions in order
    queue = [u for u, k in plan for _ in range(k)]
    rng.shuffle(queue)
    for u in queue:
        sid += 1
        # items 0..25, now and then a rare one (100..129) that valid / test may not have seen
        sessions.append((sid, u, [rng.randint(0, 25) if rng.random() < 0.93 else rng.randint(100, 129)
                                  for _ in range(rng.randint(1, 14))]))
    for msl in (0, 3):
        got, _ = _tables(spark, sessions, min_session_length=msl)
        ref = _reference(sessions, msl)
        for n in TABLES:
            assert [r[:4] for r in got[n]] == ref[n], (msl, n)
        # the draw exercises every rule: cut sessions, short pieces, items removed from valid / test
        assert len({r[0] for r in ref["valid"]}) >= 5 and len({r[0] for r in ref["test"]}) >= 5, msl


# --------------------------------------------------------------------------- the CLI and the GX gates
def test_preprocess_output_passes_every_gate(spark, tmp_path):
    from expectations.runner import run_all_gates
    from spark_jobs.preprocess import PreprocessConfig, run

    lines = ["user,item,time"]
    t0 = 1_600_000_000
    for day, (_, u, items) in enumerate(EXAMPLE):
        for i, it in enumerate(items):
            lines.append(f"{u if u is not None else 1000 + day},{it},{t0 + day * 86400 + 60 * i}")
    path = tmp_path / "ev.csv"
    path.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    run(PreprocessConfig(input=[str(path)], format="csv", columns="user_id=user,item_id=item,ts=time",
                         split="user_90_5_5_events", min_session_length=2, recent_fractions=[4, 1],
                         out=str(out)), spark)
    res = run_all_gates(out, raise_on_failure=False)
    assert res.success, [(r.suite, r.table, [f.gate for f in r.failures]) for r in res.results if not r.success]
