"""Session-parallel mini-batches (GRU4Rec §3.1.1) and the negative-sample store.

The whole epoch's schedule is computed up front with numpy (no per-step
Python bookkeeping in the hot loop): slot ``b`` at step ``t`` holds one event
of one session; when a session ends, the next unused session (in the given
order) takes the first free slot (lowest slot index first, as in the official
iterator) and that slot's hidden state is reset before the step. When the
sessions run out, slots fall idle one by one and the batch shrinks; the epoch
ends only when the last session is finished (checklist item 6).
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class Schedule:
    """Per-step arrays for one pass over sessions, ``[n_steps, n_slots]``.

    inputs/targets: item_idx (-1 where the slot is idle); reset: the slot starts a
    new session at this step (zero its state first); session: position of the
    session in the order given (-1 idle); n_valid: active slots per step (idle
    slots only ever appear at the end, once sessions run out).
    """

    inputs: np.ndarray
    targets: np.ndarray
    reset: np.ndarray
    session: np.ndarray
    position: np.ndarray  # index of the input event inside its session (0-based)
    n_valid: np.ndarray

    @property
    def n_steps(self) -> int:
        return self.inputs.shape[0]

    @property
    def n_events(self) -> int:
        return int(self.n_valid.sum())


def session_parallel_schedule(items: np.ndarray, offsets: np.ndarray, order: np.ndarray,
                              n_slots: int) -> Schedule:
    """Assign sessions (taken in ``order``) to ``n_slots`` slots; sessions with < 2 events
    produce no step and are skipped."""
    if n_slots < 1:
        raise ValueError("batch size must be >= 1")
    lengths = np.diff(offsets)[order]
    keep = lengths >= 2
    order = np.asarray(order)[keep]
    lengths = lengths[keep]
    n_sess = len(order)
    steps_per = lengths - 1
    slot_of = np.empty(n_sess, np.int64)
    start_of = np.empty(n_sess, np.int64)
    heap = [(0, b) for b in range(n_slots)]  # (first free step, slot): lowest slot wins ties
    for i in range(n_sess):
        free, b = heapq.heappop(heap)
        slot_of[i] = b
        start_of[i] = free
        heapq.heappush(heap, (free + int(steps_per[i]), b))
    n_steps = int((start_of + steps_per).max()) if n_sess else 0
    shape = (n_steps, n_slots)
    inputs = np.full(shape, -1, np.int64)
    targets = np.full(shape, -1, np.int64)
    session = np.full(shape, -1, np.int64)
    position = np.full(shape, -1, np.int64)
    reset = np.zeros(shape, bool)
    if n_sess:
        # one row per training example (every event but the last of each session)
        sess_rep = np.repeat(np.arange(n_sess), steps_per)
        within = np.arange(len(sess_rep)) - np.repeat(np.cumsum(steps_per) - steps_per, steps_per)
        ev = offsets[order][sess_rep] + within
        t = start_of[sess_rep] + within
        b = slot_of[sess_rep]
        inputs[t, b] = items[ev]
        targets[t, b] = items[ev + 1]
        session[t, b] = sess_rep
        position[t, b] = within
        reset[start_of, slot_of] = True
    n_valid = (targets >= 0).sum(1)
    # idle slots only at the tail: a slot never becomes active again once idle
    return Schedule(inputs, targets, reset, session, position, n_valid)


class SampleStore:
    """Extra negatives p(item) ∝ support^alpha, drawn in big chunks before scoring.

    One chunk = ``rows`` samples of ``n_sample`` items (the official cache holds
    10M ids); refilled when used up. Draws use Walker's alias method (exact, two
    uniforms per sample, no binary search: ~10x cheaper than searchsorted over the
    CDF on CPU). A dedicated generator keeps runs reproducible.
    """

    def __init__(self, support: np.ndarray, n_sample: int, alpha: float, store_size: int,
                 generator: torch.Generator, device: torch.device):
        self.n_sample = int(n_sample)
        self.device = device
        self.gen = generator
        w = support.astype(np.float64) ** alpha
        w[support <= 0] = 0.0  # never sample items absent from the training table
        if w.sum() <= 0:
            raise ValueError("no item has positive support: cannot draw negative samples")
        self.prob, self.alias = alias_tables(w / w.sum())
        self.rows = max(1, store_size // max(1, self.n_sample))
        self._chunk = None
        self._ptr = 0

    def _refill(self) -> None:
        n = len(self.prob)
        k = self.rows * self.n_sample
        bucket = torch.randint(0, n, (k,), generator=self.gen)
        u = torch.rand(k, generator=self.gen, dtype=torch.float64)
        idx = torch.where(u < self.prob[bucket], bucket, self.alias[bucket])
        self._chunk = idx.view(self.rows, self.n_sample).to(self.device)
        self._ptr = 0

    def take(self, n_rows: int) -> torch.Tensor:
        """Next ``n_rows`` sample rows ``[n_rows, n_sample]`` (may span refills)."""
        parts = []
        while n_rows > 0:
            if self._chunk is None or self._ptr >= self.rows:
                self._refill()
            k = min(n_rows, self.rows - self._ptr)
            parts.append(self._chunk[self._ptr:self._ptr + k])
            self._ptr += k
            n_rows -= k
        return parts[0] if len(parts) == 1 else torch.cat(parts)


def alias_tables(p: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Walker/Vose alias tables for the distribution ``p`` (sums to 1)."""
    n = len(p)
    q = p * n
    prob = np.zeros(n)
    alias = np.arange(n)
    small = [i for i in range(n) if q[i] < 1.0]
    large = [i for i in range(n) if q[i] >= 1.0]
    while small and large:
        s, l_ = small.pop(), large.pop()
        prob[s] = q[s]
        alias[s] = l_
        q[l_] = q[l_] + q[s] - 1.0
        (small if q[l_] < 1.0 else large).append(l_)
    for i in large + small:  # numerical leftovers: probability 1 of itself
        prob[i] = 1.0
    # an item of probability 0 must never be drawn through its own bucket
    zero = p <= 0
    prob[zero] = 0.0
    alias[zero & (alias == np.arange(n))] = int(np.argmax(p))
    return torch.tensor(prob, dtype=torch.float64), torch.tensor(alias, dtype=torch.int64)
