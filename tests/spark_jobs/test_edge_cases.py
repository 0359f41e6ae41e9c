"""Hand-written edge cases for sessionize / filter / split, and bad input."""
from __future__ import annotations

import datetime as dt
import json
import os

import pytest

from spark_jobs.preprocess import PreprocessConfig, QuarantineThresholdExceeded, run
from spark_jobs.readers import InputError
from tests.spark_jobs.helpers import split_table, table, write_lines

T0 = 1_600_000_000  # 2020-09-13T12:26:40Z


def _csv(tmp_path, rows, name="ev.csv"):
    """Generic CSV with user,item,time (Unix seconds)."""
    return write_lines(tmp_path / name, ["user,item,time"] + [f"{u},{i},{t}" for u, i, t in rows])


def _run(tmp_path, path, **kw):
    base = dict(input=[path], format="csv", columns="user_id=user,item_id=item,ts=time", split="time",
                recent_fractions=[], out=str(tmp_path / "out"))
    base.update(kw)
    return run(PreprocessConfig(**base), kw.pop("spark", None) or _SPARK[0])


_SPARK: list = []


@pytest.fixture(autouse=True)
def _spark(spark):
    _SPARK[:] = [spark]


def test_idle_gap_of_exactly_30_minutes_stays_in_the_session(tmp_path):
    rows = [(1, 10, T0), (1, 11, T0 + 1800), (1, 12, T0 + 3600 + 1),  # 30 min: same; 30 min 1 s: new
            (2, 10, T0), (2, 11, T0 + 1799)]
    _run(tmp_path, _csv(tmp_path, rows))
    ev = table(str(tmp_path / "out" / "events"))
    u1 = ev[ev.user_id == 1]
    assert u1.session_id.nunique() == 2
    first = u1[u1.session_id == u1.session_id.iloc[0]]
    assert list(first.item_id) == [10, 11]
    assert ev[ev.user_id == 2].session_id.nunique() == 1


def test_equal_timestamps_keep_the_input_order(tmp_path):
    rows = [(1, 30, T0), (1, 10, T0), (1, 20, T0), (1, 5, T0 + 5)]
    _run(tmp_path, _csv(tmp_path, rows))
    ev = table(str(tmp_path / "out" / "events"))
    assert list(ev.item_id) == [30, 10, 20, 5]
    assert list(ev.seq) == [0, 1, 2, 3]


def test_single_event_sessions_kept_unless_filtered(tmp_path):
    rows = [(1, 10, T0), (2, 10, T0), (2, 11, T0 + 10)]
    m = _run(tmp_path, _csv(tmp_path, rows))
    assert m["events"]["sessions"] == 2
    m = _run(tmp_path, _csv(tmp_path, rows), min_session_length=2)
    assert m["events"]["sessions"] == 1 and m["events"]["events"] == 2


def test_user_with_one_session_stays_in_train_for_last_session_split(tmp_path):
    day = 86400
    rows = [(1, 10, T0), (1, 11, T0 + 60),  # user 1: one session only
            (2, 10, T0), (2, 11, T0 + 60), (2, 10, T0 + day), (2, 11, T0 + day + 60),
            (2, 10, T0 + 2 * day), (2, 11, T0 + 2 * day + 60)]
    _run(tmp_path, _csv(tmp_path, rows), split="last_session")
    train = split_table(str(tmp_path / "out"), "last_session", "train")
    valid = split_table(str(tmp_path / "out"), "last_session", "valid")
    test = split_table(str(tmp_path / "out"), "last_session", "test")
    assert 1 in set(train.user_id) and 1 not in set(test.user_id) | set(valid.user_id)
    assert test.user_id.unique().tolist() == [2] and test.ts.min().timestamp() == T0 + 2 * day
    assert valid.ts.min().timestamp() == T0 + day


