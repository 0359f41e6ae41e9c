"""Prediction latency: the loop times each scorer.step call alone; evaluate, compare and the
MLflow logging report it.

The clock is ``evaluation.loop.time.perf_counter`` replaced by a fake that only moves when a
test says so: by a known dyadic amount inside ``step`` (so sums and differences are exact
in floating point) and by whole kiloseconds in everything around it (ranking via
``torch.topk``, ``start_session`` / ``end_session`` / ``select``), which would show up in
any step time that included that work.
"""
import json

import numpy as np
import pytest
import torch

from evaluation import mlflow_logging as ml
from evaluation.compare import compare
from evaluation.evaluate import evaluate
from evaluation.loop import evaluate_sessions
from tests.evaluation.test_compare import _ranks, write_eval
from tests.training.toy import events_table, write_split
from training.data import SessionData
from training.train import train

OUTSIDE = 1000.0  # seconds the clock jumps in any work that is not scorer.step
LATENCY_KEYS = ("latency_ms_p50", "latency_ms_p99", "latency_batch_rows_p50", "predict_us_per_event")


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


@pytest.fixture
def clock(monkeypatch):
    c = Clock()
    monkeypatch.setattr("evaluation.loop.time.perf_counter", c)
    topk = torch.topk

    def slow_topk(*a, **kw):  # the loop's ranking work
        c.now += OUTSIDE
        return topk(*a, **kw)

    monkeypatch.setattr(torch, "topk", slow_topk)
    return c


def _dt(k: int, rows: int) -> float:
    """Known step time of call k with `rows` rows: distinct for every call, exact in binary."""
    return (k % 7 + 1) / 64 + rows / 1024 + k / 4096


class TimedScorer:
    """Scores = item support (a POP), state = the begin() row numbers still held; every call
    but step moves the clock by OUTSIDE, step by _dt and logs (seconds, rows)."""

    def __init__(self, clock, n_items=5, with_select=True):
        self.clock, self.n_items, self.device = clock, n_items, torch.device("cpu")
        self.pop = torch.arange(n_items, dtype=torch.float32)
        self.calls = []
        if with_select:
            self.select = self._select

    def begin(self, n_slots):
        self.clock.now += OUTSIDE
        return np.arange(n_slots)

    def _select(self, state, rows):
        self.clock.now += OUTSIDE
        return state[rows.numpy()]

    def start_session(self, state, slots, users):
        self.clock.now += OUTSIDE
        return state

    def end_session(self, state, slots):
        self.clock.now += OUTSIDE
        return state

    def step(self, state, items):
        dt = _dt(len(self.calls), len(items))
        self.calls.append((dt, len(items)))
        self.clock.now += dt
        return self.pop.expand(len(items), -1).clone(), state


def _data(lengths):
    items = np.concatenate([np.arange(n) % 5 for n in lengths]).astype(np.int64)
    n = len(lengths)
    return SessionData(items=items, offsets=np.r_[0, np.cumsum(lengths)].astype(np.int64),
                       session_ids=np.arange(n, dtype=np.int64) + 1, start_ts=np.arange(n, dtype=np.int64),
                       user_ids=None)


@pytest.mark.parametrize("with_select", [True, False])
def test_each_step_call_is_timed_alone_with_its_rows(clock, with_select):
    lengths = [5, 4, 4, 3, 2]  # 4 + 3 + 3 + 2 + 1 = 13 predictions
    sc = TimedScorer(clock, with_select=with_select)
    res = evaluate_sessions(sc, _data(lengths), n_slots=2)
    assert res.n_events == 13
    dts, rows = map(np.array, zip(*sc.calls))
    assert res.step_seconds.dtype == np.float64 and res.step_rows.dtype == np.int64
    np.testing.assert_array_equal(res.step_rows, rows)
    np.testing.assert_array_equal(res.step_seconds, dts)  # exact: nothing else is in it
    assert res.step_seconds.max() < 1  # (a clock that took in any ranking would be >= 1000)
    if with_select:  # only active rows are stepped: one row per prediction
        assert rows.sum() == 13 and rows.max() == 2 and rows.min() == 1
    else:  # every call gets both rows, idle ones included
        assert set(rows.tolist()) == {2}


def test_no_session_to_step_gives_no_timings():
    res = evaluate_sessions(TimedScorer(Clock()), _data([1, 1]), n_slots=2)
    assert len(res.step_seconds) == 0 and len(res.step_rows) == 0


class TimedProxy:
    """A real scorer whose step advances the fake clock by a known amount (logged)."""

    def __init__(self, inner, clock):
        self.inner, self.clock, self.calls = inner, clock, []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def step(self, state, items, *rest):
        dt = _dt(len(self.calls), len(items))
        self.calls.append((dt, len(items)))
        out = self.inner.step(state, items, *rest)
        self.clock.now += dt
        return out


