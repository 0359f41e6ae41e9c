"""Counting baselines: Item-KNN, time-decayed Item-KNN, S-POP, PPOP.

Expected answers are written out by hand on toys, or come from slow, obviously-correct
reference implementations in this file (one Python loop per event / per item)."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from evaluation.loop import evaluate_sessions
from tests.training.toy import events_table, toy_split, write_split
from training.baselines.itemknn import (ItemKNNConfig, ItemKNNFamily, ItemKNNScorer, TimeDecayItemKNNConfig,
                                        TimeDecayItemKNNScorer, item_similarities)
from training.baselines.ppop import PPopFamily
from training.baselines.spop import SPopScorer
from training.config import ConfigError
from training.data import ItemIndex, SessionData
from training.family import TrainContext

CPU = torch.device("cpu")


def sdata(sessions, users=None, ts=None, sid0=100):
    """SessionData from lists of item_idx (and optional per-event times in seconds)."""
    lens = [len(s) for s in sessions]
    off = np.r_[0, np.cumsum(lens)].astype(np.int64)
    items = np.concatenate([np.asarray(s, np.int64) for s in sessions])
    ev_ts = (np.concatenate([np.asarray(t, np.int64) for t in ts]) * 1_000_000 if ts is not None
             else np.repeat(np.arange(len(sessions), dtype=np.int64) * 10**9, lens))
    return SessionData(items=items, offsets=off, session_ids=np.arange(len(sessions), dtype=np.int64) + sid0,
                       start_ts=ev_ts[off[:-1]], user_ids=None if users is None else np.asarray(users, np.int64),
                       end_ts_per_session=ev_ts[off[1:] - 1], ts=ev_ts)


def ctx_for(data: SessionData, n_items: int) -> TrainContext:
    sup = np.bincount(data.items, minlength=n_items).astype(np.int64)
    return TrainContext(index=ItemIndex(item_ids=np.arange(n_items) + 1000, support=sup), data=data,
                        support=sup, device=CPU)


def conservative_rank(scores: np.ndarray, target: int) -> int:
    return int((scores >= scores[target]).sum())  # the target itself included: 1 + #others >= it


# ------------------------------------------------------------------------------------ Item-KNN
# 4 sessions over items 0..3 (item 0 twice in session 0)
TOY = [[0, 1, 0], [0, 1], [1, 2], [0, 2, 3]]


def test_itemknn_similarity_by_hand():
    """supp (events): item0 4, item1 3, item2 2, item3 1. session-rec counting: C(0,1) = every
    event of 0 x the sessions holding 1 = 2 (session 0) + 1 (session 1) = 3, but C(1,0) = 2;
    lambda = 20 inside both square roots."""
    d = sdata(TOY)
    idx, val = item_similarities(d.items, d.offsets, 4, n_sims=3, lmbd=20.0, alpha=0.5)
    assert idx[0].tolist() == [1, 3, 2]  # item 3 (rarer) outranks item 2 at the same count
    assert val[0] == pytest.approx([3 / math.sqrt(24 * 23), 1 / math.sqrt(24 * 21), 1 / math.sqrt(24 * 22)],
                                   rel=1e-6)
    assert val[1, idx[1].tolist().index(0)] == pytest.approx(2 / math.sqrt(23 * 24), rel=1e-6)
    # alpha = 1: confidence, C / (supp(a) + lambda)
    _, v1 = item_similarities(d.items, d.offsets, 4, n_sims=3, lmbd=20.0, alpha=1.0)
    assert v1[0, 0] == pytest.approx(3 / 24, rel=1e-6)
    # binary session vectors (the paper's wording): |S0 & S1| = 2, |S0| = |S1| = 3
    ib, vb = item_similarities(d.items, d.offsets, 4, n_sims=3, lmbd=20.0, counting="sessions")
    assert ib[0, 0] == 1 and vb[0, 0] == pytest.approx(2 / 23, rel=1e-6)
    # lambda outside the product: |S0 & S2| = 1, |S0| = 3, |S2| = 2 -> 1 / (sqrt(6) + 20)
    ip, vp = item_similarities(d.items, d.offsets, 4, n_sims=3, lmbd=20.0, counting="sessions",
                               regularisation="product")
    assert vp[0, ip[0].tolist().index(2)] == pytest.approx(1 / (math.sqrt(6) + 20), rel=1e-6)


def test_itemknn_n_sims_cut_and_score_row():
    d = sdata(TOY)
    idx, val = item_similarities(d.items, d.offsets, 4, n_sims=2)
    assert idx.shape == (4, 2) and idx[0].tolist() == [1, 3]
    sc = ItemKNNScorer(torch.from_numpy(idx), torch.from_numpy(val), CPU)
    st = sc.start_session(sc.begin(2), torch.tensor([True, True]), None)
    scores, _ = sc.step(st, torch.tensor([0, 3]))
    want0 = [0.0, 3 / math.sqrt(24 * 23), 0.0, 1 / math.sqrt(24 * 21)]  # item 2 cut (3rd neighbour)
    assert scores[0].tolist() == pytest.approx(want0, rel=1e-6)
    # item 3 co-occurs with 0 and 2 (session 3): C = 1 each; supp 4 vs 2 -> item 2 first
    want3 = [1 / math.sqrt(21 * 24), 0.0, 1 / math.sqrt(21 * 22), 0.0]
    assert scores[1].tolist() == pytest.approx(want3, rel=1e-6)
    # ties at the cut: item 0 meets 1, 2, 3 once each and they have equal support -> equal
    # similarity; n_sims = 2 keeps the smaller item_idx (1, 2)
    d3 = sdata([[0, 3], [0, 2], [0, 1]])
    i3, v3 = item_similarities(d3.items, d3.offsets, 4, n_sims=2)
    assert i3[0].tolist() == [1, 2] and v3[0, 0] == v3[0, 1] == pytest.approx(1 / math.sqrt(23 * 21))
    # an item with a single neighbour: padded with (itself, 0), scores 0 elsewhere
    d2 = sdata([[0, 1], [2, 3]])
    i2, v2 = item_similarities(d2.items, d2.offsets, 4, n_sims=3)
    assert i2[0].tolist() == [1, 0, 0] and v2[0, 1:].tolist() == [0.0, 0.0]


def slow_sessionrec_sims(sessions, n_items, n_sims, lmbd, alpha):
    """session-rec's loop: for every event of item a, +1 for every distinct item of its session."""
    supp = np.zeros(n_items)
    for s in sessions:
        for i in s:
            supp[i] += 1
    dense = np.zeros((n_items, n_items))
    for s in sessions:
        for a in s:
            for b in set(s):
                if b != a:
                    dense[a, b] += 1
    dense /= np.power(supp[:, None] + lmbd, alpha) * np.power(supp[None, :] + lmbd, 1 - alpha)
    out = np.zeros_like(dense)
    for a in range(n_items):
        order = sorted(range(n_items), key=lambda b: (-dense[a, b], b))
        for b in order[:n_sims]:
            out[a, b] = dense[a, b]
    return out


