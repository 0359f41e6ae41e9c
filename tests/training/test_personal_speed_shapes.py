"""benchmarks.personal_speed's compute-bound accounting for HRNN / RNN Concat and the user-based
GRUs: the matrix products it counts for every step of a toy epoch, against the schedule and the
products worked out by hand (and their FLOPs); the same lists against the matrix multiplications
autograd really runs (forward and backward, recorded at the aten level); and the rows-per-step /
fall-back check on a toy schedule and on one forced to hold one user at a time."""
from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from benchmarks.personal_speed import (HRNNTracker, Tally, UGRUTracker, flops, hrnn_eval_products, ugru_products,
                                       users_waiting)
from benchmarks.rnn_speed_common import Product
from tests.training.test_hrnn import _toy_family as hrnn_toy
from training import registry
from training.batching import UserSchedule
from training.data import SessionData
from training.families import hrnn as HR
from training.family import TrainContext

H, U = 3, 2  # test_hrnn's toy sizes (hidden, user_hidden); 5 items


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def P(m, k, n, g):
    return Product(m, k, n, g)


def fl(m, k, n, g):  # FLOPs by hand: 2 per multiply-add, forward + g gradient products
    return 2 * m * k * n * (1 + g)


# ----------------------------------------------------------------------------- HRNN
# test_hrnn's toy epoch (batch 2, time order): slot 0 walks user 7 (sessions of 3, 2, 4 events:
# 2 + 1 + 3 steps), slot 1 user 8 (2 and 3 events: 1 + 2 steps) and then user 9 (3 events, 2
# steps). Step t: active rows R, sessions starting S, of those continuing a user C:
#   t=0: R=2, S=2 (users 7, 8 begin), C=0      t=1: R=2, S=1 (user 8's 2nd), C=1
#   t=2: R=2, S=1 (user 7's 2nd), C=1          t=3: R=2, S=2 (user 7's 3rd; user 9 begins), C=1
#   t=4: R=2, S=0                              t=5: R=1 (slot 1 idle): one target, no loss
HRNN_INIT_BY_HAND = [
    # W_init c over the 2 starts (c = 0: no input gradient); recurrent (s_0 from W_init: input
    # gradient); TOP1 over the 2 in-batch targets
    [P(2, U, H, 1), P(2, H, 3 * H, 2), P(2, H, 2, 2)],
    # user GRU on the continuing row (carried s and c: weight gradients only), W_init c (c now
    # from the user GRU: input gradient too)
    [P(1, H, 3 * U, 1), P(1, U, 3 * U, 1), P(1, U, H, 2), P(2, H, 3 * H, 2), P(2, H, 2, 2)],
    [P(1, H, 3 * U, 1), P(1, U, 3 * U, 1), P(1, U, H, 2), P(2, H, 3 * H, 2), P(2, H, 2, 2)],
    [P(1, H, 3 * U, 1), P(1, U, 3 * U, 1), P(2, U, H, 2), P(2, H, 3 * H, 2), P(2, H, 2, 2)],
    [P(2, H, 3 * H, 1), P(2, H, 2, 2)],  # no start: the carried state is a constant
    [P(1, H, 3 * H, 0)],  # one row left: the session GRU runs, then no scores and no loss
]
# the same FLOPs added up by hand, step by step
HRNN_INIT_FLOPS = [48 + 324 + 72, 72 + 48 + 36 + 324 + 72, 552, 72 + 48 + 72 + 324 + 72, 216 + 72, 54]


def _walk(fam, tracker, backward=False):
    for b in fam.batches(0):
        tracker.on_batch(b, True)
        res = fam.loss(b)
        if backward and res is not None:
            res[0].backward()


def _hrnn_tracked(name):
    fam = hrnn_toy(name)
    tr = HRNNTracker(fam)
    tr.tally = Tally(keep_steps=True)
    return fam, tr


def test_hrnn_init_products_by_hand():
    fam, tr = _hrnn_tracked("hrnn_init")
    with torch.no_grad():
        _walk(fam, tr)
    assert tr.tally.steps == HRNN_INIT_BY_HAND
    assert [flops(s) for s in tr.tally.steps] == HRNN_INIT_FLOPS
    assert tr.tally.flops() == sum(HRNN_INIT_FLOPS) == 2478
    assert tr.tally.events == 2 * 5  # rows of the 5 steps with a loss


