"""User-parallel (HRNN) schedule and padded / packed BPTT sequence batches.

Expected arrays are worked out by hand in the comments and written literally.
"""
import numpy as np
import pytest
import torch

from training.batching import (SeqBatch, pack, padding_fraction, sequence_batches,
                               user_parallel_schedule)


def from_sessions(sessions):
    lengths = [len(s) for s in sessions]
    offsets = np.r_[0, np.cumsum(lengths)].astype(np.int64)
    items = np.array([i for s in sessions for i in s], dtype=np.int64)
    return items, offsets


# ---------------------------------------------------------------- user-parallel

# session: user, start_ts, items
# (user ids A=5, B=1, C=3, D=0: id order differs from first-session order A, B, C)
#   0: A=5, ts 50, [20 21]          A's 2nd session, given first (out of time order)
#   1: B=1, ts 20, [30 31 32 33]
#   2: A=5, ts 10, [10 11 12]       A's 1st session
#   3: C=3, ts 30, [40 41]
#   4: C=3, ts 35, [99]             length 1: skipped, C continues with session 5
#   5: C=3, ts 40, [50 51]
#   6: D=0, ts  5, [77]             D's only session has length 1: D skipped (though earliest)
USER_DATA = dict(
    sessions=[[20, 21], [30, 31, 32, 33], [10, 11, 12], [40, 41], [99], [50, 51], [77]],
    user=np.array([5, 1, 5, 3, 3, 3, 0]),
    ts=np.array([50, 20, 10, 30, 35, 40, 5]),
)


def user_schedule(n_slots):
    items, off = from_sessions(USER_DATA["sessions"])
    return user_parallel_schedule(items, off, USER_DATA["user"], USER_DATA["ts"], n_slots)


def test_user_parallel_two_slots_by_hand():
    # users by first session: A(ts 10), B(20), C(30). Steps: A 2+1=3, B 3, C 1+1=2.
    # A -> slot 0 at t0, B -> slot 1 at t0, both free at t3: C -> slot 0 (lowest) at t3.
    s = user_schedule(2)
    assert s.inputs.tolist() == [[10, 30], [11, 31], [20, 32], [40, -1], [50, -1]]
    assert s.targets.tolist() == [[11, 31], [12, 32], [21, 33], [41, -1], [51, -1]]
    assert s.session.tolist() == [[2, 1], [2, 1], [0, 1], [3, -1], [5, -1]]
    assert s.user.tolist() == [[5, 1], [5, 1], [5, 1], [3, -1], [3, -1]]
    assert s.position.tolist() == [[0, 0], [1, 1], [0, 2], [0, -1], [0, -1]]
    T, F = True, False
    assert s.session_start.tolist() == [[T, T], [F, F], [T, F], [T, F], [T, F]]
    assert s.user_start.tolist() == [[T, T], [F, F], [F, F], [T, F], [F, F]]
    assert s.session_end.tolist() == [[F, F], [T, F], [T, T], [T, F], [T, F]]
    assert s.n_valid.tolist() == [2, 2, 2, 1, 1]
    # slot 0: 2+1+1+1 = 5 steps, slot 1: 3 steps
    assert s.n_steps == 5 and s.n_events == 8


def test_user_parallel_invariants():
    s = user_schedule(2)
    active = s.targets >= 0
    assert not (s.user_start & ~s.session_start).any()  # user_start implies session_start
    for flag in (s.session_start, s.user_start, s.session_end):
        assert not (flag & ~active).any()
    # idle only at the tail: once a slot is idle it stays idle
    assert not (~active[:-1] & active[1:]).any()
    # exactly one start and one end per kept session (0,1,2,3,5), one user_start per kept user
    assert s.session_start.sum() == 5 and s.session_end.sum() == 5 and s.user_start.sum() == 3
    assert 4 not in s.session and 6 not in s.session and 0 not in s.user
    # a user whose only session has 1 event takes no slot, not even for zero steps:
    # X (user 0, ts 1, [9]) skipped; Y (user 1, ts 2, 1 step) -> slot 0; Z (user 2, ts 3) -> slot 1
    items, off = from_sessions([[9], [1, 2], [3, 4, 5, 6]])
    s = user_parallel_schedule(items, off, np.array([0, 1, 2]), np.array([1, 2, 3]), 2)
    assert s.inputs.tolist() == [[1, 3], [-1, 4], [-1, 5]]
    assert s.session_end.tolist() == [[True, False], [False, False], [False, True]]
    assert s.user_start.tolist() == [[True, True], [False, False], [False, False]]