def test_itemknn_blocks_match_slow_reference():
    """Many tiny blocks (block_nnz=7) give the same top-n rows as the per-item loop."""
    rng = np.random.default_rng(3)
    sessions = [list(rng.integers(0, 15, int(rng.integers(2, 7)))) for _ in range(60)]
    d = sdata(sessions)
    ref = slow_sessionrec_sims(sessions, 15, 4, 5.0, 0.3)
    idx, val = item_similarities(d.items, d.offsets, 15, n_sims=4, lmbd=5.0, alpha=0.3, block_nnz=7)
    got = np.zeros((15, 15))
    np.put_along_axis(got, idx.astype(np.int64), val.astype(np.float64), 1)
    np.fill_diagonal(got, 0.0)
    assert np.allclose(got, ref, rtol=1e-6, atol=0)


def test_itemknn_through_the_loop():
    """Every prediction = the current item's row of the slow reference (2 slots: sessions of
    different lengths share and leave slots)."""
    rng = np.random.default_rng(5)
    train = [list(rng.integers(0, 12, int(rng.integers(2, 6)))) for _ in range(80)]
    test = [[1, 2, 3, 4, 5], [6, 7], [8, 9, 10], [11, 0]]
    d = sdata(train)
    fam = ItemKNNFamily(ItemKNNConfig(n_sims=5), ctx_for(d, 12))
    sc = ItemKNNFamily.scorer({"state_dict": fam.state_dict(), "config": {}}, CPU)
    ref = slow_sessionrec_sims(train, 12, 5, 20.0, 0.5)
    res = evaluate_sessions(sc, sdata(test), n_slots=2)
    assert res.n_events == 4 + 1 + 2 + 1
    for s, p, g, t in zip(res.session_idx, res.position, res.greater, res.ties):
        cur, tgt = test[s][p], test[s][p + 1]
        assert 1 + g + t == conservative_rank(ref[cur], tgt)