def test_hrnn_all_adds_w_c_c_and_rnn_concat_has_no_hand_over():
    fam, tr = _hrnn_tracked("hrnn_all")
    with torch.no_grad():
        _walk(fam, tr)
    # W_c c on every step, before the recurrent product: input gradient where a user continued
    wc = [P(2, U, 3 * H, 1), P(2, U, 3 * H, 2), P(2, U, 3 * H, 2), P(2, U, 3 * H, 2), P(2, U, 3 * H, 1),
          P(1, U, 3 * H, 0)]
    want = [s[:-2] + [w] + s[-2:] for s, w in zip(HRNN_INIT_BY_HAND, wc)]
    assert tr.tally.steps == want
    fam, tr = _hrnn_tracked("rnn_concat")
    with torch.no_grad():
        _walk(fam, tr)
    # one joined sequence per user (7: 8 pairs, 8: 4, 9: 2): slot A walks user 7 (8 steps), slot B
    # users 8 then 9 (6 steps); a one-row step returns no loss, so it has no output product
    assert tr.tally.steps == [[P(2, H, 3 * H, 1), P(2, H, 2, 2)]] * 6 + [[P(1, H, 3 * H, 0)]] * 2


def test_hrnn_eval_products_by_hand():
    assert hrnn_eval_products("step", "init", "onehot", 0, H, U, 4, 4, 5) == [P(4, H, 3 * H, 0), P(4, H, 5, 0)]
    assert hrnn_eval_products("step", "all", "onehot", 0, H, U, 4, 4, 5) == [P(4, U, 3 * H, 0), P(4, H, 3 * H, 0),
                                                                           P(4, H, 5, 0)]
    assert hrnn_eval_products("start", "init", "onehot", 0, H, U, 4, 1, 5) == [P(4, U, H, 0)]  # every row
    assert hrnn_eval_products("end", "init", "onehot", 0, H, U, 4, 3, 5) == [P(3, H, 3 * U, 0), P(3, U, 3 * U, 0)]
    assert hrnn_eval_products("end", "concat", "onehot", 0, H, U, 4, 3, 5) == []


def test_hrnn_rows_per_step_and_no_fallback():
    fam, tr = _hrnn_tracked("hrnn_init")
    with torch.no_grad():
        _walk(fam, tr)
    # user 9 waits for a free slot until step 3
    assert list(users_waiting(tr.sch)) == [1, 1, 1, 0, 0, 0]
    s = tr.stats.summary(n_users=3)
    assert tr.stats.rows == [2, 2, 2, 2, 2] and tr.stats.users == [2, 2, 2, 2, 2]
    assert (s["rows_per_step_min"], s["fallback_steps"], s["steps_checked"]) == (2, 0, 6)


def test_one_user_at_a_time_is_caught(monkeypatch):
    """A schedule that fills one of the 2 slots (users one after the other) is flagged at every
    step where a user was still waiting."""
    orig = HR.user_parallel_schedule

    def one_slot(items, offsets, lane, key, n_slots):
        s = orig(items, offsets, lane, key, 1)
        pad = {f: np.concatenate([getattr(s, f), np.full_like(getattr(s, f), False if getattr(s, f).dtype == bool
                                                                 else -1)], 1)
               for f in ("inputs", "targets", "session", "user", "position", "session_start", "user_start",
                         "session_end")}
        return UserSchedule(**pad, n_valid=s.n_valid)

    monkeypatch.setattr(HR, "user_parallel_schedule", one_slot)
    fam, tr = _hrnn_tracked("hrnn_init")
    with torch.no_grad():
        _walk(fam, tr)
    # 11 steps, one row each; users 8 and 9 wait until steps 6 and 9
    assert tr.stats.steps_seen == 11 and tr.stats.fallback_steps == 9


# ----------------------------------------------------------------------------- user GRUs
D, N, N_ITEMS = 4, 6, 10  # embedding d != hidden n: a transposed block cannot pass


def _ugru_family(name, **kw):
    """3 users, one session of 4 events each (3 pairs), batch 2, window 2: in any order two users
    run at t = 0..2 and the third takes a free row at t = 3..5 -> windows (R rows, scored cells
    N): (2, 4), (2, 3), (1, 2)."""
    items = np.array([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1])
    d = SessionData(items=items, offsets=np.array([0, 4, 8, 12]), session_ids=np.arange(3),
                    start_ts=np.arange(3) * 100, user_ids=np.array([7, 8, 9]))

    class _Index:
        n_items = N_ITEMS

    ctx = TrainContext(index=_Index(), data=d, support=np.ones(N_ITEMS, np.int64), device=torch.device("cpu"))
    cfg = registry.get(name).Config(**{"embedding": D, "hidden": N, "window": 2, "batch_size": 2, **kw})
    fam = registry.get(name)(cfg, ctx)
    fam.init_weights(torch.Generator().manual_seed(0))
    return fam


def _linear_window(R, Nout):
    M = 2 * R
    return [P(M, D, 2 * N, 2), P(M, D, 2 * N, 2), P(M, D, N, 2), P(M, D, N, 2),  # e W_i, v W_v, e U_i, v U_v
            P(R, N, 2 * N, 1), P(R, N, N, 2),  # t = 0: h W_h (h carried: no input gradient), (r h) U_h
            P(R, N, 2 * N, 2), P(R, N, N, 2),  # t = 1
            P(Nout, N, N_ITEMS, 2)]  # softmax over all items


