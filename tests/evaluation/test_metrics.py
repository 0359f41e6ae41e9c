"""Ranks with ties and Recall/MRR/Precision@K on toy rankings computed by hand."""
import numpy as np
import pytest
import torch

from evaluation.metrics import greater_and_ties, metrics_from_ranks, ranks


def test_perfect_ranking_scores_one():
    scores = torch.eye(5) * 10  # the target (diagonal) is always strictly best
    r = ranks(scores, torch.arange(5))
    assert r.tolist() == [1.0] * 5
    m = metrics_from_ranks(r.numpy())
    for k in (1, 5, 10, 20):
        assert m[f"recall_at_{k}"] == 1.0
        assert m[f"mrr_at_{k}"] == 1.0
        assert m[f"precision_at_{k}"] == pytest.approx(1.0 / k)


def test_rank_exactly_k_counts_and_k_plus_one_does_not():
    """Checklist 8: Recall@K uses rank <= K."""
    m = metrics_from_ranks(np.array([20.0, 21.0]), ks=(20,))
    assert m["recall_at_20"] == 0.5
    assert m["mrr_at_20"] == pytest.approx((1 / 20) / 2)
    m5 = metrics_from_ranks(np.array([5.0, 6.0, 1.0, 2.0]), ks=(1, 5))
    assert m5["recall_at_5"] == 0.75 and m5["recall_at_1"] == 0.25
    assert m5["mrr_at_5"] == pytest.approx((1 / 5 + 1 + 1 / 2) / 4)


def test_ties_counted_not_broken_by_sort_order():
    """Checklist 9: 3 other items tie with the target, 1 is above it."""
    scores = torch.tensor([[0.5, 0.9, 0.5, 0.5, 0.1, 0.5]])
    tgt = torch.tensor([2])
    g, t = greater_and_ties(scores, tgt)
    assert (g.item(), t.item()) == (1, 3)
    assert ranks(scores, tgt, "conservative").item() == 5.0  # ties against the model
    assert ranks(scores, tgt, "optimistic").item() == 2.0
    assert ranks(scores, tgt, "median").item() == 3.5
    # an all-constant model (e.g. untrained) is ranked last, never first
    flat = torch.zeros(2, 100)
    assert ranks(flat, torch.tensor([0, 99])).tolist() == [100.0, 100.0]
    assert metrics_from_ranks(ranks(flat, torch.tensor([0, 99])).numpy())["recall_at_20"] == 0.0


def test_toy_ranking_metrics_by_hand():
    # four predictions with conservative ranks 1, 3 (tie), 12, 30
    r = np.array([1.0, 3.0, 12.0, 30.0])
    m = metrics_from_ranks(r)
    assert m["recall_at_1"] == 0.25 and m["recall_at_5"] == 0.5
    assert m["recall_at_10"] == 0.5 and m["recall_at_20"] == 0.75
    assert m["mrr_at_20"] == pytest.approx((1 + 1 / 3 + 1 / 12) / 4)
    assert m["mrr_at_5"] == pytest.approx((1 + 1 / 3) / 4)
    assert m["precision_at_20"] == pytest.approx(0.75 / 20)


def test_nan_scores_fail_loudly():
    with pytest.raises(FloatingPointError):
        greater_and_ties(torch.tensor([[float("nan"), 1.0]]), torch.tensor([0]))
