"""Tests of the single-process pandas reference (the oracle for the Spark jobs); ~5 s.

Run: .venv/bin/python -m pytest tests/spark_jobs/test_reference_pandas.py -q
"""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from spark_jobs import contract as C
from spark_jobs import generate as gen
from spark_jobs import reference_pandas as R
from tests.conftest import shared_path

MIN = 60 * 1_000_000  # one minute in microseconds
T0 = 1_396_310_400 * 1_000_000  # 2014-04-01T00:00:00Z


def frame(rows) -> pd.DataFrame:
    """rows: (user, item, minutes after T0) in original order."""
    u, i, m = zip(*rows)
    return pd.DataFrame({"session_id": -1, "user_id": np.array(u, np.int64), "item_id": np.array(i, np.int64),
                         "ts": T0 + np.round(np.array(m, np.float64) * MIN).astype(np.int64)})


def sessions_of(df) -> list[list[int]]:
    """Sessions as lists of original positions, in session-id order."""
    return [g["_ord"].tolist() for _, g in df.groupby("session_id", sort=True)]


# --------------------------------------------------------------------------- sessionize

def test_gap_exactly_30_min_stays_in_session_and_one_more_microsecond_splits():
    df = frame([(1, 10, 0), (1, 11, 30), (1, 12, 0)])
    df.loc[2, "ts"] = df.loc[1, "ts"] + 30 * MIN + 1  # 30 min + 1 us later
    out, _ = R.sessionize(df, by_user=True)
    assert sessions_of(out) == [[0, 1], [2]]
    assert out["seq"].tolist() == [0, 1, 0]


def test_equal_timestamps_keep_original_order_and_ids_follow_session_start():
    # user 2 starts first; user 1 has three clicks at the same instant
    df = frame([(1, 30, 5), (1, 31, 5), (2, 40, 0), (1, 32, 5), (2, 41, 100)])
    out, _ = R.sessionize(df, by_user=True)
    assert sessions_of(out) == [[2], [0, 1, 3], [4]]  # ids 0, 1, 2 by first event time
    assert out[out.session_id == 1]["item_id"].tolist() == [30, 31, 32]
    assert out[out.session_id == 1]["seq"].tolist() == [0, 1, 2]


def test_single_event_sessions_and_user_with_one_session():
    df = frame([(7, 1, 0), (8, 2, 0), (8, 3, 50), (8, 4, 51)])
    out, _ = R.sessionize(df, by_user=True)
    assert sessions_of(out) == [[0], [1], [2, 3]]
    assert out.groupby("session_id").user_id.first().tolist() == [7, 8, 8]


def test_given_session_ids_are_kept_and_missing_users_refused():
    df = frame([(1, 1, 0), (1, 2, 90), (1, 3, 200)])
    df["session_id"] = [5, 5, 9]
    out, _ = R.sessionize(df, by_user=False)
    assert sessions_of(out) == [[0, 1], [2]]  # the 90-minute gap does not split a given session
    df["user_id"] = R.NO_USER
    with pytest.raises(ValueError, match="no user id"):
        R.sessionize(df, by_user=True)


def test_remove_consecutive_repeats_only_inside_a_session():
    df = frame([(1, 5, 0), (1, 5, 1), (1, 6, 2), (1, 5, 3), (1, 5, 100)])
    out, info = R.sessionize(df, by_user=True, remove_repeats=True)
    assert info["removed_repeats"] == 1
    assert out["item_id"].tolist() == [5, 6, 5, 5]  # the last 5 opens a new session: kept
    assert out["seq"].tolist() == [0, 1, 2, 0]


def test_sessionize_reproduces_generator_ground_truth():
    t = pd.concat([t.to_pandas() for _, t in gen.generate(40_000, n_days=4, seed=2)], ignore_index=True)
    df = pd.DataFrame({"session_id": -1, "user_id": t.user_id, "item_id": t.item_id,
                       "ts": t.ts.astype("int64")})
    out, _ = R.sessionize(df, by_user=True)
    truth = t.session_id.to_numpy()[out["_ord"].to_numpy()]
    # same partition of events: a 1:1 map between our ids and the ground truth
    pairs = pd.DataFrame({"ours": out.session_id, "truth": truth}).drop_duplicates()
    assert len(pairs) == out.session_id.nunique() == t.session_id.nunique()
    assert not pairs.ours.duplicated().any() and not pairs.truth.duplicated().any()


# --------------------------------------------------------------------------- filters

