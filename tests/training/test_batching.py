"""Session-parallel schedule, per-slot reset, shrinking tail, and the negative sampler."""
import numpy as np
import pytest
import torch

from training.batching import SampleStore, StreamedSchedule, alias_tables, session_parallel_schedule
from training.data import ItemIndex, SessionData
from training.families.gru4rec import GRU4RecConfig, GRU4RecFamily
from training.family import TrainContext
from training.trainer import make_runner


def sessions(lengths):
    offsets = np.r_[0, np.cumsum(lengths)].astype(np.int64)
    items = np.arange(offsets[-1], dtype=np.int64)  # event e has item e: easy to trace
    return items, offsets


def test_two_slot_schedule_by_hand():
    # sessions A(3 events) B(2) C(4) D(2) in this order, 2 slots
    items, off = sessions([3, 2, 4, 2])
    s = session_parallel_schedule(items, off, np.arange(4), 2)
    # step: slot0 / slot1 ; A=0,1,2  B=3,4  C=5..8  D=9,10
    assert s.inputs.tolist() == [[0, 3], [1, 5], [9, 6], [-1, 7]]
    assert s.targets.tolist() == [[1, 4], [2, 6], [10, 7], [-1, 8]]
    # reset exactly where a new session enters a slot, no later, no other slot
    assert s.reset.tolist() == [[True, True], [False, True], [True, False], [False, False]]
    assert s.n_valid.tolist() == [2, 2, 2, 1]  # the batch shrinks at the tail ...
    assert s.n_events == sum(L - 1 for L in [3, 2, 4, 2])  # ... and no event is skipped (checklist 6)


def _slow_schedule(items, off, order, slots):
    """The obvious step-by-step simulation (independent reference): at every step each free slot,
    lowest first, takes the next session of >= 2 events; a session holds its slot len - 1 steps."""
    queue = [s for s in order if off[s + 1] - off[s] >= 2]
    kept = {s: k for k, s in enumerate(queue)}
    cur = [None] * slots  # (session, position) per slot
    rows = []
    while queue or any(c is not None for c in cur):
        row = []
        for b in range(slots):
            start = False
            if cur[b] is None and queue:
                cur[b], start = (queue.pop(0), 0), True
            if cur[b] is None:
                row.append((-1, -1, False, -1, -1))
                continue
            sess, pos = cur[b]
            e = off[sess] + pos
            row.append((items[e], items[e + 1], start, kept[sess], pos))
            cur[b] = (sess, pos + 1) if pos + 2 < off[sess + 1] - off[sess] else None
        rows.append(row)
    a = np.array(rows, dtype=object).reshape(len(rows), slots, 5) if rows else np.zeros((0, slots, 5), object)
    return {"inputs": a[..., 0].astype(np.int64), "targets": a[..., 1].astype(np.int64),
            "reset": a[..., 2].astype(bool), "session": a[..., 3].astype(np.int64),
            "position": a[..., 4].astype(np.int64)}


def test_streamed_schedule_by_hand_and_equal_to_the_whole_one():
    """StreamedSchedule (GRU4Rec training) builds the same rows chunk by chunk: the hand-made
    example above cut at every chunk size, then random tables (long sessions spanning many
    chunks, short ones skipped, odd chunk sizes) against a step-by-step simulation, as does
    session_parallel_schedule (the whole epoch as one chunk)."""
    items, off = sessions([3, 2, 4, 2])
    for size in (1, 2, 3, 4, 9):
        parts = list(StreamedSchedule(items, off, np.arange(4), 2).chunks(size))
        assert np.concatenate([p.inputs for p in parts]).tolist() == [[0, 3], [1, 5], [9, 6], [-1, 7]]
        assert np.concatenate([p.reset for p in parts]).tolist() == [[True, True], [False, True],
                                                                    [True, False], [False, False]]
    rng = np.random.default_rng(3)
    for n_sess, slots, size in ((300, 7, 5), (120, 16, 3), (50, 1, 4), (400, 32, 256)):
        lengths = np.where(rng.random(n_sess) < 0.05, rng.integers(20, 60, n_sess), rng.integers(1, 9, n_sess))
        items, off = sessions(lengths)
        order = rng.permutation(n_sess)
        ref = _slow_schedule(items, off, order, slots)
        whole = session_parallel_schedule(items, off, order, slots)
        for name in ("inputs", "targets", "reset", "session", "position"):
            assert np.array_equal(getattr(whole, name), ref[name]), name
        st = StreamedSchedule(items, off, order, slots)
        assert st.n_steps == whole.n_steps
        parts = list(st.chunks(size))
        assert [p.c0 for p in parts] == list(range(0, whole.n_steps, size))
        for name in ("inputs", "targets", "reset", "n_valid"):
            assert np.array_equal(np.concatenate([getattr(p, name) for p in parts]), getattr(whole, name)), name


