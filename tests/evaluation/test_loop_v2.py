"""Evaluation protocol v2: Recall@K,N, per-step recall, NDCG, coverage, user mode, scorer calls.

Expected numbers are worked out by hand in the comments (no second implementation).
"""
import json
import math

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from evaluation.evaluate import evaluate
from evaluation.stats import events_digest
from evaluation.loop import evaluate_sessions
from evaluation.metrics import (coverage_and_popularity, metrics_from_ranks, recall_at_k_n,
                                recall_per_step)
from tests.training.toy import events_table, write_split
from training.baselines.pop import PopScorer
from training.data import SessionData
from training.train import train

N_ITEMS = 6


def _table() -> torch.Tensor:
    """Score row per INPUT item i: item i+1 scores 5, i+2 scores 4, ..., i itself 0, so the
    conservative rank of item j after input i is ((j - i - 1) mod 6) + 1. Exception: after
    input 3, items 4 and 5 tie at 5 (conservative rank 2 for both)."""
    t = torch.zeros(N_ITEMS, N_ITEMS)
    for i in range(N_ITEMS):
        for j in range(N_ITEMS):
            t[i, j] = 5 - ((j - i - 1) % N_ITEMS)
    t[3, 5] = 5.0
    return t


class TableScorer:
    """Scores = a fixed row per input item; records every call. State = the begin() row
    numbers of the rows still held (``select`` keeps a subset), so the log says which
    original slot each call touched."""

    def __init__(self, table, with_select=True):
        self.table = table
        self.n_items = table.shape[1]
        self.device = torch.device("cpu")
        self.log = []
        if with_select:
            self.select = self._select

    def begin(self, n_slots):
        self.log.append(("begin", n_slots))
        return np.arange(n_slots)

    def _select(self, state, rows):
        return state[rows.numpy()]

    def start_session(self, state, slots, users):
        for r in np.flatnonzero(slots.numpy()):
            self.log.append(("start", int(state[r]), None if users is None else int(users[r])))
        return state

    def end_session(self, state, slots):
        for r in np.flatnonzero(slots.numpy()):
            self.log.append(("end", int(state[r])))
        return state

    def step(self, state, items):
        assert len(items) == len(state)
        for r, it in enumerate(items.tolist()):
            self.log.append(("step", int(state[r]), it))
        return self.table[items], state

    def sessions_by_slot(self):
        """{slot: [(user, [input items...]), ...]} from the log; asserts proper nesting."""
        open_, out, cur = {}, {}, {}
        for e in self.log:
            if e[0] == "start":
                assert e[1] not in open_, "start_session on a slot whose session did not end"
                open_[e[1]] = e[2]
                cur[e[1]] = []
            elif e[0] == "step" and e[1] in open_:
                cur[e[1]].append(e[2])
            elif e[0] == "end":
                assert e[1] in open_, "end_session without a session"
                out.setdefault(e[1], []).append((open_.pop(e[1]), cur.pop(e[1])))
        assert not open_, f"sessions never ended: {open_}"
        return out

    def steps_outside_sessions(self):
        inside, bad = set(), 0
        for e in self.log:
            if e[0] == "start":
                inside.add(e[1])
            elif e[0] == "end":
                inside.discard(e[1])
            elif e[0] == "step" and e[1] not in inside:
                bad += 1
        return bad


def _data(sessions, start_ts=None, users=None, sids=None):
    lens = [len(s) for s in sessions]
    n = len(sessions)
    return SessionData(items=np.array([i for s in sessions for i in s], np.int64),
                       offsets=np.r_[0, np.cumsum(lens)].astype(np.int64),
                       session_ids=np.array(sids if sids is not None else np.arange(n) + 1, np.int64),
                       start_ts=np.array(start_ts if start_ts is not None else np.arange(n), np.int64),
                       user_ids=None if users is None else np.array(users, np.int64))


# A = [0, 1, 3, 2], B = [3, 5], C = [5, 0, 4, 4]
TOY = [[0, 1, 3, 2], [3, 5], [5, 0, 4, 4]]


def _by_key(res):
    return {(int(s), int(p)): i for i, (s, p) in enumerate(zip(res.session_idx, res.position))}


