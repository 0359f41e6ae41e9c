"""Per-event metric values, cluster-bootstrap confidence intervals and a paired test.

Pure numpy/scipy functions on the arrays ``per_event.parquet`` holds (one row
per prediction, see ``evaluation.evaluate``); ``evaluation.compare`` wires them
into a results table. By hand::

    import pyarrow.parquet as pq
    from evaluation.stats import event_values, bootstrap_ci
    t = pq.read_table("EVAL_DIR/per_event.parquet").to_pandas()
    bootstrap_ci(event_values(t["rank"], "recall_at_20"), units=t["session_id"])

Why a *cluster* bootstrap: the predictions of one session (or one user) are
not independent draws -- a session the model "gets" yields many hits in a
row -- so resampling single events would understate the variance. The unit
that is resampled is the session (session mode) or the user (user mode).
Each resample draws ``n_units`` units with replacement and evaluates the
metric exactly as Recall@K is reported: total of the drawn units' per-event
values / total number of their events (the event-level mean, so a long
session weighs more than a short one, as it does in the point estimate).
Intervals are percentile intervals (``np.quantile``, linear interpolation)
of ``n_boot`` resamples drawn from ``np.random.default_rng(seed)``; the same
``seed`` and number of units give the same resample indices, so intervals of
different runs/metrics computed with one seed use common random numbers.
"""
from __future__ import annotations

import re

import numpy as np

#: metric names ``event_values`` understands: ``<kind>_at_<K>``
METRIC_RE = re.compile(r"^(recall|mrr|ndcg|precision)_at_(\d+)$")

#: number of (resample x unit) cells drawn at once; bounds memory at ~16 MB per array
_CHUNK_CELLS = 1 << 21


def parse_metric(metric: str) -> tuple[str, int]:
    """``"mrr_at_20"`` -> ``("mrr", 20)``; raises ``ValueError`` for anything else."""
    m = METRIC_RE.match(metric)
    if not m or int(m.group(2)) < 1:
        raise ValueError(f"unknown metric {metric!r}: expected recall_at_K, mrr_at_K, ndcg_at_K "
                         "or precision_at_K with K >= 1")
    return m.group(1), int(m.group(2))


def event_values(rank, metric: str) -> np.ndarray:
    """Per-event value of ``metric`` for each (1-based, possibly fractional) rank.

    One target per prediction, so with ``hit = rank <= K`` (rank exactly K counts):

    * ``recall_at_K``: ``hit`` as 0/1;
    * ``mrr_at_K``: ``1 / rank`` if hit else 0;
    * ``ndcg_at_K``: ``1 / log2(rank + 1)`` if hit else 0 (the ideal DCG is 1);
    * ``precision_at_K``: ``hit / K``.

    The mean of the returned array is the metric ``evaluation.metrics`` reports.
    NaN or ranks below 1 raise ``ValueError`` (they would silently score as misses).
    """
    kind, k = parse_metric(metric)
    r = np.asarray(rank, dtype=np.float64)
    if r.size and (np.isnan(r).any() or r.min() < 1.0):
        raise ValueError("ranks must be >= 1 and not NaN")
    hit = r <= k
    if kind == "recall":
        return hit.astype(np.float64)
    if kind == "precision":
        return hit.astype(np.float64) / k
    if kind == "mrr":
        return np.where(hit, 1.0 / r, 0.0)
    return np.where(hit, 1.0 / np.log2(r + 1.0), 0.0)  # ndcg


def _as_values(values) -> np.ndarray:
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 1:
        raise ValueError(f"expected a 1-d array of per-event values, got shape {v.shape}")
    if v.size == 0:
        raise ValueError("no events: nothing to aggregate")
    if np.isnan(v).any():
        raise ValueError("per-event values contain NaN")
    return v