def test_user_parallel_three_slots_and_ties():
    # 3 slots: A, B, C each get a slot at t0
    s = user_schedule(3)
    assert s.inputs.tolist() == [[10, 30, 40], [11, 31, 50], [20, 32, -1]]
    assert s.user_start.tolist() == [[True, True, True], [False] * 3, [False] * 3]
    assert s.session_start.tolist() == [[True, True, True], [False, False, True],
                                        [True, False, False]]
    # ties: users 7 (sessions 0 @5, 3 @9) and 3 (sessions 1 @5, 2 @5) both first seen at ts 5
    # -> user 3 first; user 3's two sessions share ts 5 -> session index order (1 before 2)
    items, off = from_sessions([[1, 2], [3, 4], [5, 6], [7, 8, 9]])
    s = user_parallel_schedule(items, off, np.array([7, 3, 3, 7]), np.array([5, 5, 5, 9]), 1)
    assert s.session.ravel().tolist() == [1, 2, 0, 3, 3]
    assert s.inputs.ravel().tolist() == [3, 5, 1, 7, 8]
    assert s.user_start.ravel().tolist() == [True, False, True, False, False]
    assert s.session_end.ravel().tolist() == [True, True, True, False, True]


def test_user_parallel_every_pair_once():
    rng = np.random.default_rng(1)
    n = 120
    sessions = [list(rng.integers(0, 50, size=int(L))) for L in rng.integers(1, 7, size=n)]
    items, off = from_sessions(sessions)
    user = rng.integers(0, 25, size=n)
    ts = rng.integers(0, 40, size=n)
    s = user_parallel_schedule(items, off, user, ts, 4)
    act = s.targets >= 0
    got = sorted(zip(s.session[act].tolist(), s.position[act].tolist(),
                     s.inputs[act].tolist(), s.targets[act].tolist()))
    want = sorted((k, p, int(sessions[k][p]), int(sessions[k][p + 1]))
                  for k in range(n) for p in range(len(sessions[k]) - 1))
    assert got == want
    assert not (~act[:-1] & act[1:]).any()


# ---------------------------------------------------------------- sequence batches

def pairs_of(batches):
    out = []
    for b in batches:
        r, c = np.nonzero(b.mask)
        out += zip(b.session[r].tolist(), b.position[r, c].tolist(),
                   b.inputs[r, c].tolist(), b.targets[r, c].tolist())
    return sorted(out)


def test_truncate_keeps_last_pairs_by_hand():
    # s0: 5 pairs, max_len 3 -> keeps (3,4) (4,5) (5,6) at positions 2,3,4
    # s1: 1 pair; s2: length 1, skipped; s3: 2 pairs
    items, off = from_sessions([[1, 2, 3, 4, 5, 6], [7, 8], [9], [10, 11, 12]])
    bs = sequence_batches(items, off, np.arange(4), 2, 3, mode="truncate", pack=False,
                          users=np.array([5, 6, 7, 8]))
    assert len(bs) == 2
    b0, b1 = bs
    assert b0.inputs.tolist() == [[3, 4, 5], [7, 0, 0]]
    assert b0.targets.tolist() == [[4, 5, 6], [8, -1, -1]]
    assert b0.mask.tolist() == [[True, True, True], [True, False, False]]
    assert b0.position.tolist() == [[2, 3, 4], [0, -1, -1]]
    assert b0.lengths.tolist() == [3, 1]
    assert b0.session.tolist() == [0, 1]
    assert b0.users.tolist() == [5, 6]
    assert b0.carry.tolist() == [False, False]
    assert b1.inputs.tolist() == [[10, 11]] and b1.targets.tolist() == [[11, 12]]
    assert b1.position.tolist() == [[0, 1]] and b1.lengths.tolist() == [2]
    assert b1.session.tolist() == [3] and b1.users.tolist() == [8]
    assert b0.padding_fraction == pytest.approx(2 / 6)
    assert padding_fraction(bs) == pytest.approx(2 / 8)
    for b in bs:  # padding is never scored
        assert b.mask.sum() == b.lengths.sum()
        assert (b.targets[~b.mask] == -1).all() and (b.position[~b.mask] == -1).all()
        assert (b.targets[b.mask] >= 0).all()
        assert b.mask.tolist() == (np.arange(b.mask.shape[1]) < b.lengths[:, None]).tolist()
    # every pair of the short sessions exactly once
    assert pairs_of(bs) == [(0, 2, 3, 4), (0, 3, 4, 5), (0, 4, 5, 6), (1, 0, 7, 8),
                            (3, 0, 10, 11), (3, 1, 11, 12)]


