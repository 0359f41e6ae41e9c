"""Batch schedules for the RNN trainers, and the negative-sample store.

Three schedules, all computed up front with numpy (no per-step Python
bookkeeping in the hot loop); sessions with fewer than 2 events produce no
(input, target) pair and are skipped by all three:

* ``session_parallel_schedule`` -> ``Schedule`` (GRU4Rec §3.1.1): slot ``b`` at
  step ``t`` holds one event of one session; when a session ends, the next
  unused session (in the given order) takes the first free slot (lowest slot
  index first, as in the official iterator) and that slot's hidden state is
  reset before the step. When the sessions run out, slots fall idle one by one
  and the batch shrinks; the epoch ends only when the last session is finished
  (checklist item 6).
* ``user_parallel_schedule`` -> ``UserSchedule`` (HRNN, Quadrana et al. 2017):
  the same one-event-per-step layout, but a slot walks through all sessions of
  one user back to back, in time order, with flags telling the trainer where a
  session ends (update the user-level state), where a new session starts
  (re-initialise the session state from the user state) and where a new user
  starts (reset the user state as well).
* ``sequence_batches`` -> ``list[SeqBatch]`` (Tan et al. 2016, Donkers et al.
  2017): whole sessions as right-padded ``[B, T]`` sequences for BPTT, either
  truncated to their most recent ``max_len`` pairs (grouped by length so that
  padding is small, and ``pack`` turns them into a ``PackedSequence`` so that the
  RNN never runs on padding) or split into ``max_len`` windows laid out
  session-parallel with a ``carry`` flag for truncated BPTT.
* ``stream_windows`` -> ``list[StreamBatch]`` (truncated BPTT over session-parallel streams,
  Villatel et al. 2018): ``session_parallel_schedule`` cut into windows of ``window``
  steps, ``[B, T]`` each, with a ``reset`` flag where a new session starts inside a row;
  the state is carried from one window to the next. No padding but the epoch's tail.
"""
from __future__ import annotations

import heapq
import os
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
        """Number of (input, target) pairs in the schedule."""
        return int(self.n_valid.sum())


def session_parallel_schedule(items: np.ndarray, offsets: np.ndarray, order: np.ndarray,
                              n_slots: int) -> Schedule:
    """Assign sessions (taken in ``order``) to ``n_slots`` slots; sessions with < 2 events
    produce no step and are skipped. The whole epoch as one :class:`StreamedSchedule` chunk,
    with each entry's session and position."""
    st = StreamedSchedule(items, offsets, order, n_slots)
    ch = st.chunk(0, st.n_steps, with_sessions=True)
    # idle slots only at the tail: a slot never becomes active again once idle
    return Schedule(ch.inputs, ch.targets, ch.reset, ch.session, ch.position, ch.n_valid)


def _assign_slots(offsets: np.ndarray, order: np.ndarray, n_slots: int):
    """Which slot each session (in ``order``, those with >= 2 events) takes and at which step:
    the next session takes the slot that falls free first (lowest slot on ties, as the official
    iterator). Returns (order kept, steps per session, slot, first step, total steps); the
    first steps are non-decreasing along the order."""
    if n_slots < 1:
        raise ValueError("batch size must be >= 1")
    lengths = np.diff(offsets)[order]
    keep = lengths >= 2
    order = np.asarray(order)[keep]
    steps_per = lengths[keep] - 1
    slot_of, start_of = parallel_slots(steps_per, n_slots)
    n_steps = int((start_of + steps_per).max()) if len(order) else 0
    return order, steps_per, slot_of, start_of, n_steps


#: from this many jobs on, parallel_slots runs in C (kernels.c rnn_parallel_slots) when the
#: kernels are there: the Python heap took ~15 ms of a 0.6 s rsc15 epoch (17,794 sessions)
NATIVE_SLOTS_MIN = 4096