def test_itemknn_config_checks():
    with pytest.raises(ConfigError, match="n_sims"):
        ItemKNNConfig(n_sims=0)
    with pytest.raises(ConfigError, match="alpha"):
        ItemKNNConfig(alpha=1.5)
    with pytest.raises(ConfigError, match="counting"):
        ItemKNNConfig(counting="binary")
    with pytest.raises(ConfigError, match="tau_s"):
        TimeDecayItemKNNConfig(tau_s=0.0)
    with pytest.raises(ConfigError, match="scope"):
        TimeDecayItemKNNConfig(scope="lane")


# --------------------------------------------------------------------- time-decayed Item-KNN
# hand-made neighbour table over 4 items: row0 {1: .5, 2: .25}, row1 {0: .4, 3: .2}, row2 {3: .8, 0: .1}
NB_IDX = torch.tensor([[1, 2], [0, 3], [3, 0], [3, 2]])
NB_VAL = torch.tensor([[0.5, 0.25], [0.4, 0.2], [0.8, 0.1], [0.0, 0.0]])


def test_time_decay_weights_by_hand():
    """Events 0 @ 0 s, 1 @ 60 s, 2 @ 180 s with tau = 60 s: after the third event the score is
    row2 + e^-2 row1 + e^-3 row0 (ages 120 s and 180 s)."""
    sc = TimeDecayItemKNNScorer(NB_IDX, NB_VAL, CPU, tau_s=60.0)
    st = sc.start_session(sc.begin(1), torch.tensor([True]), None)
    us = 1_000_000
    s1, st = sc.step(st, torch.tensor([0]), torch.tensor([0 * us]))
    assert s1[0].tolist() == pytest.approx([0, 0.5, 0.25, 0])
    s2, st = sc.step(st, torch.tensor([1]), torch.tensor([60 * us]))
    e = math.exp
    assert s2[0].tolist() == pytest.approx([0.4, 0.5 * e(-1), 0.25 * e(-1), 0.2], rel=1e-6)
    s3, st = sc.step(st, torch.tensor([2]), torch.tensor([180 * us]))
    want = [0.4 * e(-2) + 0.1, 0.5 * e(-3), 0.25 * e(-3), 0.2 * e(-2) + 0.8]
    assert s3[0].tolist() == pytest.approx(want, rel=1e-6)
    # a new session starts from nothing (scope "session"), even 1 s later
    st = sc.start_session(st, torch.tensor([True]), None)
    s4, _ = sc.step(st, torch.tensor([3]), torch.tensor([181 * us]))
    assert s4[0].tolist() == pytest.approx([0, 0, 0, 0])


def slow_decay_scores(seq, times, tau):
    """sum over the events so far of row(item) * exp(-(t_now - t) / tau), one event at a time."""
    rows = np.zeros((4, 4))
    for a in range(4):
        for b, v in zip(NB_IDX[a].tolist(), NB_VAL[a].tolist()):
            rows[a, b] = v
    out = []
    for p in range(len(seq)):
        out.append(sum(rows[seq[j]] * math.exp(-(times[p] - times[j]) / tau) for j in range(p + 1)))
    return out


