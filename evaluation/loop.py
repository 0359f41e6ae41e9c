"""The one evaluation loop: next-item prediction at every position, full ranking.

Test sessions are walked session-parallel (the same schedule as training):
slot ``b`` feeds one event per step; when its session ends the next session
takes the slot and the scorer is told (``end_session`` then ``start_session``)
so the state is reset per session (checklist item 1). Every step scores all
training items for every slot, and the target's rank counts ties explicitly
(``evaluation.metrics``). Per-event results are returned for breakdowns and
significance tests.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from evaluation.metrics import greater_and_ties
from training.batching import session_parallel_schedule
from training.data import SessionData


@dataclass
class EvalResult:
    session_idx: np.ndarray  # index into SessionData (0..n_sessions-1)
    position: np.ndarray  # 0-based position of the INPUT event (prediction of event position+1)
    target: np.ndarray  # item_idx of the predicted event
    greater: np.ndarray  # #items scored above the target
    ties: np.ndarray  # #other items scored equal to the target
    seconds: float

    @property
    def n_events(self) -> int:
        return len(self.target)


def evaluate_sessions(scorer, data: SessionData, n_slots: int = 512) -> EvalResult:
    # Sessions are independent (state reset per session), so the order only affects speed:
    # longest first keeps the slots full until the very end instead of a long tail of
    # steps in which a few long sessions occupy an otherwise idle batch.
    order = np.lexsort((data.session_ids, data.start_ts, -np.diff(data.offsets)))
    sch = session_parallel_schedule(data.items, data.offsets, order, n_slots)
    dev = scorer.device
    X = torch.from_numpy(sch.inputs)
    Y = torch.from_numpy(sch.targets)
    R = torch.from_numpy(sch.reset)
    # schedule session numbers index the order restricted to sessions with >= 2 events
    kept_order = np.asarray(order)[np.diff(data.offsets)[order] >= 2]
    users_by_sess = None
    if data.user_ids is not None:
        users_by_sess = torch.from_numpy(data.user_ids[kept_order])
    out_sess, out_pos, out_tgt, out_g, out_t = [], [], [], [], []
    t0 = time.perf_counter()
    state = scorer.begin(n_slots)
    occupied = torch.zeros(n_slots, dtype=torch.bool)
    can_shrink = hasattr(scorer, "select")
    slots = torch.arange(n_slots)  # row of the scorer's state -> schedule slot
    for t in range(sch.n_steps):
        Yt = Y[t][slots]
        valid = Yt >= 0
        # idle slots never come back (they only appear once sessions run out), so a scorer
        # that can drop state rows stops paying for them
        if can_shrink and int(valid.sum()) <= len(slots) // 2:
            keep = torch.nonzero(valid).squeeze(1)
            state = scorer.select(state, keep.to(dev))
            slots, occupied, Yt, valid = slots[keep], occupied[keep], Yt[keep], valid[keep]
        starting = R[t][slots]
        if bool(starting.any()):
            ended = starting & occupied
            if bool(ended.any()):
                state = scorer.end_session(state, ended.to(dev))
            users = None
            if users_by_sess is not None:
                s = torch.from_numpy(sch.session[t])[slots]
                users = torch.where(s >= 0, users_by_sess[s.clamp(min=0)], torch.full_like(s, -1)).to(dev)
            state = scorer.start_session(state, starting.to(dev), users)
            occupied |= starting
        scores, state = scorer.step(state, X[t][slots].clamp(min=0).to(dev))
        rows = torch.nonzero(valid).squeeze(1)
        if rows.numel() == 0:
            continue
        g, ti = greater_and_ties(scores[rows.to(dev)], Yt[rows].to(dev))
        out_g.append(g.cpu())
        out_t.append(ti.cpu())
        r = slots[rows].numpy()
        out_sess.append(sch.session[t][r])
        out_pos.append(sch.position[t][r])
        out_tgt.append(sch.targets[t][r])
    if occupied.any():
        state = scorer.end_session(state, occupied.to(dev))
    secs = time.perf_counter() - t0
    cat = (lambda xs: np.concatenate(xs)) if out_tgt else (lambda xs: np.zeros(0, np.int64))
    sess_in_order = cat(out_sess)
    return EvalResult(
        session_idx=kept_order[sess_in_order] if len(sess_in_order) else sess_in_order,
        position=cat(out_pos), target=cat(out_tgt),
        greater=torch.cat(out_g).numpy() if out_g else np.zeros(0, np.int64),
        ties=torch.cat(out_t).numpy() if out_t else np.zeros(0, np.int64), seconds=secs)