def test_fixed_point_item_falls_below_support_only_after_session_filter():
    # item 9 has support 2 at first; dropping the length-1 session removes one -> support 1
    rows = [(1, 9, 0), (1, 8, 1), (1, 8, 2),  # session A: 9 8 8
            (2, 9, 0),                        # session B: 9 alone (length 1)
            (3, 8, 0), (3, 7, 1), (3, 7, 2)]  # session C: 8 7 7
    out, _ = R.sessionize(frame(rows), by_user=True)
    res, steps = R.apply_filters(out, min_item_support=2, min_session_length=2)
    assert 9 not in set(res.item_id)
    assert sorted(res.item_id.tolist()) == [7, 7, 8, 8, 8]
    assert res.groupby("item_id").size().min() >= 2 and res.groupby("session_id").size().min() >= 2
    # round 1 removes things, round 2 removes 9 and the then-short session, round 3 changes nothing
    assert [s["round"] for s in steps][-1] == 3
    assert steps[-1]["events"] == steps[-2]["events"] == 5
    assert res.groupby("session_id").seq.apply(list).tolist() == [[0, 1], [0, 1, 2]]


def test_sessions_per_user_bounds():
    rows = []
    for u, n in ((1, 1), (2, 3), (3, 6)):
        for k in range(n):
            rows += [(u, 100 + k, 120 * k), (u, 200 + k, 120 * k + 1)]
    out, _ = R.sessionize(frame(rows), by_user=True)
    res, _ = R.apply_filters(out, min_sessions_per_user=2, max_sessions_per_user=5)
    assert set(res.user_id) == {2}
    assert res.session_id.nunique() == 3


def test_no_filters_is_a_noop():
    out, _ = R.sessionize(frame([(1, 1, 0), (2, 2, 0)]), by_user=True)
    res, steps = R.apply_filters(out)
    assert steps == [] and len(res) == 2


# --------------------------------------------------------------------------- split

def test_time_split_rules():
    day = 24 * 60
    rows = [
        (1, 1, 0), (1, 2, 1),                   # ends day 0: train
        (2, 1, 2 * day - 10), (2, 3, 2 * day - 9),  # ends in the valid window
        (3, 2, 3 * day - 10), (3, 1, 3 * day + 5),  # straddles the test cut: test (last event decides)
        (4, 1, 3 * day + 10), (4, 99, 3 * day + 11), (4, 2, 3 * day + 12),  # 99 unseen: dropped from test
        (5, 98, 3 * day + 20), (5, 1, 3 * day + 21),  # left with 1 event: dropped
        (6, 1, 4 * day - 1), (6, 2, 4 * day),       # tmax
    ]
    out, _ = R.sessionize(frame(rows), by_user=True)
    tables, meta = R.time_split(out, test_days=1, recent_fractions=(2, 1))
    users = {k: sorted(set(v.user_id)) for k, v in tables.items()}
    assert users[C.TRAIN] == [1] and users[C.TRAIN_FULL] == [1, 2]
    assert users[C.VALID] == []  # item 3 never appears in train -> 1 event left -> dropped
    assert users[C.TEST] == [3, 4, 6]
    assert tables[C.TEST][tables[C.TEST].user_id == 4].item_id.tolist() == [1, 2]
    assert tables[C.TEST][tables[C.TEST].user_id == 4].seq.tolist() == [0, 1]
    assert users["train_recent_2"] == [2] and users["train_recent_1"] == [1, 2]
    assert meta["tmax_ts"].startswith("2014-04-05T00:00")


def test_time_split_on_rsc15_reproduces_the_published_slice():
    d = shared_path("rsc15-100k")
    full, test = d / "yoochoose-clicks-100k_train_full.txt", d / "yoochoose-clicks-100k_test.txt"
    m, t = R.preprocess([str(full), str(test)], "gru4rec", None, test_days=1)
    c = m["splits"]["time"]["tables"]
    assert (c["train_full"]["events"], c["train_full"]["sessions"]) == (70_278, 17_794)
    assert (c["test"]["events"], c["test"]["sessions"]) == (13_568, 3_416)
    m2, _ = R.preprocess([str(full)], "gru4rec", None, test_days=1)
    c2 = m2["splits"]["time"]["tables"]
    assert (c2["train_full"]["events"], c2["test"]["events"]) == (53_254, 16_539)
    # and the same events as the published files, not only the same counts
    pub = pd.read_csv(test, sep="\t")
    ours = t[C.TEST]
    assert sorted(zip(pub.SessionId, pub.ItemId)) == sorted(zip(ours.session_id, ours.item_id))


