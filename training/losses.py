"""GRU4Rec losses over a sampled score matrix, plus final activations.

Layout shared by every loss: ``R`` is ``[B, S]``; row ``i`` is mini-batch
slot ``i``; column ``j < B`` is the target of slot ``j`` (in-batch negatives
for the other rows), columns ``j >= B`` are the shared extra negatives. The
target of row ``i`` is therefore column ``i`` (the diagonal). Every loss
returns the SUM over rows (the trainer divides by the nominal batch size, as
the official code does). "Negatives" of row ``i`` = every column except ``i``;
duplicates of the target item among them are kept, as in the official code.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

LOSSES = ("top1", "bpr", "top1-max", "bpr-max", "cross-entropy")


def _neg_mask(R: torch.Tensor) -> torch.Tensor:
    m = torch.ones_like(R, dtype=torch.bool)
    m.diagonal().fill_(False)
    return m


def softmax_neg(R: torch.Tensor) -> torch.Tensor:
    """Softmax of each row over its negatives only (the target column gets weight 0)."""
    mask = _neg_mask(R)
    X = R.masked_fill(~mask, float("-inf"))
    return torch.softmax(X, dim=1)


def xe_loss(R: torch.Tensor, logq_cols: torch.Tensor | None = None) -> torch.Tensor:
    """Sampled softmax cross-entropy; ``logq_cols`` [S] (already times the logq weight) is
    subtracted from every row first (logQ correction for popularity-biased sampling)."""
    if logq_cols is not None:
        R = R - logq_cols
    return -torch.log_softmax(R, dim=1).diagonal().sum()


def top1_loss(R: torch.Tensor) -> torch.Tensor:
    """TOP1 (paper eq.): mean over negatives j of sigmoid(r_j - r_i) + sigmoid(r_j^2)."""
    ri = R.diagonal().unsqueeze(1)
    mask = _neg_mask(R)
    terms = (torch.sigmoid(R - ri) + torch.sigmoid(R * R)) * mask
    return (terms.sum(1) / mask.sum(1)).sum()


def bpr_loss(R: torch.Tensor) -> torch.Tensor:
    """BPR (paper eq.): -mean over negatives j of log sigmoid(r_i - r_j)."""
    ri = R.diagonal().unsqueeze(1)
    mask = _neg_mask(R)
    terms = -F.logsigmoid(ri - R) * mask
    return (terms.sum(1) / mask.sum(1)).sum()


def top1_max_loss(R: torch.Tensor) -> torch.Tensor:
    """TOP1-max: sum_j softmax_neg(r)_j * (sigmoid(r_j - r_i) + sigmoid(r_j^2))."""
    ri = R.diagonal().unsqueeze(1)
    s = softmax_neg(R)
    return (s * (torch.sigmoid(R - ri) + torch.sigmoid(R * R))).sum()


def bpr_max_loss(R: torch.Tensor, bpreg: float) -> torch.Tensor:
    """BPR-max: -log(sum_j s_j sigmoid(r_i - r_j)) + bpreg * sum_j s_j r_j^2, s = softmax over
    the negatives only (the positive is NOT inside the softmax: checklist item 3)."""
    ri = R.diagonal().unsqueeze(1)
    s = softmax_neg(R)
    # 1e-24 as in the official code: keeps log finite when every sigmoid underflows
    main = -torch.log((s * torch.sigmoid(ri - R)).sum(1) + 1e-24)
    reg = bpreg * (s * R * R).sum(1)
    return (main + reg).sum()


def parse_activation(name: str):
    """Final activation by name -> (fn, name). 'softmax' means linear scores fed to the
    cross-entropy's own softmax (so it is never applied twice: checklist item 2)."""
    if name in ("linear", "softmax"):
        return None
    if name == "tanh":
        return torch.tanh
    if name == "relu":
        return torch.relu
    if name.startswith("elu-"):
        a = float(name.split("-", 1)[1])
        return lambda x: F.elu(x, alpha=a)
    if name.startswith("leaky-"):
        a = float(name.split("-", 1)[1])
        return lambda x: F.leaky_relu(x, negative_slope=a)
    raise ValueError(f"unknown final activation {name!r} (linear|softmax|tanh|relu|elu-<a>|leaky-<a>)")


def check_loss_config(loss: str, final_act: str) -> None:
    if loss not in LOSSES:
        raise ValueError(f"unknown loss {loss!r}; choose one of {', '.join(LOSSES)}")
    parse_activation(final_act)
    if final_act == "softmax" and loss != "cross-entropy":
        raise ValueError(f"final_act 'softmax' only goes with cross-entropy, not {loss!r}")
    if loss == "cross-entropy" and final_act not in ("softmax", "linear"):
        raise ValueError(
            "cross-entropy applies its own softmax to linear scores; set final_act=softmax "
            f"(got {final_act!r})"
        )


def sampled_loss(R: torch.Tensor, loss: str, final_act: str, bpreg: float = 0.0,
                 logq_cols: torch.Tensor | None = None) -> torch.Tensor:
    """Dispatch by name (autograd path; the fast trainer has a closed form for cross-entropy)."""
    act = parse_activation(final_act)
    if act is not None:
        R = act(R)
    if loss == "cross-entropy":
        return xe_loss(R, logq_cols)
    if loss == "top1":
        return top1_loss(R)
    if loss == "bpr":
        return bpr_loss(R)
    if loss == "top1-max":
        return top1_max_loss(R)
    if loss == "bpr-max":
        return bpr_max_loss(R, bpreg)
    raise ValueError(f"unknown loss {loss!r}")
