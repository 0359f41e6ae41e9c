"""The one evaluation loop: next-item prediction at every position, full ranking.

Protocol v2 (``docs/DESIGN.md`` "Evaluation protocol (v2)"), two modes:

* ``mode="session"`` (default; GRU4Rec, Tan, baselines): every test session
  starts from a zero state. Sessions are independent, so they are laid out
  longest first (ties: first event time, then session id -- deterministic),
  which keeps the slots full until the end.
* ``mode="user"`` (HRNN, Donkers, Villatel): each slot walks ONE user at a
  time: first the user's sessions from the ``history`` tables (e.g. the
  training table), fed through the model WITHOUT being scored (HRNN
  "bootstrap"), then the user's test sessions, all in time order (first event
  time, ties by session id; history always before test). Two sessions of one
  user never run at once. A test user that has no history session (unseen in
  training) is evaluated from a fresh state -- just without bootstrap -- and is
  counted in ``EvalResult.n_users_without_history``. Test sessions without a
  user id (-1) are each their own anonymous "user" without history.
  ``start_session`` gets the user ids (int64, -1 unknown) of the starting rows.
  The last click of a session is only ever a target; a scorer with ``wants_last_item``
  gets it at ``end_session(state, rows, last_items)`` (a model of whole user sequences,
  which trained on it as the input before the user's next session, feeds it there).

Scorer calls (``training.scoring``): ``start_session`` before the first step of
a session (the rows that start), ``step`` once per step, ``end_session`` right
after the LAST step of a session (its rows) -- exactly once for every session
that ends, including the very last ones. The schedule is
``training.batching.user_parallel_schedule`` in both modes (in session mode each
session is its own pseudo-user), so a slot that falls idle never becomes active
again and idle slots only appear once the lanes run out.

Idle slots are never stepped when the scorer has ``select``: the loop drops the
state rows of slots that went idle (at the very step they do) and passes only
the active rows to every call. A scorer without ``select`` is stepped on all of
its rows (idle rows carry item 0); their scores are never counted and they
never get ``start_session``/``end_session``. The scorer is begun with only the
slots the schedule uses (``min(n_slots, n_lanes)``).

Ranking: the target's rank counts ties explicitly (``evaluation.metrics``). For
Recall@K,N (Villatel et al. 2018) the scores of the next ``n_future`` items of
the session (truncated at the session end) are gathered from the SAME score
row with one ``gather``; each one's conservative rank (``#items scoring >=
it``, itself included, i.e. 1 + #others scoring >= it) is exact whenever it is
<= ``top_k`` and is computed against the row's ``top_k + 1`` largest scores
(``torch.topk`` values only, never its order): if ``c`` of those values are
>= the item's score and ``c <= top_k`` the (top_k+1)-th largest is below the
item's score, so no other item can tie or beat it, and the rank is exactly
``c``; ``c = top_k + 1`` means rank > top_k. This costs ``[rows, n_future,
top_k+1]`` comparisons per step instead of ``[rows, n_future, n_items]``
(measured on this 2-core CPU, 1 thread, scores 512 x 2933, N = 20, per step:
gather + topk(21) + this compare + top-20 bincount 6.7 ms; the target's own
greater/ties/NaN passes of the old loop 9.9 ms; broadcasting the N scores
against the whole row [512, 20, 2933] 234 ms; sort each row + searchsorted
110 ms). The same top values give the target's own (greater, ties) counts whenever its
rank is <= ``top_k``; only the other rows get the two full comparison passes of
``evaluation.metrics.greater_and_ties`` (identical counts, tested). A NaN score
is refused (topk puts NaN first, so column 0 of the top values shows it). The
first ``top_k`` topk indices also give the top-K lists for
catalogue coverage / popularity (ties at the cut are whatever topk picks; only
coverage uses them).

Blocked ranking (large catalogues): with ``block_items`` and a scorer whose scores are
``out @ W.T + b`` (``step_hidden`` / ``output_factors``: GRU4Rec), a catalogue larger than
``block_items`` is never scored as one ``[rows, n_items]`` matrix. The step returns the hidden
output only; the loop scores ``block_items`` items at a time (:func:`blocked_top`): each block's
top ``top_k + 1`` values are merged into the running ones and the target's / next items' scores
are taken from their own block's product, so every count below compares values of the same
products the unblocked path would compare within one row. Rows whose target ranks beyond
``top_k`` get their exact greater / ties counts from a second sweep over the blocks
(:func:`blocked_greater_ties`) that repeats the same products (same rows, same block bounds:
the same values). Memory: ``rows x block_items`` scores at a time instead of ``rows x n_items``;
cost: that second sweep of products (tested equal to the unblocked counts, ties included:
tests/evaluation/test_blocked_ranking.py).

Fused ranking (CPU, the default where the C kernels build; ``RNNREC_EVAL_NATIVE=0`` turns it
off; ``EvalResult.rank_path`` says which ran): one C pass per score row
(``training/native/kernels.c`` ``rnn_rank_rows``, rows in parallel) gives the target's exact
greater / ties counts over the whole row, the ``top_k + 1`` largest values with their items and
the next items' scores, in place of topk + gather + the two comparison passes of the far rows
(:func:`rank_rows_native`; tested equal to the torch ranking, ties included). For a scorer with
``output_factors`` (GRU4Rec) the step returns the hidden output and the loop multiplies it by the
item table inside the timed step (``torch.mm``), the bias being added in the ranking pass: this
skips ``addmm``'s copy of the bias into every ``[rows, items]`` output (a third of the scoring
time at 100 units). Top-k lists break ties at the cut by the smaller item (topk's choice is
unspecified); only catalogue coverage / popularity use them.

Prediction latency: every ``scorer.step`` call (the model's prediction of one
batch, one event per row) is timed on its own with ``time.perf_counter``, from
after its arguments are on the device to its return; on CUDA the device is
synchronised right before both clock reads, so queued work of earlier calls is
not charged to it and its own kernels are finished when it is read. Ranking,
metrics, ``select`` / ``start_session`` / ``end_session`` are outside it.
``EvalResult.step_seconds`` / ``step_rows`` hold each call's seconds and the
rows it was given (``min(n_slots, n_lanes)`` while the slots are full; fewer at
the tail for a scorer with ``select``; always all rows for one without it).
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from evaluation.metrics import greater_and_ties
from training.batching import user_parallel_schedule
from training.data import SessionData

MODES = ("session", "user")


@dataclass
class EvalResult:
    session_idx: np.ndarray  # index into the test SessionData (0..n_sessions-1)
    position: np.ndarray  # 0-based position of the INPUT event (prediction of event position+1)
    target: np.ndarray  # item_idx of the predicted event
    greater: np.ndarray  # #items scored above the target
    ties: np.ndarray  # #other items scored equal to the target
    seconds: float
    #: [n_events, n_future] conservative rank of the item d+1 steps ahead (column d):
    #: exact in 1..top_k, top_k + 1 = "beyond top_k", 0 = the session ends before it
    future_rank: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.int16))
    user: np.ndarray | None = None  # user id of the event's session (-1 unknown), None if unknown
    user_history: np.ndarray | None = None  # #history sessions fed for the user (user mode)
    top_counts: np.ndarray | None = None  # [n_items] how often each item is in a top-k list
    top_k: int = 20
    mode: str = "session"
    n_users: int = 0  # user mode: lanes walked (known users + anonymous sessions)
    n_users_without_history: int = 0
    n_history_sessions: int = 0  # history sessions fed (not scored)
    n_history_steps: int = 0
    n_end_session_calls: int = 0  # sessions ended (history + test)
    #: seconds of each scorer.step call, in call order (module docstring, "Prediction latency")
    step_seconds: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float64))
    #: rows passed to each scorer.step call (its batch size)
    step_rows: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    #: items per block when the catalogue was scored in blocks, else None ("Blocked ranking")
    block_items: int | None = None
    #: which ranking ran: "native" (the fused C pass, "Fused ranking"), "torch", or "blocked"
    rank_path: str = "torch"

    @property
    def n_events(self) -> int:
        return len(self.target)


def _concat_history(data: SessionData, history) -> tuple:
    """Test sessions first (index 0..n_test-1), then the history sessions of test users."""
    n_test = data.n_sessions
    t_users = data.user_ids if data.user_ids is not None else np.full(n_test, -1, np.int64)
    known = np.unique(t_users[t_users >= 0])
    items, offs, sids, ts, users = [data.items], [data.offsets[:-1]], [data.session_ids], \
        [data.start_ts], [t_users]
    ev_ts = [_event_ts(data)]
    base = len(data.items)
    seen = set(data.session_ids.tolist())
    for h in history or ():
        if h.user_ids is None or h.n_sessions == 0:
            continue
        sel = np.isin(h.user_ids, known) & ~np.isin(h.session_ids, np.fromiter(seen, np.int64, len(seen)))
        sel &= np.diff(h.offsets) >= 2
        s_idx = np.flatnonzero(sel)
        if not len(s_idx):
            continue
        seen.update(h.session_ids[s_idx].tolist())
        lens = np.diff(h.offsets)[s_idx]
        ev = np.concatenate([np.arange(h.offsets[s], h.offsets[s + 1]) for s in s_idx])
        items.append(h.items[ev])
        ev_ts.append(_event_ts(h)[ev])
        offs.append(base + np.r_[0, np.cumsum(lens)[:-1]])
        base += int(lens.sum())
        sids.append(h.session_ids[s_idx])
        ts.append(h.start_ts[s_idx])
        users.append(h.user_ids[s_idx])
    offsets = np.r_[np.concatenate(offs), base].astype(np.int64)
    return (np.concatenate(items).astype(np.int64), offsets, np.concatenate(sids),
            np.concatenate(ts), np.concatenate(users).astype(np.int64), np.concatenate(ev_ts))


def _event_ts(data: SessionData) -> np.ndarray:
    """Per-event times (us); tables built without them get each session's start time."""
    if data.ts is not None:
        return data.ts
    return np.repeat(data.start_ts, np.diff(data.offsets))


