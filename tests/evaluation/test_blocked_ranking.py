"""Blocked full ranking (evaluation/loop.py, "Blocked ranking"; issue 13): a catalogue scored
``block`` items at a time gives the same top values, next-item scores and exact greater / ties
counts as scoring it at once, ties included, and the whole evaluation loop gives the same ranks.

    .venv/bin/python -m pytest tests/evaluation/test_blocked_ranking.py -q
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from evaluation.loop import blocked_greater_ties, blocked_top, evaluate_sessions
from evaluation.metrics import greater_and_ties


def _integer_factors(R=37, N=203, D=5, seed=0):
    """Small integers: every product and sum is exact in float32, so any summation order gives
    the same scores, and many items tie (the hard case for the counts)."""
    g = torch.Generator().manual_seed(seed)
    H = torch.randint(-2, 3, (R, D), generator=g).float()
    W = torch.randint(-2, 3, (N, D), generator=g).float()
    b = torch.randint(-1, 2, (N,), generator=g).float()
    fut = torch.randint(0, N, (R, 6), generator=g)
    return H, W, b, fut


@pytest.mark.parametrize("block", [1, 7, 64, 203, 1000])
def test_blocked_top_and_counts_equal_the_full_matrix_with_many_ties(block):
    H, W, b, fut = _integer_factors()
    kk = 21
    S = H @ W.t() + b  # the reference: the whole [R, N] matrix (exact here)
    tv, tix, fs = blocked_top(H, W, b, fut, kk, block)
    ref_v, _ = torch.topk(S, kk, dim=1)
    assert torch.equal(tv, ref_v)  # the same multiset of top values, in order
    assert torch.equal(S.gather(1, tix), tv)  # each kept index carries its value
    assert torch.equal(fs, S.gather(1, fut))
    rows = torch.arange(H.shape[0])
    g, t = blocked_greater_ties(H, W, b, rows, fs[:, 0], block)
    g_ref, t_ref = greater_and_ties(S, fut[:, 0])
    assert torch.equal(g, g_ref) and torch.equal(t, t_ref)
    assert int(t_ref.sum()) > 100  # the case really has ties
    # a subset of rows (the loop asks only for the rows ranked beyond top_k)
    sub = torch.tensor([3, 0, 36])
    g2, t2 = blocked_greater_ties(H, W, b, sub, fs[sub, 0], block)
    assert torch.equal(g2, g_ref[sub]) and torch.equal(t2, t_ref[sub])


def test_blocked_top_refuses_nan():
    H, W, b, fut = _integer_factors()
    W[150, 2] = float("nan")
    with pytest.raises(FloatingPointError, match="NaN"):
        blocked_top(H, W, b, fut, 21, 64)


def _toy_gru4rec(n_items=300, seed=0):
    from training.families.gru4rec import GRU4RecConfig, GRU4RecModel
    from training.scoring import RNNScorer

    cfg = GRU4RecConfig(layers=[16], batch_size=8, n_sample=0)
    m = GRU4RecModel(n_items, cfg)
    m.reset_parameters(torch.Generator().manual_seed(seed))
    # a few duplicated item rows: exact ties between items in different blocks
    with torch.no_grad():
        m.Wy[10:13] = m.Wy[200]
        m.By[10:13] = m.By[200]
    return RNNScorer(m, torch.device("cpu"))


def _sessions(n_items=300, n=90, seed=1):
    from training.data import SessionData

    rng = np.random.default_rng(seed)
    lens = rng.integers(2, 30, n)
    off = np.r_[0, np.cumsum(lens)].astype(np.int64)
    items = rng.integers(0, n_items, off[-1]).astype(np.int64)
    items[::7] = 200  # the duplicated item is often a target
    return SessionData(items=items, offsets=off, session_ids=np.arange(n), start_ts=np.arange(n), user_ids=None)


def test_the_loop_gives_the_same_ranks_blocked_and_unblocked():
    scorer, data = _toy_gru4rec(), _sessions()
    full = evaluate_sessions(scorer, data, n_slots=16)
    for block in (7, 64):
        res = evaluate_sessions(scorer, data, n_slots=16, block_items=block)
        assert np.array_equal(res.target, full.target) and np.array_equal(res.position, full.position)
        # scores of different products may differ in their last bit: ranks are compared, and must
        # agree for all but a handful of near-ties (none with these magnitudes)
        rank_b = 1 + res.greater + res.ties
        rank_f = 1 + full.greater + full.ties
        assert (rank_b != rank_f).sum() <= 2, np.flatnonzero(rank_b != rank_f)
        assert np.abs(res.future_rank.astype(int) - full.future_rank.astype(int)).max() <= 1
        assert (res.future_rank != full.future_rank).mean() < 0.01
    # the duplicated items tie with the target 200 when it is the target: 3 other items
    hits = full.target == 200
    assert hits.any() and (full.ties[hits] >= 3).all()
    res = evaluate_sessions(scorer, data, n_slots=16, block_items=64)
    assert (res.ties[hits] >= 3).all()


def test_the_loop_uses_blocks_only_above_the_threshold(monkeypatch):
    import evaluation.loop as L

    calls = []
    real = L.blocked_top
    monkeypatch.setattr(L, "blocked_top", lambda *a: calls.append(a[-1]) or real(*a))
    scorer, data = _toy_gru4rec(), _sessions(n=10)
    assert evaluate_sessions(scorer, data, n_slots=4, block_items=300).block_items is None  # = n_items
    assert calls == []
    assert evaluate_sessions(scorer, data, n_slots=4, block_items=50).block_items == 50
    assert calls and set(calls) == {50}