def test_time_decay_through_the_loop_and_user_scope():
    """Session mode: each session alone (resets, select with 2 slots). User mode with
    scope="user": a user's history session carries over (decayed), an anonymous one does not."""
    test = [[0, 1, 2, 3], [2, 0], [1, 3, 0]]
    times = [[0, 30, 100, 400], [1000, 1010], [2000, 2050, 2060]]
    data = sdata(test, users=[5, -1, 6], ts=times)
    sc = TimeDecayItemKNNScorer(NB_IDX, NB_VAL, CPU, tau_s=50.0)
    res = evaluate_sessions(sc, data, n_slots=2)
    assert res.n_events == 3 + 1 + 2
    for s, p, g, t in zip(res.session_idx, res.position, res.greater, res.ties):
        ref = slow_decay_scores(test[s][:p + 1], times[s][:p + 1], 50.0)[-1]
        assert 1 + g + t == conservative_rank(ref, test[s][p + 1])
    # user mode: user 5's history session [3, 2] at t = -100, -60 feeds the test session
    hist = sdata([[3, 2]], users=[5], ts=[[-100, -60]], sid0=900)
    sc_u = TimeDecayItemKNNScorer(NB_IDX, NB_VAL, CPU, tau_s=50.0, scope="user")
    res_u = evaluate_sessions(sc_u, data, n_slots=2, mode="user", history=[hist])
    assert res_u.n_history_sessions == 1
    for s, p, g, t in zip(res_u.session_idx, res_u.position, res_u.greater, res_u.ties):
        seq, tt = test[s][:p + 1], times[s][:p + 1]
        if s == 0:
            seq, tt = [3, 2] + seq, [-100, -60] + tt
        ref = slow_decay_scores(seq, tt, 50.0)[-1]
        assert 1 + g + t == conservative_rank(ref, test[s][p + 1])
    # the carried history changed the first prediction of user 5's session (not only ranks)
    sc_u2 = TimeDecayItemKNNScorer(NB_IDX, NB_VAL, CPU, tau_s=50.0, scope="user")
    st = sc_u2.start_session(sc_u2.begin(1), torch.tensor([True]), torch.tensor([5]))
    _, st = sc_u2.step(st, torch.tensor([2]), torch.tensor([-60_000_000]))
    st = sc_u2.start_session(st, torch.tensor([True]), torch.tensor([5]))
    s, st = sc_u2.step(st, torch.tensor([0]), torch.tensor([0]))
    assert s[0, 3].item() == pytest.approx(0.8 * math.exp(-60 / 50), rel=1e-6)
    # ... and a history from a LATER time is dropped (no leak when sessions come out of order)
    st = sc_u2.start_session(st, torch.tensor([True]), torch.tensor([5]))
    s, _ = sc_u2.step(st, torch.tensor([0]), torch.tensor([-1_000_000]))
    assert s[0].tolist() == pytest.approx([0, 0.5, 0.25, 0])


# ----------------------------------------------------------------------------------- S-POP
def test_spop_ties_by_global_popularity():
    """support: item0 5, item1 9, item2 1, item3 7. Session [0, 2]: both seen once -> 0 (pop 5)
    above 2 (pop 1), both above the unseen 1 and 3 although those are more popular; then a
    second 2 puts 2 first."""
    sc = SPopScorer(torch.tensor([5, 9, 1, 7]), CPU)
    st = sc.start_session(sc.begin(1), torch.tensor([True]), None)
    s, st = sc.step(st, torch.tensor([0]))
    assert torch.argsort(s[0], descending=True).tolist() == [0, 1, 3, 2]
    s, st = sc.step(st, torch.tensor([2]))
    v = s[0].tolist()
    assert v[0] > v[2] > v[1] > v[3]
    s, st = sc.step(st, torch.tensor([2]))
    v = s[0].tolist()
    assert v[2] > v[0] > v[1] > v[3]
    # equal support ties exactly (counted against the target, never broken by order)
    sc2 = SPopScorer(torch.tensor([4, 4, 1]), CPU)
    s, _ = sc2.step(sc2.begin(1), torch.tensor([2]))
    assert s[0, 0].item() == s[0, 1].item() < s[0, 2].item()