def test_packing_groups_by_length_and_cuts_padding():
    # pair counts 5,1,5,1,5,1 (sessions 0..5); batch 2
    sessions = [list(range(10 * k, 10 * k + (6 if k % 2 == 0 else 2))) for k in range(6)]
    items, off = from_sessions(sessions)
    plain = sequence_batches(items, off, np.arange(6), 2, 20, pack=False)
    packed = sequence_batches(items, off, np.arange(6), 2, 20, pack=True)
    # pack=False: [0,1] [2,3] [4,5], each 10 cells with 4 padded
    assert [b.session.tolist() for b in plain] == [[0, 1], [2, 3], [4, 5]]
    assert padding_fraction(plain) == pytest.approx(12 / 30)
    # pack=True: stable sort longest first -> 0,2,4,1,3,5 -> [0,2] [4,1] [3,5]
    assert [b.session.tolist() for b in packed] == [[0, 2], [4, 1], [3, 5]]
    assert [b.inputs.shape[1] for b in packed] == [5, 5, 1]
    assert padding_fraction(packed) == pytest.approx(4 / 22)
    assert padding_fraction(packed) < padding_fraction(plain)
    assert pairs_of(packed) == pairs_of(plain)
    assert len(pairs_of(plain)) == 18


def test_packing_chunks_follow_order_and_random_multiset():
    rng = np.random.default_rng(3)
    n = 500
    sessions = [list(rng.integers(0, 100, size=int(L))) for L in rng.integers(1, 30, size=n)]
    items, off = from_sessions(sessions)
    order = rng.permutation(n)
    plain = sequence_batches(items, off, order, 8, 10, pack=False)
    packed = sequence_batches(items, off, order, 8, 10, pack=True, chunk_batches=5)
    assert padding_fraction(packed) < padding_fraction(plain)
    assert pairs_of(packed) == pairs_of(plain)
    # chunks of 40 kept sessions: every chunk holds the same sessions either way
    kept = [int(k) for k in order if len(sessions[k]) >= 2]
    flat = [int(s) for b in packed for s in b.session]
    for c in range(0, len(kept), 40):
        assert sorted(flat[c:c + 40]) == sorted(kept[c:c + 40])
    # deterministic given the order
    again = sequence_batches(items, off, order, 8, 10, pack=True, chunk_batches=5)
    assert all(np.array_equal(a.inputs, b.inputs) for a, b in zip(packed, again))
    # truncation: every row keeps its session's last min(L-1, 10) pairs
    for b in packed:
        for r, k in enumerate(b.session):
            L = len(sessions[k])
            assert b.lengths[r] == min(L - 1, 10)
            assert b.position[r, b.lengths[r] - 1] == L - 2


def test_split_windows_by_hand():
    # max_len 2, batch 2. s0: 5 pairs = 2*2+1 -> windows (0,1) (2,3) (4); s1: 2 pairs, 1 window;
    # s2: 1 pair; s3: 3 pairs -> (0,1) (2).
    # rows: s0 -> row 0 batches 0-2; s1 -> row 1 batch 0; s2 -> row 1 batch 1;
    #       s3 -> row 1 batches 2-3; row 0 idle in batch 3.
    items, off = from_sessions([[1, 2, 3, 4, 5, 6], [7, 8, 9], [10, 11], [12, 13, 14, 15]])
    bs = sequence_batches(items, off, np.arange(4), 2, 2, mode="split")
    assert len(bs) == 4
    assert [b.inputs.tolist() for b in bs] == [[[1, 2], [7, 8]], [[3, 4], [10, 0]],
                                               [[5, 0], [12, 13]], [[0], [14]]]
    assert [b.targets.tolist() for b in bs] == [[[2, 3], [8, 9]], [[4, 5], [11, -1]],
                                                [[6, -1], [13, 14]], [[-1], [15]]]
    assert [b.position.tolist() for b in bs] == [[[0, 1], [0, 1]], [[2, 3], [0, -1]],
                                                 [[4, -1], [0, 1]], [[-1], [2]]]
    assert [b.lengths.tolist() for b in bs] == [[2, 2], [2, 1], [1, 2], [0, 1]]
    assert [b.session.tolist() for b in bs] == [[0, 1], [0, 2], [0, 3], [-1, 3]]
    # s0 sits at row 0 in three consecutive batches, carry False/True/True
    assert [b.carry.tolist() for b in bs] == [[False, False], [True, False], [True, False],
                                              [False, True]]
    assert [b.mask.tolist() for b in bs][3] == [[False], [True]]
    # s0's pairs in order, nothing lost
    s0 = [(i, t) for b in bs[:3] for i, t in zip(b.inputs[0][b.mask[0]], b.targets[0][b.mask[0]])]
    assert s0 == [(1, 2), (2, 3), (3, 4), (4, 5), (5, 6)]
    assert len(pairs_of(bs)) == 5 + 2 + 1 + 3