def test_item_falls_below_support_only_after_a_session_filter(tmp_path):
    # A=[a,b,w] B=[a,b] C=[w,z]: round 1 drops z (support 1), then C=[w] (length 1),
    # which leaves w with support 1: only round 2 removes it. Fixed point: A=[a,b], B=[a,b].
    h = 3 * 3600
    a, b, w, z = 1, 2, 3, 4
    rows = [(1, a, T0), (1, b, T0 + 1), (1, w, T0 + 2),
            (2, a, T0), (2, b, T0 + 1),
            (3, w, T0), (3, z, T0 + 1)]
    rows += [(u, i, t + h) for u, i, t in []]
    m = _run(tmp_path, _csv(tmp_path, rows), min_item_support=2, min_session_length=2)
    ev = table(str(tmp_path / "out" / "events"))
    assert sorted(ev.item_id.unique()) == [a, b]
    assert ev.groupby("session_id").item_id.apply(list).tolist() == [[a, b], [a, b]]
    rounds = {s["round"] for s in m["steps"] if "round" in s}
    assert rounds == {1, 2, 3}  # round 3 confirms the fixed point
    w_step = [s for s in m["steps"] if s.get("round") == 2 and s["step"] == "min_item_support"][0]
    assert w_step["items"] == 2


def test_empty_input_fails_clearly(tmp_path):
    path = write_lines(tmp_path / "empty.csv", ["user,item,time"])
    with pytest.raises(InputError, match="no valid events"):
        _run(tmp_path, path)
    assert not os.path.exists(tmp_path / "out")


def test_bad_rows_go_to_quarantine_with_file_line_and_reason(tmp_path):
    good = [f"{s}\t{100 + s % 7}\t{T0 + s * 10}.5" for s in range(1, 400)]
    bad = ["12\t99\tnot-a-time", "\t99\t1600000000", "13\t99", "14\t99\t1600000000\textra"]
    lines = ["SessionId\tItemId\tTime"] + good[:100] + bad + good[100:]
    data = ("\n".join(lines) + "\n").encode() + b"15\t\xff\xfe99\t1600000000\n"
    path = write_lines(tmp_path / "g.tsv", data)
    m = _run(tmp_path, path, format="gru4rec", columns=None, max_bad_fraction=0.05)
    assert m["read"]["quarantined"] == 5
    q = table(str(tmp_path / "out" / "quarantine")).sort_values("line")
    assert q.line.tolist() == [102, 103, 104, 105, 405]  # 1-based lines in the file, header = line 1
    assert q.reason.tolist() == ["unparseable timestamp", "missing session id",
                                 "expected 3 '\\t'-separated columns, got 2",
                                 "expected 3 '\\t'-separated columns, got 4", "non-UTF-8 bytes"]
    assert set(q.file) == {path}
    assert m["events"]["events"] == 399  # nothing valid dropped
    with open(tmp_path / "out" / "manifest.json") as f:
        assert json.load(f)["read"]["quarantined"] == 5


def test_too_many_bad_rows_fail_naming_the_file_and_count(tmp_path):
    lines = ["SessionId\tItemId\tTime"] + [f"{s}\t1\t{T0 + s}" for s in range(1, 50)] + ["x\t1\t1", "2\ty\t1"]
    path = write_lines(tmp_path / "bad.tsv", lines)
    with pytest.raises(QuarantineThresholdExceeded) as e:
        _run(tmp_path, path, format="gru4rec", columns=None)
    msg = str(e.value)
    assert path in msg and "2 of 51 rows" in msg and "line 51" in msg and "session id is not an integer" in msg
    assert os.path.exists(str(tmp_path / "out.quarantine"))
    assert not os.path.exists(tmp_path / "out")