def blocked_top(H: torch.Tensor, W: torch.Tensor, b: torch.Tensor, fut: torch.Tensor, kk: int,
                block: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Scores ``H @ W.T + b`` of ``[R, N]`` items, ``block`` items at a time: the ``kk`` largest
    values per row with their item indices, and the scores of the items ``fut`` ``[R, F]``, each
    taken from its own block's product. Raises on a NaN score."""
    R, N = H.shape[0], W.shape[0]
    tv = H.new_full((R, 0), float("-inf"))
    tix = torch.zeros((R, 0), dtype=torch.int64, device=H.device)
    fs = H.new_zeros(fut.shape)
    for lo in range(0, N, block):
        hi = min(N, lo + block)
        S = torch.addmm(b[lo:hi], H, W[lo:hi].t())
        if torch.isnan(S.sum()) and torch.isnan(S).any():
            raise FloatingPointError("model produced NaN scores; ranks would be meaningless")
        v, i = torch.topk(S, min(kk, hi - lo), dim=1)
        cv, ci = torch.cat([tv, v], 1), torch.cat([tix, i + lo], 1)
        if cv.shape[1] > kk:
            cv, sel = torch.topk(cv, kk, dim=1)
            ci = ci.gather(1, sel)
        tv, tix = cv, ci
        inb = (fut >= lo) & (fut < hi)
        if bool(inb.any()):
            fs = torch.where(inb, S.gather(1, (fut - lo).clamp(0, hi - lo - 1)), fs)
    return tv, tix, fs


def blocked_greater_ties(H: torch.Tensor, W: torch.Tensor, b: torch.Tensor, rows: torch.Tensor,
                         t: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For the rows ``rows`` of ``H``: (#items scoring > ``t``, #items scoring == ``t`` minus one:
    the target itself), repeating :func:`blocked_top`'s products (all of ``H``'s rows, the same
    block bounds) so that every score equals the one the target's ``t`` was compared with there."""
    N = W.shape[0]
    g = torch.zeros(len(rows), dtype=torch.int32, device=H.device)
    e = torch.zeros(len(rows), dtype=torch.int32, device=H.device)
    tt = t.unsqueeze(1)
    for lo in range(0, N, block):
        hi = min(N, lo + block)
        S = torch.addmm(b[lo:hi], H, W[lo:hi].t()).index_select(0, rows)
        g += (S > tt).sum(1, dtype=torch.int32)
        e += (S == tt).sum(1, dtype=torch.int32)
    return g, e - 1


def rank_lib(device):
    """The fused ranking kernel's library (training/native ``rnn_rank_rows``) for CPU scores,
    or None: on another device, without the C kernels, or with ``RNNREC_EVAL_NATIVE=0``."""
    if torch.device(device).type != "cpu" or os.environ.get("RNNREC_EVAL_NATIVE", "1") == "0":
        return None
    from training import native
    return native.load()


def rank_rows_native(lib, S: torch.Tensor, bias: torch.Tensor | None, fut: torch.Tensor, kk: int):
    """One pass over each row of the scores ``S + bias`` ([R, N], float32 CPU; ``bias`` [N] or
    None) in C (module docstring, "Fused ranking"): the ``kk`` largest values and their items
    (descending), the scores of the items ``fut`` [R, F] (column 0: the target), and the
    target's exact (#greater, #ties). Raises on a NaN score."""
    S = S.contiguous()
    R, N = S.shape
    fut = fut.contiguous()
    F = fut.shape[1]
    tv = torch.empty((R, kk), dtype=torch.float32)
    tix = torch.empty((R, kk), dtype=torch.int64)
    fs = torch.empty((R, F), dtype=torch.float32)
    g = torch.empty(R, dtype=torch.int32)
    ti = torch.empty(R, dtype=torch.int32)
    tgt = fut[:, 0].contiguous()
    if bias is None:  # + 0.0 leaves every score as it is (NaN stays NaN)
        bias = torch.zeros(N, dtype=torch.float32)
    bias = bias.contiguous()
    n_nan = lib.rnn_rank_rows(S.data_ptr(), bias.data_ptr(), R, N, tgt.data_ptr(),
                              fut.data_ptr(), F, kk, tv.data_ptr(), tix.data_ptr(), fs.data_ptr(), g.data_ptr(),
                              ti.data_ptr())
    if n_nan < 0:
        raise MemoryError("rnn_rank_rows: could not allocate its per-thread buffers")
    if n_nan:
        raise FloatingPointError("model produced NaN scores; ranks would be meaningless")
    return tv, tix, fs, g, ti


def evaluate_sessions(scorer, data: SessionData, n_slots: int = 512, mode: str = "session",
                      history=None, n_future: int = 20, top_k: int = 20,
                      block_items: int | None = None) -> EvalResult:
    """Walk ``data`` (the test table) through ``scorer``; see the module docstring.

    ``history``: list of ``SessionData`` read with the same item index (user mode only):
    their sessions of test users are fed first, unscored. ``block_items``: score a catalogue
    larger than this in blocks (module docstring, "Blocked ranking"; scorers with
    ``output_factors`` only).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if n_slots < 1:
        raise ValueError("n_slots must be >= 1")
    n_test = data.n_sessions
    lens_t = np.diff(data.offsets)
    if mode == "session":
        items, offsets = data.items, data.offsets
        sids, ts = data.session_ids, data.start_ts
        event_ts = _event_ts(data)
        users_all = data.user_ids
        # longest first (deterministic ties: start time, then session id)
        order = np.lexsort((data.session_ids, data.start_ts, -lens_t))
        key = np.empty(n_test, np.int64)
        key[order] = np.arange(n_test)
        lane = np.arange(n_test, dtype=np.int64)  # each session its own pseudo-user
    else:
        items, offsets, sids, ts, users_all, event_ts = _concat_history(data, history)
        n_all = len(sids)
        is_test = np.arange(n_all) < n_test
        # anonymous test sessions: a lane of their own (negative pseudo ids never clash)
        lane = np.where(users_all >= 0, users_all, -(np.arange(n_all) + 2))
        # within a user: history first, then time, then session id
        within = np.empty(n_all, np.int64)
        within[np.lexsort((sids, ts, is_test))] = np.arange(n_all)
        # users (lanes) longest first (total steps), ties by first session time then lane id
        steps = np.maximum(np.diff(offsets) - 1, 0)
        uniq, inv = np.unique(lane, return_inverse=True)
        tot = np.bincount(inv, weights=steps).astype(np.int64)
        first = np.full(len(uniq), np.iinfo(np.int64).max)
        np.minimum.at(first, inv, within)
        lane_rank = np.empty(len(uniq), np.int64)
        lane_rank[np.lexsort((uniq, first, -tot))] = np.arange(len(uniq))
        key = lane_rank[inv] * (n_all + 1) + within
    sch = user_parallel_schedule(items, offsets, lane, key, n_slots)
    n_used = int(min(n_slots, len(np.unique(lane[np.diff(offsets) >= 2])))) if len(lane) else 0
    dev = scorer.device
    item_t = torch.from_numpy(np.ascontiguousarray(items))
    n_all_ev = len(items)
    ar_f = np.arange(n_future)

    # per-user history counts (user mode)
    hist_count = None
    n_users = n_no_hist = n_hist_sess = 0
    if mode == "user":
        sess_in = np.flatnonzero(np.diff(offsets) >= 2)
        is_h = sess_in >= n_test
        lane_in = lane[sess_in]
        hist_lanes, hcnt = np.unique(lane_in[is_h], return_counts=True)
        test_lanes = np.unique(lane_in[~is_h])
        n_users = len(test_lanes)
        n_hist_sess = int(is_h.sum())
        hc = dict(zip(hist_lanes.tolist(), hcnt.tolist()))
        n_no_hist = int(sum(1 for u in test_lanes.tolist() if u not in hc))
        hist_count = np.array([hc.get(int(u), 0) for u in lane[:n_test]], np.int64)

    out_r, out_g, out_t, out_f = [], [], [], []
    step_secs, step_rows = [], []
    sync = torch.cuda.synchronize if torch.device(dev).type == "cuda" else None
    n_end = 0
    n_hist_steps = 0
    top_counts = torch.zeros(scorer.n_items, dtype=torch.int64)
    kk = min(top_k + 1, scorer.n_items)
    t0 = time.perf_counter()
    if not n_used:
        state = None
    elif getattr(scorer, "wants_mode", False):  # e.g. a user-sequence RNN: carry state across a user's sessions
        state = scorer.begin(n_used, mode=mode)
    else:
        state = scorer.begin(n_used)
    can_shrink = hasattr(scorer, "select")
    factors = getattr(scorer, "output_factors", lambda: None)()  # (W, b) or None, asked once
    blocked = factors is not None and bool(block_items) and scorer.n_items > block_items
    if blocked:
        W_out, b_out = factors
    lib = rank_lib(dev) if not blocked else None
    # fused: the model's hidden output times the item table in the timed step, the bias added
    # in the ranking pass (no [rows, items] bias copy); scorers without factors give scores
    fused = factors is not None and lib is not None and hasattr(scorer, "step_hidden")
    if fused:
        W_f, b_f = (t.float().contiguous() for t in factors)
    uses_time = bool(getattr(scorer, "uses_time", False))
    wants_last = bool(getattr(scorer, "wants_last_item", False))
    sl = np.arange(n_used)  # row of the scorer's state -> schedule slot
    for t in range(sch.n_steps if n_used else 0):
        tg = sch.targets[t, sl]
        valid = tg >= 0
        if can_shrink and not valid.all():
            keep = np.flatnonzero(valid)
            state = scorer.select(state, torch.from_numpy(keep).to(dev))
            sl, tg, valid = sl[keep], tg[keep], valid[keep]
        sess = sch.session[t, sl]
        starting = sch.session_start[t, sl]
        if starting.any():
            users = None
            if mode == "user":
                users = torch.from_numpy(np.where(starting, users_all[sess.clip(min=0)], -1)).to(dev)
            elif users_all is not None:
                users = torch.from_numpy(np.where(starting & (sess >= 0), users_all[sess.clip(min=0)],
                                                  -1)).to(dev)
            state = scorer.start_session(state, torch.from_numpy(starting).to(dev), users)
        args = (torch.from_numpy(sch.inputs[t, sl].clip(min=0)).to(dev),)
        if uses_time:  # time-aware baselines (STAN, time-decayed Item-KNN): input events' times
            act = sess >= 0
            ev_in = np.where(act, offsets[sess.clip(min=0)] + sch.position[t, sl], 0)
            args += (torch.from_numpy(np.where(act, event_ts[ev_in], 0)).to(dev),)
        if sync is not None:
            sync(dev)
        c0 = time.perf_counter()
        if blocked:  # the hidden output only: the loop scores the catalogue block by block
            hidden, state = scorer.step_hidden(state, *args)
        elif fused:  # the product in the step's time, its bias in the ranking pass
            hidden, state = scorer.step_hidden(state, *args)
            scores = torch.mm(hidden.float(), W_f.t())
        else:
            scores, state = scorer.step(state, *args)
        if sync is not None:
            sync(dev)
        step_secs.append(time.perf_counter() - c0)
        step_rows.append(len(sl))
        scored = valid & (sess < n_test)  # idle rows have sess == -1 < n_test but valid False
        n_hist_steps += int((valid & (sess >= n_test)).sum())
        r = np.flatnonzero(scored)
        if len(r):
            s_r = sess[r]
            ev = offsets[s_r] + sch.position[t, sl[r]] + 1  # event index of the target
            idx = ev[:, None] + ar_f
            ok = idx < offsets[s_r + 1][:, None]
            fut = item_t[torch.from_numpy(np.minimum(idx, n_all_ev - 1))]
            native_counts = None
            if blocked:
                Hr = hidden if len(r) == len(sl) else hidden[torch.from_numpy(r).to(dev)]
                tv, tix, fs = blocked_top(Hr, W_out, b_out, fut.to(dev), kk, block_items)
            elif lib is not None:
                S = scores if len(r) == len(sl) else scores[torch.from_numpy(r)]
                tv, tix, fs, g_n, t_n = rank_rows_native(lib, S.float(), b_f if fused else None, fut, kk)
                native_counts = (g_n, t_n)
            else:
                S = scores if len(r) == len(sl) else scores[torch.from_numpy(r).to(dev)]
                tv, tix = torch.topk(S, kk, dim=1)
                # topk ranks NaN above every number, so a row holding a NaN has it in column 0:
                # this replaces a full isnan pass over the scores
                if bool(torch.isnan(tv[:, 0]).any()):
                    raise FloatingPointError("model produced NaN scores; ranks would be meaningless")
                fs = S.gather(1, fut.to(dev))  # [R, n_future] scores of the next items
            cnt = (tv.unsqueeze(1) >= fs.unsqueeze(2)).sum(2, dtype=torch.int32)  # in 1..kk (itself included)
            # the target (column 0): when fewer than kk of the top values reach its score
            # (or topk holds the whole catalogue) every item >= it is among them, so its
            # greater / ties counts come from the top values; only the other rows need the
            # two full comparison passes
            ge = cnt[:, 0]
            if native_counts is not None:  # exact counts over the whole row, from the same pass
                g, ti = native_counts
            else:
                g = (tv > fs[:, :1]).sum(1, dtype=torch.int32)
                ti = ge - 1 - g
            if kk < scorer.n_items and native_counts is None:
                far = torch.nonzero(ge >= kk).squeeze(1)
                if far.numel() and blocked:
                    g_f, t_f = blocked_greater_ties(Hr, W_out, b_out, far, fs[far, 0], block_items)
                    g[far] = g_f
                    ti[far] = t_f
                elif far.numel():
                    g_f, t_f = greater_and_ties(S[far], fut[far.cpu(), 0].to(dev), check_nan=False)
                    g[far] = g_f
                    ti[far] = t_f
            cnt = cnt.cpu().to(torch.int16)
            cnt[torch.from_numpy(~ok)] = 0
            top_counts += torch.bincount(tix[:, :top_k].reshape(-1).cpu(), minlength=scorer.n_items)
            out_g.append(g.cpu())
            out_t.append(ti.cpu())
            out_f.append(cnt)
            out_r.append(np.stack([s_r, sch.position[t, sl[r]], tg[r]], 1))
        ending = valid & sch.session_end[t, sl]
        if ending.any():
            if wants_last:  # the session's last click (this step's target), never an input otherwise
                state = scorer.end_session(state, torch.from_numpy(ending).to(dev),
                                           torch.from_numpy(np.where(ending, tg, 0)).to(dev))
            else:
                state = scorer.end_session(state, torch.from_numpy(ending).to(dev))
            n_end += int(ending.sum())
    secs = time.perf_counter() - t0
    if out_r:
        rows = np.concatenate(out_r)
        greater = torch.cat(out_g).numpy()
        ties = torch.cat(out_t).numpy()
        fr = torch.cat(out_f).numpy()
    else:
        rows = np.zeros((0, 3), np.int64)
        greater = ties = np.zeros(0, np.int64)
        fr = np.zeros((0, n_future), np.int16)
    s_idx = rows[:, 0]
    user = None
    if mode == "user":
        u = users_all[:n_test][s_idx]
        user = u.astype(np.int64)
    elif data.user_ids is not None:
        user = data.user_ids[s_idx].astype(np.int64)
    return EvalResult(
        session_idx=s_idx, position=rows[:, 1], target=rows[:, 2], greater=greater, ties=ties,
        seconds=secs, future_rank=fr, user=user,
        user_history=hist_count[s_idx] if hist_count is not None else None,
        top_counts=top_counts.numpy(), top_k=top_k, mode=mode,
        n_users=n_users if mode == "user" else 0, n_users_without_history=n_no_hist,
        n_history_sessions=n_hist_sess, n_history_steps=n_hist_steps, n_end_session_calls=n_end,
        step_seconds=np.array(step_secs, np.float64), step_rows=np.array(step_rows, np.int64),
        block_items=block_items if blocked else None,
        rank_path="blocked" if blocked else "native" if lib is not None else "torch")
