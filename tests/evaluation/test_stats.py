"""evaluation.stats against hand-computed values, scipy, exhaustive enumeration and coverage runs."""
import itertools
import time
import warnings

import numpy as np
import pytest
from scipy import stats as sps

from evaluation.stats import (bootstrap_ci, bootstrap_distribution, event_values, paired_bootstrap_diff,
                              unit_means, wilcoxon)

RANKS = [1.0, 2.0, 5.0, 21.0, 3.5]


# ----------------------------------------------------------------------------- event_values

def test_event_values_by_hand():
    r = np.array(RANKS)
    for k in (5, 20):  # every rank but 21 is within both cut-offs
        assert event_values(r, f"recall_at_{k}").tolist() == [1.0, 1.0, 1.0, 0.0, 1.0]
        assert event_values(r, f"mrr_at_{k}") == pytest.approx([1.0, 0.5, 0.2, 0.0, 1 / 3.5])
        assert event_values(r, f"precision_at_{k}") == pytest.approx([1 / k, 1 / k, 1 / k, 0.0, 1 / k])
        # 1/log2(rank+1): log2(2)=1, log2(3)=1.5849625, log2(6)=2.5849625, log2(4.5)=2.1699250
        assert event_values(r, f"ndcg_at_{k}") == pytest.approx([1.0, 0.6309298, 0.3868528, 0.0, 0.4608454], abs=1e-7)
    assert event_values(r, "recall_at_1").tolist() == [1.0, 0.0, 0.0, 0.0, 0.0]
    # rank exactly K counts, K+1 does not
    assert event_values([20.0, 21.0], "recall_at_20").tolist() == [1.0, 0.0]
    assert event_values([20.0, 21.0], "ndcg_at_20") == pytest.approx([1 / 4.3923174, 0.0])


def test_event_values_mean_matches_the_reported_metrics():
    from evaluation.metrics import metrics_from_ranks

    r = np.random.default_rng(3).integers(1, 40, 500).astype(float) + np.repeat([0.0, 0.5], 250)
    m = metrics_from_ranks(r, ks=(5, 20))
    for name in ("recall_at_5", "mrr_at_5", "precision_at_20", "mrr_at_20"):
        assert event_values(r, name).mean() == pytest.approx(m[name], rel=1e-12)


def test_event_values_rejects_bad_input():
    with pytest.raises(ValueError):
        event_values([1.0], "recall@20")
    with pytest.raises(ValueError):
        event_values([1.0], "auc_at_5")
    with pytest.raises(ValueError):
        event_values([float("nan")], "recall_at_5")
    with pytest.raises(ValueError):
        event_values([0.0], "recall_at_5")  # ranks are 1-based


# ----------------------------------------------------------------------------- unit_means

def test_unit_means_by_hand():
    ids, means, w = unit_means([1.0, 0.0, 1.0, 1.0, 0.5], [7, 3, 7, 9, 3])
    assert ids.tolist() == [3, 7, 9]
    assert means.tolist() == [0.25, 1.0, 1.0]
    assert w.tolist() == [2, 2, 1]
    assert (means * w).sum() / w.sum() == pytest.approx(3.5 / 5)


# ----------------------------------------------------------------------------- bootstrap

def _coverage(make_data, reps=200, n_boot=1000, units_for_ci=True):
    hits = 0
    for i in range(reps):
        values, units = make_data(np.random.default_rng(10_000 + i))
        _, lo, hi = bootstrap_ci(values, units if units_for_ci else None, n_boot=n_boot, seed=i)
        hits += lo <= 0.3 <= hi
    return hits / reps


def _independent(rng):
    """300 Bernoulli(0.3) events, 100 sessions of 3 events."""
    return (rng.random(300) < 0.3).astype(float), np.repeat(np.arange(100), 3)


def _clustered(rng):
    """60 sessions of 5 events that all share their session's Bernoulli(0.3) outcome."""
    return np.repeat((rng.random(60) < 0.3).astype(float), 5), np.repeat(np.arange(60), 5)


def test_bootstrap_ci_covers_the_true_mean_at_about_the_nominal_rate():
    assert 0.90 <= _coverage(_independent) <= 0.99


def test_cluster_bootstrap_keeps_its_coverage_when_events_are_correlated():
    assert 0.90 <= _coverage(_clustered) <= 0.99
    # resampling single events ignores the correlation and under-covers badly (~0.6)
    assert _coverage(_clustered, units_for_ci=False) < 0.8


def test_cluster_ci_is_wider_than_event_level_ci_for_correlated_events():
    v, u = _clustered(np.random.default_rng(5))
    m1, lo_u, hi_u = bootstrap_ci(v, u, seed=1)
    m2, lo_e, hi_e = bootstrap_ci(v, None, seed=1)
    assert m1 == m2 == v.mean()
    assert (hi_u - lo_u) > 1.7 * (hi_e - lo_e)  # sqrt(5) = 2.24 in expectation


def test_a_resample_is_total_value_over_total_events_of_the_drawn_units():
    # unit 0: one event worth 1; unit 1: three events worth 0.  Two units drawn per resample:
    # {0,0} -> 1, {1,1} -> 0, {0,1} -> 1/4 (sum/count; a mean of unit means would give 1/2)
    dist = bootstrap_distribution([1.0, 0.0, 0.0, 0.0], [0, 1, 1, 1], n_boot=400, seed=0)
    assert set(np.round(dist, 12).tolist()) == {0.0, 0.25, 1.0}
    assert np.mean(dist == 0.25) == pytest.approx(0.5, abs=0.08)