@pytest.mark.parametrize("n_slots", [1, 2, 8])
def test_recall_at_k_n_and_per_step_by_hand(n_slots):
    res = evaluate_sessions(TableScorer(_table()), _data(TOY), n_slots=n_slots, n_future=3, top_k=2)
    # conservative ranks of the next items (d = 1, 2, 3) under the score row of the input:
    #   A p0 input 0: items 1, 3, 2 -> 1, 3, 2      A p1 input 1: items 3, 2 -> 2, 1
    #   A p2 input 3: item 2 -> 5                    B p0 input 3: item 5 -> 2 (tied with 4)
    #   C p0 input 5: items 0, 4, 4 -> 1, 5, 5       C p1 input 0: items 4, 4 -> 4, 4
    #   C p2 input 4: item 4 -> 6
    # with top_k = 2 every rank > 2 is stored as 3 ("beyond"); 0 = past the session end
    want = {(0, 0): [1, 3, 2], (0, 1): [2, 1, 0], (0, 2): [3, 0, 0], (1, 0): [2, 0, 0],
            (2, 0): [1, 3, 3], (2, 1): [3, 3, 0], (2, 2): [3, 0, 0]}
    k = _by_key(res)
    assert sorted(k) == sorted(want)
    for key, fr in want.items():
        assert res.future_rank[k[key]].tolist() == fr, key
    # full ranks of the target (d = 1) from the greater/ties counts
    full = {(0, 0): 1, (0, 1): 2, (0, 2): 5, (1, 0): 2, (2, 0): 1, (2, 1): 4, (2, 2): 6}
    for key, r in full.items():
        assert 1 + res.greater[k[key]] + res.ties[k[key]] == r
    assert res.ties[k[(1, 0)]] == 1  # item 5 ties with item 4 after input 3
    m = recall_at_k_n(res.future_rank, ks=(1, 2), ns=(1, 2, 3), top_k=2)
    # N=1: rank<=1 at A0, C0 -> 2/7; rank<=2 at A0, A1, B0, C0 -> 4/7
    assert m["recall_at_1_n_1"] == pytest.approx(2 / 7)
    assert m["recall_at_2_n_1"] == pytest.approx(4 / 7)
    # N=2: any of next 2 rank<=1: A0 (1), A1 (2nd item rank 1), C0 -> 3/7; <=2: A0, A1, B0, C0
    assert m["recall_at_1_n_2"] == pytest.approx(3 / 7)
    assert m["recall_at_2_n_2"] == pytest.approx(4 / 7)
    # N=3 adds A0's 3rd item (rank 2): no new predictions
    assert m["recall_at_1_n_3"] == pytest.approx(3 / 7)
    assert m["recall_at_2_n_3"] == pytest.approx(4 / 7)
    steps = recall_per_step(res.future_rank, ks=(1, 2), top_k=2)
    # d=1: 7 predictions; d=2: A0 (3), A1 (1), C0 (5), C1 (4); d=3: A0 (2), C0 (5)
    assert [s["n_events"] for s in steps] == [7, 4, 2]
    assert [s["recall_at_1"] for s in steps] == pytest.approx([2 / 7, 1 / 4, 0.0])
    assert [s["recall_at_2"] for s in steps] == pytest.approx([4 / 7, 1 / 4, 1 / 2])


def test_future_rank_top_k_larger_than_catalogue_is_exact():
    res = evaluate_sessions(TableScorer(_table()), _data(TOY), n_slots=2, n_future=3, top_k=20)
    k = _by_key(res)
    assert res.future_rank[k[(2, 0)]].tolist() == [1, 5, 5]
    assert res.future_rank[k[(2, 2)]].tolist() == [6, 0, 0]


def test_ndcg_by_hand():
    # ranks 1, 2, 5, 2, 1, 4, 6 (the toy's targets); NDCG@5 = mean of 1/log2(rank+1) for rank<=5
    m = metrics_from_ranks(np.array([1, 2, 5, 2, 1, 4, 6.0]), ks=(1, 5))
    want5 = (1 + 1 / math.log2(3) + 1 / math.log2(6) + 1 / math.log2(3) + 1 + 1 / math.log2(5) + 0) / 7
    assert m["ndcg_at_5"] == pytest.approx(want5)
    assert m["ndcg_at_1"] == pytest.approx(2 / 7)
    assert m["ndcg_at_5"] == pytest.approx(4.0793855 / 7, abs=1e-6)  # 1+.63093+.38685+.63093+1+.43068


