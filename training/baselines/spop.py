"""S-POP: the current session's most frequent items, ties broken by global popularity
(Hidasi et al. 2016's second baseline: "recommends the most popular items of the current
session ... Ties are broken up using global popularity values").

The score of item i after the events of the session so far (the current one included)::

    score(i) = count_in_session(i) * BIG + pop(i) / (max_pop + 1),   BIG = 1

``pop / (max_pop + 1)`` lies in [0, 1) and counts are integers, so BIG = 1 already makes a
session count always dominate (an item seen once outranks every unseen item, one seen twice
every item seen once), and among equal counts the globally more popular item ranks first;
items not in the session rank by popularity (POP). A larger BIG would only cost float32
precision. The tie-break term actually used is the order-equivalent dense popularity rank
``rank(pop(i)) / n_levels`` (``rank`` over the distinct support values, 0 = least popular):
the same order as ``pop / (max_pop + 1)``, but spaced ``1 / n_levels`` apart instead of
``1 / (max_pop + 1)``, so float32 keeps every popularity tie-break exact while
``count * n_levels < 2^23`` (about 8M; the items of equal support still tie, as they do
in POP). session-rec's ``SessionPop`` adds ``supp / (supp + 1)`` for its 100 most popular
items only; this one ranks the whole catalogue by popularity.

State: dense per-slot counts ``[rows, n_items]`` float32 (reset at ``start_session``,
``select`` keeps the rows the loop still uses). :class:`SPopScorer` also serves PPOP
(``training.baselines.ppop``), which starts every session from the user's training counts.

Train (nothing to learn: the trainer writes one checkpoint, epoch 0, with the support)::

    python -m training.train --model spop --data SPLIT_DIR --out RUN_DIR
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from training.config import CommonConfig
from training.family import Family, TrainContext
from training.scoring import SessionScorerBase

#: weight of one in-session (or user) occurrence; the popularity term is < 1
BIG = 1.0


@dataclass
class SPopConfig(CommonConfig):
    """S-POP: session counts, ties by global popularity (no parameters)."""

    model: str = "spop"
    n_epochs: int = 0


def popularity_tiebreak(support) -> torch.Tensor:
    """float32 [n_items] in [0, 1): dense rank of each item's support / number of distinct
    supports (same order as ``support / (max_support + 1)``; module docstring)."""
    sup = np.asarray(support.numpy() if isinstance(support, torch.Tensor) else support, np.int64)
    levels, inv = np.unique(sup, return_inverse=True)
    return torch.from_numpy((inv.reshape(-1) / len(levels)).astype(np.float32))


class SPopScorer(SessionScorerBase):
    """Counts of the session so far (+ optionally the user's training counts) + popularity.

    ``user_table`` (PPOP): ``(user_ids sorted int64 [U], indptr int64 [U+1], items int64 [nnz],
    counts float32 [nnz])``, the training counts of each user (CSR); a session of a user in
    it starts from those counts, any other session (user -1 / unseen) from zeros."""

    def __init__(self, support: torch.Tensor, device: torch.device, user_table=None):
        self.device = device
        self.tie = popularity_tiebreak(support).to(device)
        self.n_items = int(self.tie.shape[0])
        self.table = None
        if user_table is not None:
            u, ptr, it, cnt = user_table
            self.table = (u.to(device, torch.int64), ptr.to(device, torch.int64),
                          it.to(device, torch.int64), cnt.to(device, torch.float32))

    def begin(self, n_slots: int):
        return torch.zeros(n_slots, self.n_items, dtype=torch.float32, device=self.device)

    def select(self, state, rows):
        return state.index_select(0, rows)

    def start_session(self, state, slots, users):
        slots = slots.to(self.device)
        state = state.masked_fill(slots.unsqueeze(1), 0.0)
        if self.table is None or users is None:
            return state
        uid, ptr, it, cnt = self.table
        rows = torch.nonzero(slots).squeeze(1)
        u = users.to(self.device, torch.int64)[rows]
        if not len(uid) or not len(rows):
            return state
        pos = torch.searchsorted(uid, u).clamp(max=len(uid) - 1)
        found = (uid[pos] == u) & (u >= 0)
        rows, pos = rows[found], pos[found]
        lens = ptr[pos + 1] - ptr[pos]
        total = int(lens.sum())
        if total == 0:
            return state
        rr = torch.repeat_interleave(rows, lens)
        first = torch.repeat_interleave(torch.cumsum(lens, 0) - lens, lens)
        ev = torch.repeat_interleave(ptr[pos], lens) + torch.arange(total, device=self.device) - first
        state[rr, it[ev]] = cnt[ev]
        return state

    @torch.no_grad()
    def step(self, state, items):
        ar = torch.arange(items.shape[0], device=self.device)
        state[ar, items] += 1.0  # rows are distinct: a plain in-place increment
        return state * BIG + self.tie, state


class SPopFamily(Family):
    name = "spop"
    Config = SPopConfig
    trainable = False

    def __init__(self, cfg, ctx: TrainContext):
        super().__init__(cfg, ctx)
        self.support = torch.from_numpy(ctx.support.astype("int64"))

    def state_dict(self) -> dict:
        return {"support": self.support.clone()}

    def load_weights(self, state_dict: dict) -> None:
        pass  # recounted from the (new) training table: "fine-tuning" = refitting on it

    @classmethod
    def scorer(cls, ckpt: dict, device: torch.device):
        return SPopScorer(ckpt["state_dict"]["support"], device)