def test_ugru_linear_products_rows_and_flops_by_hand():
    fam = _ugru_family("ugru_linear")
    tr = UGRUTracker(fam)
    tr.tally = Tally(keep_steps=True)
    with torch.no_grad():
        _walk(fam, tr)
    assert tr.tally.steps == [_linear_window(2, 4), _linear_window(2, 3), _linear_window(1, 2)]
    # window 0: 2 x e W_i / v W_v, 2 x e U_i / v U_v, h W_h (t=0, t=1), (r h) U_h (t=0, t=1), softmax
    w0 = 2 * fl(4, 4, 12, 2) + 2 * fl(4, 4, 6, 2) + fl(2, 6, 12, 1) + fl(2, 6, 12, 2) + 2 * fl(2, 6, 6, 2) \
        + fl(4, 6, 10, 2)
    assert w0 == 2 * 1152 + 2 * 576 + 576 + 864 + 2 * 432 + 1440 == 7200
    assert [flops(s) for s in tr.tally.steps] == [7200, 7200 - 1440 + 1080,
                                                  2 * 576 + 2 * 288 + 288 + 432 + 2 * 216 + 720]
    assert tr.tally.flops() == 7200 + 6840 + 3600
    assert tr.tally.events == 4 + 3 + 2
    assert tr.stats.rows == [2, 2, 1] and tr.stats.fallback_steps == 0 and tr.stats.steps_seen == 3


def test_ugru_rectified_and_attentional_products_by_hand():
    fam = _ugru_family("ugru_rect")
    tr = UGRUTracker(fam)
    tr.tally = Tally(keep_steps=True)
    with torch.no_grad():
        _walk(fam, tr)
    step = lambda g: [P(2, N, 2 * D, g), P(2, D, 2 * N, 2), P(2, D, N, 2), P(2, N, 2 * N, g), P(2, N, N, 2)]  # noqa: E731
    assert tr.tally.steps[0] == [P(4, D, 2 * D, 2), P(4, D, 2 * D, 2), P(4, D, 2 * N, 2), P(4, D, N, 2)] \
        + step(1) + step(2) + [P(4, N, N_ITEMS, 2)]
    fam = _ugru_family("ugru_attn")
    tr = UGRUTracker(fam)
    tr.tally = Tally(keep_steps=True)
    with torch.no_grad():
        _walk(fam, tr)
    step = lambda g: [P(2, N, D, g), P(2, D, 2 * N, 2), P(2, D, 2 * N, 2), P(2, D, N, 2), P(2, D, N, 2),  # noqa: E731
                      P(2, N, 2 * N, g), P(2, N, N, 2)]
    assert tr.tally.steps[0] == [P(4, D, D, 2), P(4, D, D, 2)] + step(1) + step(2) + [P(4, N, N_ITEMS, 2)]


def test_ugru_eval_products_are_one_forward_step():
    assert ugru_products("linear", D, N, 3, 1, 3, N_ITEMS, train=False) == [
        P(3, D, 2 * N, 0), P(3, D, 2 * N, 0), P(3, D, N, 0), P(3, D, N, 0), P(3, N, 2 * N, 0), P(3, N, N, 0),
        P(3, N, N_ITEMS, 0)]


# ----------------------------------------------------------------------------- against autograd
class MatmulLog(TorchDispatchMode):
    """Every aten matrix multiplication run (forward and backward), as sorted (m, k, n) dims."""

    def __init__(self):
        super().__init__()
        self.dims = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if name in ("mm", "addmm", "bmm", "baddbmm"):
            a, b = (args[1], args[2]) if name in ("addmm", "baddbmm") else (args[0], args[1])
            assert a.dim() == 2, f"{name} on {a.dim()}-d tensors"
            self.dims[tuple(sorted((a.shape[0], a.shape[1], b.shape[1])))] += 1
        return func(*args, **kwargs)


def _counted_dims(tally: Tally) -> Counter:
    c = Counter()
    for s in tally.steps:
        for p in s:
            for sh in p.shapes("own"):
                c[tuple(sorted(sh))] += 1
    return c


@pytest.mark.parametrize("name", ["hrnn_init", "hrnn_all", "rnn_concat"])
def test_hrnn_counts_are_the_products_autograd_runs(name):
    fam, tr = _hrnn_tracked(name)
    log = MatmulLog()
    with log:
        _walk(fam, tr, backward=True)
    assert log.dims == _counted_dims(tr.tally)


@pytest.mark.parametrize("name", ["ugru_linear", "ugru_rect", "ugru_attn"])
def test_ugru_counts_are_the_products_autograd_runs(name):
    fam = _ugru_family(name)
    tr = UGRUTracker(fam)
    tr.tally = Tally(keep_steps=True)
    log = MatmulLog()
    with log:
        _walk(fam, tr, backward=True)
    assert log.dims == _counted_dims(tr.tally)
