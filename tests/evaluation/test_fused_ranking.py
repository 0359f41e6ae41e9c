"""Fused ranking (evaluation/loop.py, "Fused ranking"; issue 13): the C pass over each score row
gives the torch ranking's top values, next-item scores and exact greater / ties counts, ties and
a bias included, and the loop's results do not change with it.

    .venv/bin/python -m pytest tests/evaluation/test_fused_ranking.py -q
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from evaluation.loop import evaluate_sessions, rank_lib, rank_rows_native
from evaluation.metrics import greater_and_ties
from tests.evaluation.test_blocked_ranking import _integer_factors, _sessions, _toy_gru4rec
from training import native

lib = native.load()
needs_lib = pytest.mark.skipif(lib is None, reason=f"C kernels unavailable: {native.why_not()}")


@needs_lib
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("kk", [1, 21, 203])  # 203 = the whole catalogue
def test_kernel_equals_the_torch_ranking_with_many_ties(with_bias, kk):
    H, W, b, fut = _integer_factors(R=37, N=203)
    S0 = H @ W.t()  # exact small integers
    S = S0 + b if with_bias else S0  # the reference scores
    tv, tix, fs, g, t = rank_rows_native(lib, S0, b if with_bias else None, fut, kk)
    ref_v, _ = torch.topk(S, kk, dim=1)
    assert torch.equal(tv, ref_v)  # the same multiset of top values, in order
    assert torch.equal(S.gather(1, tix), tv)  # each kept item carries its value
    # which items: the kk first of a stable descending sort (ties, at the cut too: smaller item)
    assert torch.equal(tix, torch.sort(S, dim=1, descending=True, stable=True).indices[:, :kk])
    assert torch.equal(fs, S.gather(1, fut))
    g_ref, t_ref = greater_and_ties(S, fut[:, 0])
    assert torch.equal(g, g_ref.to(torch.int32)) and torch.equal(t, t_ref.to(torch.int32))
    assert int(t_ref.sum()) > 100  # the case really has ties


@needs_lib
def test_kernel_refuses_nan():
    H, W, b, fut = _integer_factors()
    S = H @ W.t()
    S[5, 150] = float("nan")
    with pytest.raises(FloatingPointError, match="NaN"):
        rank_rows_native(lib, S, b, fut, 21)


class _NoFactors:
    """A scorer that gives scores only (like the baselines): the kernel ranks them as they are."""

    def __init__(self, inner):
        self.inner = inner
        self.n_items, self.device = inner.n_items, inner.device

    def begin(self, n):
        return self.inner.begin(n)

    def start_session(self, *a):
        return self.inner.start_session(*a)

    def end_session(self, *a):
        return self.inner.end_session(*a)

    def select(self, *a):
        return self.inner.select(*a)

    def step(self, state, items):
        return self.inner.step(state, items)


@needs_lib
def test_the_loop_gives_the_same_results_with_and_without_the_kernel(monkeypatch):
    scorer, data = _toy_gru4rec(), _sessions()
    monkeypatch.setenv("RNNREC_EVAL_NATIVE", "0")
    ref = evaluate_sessions(scorer, data, n_slots=16)
    assert ref.rank_path == "torch"
    monkeypatch.delenv("RNNREC_EVAL_NATIVE")
    # scores as the scorer gives them (the same values as the torch path): identical results
    res = evaluate_sessions(_NoFactors(scorer), data, n_slots=16)
    assert res.rank_path == "native"
    for k in ("target", "position", "greater", "ties", "future_rank"):
        assert np.array_equal(getattr(res, k), getattr(ref, k)), k
    assert res.top_counts.sum() == ref.top_counts.sum()
    # GRU4Rec: hidden output x item table in the step, the bias in the pass (mm + b instead of
    # addmm: last-bit differences, so ranks are compared like the blocked path's)
    fused = evaluate_sessions(scorer, data, n_slots=16)
    assert fused.rank_path == "native"
    assert np.array_equal(fused.target, ref.target)
    rank_n, rank_r = 1 + fused.greater + fused.ties, 1 + ref.greater + ref.ties
    assert (rank_n != rank_r).sum() <= 2
    hits = ref.target == 200  # the duplicated items tie with the target 200
    assert hits.any() and (fused.ties[hits] >= 3).all()
    assert (fused.future_rank != ref.future_rank).mean() < 0.01


def test_the_switch_and_devices():
    assert rank_lib("meta") is None