# --------------------------------------------------------------------------- end to end

def test_preprocess_generated_data_writes_the_contract(tmp_path):
    src = tmp_path / "clicks"
    gen.write(src, 30_000, n_days=4, seed=1, progress=False)
    out = tmp_path / "ref"
    m, tables = R.preprocess([str(src)], "synthetic", out, min_item_support=5, min_session_length=2,
                             min_sessions_per_user=2, max_sessions_per_user=50)
    ev = tables[C.EVENTS_DIR]
    assert ev.groupby("item_id").size().min() >= 5
    assert ev.groupby("session_id").size().min() >= 2
    spu = ev.groupby("user_id").session_id.nunique()
    assert spu.min() >= 2 and spu.max() <= 50
    split = out / C.SPLITS_DIR / "time"
    for name in (C.TRAIN, C.VALID, C.TEST, C.TRAIN_FULL, "train_recent_4"):
        t = pq.read_table(split / name)
        assert t.schema == C.EVENT_SCHEMA, name
        assert t.num_rows == m["splits"]["time"]["tables"][name]["events"]
    tr, va, te, tf = (tables[k] for k in (C.TRAIN, C.VALID, C.TEST, C.TRAIN_FULL))
    assert not set(tr.session_id) & set(va.session_id) and not set(tf.session_id) & set(te.session_id)
    assert set(te.item_id) <= set(tf.item_id) and set(va.item_id) <= set(tr.item_id)
    assert te.groupby("session_id").size().min() >= 2
    idx = pq.read_table(split / C.ITEM_INDEX).to_pandas()
    assert idx.item_idx.tolist() == list(range(len(idx))) and idx.support.is_monotonic_decreasing
    assert set(idx.item_id) == set(tf.item_id)
    assert json.loads((out / C.MANIFEST).read_text())["events"]["events"] == len(ev)
    # re-run: replaced atomically, identical data, no leftovers
    before = pq.read_table(split / C.TEST)
    R.preprocess([str(src)], "synthetic", out, min_item_support=5, min_session_length=2,
                 min_sessions_per_user=2, max_sessions_per_user=50)
    assert pq.read_table(split / C.TEST).equals(before)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clicks", "ref"]


def test_yoochoose_input_uses_its_session_ids(tmp_path):
    gen.write(tmp_path / "yc", 8_000, n_days=3, seed=4, fmt="yoochoose", progress=False)
    m, t = R.preprocess([str(tmp_path / "yc")], "yoochoose", None, test_days=1)
    truth = pd.concat([x.to_pandas() for _, x in gen.generate(8_000, n_days=3, seed=4)], ignore_index=True)
    ev = t[C.EVENTS_DIR]
    assert m["steps"][0]["by_user"] is False and m["events"]["users"] == 0
    assert len(ev) == 8_000 and ev.session_id.nunique() == truth.session_id.nunique()
    assert sorted(zip(ev.session_id, ev.item_id)) == sorted(zip(truth.session_id, truth.item_id))
    assert (ev.ts.to_numpy() % 1000 == 0).all()  # the raw format has millisecond timestamps


def test_compare_outputs_finds_equal_and_different_tables(tmp_path):
    src = tmp_path / "clicks"
    gen.write(src, 6_000, n_days=3, seed=8, progress=False)
    R.preprocess([str(src)], "synthetic", tmp_path / "a", min_item_support=2)
    R.preprocess([str(src)], "synthetic", tmp_path / "b", min_item_support=2)
    same = R.compare_outputs(tmp_path / "a", tmp_path / "b")
    assert "events" in same and "splits/time/test" in same and set(same.values()) == {None}
    R.preprocess([str(src)], "synthetic", tmp_path / "b", min_item_support=3)
    diff = R.compare_outputs(tmp_path / "a", tmp_path / "b")
    assert diff["events"] is not None and "rows" in diff["events"]


def test_bad_input_is_reported(tmp_path):
    with pytest.raises(R.InputError, match="matches no file"):
        R.read_events([str(tmp_path / "nope*.txt")], "gru4rec")
    f = tmp_path / "x.txt"
    f.write_text("a,b,c\n1,2,3\n")
    with pytest.raises(R.InputError, match="x.txt: expected header"):
        R.read_events([str(f)], "gru4rec")
    e = tmp_path / "empty.txt"
    e.write_text("SessionId\tItemId\tTime\n")
    with pytest.raises(ValueError, match="no events"):
        R.preprocess([str(e)], "gru4rec", None)