def test_split_random_continuity():
    rng = np.random.default_rng(4)
    n = 80
    sessions = [list(rng.integers(0, 100, size=int(L))) for L in rng.integers(1, 25, size=n)]
    items, off = from_sessions(sessions)
    order = rng.permutation(n)
    bs = sequence_batches(items, off, order, 5, 4, mode="split")
    want = sorted((k, p, int(sessions[k][p]), int(sessions[k][p + 1]))
                  for k in range(n) for p in range(len(sessions[k]) - 1))
    assert pairs_of(bs) == want
    for k in range(1, len(bs)):
        prev, cur = bs[k - 1], bs[k]
        assert cur.session.shape == prev.session.shape == (5,)
        for r in range(5):
            if cur.carry[r]:  # same session, same row, next window
                assert cur.session[r] == prev.session[r]
                assert cur.position[r, 0] == prev.position[r, prev.lengths[r] - 1] + 1
            elif cur.session[r] >= 0:
                assert cur.position[r, 0] == 0
            else:  # idle rows never come back
                assert all(b.session[r] == -1 for b in bs[k:])


def test_bad_arguments():
    items, off = from_sessions([[1, 2]])
    with pytest.raises(ValueError):
        sequence_batches(items, off, [0], 2, 3, mode="window")
    with pytest.raises(ValueError):
        sequence_batches(items, off, [0], 2, 0)
    with pytest.raises(ValueError):
        user_parallel_schedule(items, off, [0], [0], 0)
    assert sequence_batches(*from_sessions([[1]]), [0], 2, 3) == []


# ---------------------------------------------------------------- pack()

def run_packed_vs_alone(b: SeqBatch, seed=0):
    torch.manual_seed(seed)
    emb = torch.nn.Embedding(40, 5)
    gru = torch.nn.GRU(5, 7, batch_first=True)
    with torch.no_grad():
        x = emb(torch.as_tensor(b.inputs))
        h0 = torch.randn(1, len(b.lengths), 7)
        out, h_n = gru(b.packed(x), h0)
        padded, lens = torch.nn.utils.rnn.pad_packed_sequence(out, batch_first=True)
        for r, L in enumerate(b.lengths.tolist()):
            if L == 0:
                continue
            alone, h_alone = gru(emb(torch.as_tensor(b.inputs[r:r + 1, :L])), h0[:, r:r + 1])
            torch.testing.assert_close(padded[r, :L], alone[0])
            torch.testing.assert_close(h_n[:, r], h_alone[:, 0])  # state after the last real step
    return out, lens


def test_pack_matches_unpadded_gru():
    sessions = [[1, 2, 3, 4, 5], [6, 7], [8, 9, 10], [11, 12, 13, 14, 15, 16, 17]]
    items, off = from_sessions(sessions)
    (b,) = sequence_batches(items, off, np.arange(4), 4, 6, pack=False)
    assert b.lengths.tolist() == [4, 1, 2, 6]
    out, lens = run_packed_vs_alone(b)
    assert lens.tolist() == [4, 1, 2, 6]
    packed = pack(b, torch.zeros(4, 6, 3))
    assert packed.data.shape[0] == int(b.lengths.sum())  # no cell of padding is run
    assert int(packed.batch_sizes.sum()) == 13


def test_pack_split_tail_with_idle_row():
    items, off = from_sessions([[1, 2, 3, 4, 5, 6], [7, 8, 9], [10, 11], [12, 13, 14, 15]])
    bs = sequence_batches(items, off, np.arange(4), 2, 2, mode="split")
    assert bs[3].lengths.tolist() == [0, 1]
    for b in bs:
        run_packed_vs_alone(b)