def test_rerun_replaces_output_atomically_and_identically(tmp_path):
    rows = [(u, (u * 7 + k) % 5, T0 + u * 100 + k * 60 + (k // 3) * 4000) for u in range(1, 30) for k in range(8)]
    path = _csv(tmp_path, rows)
    _run(tmp_path, path, split="time_strict", test_days=0.02)
    first = {t: split_table(str(tmp_path / "out"), "time_strict", t) for t in ("train", "valid", "test", "train_full")}
    marker = tmp_path / "out" / "stale-file"
    marker.write_text("x")
    _run(tmp_path, path, split="time_strict", test_days=0.02)
    assert not marker.exists()  # the old output was replaced, not merged
    for t, df in first.items():
        again = split_table(str(tmp_path / "out"), "time_strict", t)
        assert df.equals(again), t
    assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p or ".old-" in p]


def _random_users_run(tmp_path, path, seed, name):
    _run(tmp_path, path, split="random_users", seed=seed, out=str(tmp_path / name))
    out = str(tmp_path / name)
    return {t: split_table(out, "random_users", t) for t in ("train", "valid", "test", "train_full")}


def test_random_users_split_is_seeded_disjoint_80_10_10_and_keeps_users_whole(tmp_path):
    # 2000 users, two sessions each (a day apart) of three events over items 0..9, the first
    # session also holding the user's own item 1000 + u (seen by nobody else): in valid / test it
    # is unseen (not in train, resp. train_full) and must go, leaving two events, so the session stays.
    day, n_users = 86400, 2000
    rows = []
    for u in range(1, n_users + 1):
        t = T0 + u * 10
        rows += [(u, u % 10, t), (u, (u + 3) % 10, t + 1), (u, 1000 + u, t + 2),
                 (u, (u + 5) % 10, t + day), (u, (u + 7) % 10, t + day + 1), (u, (u + 1) % 10, t + day + 2)]
    path = _csv(tmp_path, rows)
    a = _random_users_run(tmp_path, path, 7, "a")
    again = _random_users_run(tmp_path, path, 7, "again")
    other = _random_users_run(tmp_path, path, 8, "other")

    def parts(tables):
        return {p: frozenset(tables[p].user_id) for p in ("train", "valid", "test")}

    users = parts(a)
    assert parts(again) == users  # same seed: the same assignment
    moved = sum(len(users[p] - parts(other)[p]) for p in users)
    assert moved > n_users // 4  # another seed: another draw (about 1 - 0.66 of users move)
    # every user in exactly one part
    assert not (users["train"] & users["valid"] or users["train"] & users["test"] or users["valid"] & users["test"])
    assert users["train"] | users["valid"] | users["test"] == set(range(1, n_users + 1))
    assert set(a["train_full"].user_id) == users["train"] | users["valid"]
    # The assignment is a per-user hash (xxhash64 of user id and seed, mod 10^6, against 0.8 / 0.9),
    # not exact counts: the sizes are binomial, n = 2000; 3.5 standard deviations either side.
    for p, frac in (("train", 0.8), ("valid", 0.1), ("test", 0.1)):
        sd = (n_users * frac * (1 - frac)) ** 0.5
        assert abs(len(users[p]) - n_users * frac) <= 3.5 * sd, (p, len(users[p]))
    # all of a user's sessions are in the user's part: two sessions, 6 events in train,
    # 5 in valid / test (the user's own item removed)
    for p, n_events in (("train", 6), ("valid", 5), ("test", 5)):
        per_user = a[p].groupby("user_id").agg(sessions=("session_id", "nunique"), events=("item_id", "size"))
        assert (per_user.sessions == 2).all() and (per_user.events == n_events).all(), p
    # no unseen items: valid within train's items, test within train_full's
    assert set(a["valid"].item_id) <= set(a["train"].item_id)
    assert set(a["test"].item_id) <= set(a["train_full"].item_id)
    assert set(a["valid"].item_id) | set(a["test"].item_id) <= set(range(10))
    assert sorted(a["valid"].groupby("session_id").seq.max().unique()) == [1, 2]  # seq renumbered


def test_last_session_global_test_users_keep_training_history(tmp_path):
    # Users 1..10: sessions on days 0, 10, ..., 90 and 101; user 11: days 95 and 102 only. The test
    # cut is day 100 and the validation cut lands on day 90 (the 0.9 quantile of the training
    # sessions' starts), so user 11's one session before the test cut is after the validation cut
    # with no history before it and is dropped: user 11 has no history, so no test session either.
    day, cut = 86400, T0 + 100 * 86400
    rows = [(u, i, T0 + d * day + 60 * i) for u in range(1, 11) for d in [*range(0, 100, 10), 101] for i in (1, 2)]
    rows += [(11, i, T0 + d * day + 60 * i) for d in (95, 102) for i in (1, 2)]
    cut_ts = dt.datetime.fromtimestamp(cut, dt.timezone.utc).isoformat()
    m = _run(tmp_path, _csv(tmp_path, rows), split="last_session_global", cut_ts=cut_ts)
    meta = m["splits"]["last_session_global"]
    vcut = dt.datetime.fromisoformat(meta["valid_cut_ts"]).timestamp()
    assert T0 + 80 * day < vcut < T0 + 95 * day  # the scenario's premise
    out = str(tmp_path / "out")
    full, test = split_table(out, "last_session_global", "train_full"), split_table(out, "last_session_global", "test")
    assert 11 not in set(full.user_id)
    assert sorted(test.user_id.unique()) == list(range(1, 11))
    assert set(test.user_id) <= set(full.user_id)
    assert meta["dropped_sessions"] == 2  # user 11's two sessions