def test_metrics_json_latency_is_numpys_percentiles_of_the_step_times(tmp_path, clock, monkeypatch):
    uid = {1: 1, 2: 1, 3: 2, 4: 3, 5: 1, 6: 2, 7: 4}.get
    train_full = events_table([(1, [10, 11, 12]), (2, [11, 12, 13]), (3, [12, 13]), (4, [10, 13])],
                              user_of=uid)
    test = events_table([(5, [10, 11, 12, 13]), (6, [13, 12]), (7, [11, 10])], t0=1_700_000_000,
                        user_of=uid)
    root = write_split(tmp_path / "split", {"train_full": train_full, "train": train_full, "test": test})
    train("pop", root, tmp_path / "run", show_progress=False)
    import evaluation.evaluate as ev

    proxies = []
    load = ev.load_scorer

    def timed_load(ckpt, dev):
        proxies.append(TimedProxy(load(ckpt, dev), clock))
        return proxies[-1]

    monkeypatch.setattr(ev, "load_scorer", timed_load)
    m = evaluate(tmp_path / "run", root, tmp_path / "ev", mode="user", device="cpu")
    on_disk = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    dts, rows = map(np.array, zip(*proxies[0].calls))
    # user 1: 2 history sessions of 3 events (4 steps) + 3 test steps = 7 calls; POP has no
    # select, so every call steps all 3 lanes (users 1, 2, 4)
    assert len(dts) == 7 and set(rows.tolist()) == {3}
    ms = dts * 1e3
    assert on_disk["latency_ms_p50"] == pytest.approx(np.percentile(ms, 50, method="linear"), rel=1e-12)
    assert on_disk["latency_ms_p99"] == pytest.approx(np.percentile(ms, 99, method="linear"), rel=1e-12)
    assert on_disk["latency_ms_p99"] != pytest.approx(np.percentile(ms, 99, method="nearest"), rel=1e-6)
    assert on_disk["latency_batch_rows_p50"] == 3
    # events fed: 5 scored + 5 history (user 1: 2 + 2, user 2: 1), not the 21 rows stepped
    assert m["n_events"] == 5 and m["n_history_events_fed"] == 5
    assert on_disk["predict_us_per_event"] == pytest.approx(dts.sum() * 1e6 / 10, rel=1e-12)
    assert all(m[k] == on_disk[k] for k in LATENCY_KEYS)


def _cost_rows(md: str) -> dict:
    lines = md.splitlines()
    i = next(j for j, ln in enumerate(lines) if ln.startswith("| run | fit s"))
    head = [c.strip() for c in lines[i].strip("|").split("|")]
    out = {}
    for ln in lines[i + 2:]:
        if not ln.startswith("|"):
            break
        cells = [c.strip() for c in ln.strip("|").split("|")]
        out[cells[0]] = dict(zip(head, cells))
    return out


def test_compare_cost_table_shows_latency_and_old_evaluations_still_compare(tmp_path):
    lat = {"latency_ms_p50": 1.25, "latency_ms_p99": 7.5, "latency_batch_rows_p50": 512.0,
           "predict_us_per_event": 2.5, "n_parameters": 1000}
    seeds = [write_eval(tmp_path / f"gru{s}", _ranks(1, 30), model="gru4rec",
                        metrics_override={**lat, "latency_ms_p50": 1.25 + s, "latency_ms_p99": 7.5 + 2 * s})
             for s in (0, 1)]
    old = write_eval(tmp_path / "pop", _ranks(2, 80), model="pop")  # written before latency was logged
    res = compare({"gru": seeds, "pop": [old]}, "pop", tmp_path / "cmp", metrics=["recall_at_20"], n_boot=50)
    cost = res["runs"]["gru"]["cost"]
    assert cost["latency_ms_p50"] == pytest.approx(1.75) and cost["latency_ms_p99"] == pytest.approx(8.5)
    assert cost["latency_batch_rows_p50"] == 512 and cost["predict_us_per_event"] == 2.5
    assert all(res["runs"]["pop"]["cost"][k] is None for k in LATENCY_KEYS)
    rows = _cost_rows((tmp_path / "cmp" / "comparison.md").read_text())
    g, p = rows["gru"], rows["pop"]
    assert (g["step p50 ms"], g["step p99 ms"], g["rows/step"], g["us/event"]) == ("1.750", "8.500", "512", "2.50")
    assert g["parameters"] == "1,000"
    assert (p["step p50 ms"], p["step p99 ms"], p["rows/step"], p["us/event"]) == ("—",) * 4
    saved = json.loads((tmp_path / "cmp" / "comparison.json").read_text())
    assert saved["runs"]["gru"]["cost"]["latency_ms_p99"] == pytest.approx(8.5)


class FakeClient:
    def __init__(self):
        self.metrics = {}

    def log_batch(self, run_id, metrics=(), params=()):
        self.metrics.update({x.key: x.value for x in metrics})

    def log_artifact(self, run_id, path, artifact_path=None):
        pass


@pytest.mark.parametrize("table,prefix", [("test", ""), ("valid", "valid_")])
def test_log_evaluation_logs_size_and_latency_as_metrics(tmp_path, monkeypatch, table, prefix):
    m = {"recall_at_20": 0.5, "n_events": 10, "n_parameters": 1234, "model_bytes": 4936,
         "latency_ms_p50": 0.5, "latency_ms_p99": 2.0, "latency_batch_rows_p50": 64.0,
         "predict_us_per_event": None}  # None (nothing stepped) is not a metric
    (tmp_path / "metrics.json").write_text(json.dumps(m))
    client = FakeClient()
    monkeypatch.setattr(ml, "_client", lambda: client)
    ml.log_evaluation("run", tmp_path, table)
    want = {"recall_at_20": 0.5, "n_events": 10.0, "n_parameters": 1234.0, "model_bytes": 4936.0,
            "latency_ms_p50": 0.5, "latency_ms_p99": 2.0, "latency_batch_rows_p50": 64.0}
    assert client.metrics == {prefix + k: v for k, v in want.items()}