def test_spop_session_count_dominates_large_popularity():
    """A session item seen once outranks the most popular unseen item even with a huge
    popularity range (float32 precision of the tie term)."""
    sup = torch.tensor([10_000_000, 1, 2, 9_999_999])
    sc = SPopScorer(sup, CPU)
    st = sc.begin(1)
    for it in [1] * 50 + [2] * 50:  # items 1 and 2: 50 each; 2 is more popular
        s, st = sc.step(st, torch.tensor([it]))
    v = s[0].tolist()
    assert v[2] > v[1] > v[0] > v[3]


def test_select_keeps_rows_aligned():
    """``select`` keeps exactly the given rows, in order (the loop drops idle slots)."""
    sp_ = SPopScorer(torch.tensor([1, 2, 3, 4]), CPU)
    st = sp_.begin(3)
    _, st = sp_.step(st, torch.tensor([0, 1, 2]))
    st = sp_.select(st, torch.tensor([1, 2]))
    s, _ = sp_.step(st, torch.tensor([3, 3]))
    assert s[:, :4].floor().tolist() == [[0, 1, 0, 1], [0, 0, 1, 1]]
    td = TimeDecayItemKNNScorer(NB_IDX, NB_VAL, CPU, tau_s=1e9)
    st = td.start_session(td.begin(3), torch.ones(3, dtype=torch.bool), None)
    _, st = td.step(st, torch.tensor([0, 1, 2]), torch.tensor([1, 1, 1]))
    st = td.select(st, torch.tensor([2, 0]))
    s, _ = td.step(st, torch.tensor([3, 3]), torch.tensor([2, 2]))
    assert s.reshape(-1).tolist() == pytest.approx([0.1, 0, 0, 0.8, 0, 0.5, 0.25, 0], rel=1e-6)


def slow_spop_rank(seq, p, pop):
    counts = {}
    for i in seq[:p + 1]:
        counts[i] = counts.get(i, 0) + 1
    tgt = seq[p + 1]
    key = lambda i: (counts.get(i, 0), pop[i])  # noqa: E731
    return sum(1 for i in range(len(pop)) if key(i) >= key(tgt))


def test_spop_through_the_loop_resets_at_session_boundaries():
    """Slots are reused (2 slots, 5 sessions): a session must not see the counts of the one
    that ran before it in its slot; select keeps rows aligned as slots go idle."""
    pop = [3, 8, 1, 6, 2, 5]
    test = [[1, 1, 1, 2], [2, 3], [0, 0, 4, 0, 1], [4, 1], [5, 5, 0]]
    res = evaluate_sessions(SPopScorer(torch.tensor(pop), CPU), sdata(test), n_slots=2)
    assert res.n_events == sum(len(s) - 1 for s in test)
    for s, p, g, t in zip(res.session_idx, res.position, res.greater, res.ties):
        assert 1 + g + t == slow_spop_rank(test[s], p, pop)


# ------------------------------------------------------------------------------------ PPOP
# training: user 8 [0, 1], [0, 0, 0, 1], [0, 1]; user 7 [3, 3, 1], [3, 2]; anonymous [2, 1]
TRAIN_U = sdata([[0, 1], [3, 3, 1], [0, 0, 0, 1], [3, 2], [0, 1], [2, 1]], users=[8, 7, 8, 7, 8, -1], sid0=500)
# support: item0 5, item1 5, item2 2, item3 3 -> POP order 0 = 1 > 3 > 2


def ppop_scorer():
    fam = PPopFamily(None, ctx_for(TRAIN_U, 4))
    sd = fam.state_dict()
    assert sd["user_ids"].tolist() == [7, 8] and all(isinstance(v, torch.Tensor) for v in sd.values())
    return PPopFamily.scorer({"state_dict": sd, "config": {}}, CPU)