def parallel_slots(durations: np.ndarray, n_slots: int) -> tuple[np.ndarray, np.ndarray]:
    """Jobs of the given durations, in order, each to the slot that falls free first (lowest
    slot on ties): (slot, first step) per job. In C for many jobs (:data:`NATIVE_SLOTS_MIN`;
    ``RNNREC_NATIVE=0`` or no compiler: this Python loop, the reference)."""
    n = len(durations)
    slot_of = np.empty(n, np.int64)
    start_of = np.empty(n, np.int64)
    if n >= NATIVE_SLOTS_MIN and n_slots >= 1 and os.environ.get("RNNREC_NATIVE", "1") != "0":
        from training import native
        lib = native.load()
        if lib is not None:
            dur = np.ascontiguousarray(durations, dtype=np.int64)
            if lib.rnn_parallel_slots(n, dur.ctypes.data, n_slots, slot_of.ctypes.data, start_of.ctypes.data) == 0:
                return slot_of, start_of
    heap = [(0, b) for b in range(n_slots)]  # (first free step, slot)
    for i in range(n):
        free, b = heapq.heappop(heap)
        slot_of[i] = b
        start_of[i] = free
        heapq.heappush(heap, (free + int(durations[i]), b))
    return slot_of, start_of


@dataclass
class ScheduleChunk:
    """Steps ``c0 .. c1 - 1`` of a session-parallel schedule (``[c1 - c0, n_slots]`` arrays,
    equal to the same rows of :func:`session_parallel_schedule`'s)."""

    c0: int
    c1: int
    inputs: np.ndarray
    targets: np.ndarray
    reset: np.ndarray
    n_valid: np.ndarray
    session: np.ndarray | None = None  # with_sessions: position of the session in the order kept
    position: np.ndarray | None = None  # with_sessions: index of the input event in its session


class StreamedSchedule:
    """:func:`session_parallel_schedule`'s inputs / targets / resets, built one chunk of steps
    at a time (:meth:`chunks`): memory O(sessions + chunk x slots) instead of O(steps x slots)
    int64 arrays for the whole epoch (GRU4Rec training: 33 B per step-slot plus ~60 B per event
    of temporaries while building, i.e. several times the training table itself on a large
    table; issue 13, benchmarks/gru4rec_memory.py)."""

    def __init__(self, items: np.ndarray, offsets: np.ndarray, order: np.ndarray, n_slots: int):
        self.items, self.offsets, self.n_slots = items, offsets, n_slots
        self.order, self.steps_per, self.slot_of, self.start_of, self.n_steps = \
            _assign_slots(offsets, order, n_slots)
        self.end_of = self.start_of + self.steps_per
        # prefix max of the end steps: every session before the first index whose prefix max
        # exceeds c0 has ended by step c0
        self._end_pmax = np.maximum.accumulate(self.end_of) if len(self.end_of) else self.end_of

    def chunk(self, c0: int, c1: int, with_sessions: bool = False) -> ScheduleChunk:
        """Steps ``c0 .. c1 - 1``; ``with_sessions``: also each entry's session and position
        (-1 where idle)."""
        lo = int(np.searchsorted(self._end_pmax, c0, side="right"))
        hi = int(np.searchsorted(self.start_of, c1, side="left"))
        idx = np.arange(lo, hi)
        idx = idx[self.end_of[idx] > c0]
        shape = (c1 - c0, self.n_slots)
        inputs = np.full(shape, -1, np.int64)
        targets = np.full(shape, -1, np.int64)
        reset = np.zeros(shape, bool)
        session = np.full(shape, -1, np.int64) if with_sessions else None
        position = np.full(shape, -1, np.int64) if with_sessions else None
        if len(idx):
            t0 = np.maximum(self.start_of[idx], c0)
            t1 = np.minimum(self.end_of[idx], c1)
            cnt = t1 - t0
            rep = np.repeat(np.arange(len(idx)), cnt)
            t = np.repeat(t0, cnt) + (np.arange(len(rep)) - np.repeat(np.cumsum(cnt) - cnt, cnt))
            i = idx[rep]
            within = t - self.start_of[i]
            ev = self.offsets[self.order[i]] + within
            b = self.slot_of[i]
            inputs[t - c0, b] = self.items[ev]
            targets[t - c0, b] = self.items[ev + 1]
            if with_sessions:
                session[t - c0, b] = i
                position[t - c0, b] = within
            st = idx[(self.start_of[idx] >= c0) & (self.start_of[idx] < c1)]
            reset[self.start_of[st] - c0, self.slot_of[st]] = True
        return ScheduleChunk(c0, c1, inputs, targets, reset, (targets >= 0).sum(1), session, position)

    def chunks(self, size: int):
        for c0 in range(0, self.n_steps, size):
            yield self.chunk(c0, min(self.n_steps, c0 + size))


