"""PPOP, "Personal Pop" (Quadrana et al. 2017's baseline): "recommends the item with the
largest number of interactions by the user", ties (and users without interactions) by
global popularity::

    score(i) = user_count(i) * BIG + pop(i) / (max_pop + 1),   BIG = 1

(``training.baselines.spop`` explains BIG and the order-equivalent popularity term that is
actually used for float32 precision.) ``user_count(i)`` = the user's interactions with i in
the TRAINING table (stored per user in the checkpoint) + the events of the current session
so far, the current one included: everything the user has done up to the prediction, in
Quadrana et al.'s setting (the test set = the last session of each user, every earlier
session in training). A user with no training events (user id -1, or a user not in the
training table) gets only the current session's counts, i.e. POP outside the session
(S-POP); on a table without user ids (rsc15) PPOP is S-POP.

Why a per-user table in the checkpoint, and not counts accumulated from the events the
scorer is fed: the scorer sees a user's history only in ``--mode user`` (the loop feeds the
user's ``--history-tables`` sessions unscored); in session mode it sees each test session
alone. Reading the user's counts from the checkpoint at every ``start_session(state, slots,
users)`` gives the same, schedule-independent answer in both modes (session mode passes the
test table's user ids too), and the bootstrap sessions of user mode change nothing (every
session restarts from the table, so fed history events are never counted twice). The
price: a user's EARLIER TEST sessions (a global time split gives some users several) are not
added; carrying counts from one session to the next in a slot would depend on the slot
schedule in session mode (which lays sessions out longest first, not in time order).

Checkpoint: users (sorted int64 [U]), CSR row pointers [U+1], item_idx [nnz] and counts
[nnz] of the training table, plus the support (tensors only).

Train (nothing to learn: one checkpoint, epoch 0) and evaluate per user::

    python -m training.train --model ppop --data SPLIT_DIR --out RUN_DIR
    python -m evaluation.evaluate --model-dir RUN_DIR --data SPLIT_DIR --out EVAL_DIR --mode user
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from training.baselines.spop import SPopScorer
from training.config import CommonConfig
from training.data import SessionData
from training.family import Family, TrainContext


@dataclass
class PPopConfig(CommonConfig):
    """PPOP: the user's training counts + the session so far, ties by global popularity."""

    model: str = "ppop"
    n_epochs: int = 0


def user_item_counts(data: SessionData, n_items: int):
    """CSR of (user, item) counts over the events of sessions with a user id >= 0:
    ``(user_ids sorted [U], indptr [U+1], items [nnz], counts [nnz])`` as numpy arrays."""
    empty = (np.zeros(0, np.int64), np.zeros(1, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32))
    if data.user_ids is None or data.n_sessions == 0:
        return empty
    ev_user = np.repeat(data.user_ids, np.diff(data.offsets))
    known = ev_user >= 0
    if not known.any():
        return empty
    uniq, inv = np.unique(ev_user[known], return_inverse=True)
    key = inv.astype(np.int64) * n_items + data.items[known]
    keys, counts = np.unique(key, return_counts=True)  # sorted by (user, item)
    rows = keys // n_items
    indptr = np.r_[0, np.cumsum(np.bincount(rows, minlength=len(uniq)))].astype(np.int64)
    return uniq.astype(np.int64), indptr, (keys % n_items).astype(np.int64), counts.astype(np.float32)


class PPopFamily(Family):
    name = "ppop"
    Config = PPopConfig
    trainable = False

    def __init__(self, cfg, ctx: TrainContext):
        super().__init__(cfg, ctx)
        self.support = torch.from_numpy(ctx.support.astype("int64"))
        self.table = tuple(torch.from_numpy(a) for a in user_item_counts(ctx.data, ctx.index.n_items))

    def state_dict(self) -> dict:
        u, ptr, it, cnt = self.table
        return {"support": self.support.clone(), "user_ids": u.clone(), "user_indptr": ptr.clone(),
                "user_items": it.clone(), "user_counts": cnt.clone()}

    def load_weights(self, state_dict: dict) -> None:
        pass  # recounted from the (new) training table: "fine-tuning" = refitting on it

    @classmethod
    def scorer(cls, ckpt: dict, device: torch.device):
        sd = ckpt["state_dict"]
        return SPopScorer(sd["support"], device,
                          (sd["user_ids"], sd["user_indptr"], sd["user_items"], sd["user_counts"]))