def test_ppop_known_user_first_unseen_user_falls_back_to_pop():
    sc = ppop_scorer()
    st = sc.start_session(sc.begin(4), torch.ones(4, dtype=torch.bool), torch.tensor([7, -1, 99, 8]))
    s, st = sc.step(st, torch.tensor([0, 0, 0, 0]))
    # user 7: training counts 3:3, 1:1, 2:1 + the current 0: 3 (count 3) first; 1 and 0 tie
    # (count 1, support 5 each); 2 (count 1, support 2) below them
    v = s[0].tolist()
    assert v[3] > v[1] == v[0] > v[2]
    # unseen users (-1, and 99 not in training): the session item, then POP
    for r in (1, 2):
        v = s[r].tolist()
        assert v[0] > v[1] > v[3] > v[2]
        assert v[1] < 1.0 <= v[0]  # item 1: no count, only the popularity term
    # user 8: 0 (5 + 1) > 1 (3) > 3 > 2 (POP among the unseen)
    v = s[3].tolist()
    assert v[0] > v[1] > v[3] > v[2]
    # a new session of user 7 restarts from the training counts (the 0 above is gone)
    st = sc.start_session(st, torch.tensor([True, False, False, False]), torch.tensor([7, -1, -1, -1]))
    s, _ = sc.step(st, torch.tensor([2, 0, 0, 0]))
    v = s[0].tolist()
    assert v[3] > v[2] > v[1] > v[0]  # 3: 3, 2: 1 + 1, 1: 1, 0: 0


def test_ppop_same_ranks_in_user_and_session_mode():
    """Through the loop: user mode (training sessions fed as unscored bootstrap) and session
    mode give the same ranks, equal to a slow reference (user's training counts + session)."""
    test = sdata([[3, 1, 2], [2, 0], [1, 1, 3]], users=[7, -1, 8])
    pop = np.bincount(TRAIN_U.items, minlength=4)
    tr_counts = {7: {3: 3, 1: 1, 2: 1}, 8: {0: 5, 1: 3}}
    seqs = [[3, 1, 2], [2, 0], [1, 1, 3]]
    users = [7, -1, 8]
    ref = []
    for s, seq in enumerate(seqs):
        for p in range(len(seq) - 1):
            c = dict(tr_counts.get(users[s], {}))
            for i in seq[:p + 1]:
                c[i] = c.get(i, 0) + 1
            key = lambda i: (c.get(i, 0), pop[i])  # noqa: E731
            ref.append(sum(1 for i in range(4) if key(i) >= key(seq[p + 1])))
    for mode in ("session", "user"):
        res = evaluate_sessions(ppop_scorer(), test, n_slots=2, mode=mode,
                                history=[TRAIN_U] if mode == "user" else None)
        if mode == "user":
            assert res.n_history_sessions == 5
        order = np.lexsort((res.position, res.session_idx))
        assert (1 + res.greater + res.ties)[order].tolist() == ref


# ----------------------------------------------------------------------- CLI, checkpoints
@pytest.mark.parametrize("model", ["itemknn", "itemknn_td", "spop", "ppop"])
def test_train_and_evaluate_cli(tmp_path, model):
    """The real train -> checkpoint (torch.load weights_only) -> evaluate path, in both modes
    where the table has users."""
    from evaluation.evaluate import evaluate
    from training.train import train

    root = toy_split(tmp_path / "split", n_train=80, n_test=20)
    if model == "ppop":  # a split with users
        from tests.training.toy import random_sessions
        tr = random_sessions(80, 30, 0)
        te = random_sessions(20, 30, 1, start_id=10_000)
        uo = lambda s: s % 7  # noqa: E731
        root = write_split(tmp_path / "usplit", {"train_full": events_table(tr, user_of=uo),
                                                 "test": events_table(te, t0=1_700_000_000, user_of=uo)})
    run = tmp_path / "run"
    train(model, root, run, show_progress=False)
    m = evaluate(run, root, tmp_path / "ev", mode="user" if model == "ppop" else "session")
    assert m["model"] == model and m["n_events"] > 0 and 0.0 <= m["recall_at_20"] <= 1.0
    assert json.loads((run / "config.json").read_text())["n_epochs"] == 0