def test_coverage_and_popularity_by_hand():
    # table scorer, top-2 lists: input 0 -> {1, 2} (A0, C1), input 1 -> {2, 3}, input 3 -> {4, 5}
    # (A2, B0), input 5 -> {0, 1}, input 4 -> {5, 0}: per item 0..5: 2, 3, 3, 1, 2, 3
    res = evaluate_sessions(TableScorer(_table()), _data(TOY), n_slots=3, n_future=3, top_k=2)
    assert res.top_counts.tolist() == [2, 3, 3, 1, 2, 3]
    cov, pop = coverage_and_popularity(res.top_counts, np.array([1, 2, 3, 4, 5, 6]))
    assert cov == 1.0
    assert pop == pytest.approx((2 * 1 + 3 * 2 + 3 * 3 + 1 * 4 + 2 * 5 + 3 * 6) / 14)  # 3.5
    # POP over 5 items, support 5, 1, 9, 3, 0: the top-2 list is always {2, 0}
    sc = PopScorer(torch.tensor([5, 1, 9, 3, 0]), torch.device("cpu"))
    res = evaluate_sessions(sc, _data([[0, 1, 2], [3, 1]]), n_slots=2, top_k=2)
    cov, pop = coverage_and_popularity(res.top_counts, np.array([5, 1, 9, 3, 0]))
    assert cov == pytest.approx(2 / 5)
    assert pop == pytest.approx((9 + 5) / 2)


@pytest.mark.parametrize("with_select", [True, False])
def test_session_mode_end_session_once_and_idle_slots(with_select):
    sessions = [[0, 1, 2, 3, 4], [1, 2], [2, 3, 4], [3, 4], [4, 5, 0, 1], [5, 0]]
    sc = TableScorer(_table(), with_select=with_select)
    res = evaluate_sessions(sc, _data(sessions), n_slots=4)
    by_slot = sc.sessions_by_slot()  # asserts start/end nesting and that every session ended
    got = sorted(tuple(s) for v in by_slot.values() for _, s in v)
    assert got == sorted(tuple(s[:-1]) for s in sessions)  # each session exactly once
    assert sum(e[0] == "end" for e in sc.log) == len(sessions)
    assert res.n_end_session_calls == len(sessions)
    assert res.n_events == sum(len(s) - 1 for s in sessions)
    if with_select:
        # only active rows are ever stepped
        assert sc.steps_outside_sessions() == 0
        assert sum(e[0] == "step" for e in sc.log) == res.n_events
    # longest first: the 5-event session starts on slot 0 at the first step
    assert sc.log[0] == ("begin", 4) and by_slot[0][0][1] == [0, 1, 2, 3]
    # a scorer with fewer sessions than slots is begun with only the slots it uses
    sc2 = TableScorer(_table(), with_select=with_select)
    evaluate_sessions(sc2, _data(sessions[:2]), n_slots=16)
    assert sc2.log[0] == ("begin", 2)


def test_session_mode_without_select_gives_the_same_results():
    sessions = [[0, 1, 2, 3, 4], [1, 2], [2, 3, 4], [3, 4], [4, 5, 0, 1], [5, 0]]
    a = evaluate_sessions(TableScorer(_table(), True), _data(sessions), n_slots=3, top_k=2, n_future=4)
    b = evaluate_sessions(TableScorer(_table(), False), _data(sessions), n_slots=3, top_k=2, n_future=4)
    for f in ("session_idx", "position", "target", "greater", "ties", "future_rank", "top_counts"):
        assert np.array_equal(getattr(a, f), getattr(b, f)), f


def _user_toy():
    # test table, in session_id (= offsets) order; user 7's sessions in TIME order: 12, 10, 11
    test = _data([[0, 1], [2, 3, 4], [5, 0], [1, 3], [4, 2]],
                 start_ts=[200, 300, 100, 150, 160], users=[7, 7, 7, 8, -1],
                 sids=[10, 11, 12, 20, 30])
    # history of user 7 (listed out of time order: session 2 is earlier than session 1),
    # plus a history session of user 9 (not in the test table: must not be fed)
    hist = _data([[3, 4, 5], [1, 2], [0, 5, 4]], start_ts=[20, 10, 5], users=[7, 7, 9], sids=[1, 2, 3])
    return test, hist


