"""Ranks with explicit tie handling, and Recall / MRR / Precision @ K from ranks.

Rank of the target = 1 + #items scoring strictly higher + a share of the other
items scoring exactly the same (the target itself is never counted):

* ``conservative`` (default): every tie counts against the model  -> 1 + greater + ties
* ``optimistic``: ties count for the model                          -> 1 + greater
* ``median``: half of the ties                                       -> 1 + greater + ties / 2

Ties are counted, never broken by sort order (checklist item 9); Recall@K
counts rank <= K, not < K (checklist item 8).
"""
from __future__ import annotations

import numpy as np
import torch

TIE_MODES = ("conservative", "optimistic", "median")
DEFAULT_KS = (1, 5, 10, 20)


def greater_and_ties(scores: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For each row: (#items with score > target's, #OTHER items with score == target's)."""
    if torch.isnan(scores).any():
        raise FloatingPointError("model produced NaN scores; ranks would be meaningless")
    t = scores.gather(1, targets.unsqueeze(1))
    greater = (scores > t).sum(1)
    ties = (scores == t).sum(1) - 1  # exclude the target itself
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
    """{recall_at_K, mrr_at_K, precision_at_K} for each K (keys are MLflow-safe: no '@')."""
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
    return out