def test_every_event_once_and_short_sessions_skipped():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 9, size=200)
    items, off = sessions(lengths)
    order = rng.permutation(200)
    s = session_parallel_schedule(items, off, order, 7)
    pairs = sorted(zip(s.inputs[s.targets >= 0].tolist(), s.targets[s.targets >= 0].tolist()))
    expect = sorted((e, e + 1) for k in range(200) for e in range(off[k], off[k + 1] - 1))
    assert pairs == expect
    # idle slots only at the end: once a slot is idle it stays idle
    idle = s.targets < 0
    assert (np.diff(idle.astype(int), axis=0) >= 0).all()


def _family(lengths, B, p_hidden=0.0):
    items, off = sessions(lengths)
    n_items = int(off[-1])
    data = SessionData(items=items, offsets=off, session_ids=np.arange(len(lengths)),
                       start_ts=np.arange(len(lengths)), user_ids=None)
    idx = ItemIndex(np.arange(n_items) + 100, np.ones(n_items, np.int64))
    cfg = GRU4RecConfig(batch_size=B, layers=[4], n_sample=3, dropout_hidden=p_hidden, n_epochs=1,
                        train_path="native")
    fam = GRU4RecFamily(cfg, TrainContext(idx, data, np.ones(n_items, np.int64), torch.device("cpu")))
    fam.init_weights(torch.Generator().manual_seed(0))
    return make_runner(fam, cfg, torch.device("cpu"))


def test_two_slot_training_resets_only_the_new_sessions_slot():
    """Capture the state each training step receives: zero exactly in the slot whose session
    just started (checklist 1: right rows, not one step late), non-zero elsewhere."""
    fam = _family([3, 2, 4, 2], B=2)
    assert fam.path == "native"
    seen = []
    real = fam.step.__call__

    class Spy:
        chunk = None  # per step (the whole-step C path equals it: test_native_kernels / test_families)

        def __call__(self, x, y, state, masks):
            seen.append((x.clone(), [h.clone() for h in state]))
            return real(x, y, state, masks)

    fam.step = Spy()
    fam.run_epoch(0)
    # steps (see test above): reset [[T,T],[F,T],[T,F],[F,-]]
    zero = [[bool((h[b] == 0).all()) for b in range(h.shape[0])] for _, (h,) in seen]
    assert zero[0] == [True, True]
    assert zero[1] == [False, True]
    assert zero[2] == [True, False]
    assert zero[3] == [False]  # tail: only slot 0 is left, it continues session C
    assert seen[3][0].tolist() == [7]


def test_sample_store_follows_support_power_alpha():
    support = np.array([0, 1, 4, 9, 16, 100], np.int64)
    st = SampleStore(support, n_sample=1000, alpha=0.5, store_size=200_000,
                     generator=torch.Generator().manual_seed(0), device=torch.device("cpu"))
    draws = st.take(200).reshape(-1).numpy()
    freq = np.bincount(draws, minlength=6) / len(draws)
    p = np.sqrt(support) / np.sqrt(support).sum()
    assert freq[0] == 0.0  # zero support is never sampled
    assert np.abs(freq - p).max() < 0.01
    assert st.take(3).shape == (3, 1000)


def test_alias_tables_exact():
    p = np.array([0.5, 0.25, 0.125, 0.125, 0.0])
    prob, alias = alias_tables(p)
    # probability mass recovered from the tables equals p exactly
    n = len(p)
    mass = np.zeros(n)
    for i in range(n):
        mass[i] += prob[i].item() / n
        mass[alias[i].item()] += (1 - prob[i].item()) / n
    assert mass == pytest.approx(p)


def test_parallel_slots_in_c_equals_the_python_heap(monkeypatch):
    """kernels.c rnn_parallel_slots (taken from NATIVE_SLOTS_MIN jobs on) against the Python heap
    it replaces, with many ties (durations 0-5) and 1 to 512 slots."""
    from training import batching, native

    lib = native.load()
    if lib is None:
        pytest.skip(f"no C kernels here: {native.why_not()}")
    calls = []

    class Spy:  # counts the C calls, so the test fails if the Python loop ran both times
        def __getattr__(self, name):
            return getattr(lib, name)

        def rnn_parallel_slots(self, *a):
            calls.append(a[0])
            return lib.rnn_parallel_slots(*a)

    rng = np.random.default_rng(3)
    for n_slots in (1, 3, 32, 512):
        dur = rng.integers(0, 6, 6000)
        monkeypatch.setattr(native, "load", lambda: Spy())
        got = batching.parallel_slots(dur, n_slots)
        monkeypatch.setattr(batching, "NATIVE_SLOTS_MIN", 10 ** 12)
        ref = batching.parallel_slots(dur, n_slots)
        monkeypatch.undo()
        assert len(calls) == 1
        calls.clear()
        np.testing.assert_array_equal(got[0], ref[0])
        np.testing.assert_array_equal(got[1], ref[1])