def test_bootstrap_ci_is_seeded_and_ordered():
    v, u = _independent(np.random.default_rng(0))
    a, b = bootstrap_ci(v, u, seed=7), bootstrap_ci(v, u, seed=7)
    assert a == b
    assert bootstrap_ci(v, u, seed=8) != a
    mean, lo, hi = a
    assert mean == v.mean() and lo < mean < hi
    assert bootstrap_ci(np.full(10, 0.4), np.arange(10)) == pytest.approx((0.4, 0.4, 0.4))
    # every event its own unit is the ordinary bootstrap
    assert bootstrap_ci(v, np.arange(300), seed=3) == bootstrap_ci(v, None, seed=3)
    with pytest.raises(ValueError):
        bootstrap_ci([], None)
    with pytest.raises(ValueError):
        bootstrap_ci([0.1, float("nan")], None)


def test_bootstrap_is_fast_for_ten_thousand_units():
    rng = np.random.default_rng(0)
    units = rng.integers(0, 10_000, 60_000)
    values = (rng.random(60_000) < 0.3).astype(float)
    bootstrap_ci(values[:100], units[:100], n_boot=10)  # warm-up
    t = time.perf_counter()
    _, lo, hi = bootstrap_ci(values, units, n_boot=1000, seed=0)
    elapsed = time.perf_counter() - t
    assert lo < values.mean() < hi
    assert elapsed < 3.0, f"{elapsed:.2f} s for 10^4 units x 1000 resamples (target < 1 s on an idle core)"


# ----------------------------------------------------------------------------- paired differences

def test_paired_diff_of_identical_runs_is_exactly_zero():
    v, u = _independent(np.random.default_rng(1))
    assert paired_bootstrap_diff(v, v.copy(), u) == (0.0, 0.0, 0.0)


def test_paired_diff_uses_the_same_resample_for_both_runs():
    rng = np.random.default_rng(2)
    a = rng.random(400)
    u = np.repeat(np.arange(80), 5)
    # b is a shifted by a constant on every event: every paired resample differs by exactly 0.1,
    # while a's own CI is wide; independent resamples of a and b would give a wide interval too
    d, lo, hi = paired_bootstrap_diff(a, a - 0.1, u, seed=4)
    assert (d, lo, hi) == pytest.approx((0.1, 0.1, 0.1), abs=1e-12)
    _, alo, ahi = bootstrap_ci(a, u, seed=4)
    assert ahi - alo > 0.05


def test_paired_diff_is_a_minus_b():
    a = np.array([1.0, 1.0, 0.0, 1.0, 0.0, 1.0, 1.0, 0.0])  # mean 5/8
    b = np.array([0.0, 1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0])  # mean 2/8
    d, lo, hi = paired_bootstrap_diff(a, b, np.arange(8) // 2, n_boot=500)
    assert d == pytest.approx(3 / 8)
    assert lo <= d <= hi and hi > 0
    with pytest.raises(ValueError):
        paired_bootstrap_diff(a, b[:-1])


# ----------------------------------------------------------------------------- Wilcoxon

def _exact_signed_rank_p(d):
    """Two-sided exact p by enumerating all 2^n sign assignments (distinct |d|, no zeros)."""
    d = np.asarray(d, dtype=float)
    ranks = sps.rankdata(np.abs(d))
    n = len(d)
    w_obs = ranks[d > 0].sum()
    mu = n * (n + 1) / 4
    extreme = sum(abs(sum(r for r, s in zip(ranks, signs) if s) - mu) >= abs(w_obs - mu) - 1e-12
                  for signs in itertools.product((0, 1), repeat=n))
    return extreme / 2 ** n


def test_wilcoxon_exact_small_case_by_enumeration():
    a = np.array([1.4, 0.2, 2.0, 3.2, 0.4, 4.1])
    b = np.array([0.5, 0.5, 0.6, 1.0, 1.0, 1.0])
    # differences 0.9, -0.3, 1.4, 2.2, -0.6, 3.1: negative ranks 1 and 2, W+ = 18 of 21;
    # subsets of {1..6} with sum <= 3: {}, {1}, {2}, {3}, {1,2} -> 5, times 2 tails -> 10/64
    assert _exact_signed_rank_p(a - b) == pytest.approx(10 / 64)
    assert wilcoxon(a, b) == pytest.approx(10 / 64)
    assert wilcoxon(b, a) == pytest.approx(10 / 64)  # two-sided
    assert wilcoxon(np.arange(1.0, 7.0), np.zeros(6)) == pytest.approx(2 / 64)


def test_wilcoxon_matches_scipy_and_drops_zero_differences():
    rng = np.random.default_rng(0)
    a = np.round(rng.random(80), 1)
    b = np.round(np.clip(a + rng.normal(0.05, 0.2, 80), 0, 1), 1)  # ties and zero differences
    assert wilcoxon(a, b) == pytest.approx(sps.wilcoxon(a, b, zero_method="wilcox").pvalue, rel=1e-12)
    # one zero difference + 1..6: the zero is dropped, leaving the all-positive n=6 case
    assert wilcoxon(np.arange(0.0, 7.0), np.zeros(7)) == pytest.approx(2 / 64)


def test_wilcoxon_identical_runs_give_one():
    x = np.array([0.2, 0.5, 0.5, 1.0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no scipy division-by-zero warning, no NaN, no exception
        assert wilcoxon(x, x.copy()) == 1.0
    with pytest.raises(ValueError):
        wilcoxon(x, x[:3])