class SampleStore:
    """Extra negatives p(item) ∝ support^alpha, drawn in big chunks before scoring.

    One chunk = ``rows`` samples of ``n_sample`` items (the official cache holds
    10M ids); refilled when used up. Draws use Walker's alias method (exact, two
    uniforms per sample, no binary search: ~10x cheaper than searchsorted over the
    CDF on CPU). A dedicated generator keeps runs reproducible: a ``torch.Generator``, or a
    ``training.rng.CounterStream`` (GRU4Rec), whose draws run in C when the kernels are built
    and are made per :meth:`take`, without a store.
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
        """Next ``n_rows`` sample rows ``[n_rows, n_sample]`` (may span refills). With a
        counter-based stream the rows are drawn right here: a counter stream's draws do not
        depend on how they are grouped, so this equals any store size (tested) and holds no
        store (the 10M-id store was 80 MB; issue 13, benchmarks/gru4rec_memory.py)."""
        if hasattr(self.gen, "alias"):
            return self.gen.alias(n_rows * self.n_sample, self.prob, self.alias).view(
                n_rows, self.n_sample).to(self.device)
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


# ---------------------------------------------------------------------------
# User-parallel mini-batches (HRNN)
# ---------------------------------------------------------------------------


@dataclass
class UserSchedule:
    """Per-step arrays for one pass over users, ``[n_steps, n_slots]`` (HRNN).

    Slot ``b`` walks through the sessions of one user back to back, one event
    per step: input = event ``i``, target = event ``i+1`` of the same session.

    inputs/targets: item_idx (-1 where the slot is idle).
    session: index of the session in the ORIGINAL ``SessionData`` (-1 idle).
    user: the user of that session, as given in ``session_user`` (-1 idle).
    position: 0-based index of the input event inside its session (-1 idle).
    session_start: this slot begins a new session at this step. Before the
        step the trainer must already have finished the slot's previous session
        (the user-level update happens at ``session_end`` of that session) and
        then re-initialise the session state (from the user state in HRNN).
    user_start: this slot begins a new user at this step: reset the user state
        too. ``user_start`` implies ``session_start``.
    session_end: this step is the LAST step of its session in that slot; after
        it, the session representation feeds the user-level GRU update.
    n_valid: active slots per step. Idle slots only appear at the end: once a
        slot is idle it never becomes active again, and the epoch ends only
        when the last user is finished.
    """

    inputs: np.ndarray
    targets: np.ndarray
    session: np.ndarray
    user: np.ndarray
    position: np.ndarray
    session_start: np.ndarray
    user_start: np.ndarray
    session_end: np.ndarray
    n_valid: np.ndarray

    n_steps = Schedule.n_steps
    n_events = Schedule.n_events


def user_parallel_schedule(items: np.ndarray, offsets: np.ndarray, session_user: np.ndarray,
                           session_order_key: np.ndarray, n_slots: int) -> UserSchedule:
    """User-parallel schedule over all sessions of ``offsets`` (HRNN, Quadrana et al. 2017).

    ``session_user[s]`` is the user of session ``s`` (a row index or an id: it is
    returned as given) and ``session_order_key[s]`` orders a user's sessions in
    time (e.g. ``start_ts``; ties by session index). Sessions with < 2 events
    are dropped first; a user left without sessions is skipped. Users are taken
    in the order of their first remaining session (ties by user value); each
    user goes, as a whole, to the first free slot (lowest slot index on ties),
    like sessions in ``session_parallel_schedule``.
    """
    if n_slots < 1:
        raise ValueError("batch size must be >= 1")
    items = np.asarray(items)
    offsets = np.asarray(offsets, np.int64)
    n_all = len(offsets) - 1
    session_user = np.asarray(session_user).astype(np.int64, copy=False)
    key = np.asarray(session_order_key)
    if len(session_user) != n_all or len(key) != n_all:
        raise ValueError(f"session_user ({len(session_user)}) and session_order_key "
                         f"({len(key)}) need one entry per session ({n_all})")
    lengths = np.diff(offsets)
    kept = np.flatnonzero(lengths >= 2)
    # sessions grouped by user, in time order inside a user (ties: session index)
    sess = kept[np.lexsort((kept, key[kept], session_user[kept]))]
    n_sess = len(sess)
    u = session_user[sess]
    steps = lengths[sess] - 1
    new_user = np.ones(n_sess, bool)
    new_user[1:] = u[1:] != u[:-1]
    grp_first = np.flatnonzero(new_user)  # position (in sess) of each user's first session
    n_users = len(grp_first)
    grp_of = np.cumsum(new_user) - 1  # user group of every session
    grp_steps = np.add.reduceat(steps, grp_first) if n_users else np.zeros(0, np.int64)
    # users in the order of their first session (ties by user value)
    user_order = np.lexsort((u[grp_first], key[sess[grp_first]]))
    grp_slot = np.empty(n_users, np.int64)
    grp_t0 = np.empty(n_users, np.int64)
    heap = [(0, b) for b in range(n_slots)]  # (first free step, slot): lowest slot wins ties
    for g in user_order:
        free, b = heapq.heappop(heap)
        grp_slot[g] = b
        grp_t0[g] = free
        heapq.heappush(heap, (free + int(grp_steps[g]), b))
    excl = np.cumsum(steps) - steps  # steps before each session (all users)
    start_of = grp_t0[grp_of] + excl - excl[grp_first][grp_of]
    slot_of = grp_slot[grp_of]
    n_steps = int((start_of + steps).max()) if n_sess else 0
    shape = (n_steps, n_slots)
    inputs = np.full(shape, -1, np.int64)
    targets = np.full(shape, -1, np.int64)
    session = np.full(shape, -1, np.int64)
    user = np.full(shape, -1, np.int64)
    position = np.full(shape, -1, np.int64)
    session_start = np.zeros(shape, bool)
    user_start = np.zeros(shape, bool)
    session_end = np.zeros(shape, bool)
    if n_sess:
        rep = np.repeat(np.arange(n_sess), steps)
        within = np.arange(len(rep)) - np.repeat(excl, steps)
        ev = offsets[sess][rep] + within
        t = start_of[rep] + within
        b = slot_of[rep]
        inputs[t, b] = items[ev]
        targets[t, b] = items[ev + 1]
        session[t, b] = sess[rep]
        user[t, b] = u[rep]
        position[t, b] = within
        session_start[start_of, slot_of] = True
        session_end[start_of + steps - 1, slot_of] = True
        user_start[start_of[grp_first], slot_of[grp_first]] = True
    n_valid = (targets >= 0).sum(1)
    return UserSchedule(inputs, targets, session, user, position, session_start, user_start,
                        session_end, n_valid)


# ---------------------------------------------------------------------------
# Padded sequences for BPTT (truncated or split into windows)
# ---------------------------------------------------------------------------

PAD_INPUT = 0  # input value on padded cells: a valid index, so an embedding of [B, T] never fails


@dataclass
class SeqBatch:
    """One right-padded batch of (input, target) sequences, ``[B, T]``.

    inputs: item_idx of the input events (``PAD_INPUT`` = 0 on padding; never
        scored, and ``pack`` keeps the RNN off it).
    targets: item_idx of the next event (-1 on padding).
    mask: True where the cell is a real (input, target) pair to score.
    lengths: real pairs per row (0 only for an idle row of a "split" tail batch).
    session: index of the row's session in the original sessions (-1 idle row).
    carry: the row continues the previous window of the same session, which
        sat at the same row of the previous batch: start from the hidden state
        left after that window instead of a fresh one ("split" mode only).
    users: user of the row's session (from ``users``), -1 idle; None without users.
    position: 0-based position of the input event in its session (-1 on padding).
    """

    inputs: np.ndarray
    targets: np.ndarray
    mask: np.ndarray
    lengths: np.ndarray
    session: np.ndarray
    carry: np.ndarray
    users: np.ndarray | None
    position: np.ndarray

    @property
    def n_cells(self) -> int:
        return int(self.mask.size)

    @property
    def n_pairs(self) -> int:
        return int(self.lengths.sum())

    @property
    def padding_fraction(self) -> float:
        """Padded cells / all ``B*T`` cells of this batch."""
        return 1.0 - self.n_pairs / self.n_cells if self.n_cells else 0.0

    def packed(self, embedded: torch.Tensor) -> torch.nn.utils.rnn.PackedSequence:
        """``pack(self, embedded)``."""
        return pack(self, embedded)


def pack(batch: SeqBatch, x: torch.Tensor) -> torch.nn.utils.rnn.PackedSequence:
    """PackedSequence of ``x`` (``[B, T, ...]``, batch first, e.g. embedded inputs) over
    ``batch.lengths`` (enforce_sorted=False), so an RNN never runs on right padding.

    Rows keep their batch order for ``h0``/``h_n`` and ``pad_packed_sequence``. An
    idle row (length 0, only at the tail of "split" mode) cannot be packed empty:
    it is given length 1 so that all ``B`` rows stay aligned with the carried
    hidden state; that one step runs on padding, is never scored (mask False),
    and its state is never carried (an idle row never becomes active again).
    """
    lengths = torch.as_tensor(np.maximum(batch.lengths, 1), dtype=torch.int64)
    return torch.nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=True,
                                                   enforce_sorted=False)


def padding_fraction(batches: list[SeqBatch]) -> float:
    """Padded cells / all cells over a list of batches (0 for no batch)."""
    cells = sum(b.n_cells for b in batches)
    pairs = sum(b.n_pairs for b in batches)
    return 1.0 - pairs / cells if cells else 0.0


def _build_batch(items: np.ndarray, offsets: np.ndarray, users: np.ndarray | None,
                 sess: np.ndarray, first: np.ndarray, n: np.ndarray,
                 carry: np.ndarray) -> SeqBatch:
    """Rows: session ``sess`` (-1 idle), pairs ``first .. first+n-1`` of it (pair j =
    events j, j+1), carry flag. T = the longest row."""
    B = len(sess)
    T = int(n.max())
    inputs = np.full((B, T), PAD_INPUT, np.int64)
    targets = np.full((B, T), -1, np.int64)
    position = np.full((B, T), -1, np.int64)
    mask = np.zeros((B, T), bool)
    rows = np.repeat(np.arange(B), n)
    col = np.arange(len(rows)) - np.repeat(np.cumsum(n) - n, n)
    pos = first[rows] + col
    ev = offsets[sess[rows]] + pos
    inputs[rows, col] = items[ev]
    targets[rows, col] = items[ev + 1]
    position[rows, col] = pos
    mask[rows, col] = True
    u = None
    if users is not None:
        u = np.where(sess >= 0, users[np.maximum(sess, 0)], -1).astype(np.int64)
    return SeqBatch(inputs, targets, mask, n.astype(np.int64), sess.astype(np.int64),
                    carry.astype(bool), u, position)


def sequence_batches(items: np.ndarray, offsets: np.ndarray, order: np.ndarray, batch_size: int,
                     max_len: int, mode: str = "truncate", pack: bool = True,
                     users: np.ndarray | None = None, chunk_batches: int = 50) -> list[SeqBatch]:
    """Right-padded ``[B, T]`` batches of whole sessions for BPTT.

    A session of ``L >= 2`` events gives ``L-1`` (input, target) pairs; sessions
    with < 2 events are skipped. ``order`` holds session indices (a shuffled
    epoch order, say); ``users`` optionally maps session -> user for
    ``SeqBatch.users``. ``T`` of a batch is its longest row (never more than
    ``max_len``).

    mode="truncate" (Tan et al. 2016 truncate at 19, Donkers et al. unroll 20):
        a session with more than ``max_len`` pairs keeps only its LAST
        ``max_len`` pairs, i.e. the most recent clicks, whose targets are the
        ones closest to the next prediction; the earlier clicks are dropped
        (``position`` still gives their place in the full session). Every row
        is one whole (truncated) session, ``carry`` is all False.
        pack=True: the kept sessions are cut, in ``order``, into chunks of
        ``chunk_batches * batch_size``; inside a chunk they are sorted by
        pair count (longest first, stable on ties) and cut into batches of
        ``batch_size``, so rows of a batch have similar lengths and padding is
        small. Deterministic given ``order`` (no randomness of its own): the
        caller shuffles ``order`` per epoch, and may shuffle the batch list.
        pack=False: batches are consecutive runs of ``order``.
        Only the last batch can have fewer than ``batch_size`` rows.

    mode="split" (truncated BPTT over whole sessions): a session with ``P``
        pairs becomes ``ceil(P / max_len)`` consecutive windows of ``max_len``
        pairs (the last may be shorter), nothing dropped. The windows are laid
        out session-parallel (like ``session_parallel_schedule``, one window per
        batch instead of one event per step): batch ``k`` has ``B =
        min(batch_size, n_sessions)`` rows; sessions are taken in ``order`` and
        each goes to the row that frees first (lowest row on ties), where its
        windows occupy batches ``k0, k0+1, ...`` at that row. ``carry`` is True
        on every window after the first: the trainer starts that row from the
        hidden state it had after the previous batch (the last real step of the
        previous window, e.g. ``h_n`` of ``pack``) and resets it (zeros) where
        ``carry`` is False. When sessions run out, rows fall idle at the tail
        (length 0, session -1, mask all False) and never become active again.
        ``pack`` does not regroup sessions in this mode (the layout is fixed by
        the session-parallel assignment).
    """
    if batch_size < 1:
        raise ValueError("batch size must be >= 1")
    if max_len < 1:
        raise ValueError("max_len must be >= 1")
    if mode not in ("truncate", "split"):
        raise ValueError(f"mode must be 'truncate' or 'split', got {mode!r}")
    items = np.asarray(items)
    offsets = np.asarray(offsets, np.int64)
    order = np.asarray(order, np.int64)
    if users is not None:
        users = np.asarray(users).astype(np.int64, copy=False)
    pairs = np.diff(offsets)[order] - 1
    keep = pairs >= 1
    order = order[keep]
    pairs = pairs[keep]
    n_sess = len(order)
    if n_sess == 0:
        return []
    out: list[SeqBatch] = []
    if mode == "truncate":
        n = np.minimum(pairs, max_len)
        first = pairs - n  # keep the last max_len pairs
        if pack:
            chunk = max(1, chunk_batches) * batch_size
            perm = np.concatenate([
                c0 + np.argsort(-n[c0:c0 + chunk], kind="stable")
                for c0 in range(0, n_sess, chunk)])
        else:
            perm = np.arange(n_sess)
        no_carry = np.zeros(batch_size, bool)
        for k0 in range(0, n_sess, batch_size):
            idx = perm[k0:k0 + batch_size]
            out.append(_build_batch(items, offsets, users, order[idx], first[idx], n[idx],
                                    no_carry[:len(idx)]))
        return out
    # split: session-parallel over windows
    n_win = -(-pairs // max_len)
    n_rows = min(batch_size, n_sess)
    row_of, k0_of = parallel_slots(n_win, n_rows)  # (row, first batch): lowest row wins ties
    n_batches = int((k0_of + n_win).max())
    # one entry per window, then a [n_batches, n_rows] table of windows
    wsess = np.repeat(np.arange(n_sess), n_win)
    w = np.arange(len(wsess)) - np.repeat(np.cumsum(n_win) - n_win, n_win)
    kk = k0_of[wsess] + w
    rr = row_of[wsess]
    tab_sess = np.full((n_batches, n_rows), -1, np.int64)
    tab_first = np.zeros((n_batches, n_rows), np.int64)
    tab_n = np.zeros((n_batches, n_rows), np.int64)
    tab_carry = np.zeros((n_batches, n_rows), bool)
    tab_sess[kk, rr] = order[wsess]
    tab_first[kk, rr] = w * max_len
    tab_n[kk, rr] = np.minimum(max_len, pairs[wsess] - w * max_len)
    tab_carry[kk, rr] = w > 0
    for k in range(n_batches):
        out.append(_build_batch(items, offsets, users, tab_sess[k], tab_first[k], tab_n[k],
                                tab_carry[k]))
    return out


@dataclass
class StreamBatch:
    """Steps ``t0 .. t0+T-1`` of a session-parallel schedule, one row per slot, ``[B, T]``.

    inputs: item_idx (0 on idle cells); targets: item_idx of the next event (-1 idle);
    reset: a new session starts in this row at this step (zero the state first). The
    state of row ``b`` after the window is the start state of row ``b`` of the next window.
    """

    inputs: np.ndarray
    targets: np.ndarray
    reset: np.ndarray

    @property
    def mask(self) -> np.ndarray:
        return self.targets >= 0

    @property
    def n_pairs(self) -> int:
        return int((self.targets >= 0).sum())


def stream_windows(items: np.ndarray, offsets: np.ndarray, order: np.ndarray, n_slots: int,
                   window: int) -> list[StreamBatch]:
    """Sessions (in ``order``) laid out session-parallel (``session_parallel_schedule``: a row
    takes the next session as soon as its current one ends), cut into windows of ``window``
    steps. Every (input, target) pair appears exactly once; only the last windows have idle
    cells (rows whose sessions ran out), and they are never scored."""
    if window < 1:
        raise ValueError("window must be >= 1")
    sch = session_parallel_schedule(items, offsets, order, n_slots)
    out = []
    for t0 in range(0, sch.n_steps, window):
        sl = slice(t0, t0 + window)
        out.append(StreamBatch(inputs=np.ascontiguousarray(sch.inputs[sl].T.clip(min=0)),
                               targets=np.ascontiguousarray(sch.targets[sl].T),
                               reset=np.ascontiguousarray(sch.reset[sl].T)))
    return out
