"""Ranks with explicit tie handling, and Recall / MRR / Precision @ K from ranks.

Rank of the target = 1 + #items scoring strictly higher + a share of the other
items scoring exactly the same (the target itself is never counted):

* ``conservative`` (default): every tie counts against the model  -> 1 + greater + ties
* ``optimistic``: ties count for the model                          -> 1 + greater
* ``median``: half of the ties                                       -> 1 + greater + ties / 2

Ties are counted, never broken by sort order (checklist item 9); Recall@K
counts rank <= K, not < K (checklist item 8). NDCG@K for one target is
1 / log2(rank + 1) when rank <= K, else 0.

Recall@K,N (Villatel et al. 2018) and recall per future step work on the
loop's ``future_rank`` matrix ``[n_events, n_future]``: column d holds the
conservative rank (1 + #other items scoring >= it) of the item d+1 steps ahead
under the SAME score vector, exact up to the loop's ``top_k`` (``top_k + 1``
means "beyond"), 0 where the session ended before it. A prediction is a hit
for Recall@K,N if ANY of the next N items (truncated at the session end) has
rank <= K; the denominator is every prediction.
"""
from __future__ import annotations

import numpy as np
import torch

TIE_MODES = ("conservative", "optimistic", "median")
DEFAULT_KS = (1, 5, 10, 20)


def greater_and_ties(scores: torch.Tensor, targets: torch.Tensor,
                     check_nan: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """For each row: (#items with score > target's, #OTHER items with score == target's).

    ``check_nan=False`` only for callers that have checked the rows for NaN themselves."""
    # one sum is ~20x cheaper than isnan().any(); it is NaN if any score is NaN (or on
    # +inf - inf, where the exact check decides)
    if check_nan and torch.isnan(scores.sum()) and torch.isnan(scores).any():
        raise FloatingPointError("model produced NaN scores; ranks would be meaningless")
    t = scores.gather(1, targets.unsqueeze(1))
    # int32 sums are ~2x faster than the default int64 on CPU (n_items < 2**31)
    greater = (scores > t).sum(1, dtype=torch.int32)
    ties = (scores == t).sum(1, dtype=torch.int32) - 1  # exclude the target itself
    return greater, ties


def rank_from_counts(greater, ties, mode: str = "conservative"):
    if mode == "conservative":
        return 1.0 + greater + ties
    if mode == "optimistic":
        return 1.0 + greater
    if mode == "median":
        return 1.0 + greater + ties / 2.0
    raise ValueError(f"unknown tie mode {mode!r}; choose one of {TIE_MODES}")


def ranks(scores: torch.Tensor, targets: torch.Tensor, mode: str = "conservative") -> torch.Tensor:
    g, t = greater_and_ties(scores, targets)
    return rank_from_counts(g.double(), t.double(), mode)


def metrics_from_ranks(rank: np.ndarray, ks=DEFAULT_KS) -> dict[str, float]:
    """{recall_at_K, mrr_at_K, precision_at_K, ndcg_at_K} for each K (MLflow-safe keys: no '@')."""
    rank = np.asarray(rank, dtype=np.float64)
    out: dict[str, float] = {}
    n = len(rank)
    for k in ks:
        hit = rank <= k
        rec = float(hit.mean()) if n else float("nan")
        out[f"recall_at_{k}"] = rec
        out[f"mrr_at_{k}"] = float(np.where(hit, 1.0 / rank, 0.0).mean()) if n else float("nan")
        # single target per prediction: precision@K = recall@K / K
        out[f"precision_at_{k}"] = rec / k if n else float("nan")
        ndcg = np.where(hit, 1.0 / np.log2(rank + 1.0), 0.0)
        out[f"ndcg_at_{k}"] = float(ndcg.mean()) if n else float("nan")
    return out


DEFAULT_NS = (1, 5, 20)


def future_hits(future_rank: np.ndarray, k: int, n: int) -> np.ndarray:
    """bool [n_events]: any of the next ``n`` items has rank <= ``k`` (rank 0 = no item)."""
    fr = np.asarray(future_rank)[:, :n]
    return ((fr >= 1) & (fr <= k)).any(1)


def recall_at_k_n(future_rank: np.ndarray, ks=DEFAULT_KS, ns=DEFAULT_NS, top_k: int = 20) -> dict[str, float]:
    """{recall_at_K_n_N} for K in ks (K <= top_k: ranks are exact only up to there), N in ns."""
    fr = np.asarray(future_rank)
    out: dict[str, float] = {}
    for k in ks:
        if k > top_k:
            continue
        for n in ns:
            if n > fr.shape[1]:
                continue
            out[f"recall_at_{k}_n_{n}"] = float(future_hits(fr, k, n).mean()) if len(fr) else float("nan")
    return out


def recall_per_step(future_rank: np.ndarray, ks=DEFAULT_KS, top_k: int = 20) -> list[dict]:
    """One row per future step d = 1..n_future: n_events (predictions that have an item d
    steps ahead) and recall_at_K (that item has rank <= K) for K in ks, K <= top_k."""
    fr = np.asarray(future_rank)
    rows = []
    for d in range(fr.shape[1]):
        col = fr[:, d]
        has = col >= 1
        row: dict = {"step": d + 1, "n_events": int(has.sum())}
        for k in ks:
            if k <= top_k:
                row[f"recall_at_{k}"] = float((col[has] <= k).mean()) if has.any() else None
        rows.append(row)
    return rows


def coverage_and_popularity(top_counts: np.ndarray, support: np.ndarray) -> tuple[float, float]:
    """From ``top_counts[i]`` = #top-K lists holding item i: (catalogue coverage = fraction of
    items in at least one list, mean training support of the recommended items)."""
    tc = np.asarray(top_counts, np.float64)
    n = tc.sum()
    cov = float((tc > 0).mean()) if len(tc) else float("nan")
    pop = float((tc * np.asarray(support, np.float64)).sum() / n) if n else float("nan")
    return cov, pop