def _unit_codes(units, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(sorted unique unit ids, code of each event in 0..n_units-1); ``None`` = every event a unit."""
    if units is None:
        return np.arange(n), np.arange(n)
    u = np.asarray(units)
    if u.shape != (n,):
        raise ValueError(f"units has shape {u.shape}, values has {n} events")
    ids, codes = np.unique(u, return_inverse=True)
    return ids, codes.reshape(-1)


def unit_means(values, units):
    """Aggregate per-event values per resampling unit (session or user).

    Returns ``(unit_ids, means, weights)``: the sorted unique unit ids, each
    unit's mean value over its events, and its number of events (``weights``;
    ``sum(means * weights) / sum(weights)`` is the event-level mean).
    ``units=None``: every event is its own unit.
    """
    v = _as_values(values)
    ids, codes = _unit_codes(units, len(v))
    counts = np.bincount(codes, minlength=len(ids)).astype(np.float64)
    sums = np.bincount(codes, weights=v, minlength=len(ids))
    return ids, sums / counts, counts


def bootstrap_distribution(values, units=None, n_boot: int = 1000, seed: int = 0) -> np.ndarray:
    """The ``n_boot`` resampled event-level means of each column of ``values``.

    ``values``: shape ``(n_events,)`` or ``(n_events, m)`` (m metrics/runs on the
    same events, resampled together). ``units``: the resampling unit of each
    event (``None``: every event is its own unit). Returns shape ``(n_boot,)``
    or ``(n_boot, m)``. Each resample draws ``n_units`` unit indices uniformly
    with replacement, turns them into per-unit draw counts ``w`` (``np.bincount``)
    and evaluates ``(w @ unit_sums) / (w @ unit_event_counts)`` -- vectorised
    in chunks of resamples, no Python loop over single resamples.
    """
    v = np.asarray(values, dtype=np.float64)
    if v.ndim not in (1, 2):
        raise ValueError(f"values must be 1-d or 2-d, got shape {v.shape}")
    one_d = v.ndim == 1
    v2 = v.reshape(len(v), -1)
    if len(v2) == 0:
        raise ValueError("no events: nothing to resample")
    if np.isnan(v2).any():
        raise ValueError("per-event values contain NaN")
    if n_boot < 1:
        raise ValueError("n_boot must be >= 1")
    _, codes = _unit_codes(units, len(v2))
    n_units = int(codes.max()) + 1
    counts = np.bincount(codes, minlength=n_units).astype(np.float64)
    sums = np.stack([np.bincount(codes, weights=v2[:, j], minlength=n_units) for j in range(v2.shape[1])], 1)
    rng = np.random.default_rng(seed)
    out = np.empty((n_boot, v2.shape[1]))
    chunk = max(1, _CHUNK_CELLS // n_units)
    for start in range(0, n_boot, chunk):
        c = min(chunk, n_boot - start)
        draws = rng.integers(0, n_units, size=(c, n_units))
        draws += (np.arange(c) * n_units)[:, None]  # one bincount for the whole chunk
        w = np.bincount(draws.ravel(), minlength=c * n_units).reshape(c, n_units).astype(np.float64)
        out[start:start + c] = (w @ sums) / (w @ counts)[:, None]
    return out[:, 0] if one_d else out


def percentile_interval(dist, level: float = 0.95) -> tuple[float, float]:
    """Equal-tailed percentile interval of a bootstrap distribution (``np.quantile``, linear)."""
    if not 0.0 < level < 1.0:
        raise ValueError("level must be in (0, 1)")
    a = (1.0 - level) / 2.0
    lo, hi = np.quantile(np.asarray(dist, dtype=np.float64), [a, 1.0 - a], axis=0)
    return float(lo), float(hi)


def bootstrap_ci(values, units=None, n_boot: int = 1000, level: float = 0.95,
                 seed: int = 0) -> tuple[float, float, float]:
    """``(mean, lo, hi)``: the event-level mean and its cluster-bootstrap percentile CI.

    ``units=None`` resamples single events (an ordinary bootstrap); pass the
    session ids (or user ids) to resample whole sessions (users). Defaults:
    1000 resamples, 95 %, ``seed=0``. ``mean`` is the plain mean of ``values``
    (not the mean of the resamples).
    """
    v = _as_values(values)
    dist = bootstrap_distribution(v, units, n_boot, seed)
    lo, hi = percentile_interval(dist, level)
    return float(v.mean()), lo, hi


def paired_bootstrap_diff(a, b, units=None, n_boot: int = 1000, level: float = 0.95,
                          seed: int = 0) -> tuple[float, float, float]:
    """``(mean(a) - mean(b), lo, hi)`` for two runs scored on the SAME events (row i = row i).

    Both runs are resampled with the same draws (the per-event difference
    ``a - b`` is resampled), so the interval reflects only how the runs
    differ on the same units; identical runs give exactly ``(0, 0, 0)``.
    """
    a, b = _as_values(a), _as_values(b)
    if a.shape != b.shape:
        raise ValueError(f"paired runs must score the same events: {a.shape} vs {b.shape}")
    d = a - b
    dist = bootstrap_distribution(d, units, n_boot, seed)
    lo, hi = percentile_interval(dist, level)
    return float(d.mean()), lo, hi


def wilcoxon(a_unit_means, b_unit_means, zero_method: str = "wilcox", method: str = "auto") -> float:
    """Two-sided p-value of the paired Wilcoxon signed-rank test (``scipy.stats.wilcoxon``).

    Inputs are per-unit values of two runs on the same units, in the same
    order (``unit_means``' ``means`` of each run). ``zero_method="wilcox"``
    (default) drops units whose difference is exactly zero before ranking --
    the classic test; with session-level Recall many sessions tie (both runs
    hit or both miss), and those carry no information about which run is
    better. ``"pratt"`` and ``"zsplit"`` are passed through. ``method`` is
    scipy's (``"auto"``: exact distribution for small samples without ties
    or zeros, normal approximation otherwise). When every difference is zero
    there is no evidence of a difference and 1.0 is returned (scipy would
    raise or return NaN).
    """
    from scipy import stats

    a = np.asarray(a_unit_means, dtype=np.float64)
    b = np.asarray(b_unit_means, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired samples must be 1-d and equally long: {a.shape} vs {b.shape}")
    if np.isnan(a).any() or np.isnan(b).any():
        raise ValueError("unit means contain NaN")
    d = a - b
    if not np.any(d != 0):
        return 1.0
    res = stats.wilcoxon(a, b, zero_method=zero_method, alternative="two-sided", method=method)
    return float(res.pvalue)


def events_digest(session_ids, positions, target_item_ids) -> str:
    """sha256 of the (session_id, position, target_item_id) rows, sorted, as int64 LE triples:
    equal iff two evaluations predicted the same events (metrics.json ``test_digest``,
    ``evaluation.compare``)."""
    import hashlib

    a = np.stack([np.asarray(session_ids, np.int64), np.asarray(positions, np.int64),
                  np.asarray(target_item_ids, np.int64)], 1)
    a = a[np.lexsort((a[:, 2], a[:, 1], a[:, 0]))]
    return hashlib.sha256(np.ascontiguousarray(a.astype("<i8")).tobytes()).hexdigest()