def test_user_mode_bootstrap_order_and_calls():
    test, hist = _user_toy()
    sc = TableScorer(_table())
    res = evaluate_sessions(sc, test, n_slots=4, mode="user", history=[hist])
    by_slot = sc.sessions_by_slot()
    seqs = list(by_slot.values())
    # user 7 walks ONE slot: history 2 ([1]), history 1 ([3, 4]), then test 12, 10, 11 in time order
    u7 = [(7, [1]), (7, [3, 4]), (7, [5]), (7, [0]), (7, [2, 3])]
    assert u7 in seqs
    assert sorted(len(q) for q in seqs) == [1, 1, 5]
    all_sessions = [x for q in seqs for x in q]
    assert (8, [1]) in all_sessions and (-1, [4]) in all_sessions
    assert (9, [0, 5]) not in all_sessions  # user 9 has no test session
    assert sum(e[0] == "end" for e in sc.log) == 7 == res.n_end_session_calls
    # history is fed but not scored: only the 5 test sessions' predictions
    assert res.n_events == 1 + 2 + 1 + 1 + 1
    assert sorted(set(res.session_idx.tolist())) == [0, 1, 2, 3, 4]
    assert res.n_history_sessions == 2 and res.n_history_steps == 3
    assert res.n_users == 3 and res.n_users_without_history == 2
    by_sess = dict(zip(res.session_idx.tolist(), res.user_history.tolist()))
    assert by_sess == {0: 2, 1: 2, 2: 2, 3: 0, 4: 0}
    assert dict(zip(res.session_idx.tolist(), res.user.tolist())) == {0: 7, 1: 7, 2: 7, 3: 8, 4: -1}
    assert sc.steps_outside_sessions() == 0


def test_user_mode_sessions_in_time_not_offset_order_with_one_slot_per_user():
    """Fails if a user's test sessions are walked in offsets / session-id order (10, 11, 12)
    instead of time order (12, 10, 11), or if two of them run in parallel slots."""
    test, _ = _user_toy()
    sc = TableScorer(_table())
    evaluate_sessions(sc, test, n_slots=8, mode="user", history=[])
    by_slot = sc.sessions_by_slot()
    u7_slots = [slot for slot, v in by_slot.items() if any(u == 7 for u, _ in v)]
    assert len(u7_slots) == 1
    assert [s for _, s in by_slot[u7_slots[0]]] == [[5], [0], [2, 3]]


class CountScorer:
    """Score of item j = how often this row has stepped item j since its current USER began
    (the count is kept across sessions of one user and reset when the user changes)."""

    n_items = N_ITEMS
    device = torch.device("cpu")

    def begin(self, n):
        return torch.zeros(n, N_ITEMS), np.full(n, -99)

    def select(self, state, rows):
        return state[0][rows], state[1][rows.numpy()]

    def start_session(self, state, slots, users):
        counts, last = state
        for r in np.flatnonzero(slots.numpy()):
            if int(users[r]) != last[r] or int(users[r]) < 0:
                counts[r] = 0
                last[r] = int(users[r])
        return counts, last

    def end_session(self, state, slots):
        return state

    def step(self, state, items):
        counts, last = state
        counts[torch.arange(len(items)), items] += 1
        return counts.clone(), (counts, last)


def test_user_mode_history_reaches_the_state_of_the_first_test_session():
    test, hist = _user_toy()
    a = evaluate_sessions(CountScorer(), test, n_slots=2, mode="user", history=[hist])
    b = evaluate_sessions(CountScorer(), test, n_slots=2, mode="user", history=[])
    ia, ib = _by_key(a)[(2, 0)], _by_key(b)[(2, 0)]  # session 12: input 5, target 0
    # bootstrap fed inputs 1 and 3, 4 of user 7 first: items 1, 3, 4, 5 score 1 > item 0's 0
    assert a.greater[ia] == 4
    assert b.greater[ib] == 1  # no bootstrap: only item 5 has been seen
    # session 10 (input 0, target 1) follows 12 in the same lane: the counts carry over
    assert a.greater[_by_key(a)[(0, 0)]] == 0 and a.ties[_by_key(a)[(0, 0)]] == 4  # 0,1,3,4,5 all 1
    assert b.n_history_sessions == 0 and b.n_users_without_history == 3


