"""Next-item metrics of a scorer on a table, for early stopping inside the trainer.

The same protocol as ``evaluation.loop`` (every position after the first, each session
from a zero state, full ranking, ties counted against the model), reduced to what the
trainer needs: one metric. It lives here so that session-mode training never imports
``evaluation``; tests/training/test_trainer.py checks that both give the same numbers.
User mode (``early_stop_mode=user``: each user's history fed first, the user state carried)
is the evaluation loop itself (``evaluation.loop.evaluate_sessions``, imported on use), not
a second copy of its user-lane layout.
"""
from __future__ import annotations

import numpy as np
import torch

from training.batching import session_parallel_schedule
from training.data import SessionData


@torch.no_grad()
def conservative_ranks(scorer, data: SessionData, n_slots: int = 256) -> np.ndarray:
    """Rank of every target (1 + #items scoring >= it, itself excluded)."""
    order = np.lexsort((data.session_ids, data.start_ts))
    sch = session_parallel_schedule(data.items, data.offsets, order, n_slots)
    dev = scorer.device
    state = scorer.begin(n_slots)
    out = []
    for t in range(sch.n_steps):
        starting = torch.from_numpy(sch.reset[t])
        if bool(starting.any()):
            state = scorer.start_session(state, starting.to(dev), None)
        scores, state = scorer.step(state, torch.from_numpy(sch.inputs[t]).clamp(min=0).to(dev))
        y = torch.from_numpy(sch.targets[t])
        rows = torch.nonzero(y >= 0).squeeze(1)
        s = scores[rows.to(dev)].float()
        tgt = s.gather(1, y[rows].to(dev).unsqueeze(1))
        out.append(((s >= tgt).sum(1)).cpu().numpy())  # counts the target itself: = 1 + others
    return np.concatenate(out).astype(np.float64) if out else np.zeros(0)


def user_mode_ranks(scorer, data: SessionData, history: list[SessionData], n_slots: int = 256) -> np.ndarray:
    """Conservative ranks (1 + #other items scoring >= the target) of every target of ``data``
    scored by the evaluation loop in user mode: each user's ``history`` sessions are fed
    first, unscored, then the user's sessions of ``data``."""
    from evaluation.loop import evaluate_sessions

    res = evaluate_sessions(scorer, data, n_slots=n_slots, mode="user", history=history)
    return (1 + res.greater + res.ties).astype(np.float64)


def metric(name: str, rank: np.ndarray) -> float:
    """``recall_at_K`` | ``mrr_at_K`` of conservative ranks."""
    kind, _, k = name.rpartition("_at_")
    if kind not in ("recall", "mrr") or not k.isdigit():
        raise ValueError(f"early_stop_metric {name!r}: use recall_at_K or mrr_at_K (e.g. mrr_at_20)")
    hit = rank <= int(k)
    if not len(rank):
        return float("nan")
    return float(hit.mean()) if kind == "recall" else float(np.where(hit, 1.0 / rank, 0.0).mean())
