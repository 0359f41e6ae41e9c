"""SessionData.take (training/data.py): the chosen sessions, in the given order, every array
sliced alike; expected values written out by hand from the toy table below."""
from __future__ import annotations

import numpy as np
import pytest

from training.data import SessionData


def _toy() -> SessionData:
    # session 0 (id 10): items 5, 6        ts 100, 110
    # session 1 (id 11): items 7           ts 200
    # session 2 (id 12): items 8, 9, 4    ts 300, 310, 320
    return SessionData(items=np.array([5, 6, 7, 8, 9, 4]), offsets=np.array([0, 2, 3, 6]),
                       session_ids=np.array([10, 11, 12]), start_ts=np.array([100, 200, 300]),
                       user_ids=np.array([-1, 3, 4]), n_unknown_dropped=2, n_short_dropped=1,
                       end_ts_per_session=np.array([110, 200, 320]),
                       ts=np.array([100, 110, 200, 300, 310, 320]))


def test_take_slices_every_array_in_the_given_order():
    t = _toy().take([2, 0])
    assert t.items.tolist() == [8, 9, 4, 5, 6]
    assert t.offsets.tolist() == [0, 3, 5]
    assert t.session_ids.tolist() == [12, 10]
    assert t.start_ts.tolist() == [300, 100]
    assert t.user_ids.tolist() == [4, -1]
    assert t.end_ts_per_session.tolist() == [320, 110]
    assert t.ts.tolist() == [300, 310, 320, 100, 110]
    assert (t.n_unknown_dropped, t.n_short_dropped) == (2, 1)
    assert t.offsets.dtype == np.int64 and t.items.dtype == _toy().items.dtype


def test_take_repeats_a_repeated_row_and_keeps_optional_arrays_absent():
    d = _toy()
    d.user_ids, d.ts, d.end_ts_per_session = None, None, None
    t = d.take(np.array([1, 1, 0]))
    assert t.items.tolist() == [7, 7, 5, 6]
    assert t.offsets.tolist() == [0, 1, 2, 4]
    assert t.session_ids.tolist() == [11, 11, 10]
    assert t.user_ids is None and t.ts is None and t.end_ts_per_session is None


def test_take_nothing_and_the_first_n():
    e = _toy().take([])
    assert e.n_sessions == 0 and e.n_events == 0 and e.offsets.tolist() == [0]
    f = _toy().take(np.arange(2))  # the first two sessions: a prefix of the table
    assert f.items.tolist() == [5, 6, 7] and f.offsets.tolist() == [0, 2, 3]


def test_take_refuses_out_of_range_rows_and_masks():
    with pytest.raises(IndexError, match=r"0\.\.2, got 1\.\.3"):
        _toy().take([1, 3])
    with pytest.raises(IndexError, match="got -1"):
        _toy().take([-1])
    with pytest.raises(TypeError, match="boolean mask"):
        _toy().take(np.array([True, False, True]))


def test_recent_is_take_of_the_latest_sessions():
    # recent(2): ceil(3/2) = 2 latest by start time -> sessions 1 and 2, in table order
    r = _toy().recent(2)
    assert r.session_ids.tolist() == [11, 12]
    assert r.items.tolist() == [7, 8, 9, 4]
    assert r.offsets.tolist() == [0, 1, 4]
    assert r.ts.tolist() == [200, 300, 310, 320]