def test_evaluate_cli_user_mode_outputs(tmp_path):
    uid = {1: 1, 2: 1, 3: 2, 4: 3, 5: 1, 6: 2, 7: 4}.get
    train_full = events_table([(1, [10, 11, 12]), (2, [11, 12, 13]), (3, [12, 13]), (4, [10, 13])],
                              user_of=uid)
    test = events_table([(5, [10, 11, 12, 13]), (6, [13, 12]), (7, [11, 10])], t0=1_700_000_000,
                        user_of=uid)
    test2 = events_table([(5, [10, 11, 12, 13]), (6, [13, 11])], t0=1_700_000_000, user_of=uid)
    root = write_split(tmp_path / "split", {"train_full": train_full, "train": train_full,
                                            "test": test, "test2": test2})
    train("pop", root, tmp_path / "run", show_progress=False)
    from evaluation.evaluate import main
    assert main(["--model-dir", str(tmp_path / "run"), "--data", str(root), "--out", str(tmp_path / "ev"),
                 "--mode", "user"]) == 0
    m = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert m["mode"] == "user" and m["history_tables"] == ["train_full"]
    assert m["n_events"] == 3 + 1 + 1 and m["n_users"] == 3 and m["n_users_without_history"] == 1
    assert m["n_history_sessions"] == 3  # users 1 (x2) and 2
    for key in ("ndcg_at_20", "recall_at_20_n_5", "recall_at_5_n_1", "coverage_at_20",
                "mean_popularity_at_20", "test_digest", "recall_at_20", "n_sessions"):
        assert key in m
    assert m["recall_at_20_n_1"] == m["recall_at_20"]  # conservative ties: the same thing
    pe = pq.read_table(tmp_path / "ev" / "per_event.parquet").to_pydict()
    assert set(pe["user_id"]) == {1, 2, 4}
    assert pe["user_history_sessions"] == [2 if u == 1 else 1 if u == 2 else 0 for u in pe["user_id"]]
    assert all(isinstance(x, bool) for x in pe["hit_at_20_n_5"] + pe["hit_at_5_n_20"])
    rows = sorted(zip(pe["session_id"], pe["position"], pe["target_item_id"]))
    assert m["test_digest"] == events_digest(*map(np.array, zip(*rows)))
    assert (tmp_path / "ev" / "breakdown_user_history.csv").read_text().startswith("bucket,n_events")
    steps = json.loads((tmp_path / "ev" / "recall_per_step.json").read_text())
    assert [s["n_events"] for s in steps[:3]] == [5, 2, 1]
    assert (tmp_path / "ev" / "recall_per_step.csv").exists()
    m2 = evaluate(tmp_path / "run", root, tmp_path / "ev2", table="test2")
    assert m2["mode"] == "session" and m2["test_digest"] != m["test_digest"]
    m3 = evaluate(tmp_path / "run", root, tmp_path / "ev3", table="test")
    assert m3["test_digest"] == m["test_digest"]  # same events predicted in either mode


def test_nan_scores_are_refused_by_the_loop():
    t = _table()
    t[2, 4] = float("nan")  # only after input 2, on a non-target item
    with pytest.raises(FloatingPointError):
        evaluate_sessions(TableScorer(t), _data([[0, 1, 2, 3]]), n_slots=1)


@pytest.mark.parametrize("top_k", [1, 2, 20])
def test_greater_and_ties_match_the_full_count_with_many_ties(top_k):
    """The loop takes a target's counts from the top values when its rank is <= top_k and
    from full passes otherwise: both must equal metrics.greater_and_ties on the score row."""
    from evaluation.metrics import greater_and_ties
    g = torch.Generator().manual_seed(3)
    table = torch.randint(0, 3, (N_ITEMS, N_ITEMS), generator=g).float()  # ties everywhere
    sessions = [torch.randint(0, N_ITEMS, (L,), generator=g).tolist() for L in (2, 5, 7, 3, 9, 4)]
    res = evaluate_sessions(TableScorer(table), _data(sessions), n_slots=3, top_k=top_k, n_future=5)
    items = [i for s in sessions for i in s]
    off = np.r_[0, np.cumsum([len(s) for s in sessions])]
    for k in range(res.n_events):
        e = off[res.session_idx[k]] + res.position[k]
        gw, tw = greater_and_ties(table[items[e]].unsqueeze(0), torch.tensor([items[e + 1]]))
        assert (res.greater[k], res.ties[k]) == (gw.item(), tw.item())
        r = 1 + gw.item() + tw.item()
        assert res.future_rank[k, 0] == (r if r <= top_k else top_k + 1)
