"""Session-kNN family (SKNN, V-SKNN, STAN, VSTAN; training/baselines/sknn.py).

Hand-computed toys (weights, similarities, the sample and top-k cuts, STAN's time units), a
slow obviously-correct reference written here from the definitions (plain Python loops over
sessions) checked on every score of every step of real diginetica sessions, and the scorer's
session boundaries / ``select`` alignment.
"""
from __future__ import annotations

import io
import math

import numpy as np
import pandas as pd
import pytest
import torch

from tests.conftest import shared_path
from training import registry
from training.baselines.sknn import (SKNNConfig, SKNNFamily, STANConfig, STANFamily, VSKNNConfig,
                                     VSKNNFamily, VSTANConfig, VSTANFamily)
from training.config import ConfigError, config_to_dict
from training.data import ItemIndex, SessionData
from training.family import TrainContext

CPU = torch.device("cpu")
DAY_US = 86400 * 10**6
FAMILIES = {"sknn": (SKNNFamily, SKNNConfig), "vsknn": (VSKNNFamily, VSKNNConfig),
            "stan": (STANFamily, STANConfig), "vstan": (VSTANFamily, VSTANConfig)}


# ------------------------------------------------------------------------------- helpers
def make_data(sessions, end_us, start_us=None, session_ids=None) -> SessionData:
    """SessionData from item lists; event times spread 1 s apart ending at ``end_us``."""
    lengths = [len(s) for s in sessions]
    offsets = np.r_[0, np.cumsum(lengths)].astype(np.int64)
    ts = np.concatenate([e - 10**6 * np.arange(len(s))[::-1] for s, e in zip(sessions, end_us)]).astype(np.int64)
    start = ts[offsets[:-1]] if start_us is None else np.asarray(start_us, np.int64)
    sids = np.arange(len(sessions), dtype=np.int64) + 1 if session_ids is None else np.asarray(session_ids)
    return SessionData(items=np.concatenate([np.asarray(s, np.int64) for s in sessions]), offsets=offsets,
                       session_ids=sids, start_ts=start, user_ids=None,
                       end_ts_per_session=np.asarray(end_us, np.int64), ts=ts)


def fit_scorer(model: str, data: SessionData, n_items: int, **over):
    """Fit the family, write its checkpoint through torch.save / torch.load(weights_only=True)
    (what the trainer and evaluator do) and build the scorer from it via the registry."""
    fam_cls, cfg_cls = FAMILIES[model]
    cfg = cfg_cls(**over)
    support = np.bincount(data.items, minlength=n_items).astype(np.int64)
    ctx = TrainContext(index=ItemIndex(item_ids=np.arange(n_items) + 100, support=support), data=data,
                       support=support, device=CPU)
    fam = fam_cls(cfg, ctx)
    buf = io.BytesIO()
    torch.save({"model": model, "config": config_to_dict(cfg), "state_dict": fam.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    return registry.load_scorer(ckpt, CPU)


def run_alone(scorer, items, ts=None) -> list[np.ndarray]:
    """Scores after every event of one session in a fresh one-slot scorer."""
    st = scorer.begin(1)
    st = scorer.start_session(st, torch.tensor([True]), None)
    out = []
    for j, x in enumerate(items):
        args = (st, torch.tensor([x]))
        if scorer.uses_time:
            args += (torch.tensor([ts[j] if ts is not None else 0], dtype=torch.int64),)
        sc, st = scorer.step(*args)
        out.append(sc[0].numpy().astype(np.float64))
    return out


def run_parallel(scorer, sessions, times) -> list[list[np.ndarray]]:
    """All sessions in parallel rows, dropping a row (``select``) as soon as its session is
    over: returns the scores of every session after each of its events but the last."""
    n = len(sessions)
    st = scorer.begin(n)
    st = scorer.start_session(st, torch.ones(n, dtype=torch.bool), None)
    alive = np.arange(n)
    got = [[] for _ in range(n)]
    t = 0
    while len(alive):
        items = torch.tensor([sessions[s][t] for s in alive])
        args = (st, items)
        if scorer.uses_time:
            args += (torch.tensor([times[s][t] for s in alive], dtype=torch.int64),)
        sc, st = scorer.step(*args)
        for r, s in enumerate(alive):
            got[s].append(sc[r].numpy().astype(np.float64))
        t += 1
        keep = np.array([len(sessions[s]) > t + 1 for s in alive])
        if not keep.all():
            st = scorer.select(st, torch.from_numpy(np.flatnonzero(keep)))
            alive = alive[keep]
    return got


# ------------------------------------------------------------------- the slow reference
class SlowKNN:
    """The definitions of the module docstring, one session and one item at a time."""

    def __init__(self, sessions, end_us, session_ids, n_items, cfg):
        self.cfg = cfg
        self.n_items = n_items
        self.sessions = [list(s) for s in sessions]
        self.end_s = [e / 1e6 for e in end_us]
        # recency: later last event first, ties larger session id first
        order = sorted(range(len(sessions)), key=lambda i: (-end_us[i], -session_ids[i]))
        self.rank = {s: r for r, s in enumerate(order)}
        self.of_item = {}
        count = {}
        for i, s in enumerate(self.sessions):
            for x in s:
                self.of_item.setdefault(x, set()).add(i)
                count[x] = count.get(x, 0) + 1
        self.idf = {x: math.log(len(sessions) / c) for x, c in count.items()}
        self.cuts = {"sample": 0, "topk": 0}

    def weight(self, p, L):
        c = self.cfg
        if c.lambda_spw > 0:
            return math.exp((p - L) / c.lambda_spw)
        return {"same": lambda: 1.0, "div": lambda: p / L,
                "linear": lambda: 1 - 0.1 * (L - p) if p <= 10 else 0.0,
                "log": lambda: 1 / math.log10(L - p + 1.7), "quadratic": lambda: (p / L) ** 2}[c.weighting]()

    def scores(self, cur, t_us):
        c = self.cfg
        L = len(cur)
        last = {}
        for p, x in enumerate(cur, start=1):
            last[x] = p  # the last occurrence wins
        w = {x: self.weight(p, L) for x, p in last.items()}
        relevant = set()
        for x in cur:
            relevant |= self.of_item.get(x, set())
        cands = sorted(relevant, key=lambda i: self.rank[i])
        if c.sample_size and len(cands) > c.sample_size:
            self.cuts["sample"] += 1
            cands = cands[:c.sample_size]
        nbrs = []
        for i in cands:
            items = set(self.sessions[i])
            shared = set(last) & items
            if c.similarity == "cosine":
                sim = sum(w[x] for x in shared) / (math.sqrt(sum(v * v for v in w.values())) * math.sqrt(len(items)))
            elif c.similarity == "vec":
                sim = sum(w[x] for x in shared) / len(last)
            else:
                sim = len(shared) / len(set(last) | items)
            if c.lambda_snh > 0:
                sim *= math.exp(-(t_us / 1e6 - self.end_s[i]) / (c.lambda_snh * 86400))
            if sim > 0:
                nbrs.append((i, sim, shared))
        nbrs.sort(key=lambda e: (-float(np.float32(e[1])), self.rank[e[0]]))
        if len(nbrs) > c.k:
            self.cuts["topk"] += 1
            nbrs = nbrs[:c.k]
        out = np.zeros(self.n_items)
        for i, sim, shared in nbrs:
            seq = self.sessions[i]
            q = {}
            for pos, x in enumerate(seq, start=1):
                q[x] = pos
            qstar = max(q[x] for x in shared)
            pstar = max(last[x] for x in shared)
            d = L - pstar + 1
            f = sim * {"same": 1.0, "div": 1 / d, "linear": 1 - 0.1 * d if d <= 100 else 0.0,
                       "log": 1 / math.log10(d + 1.7), "quadratic": 1 / (d * d)}[c.weighting_score]
            if c.lambda_ipw > 0:
                f *= math.exp((pstar - L) / c.lambda_ipw)
            for x in set(seq):
                v = f
                if c.lambda_inh > 0:
                    v *= math.exp(-abs(q[x] - qstar) / c.lambda_inh)
                if c.lambda_idf > 0:
                    v += v * self.idf[x] * c.lambda_idf
                out[x] += v
        return out


# ------------------------------------------------------------------------- 1. V-SKNN toy
def _vsknn_toy():
    # A = [0, 1, 2] (ends first), B = [1, 3], C = [2, 1, 4, 1] (ends last; item 1 twice)
    return make_data([[0, 1, 2], [1, 3], [2, 1, 4, 1]], end_us=[100 * 10**6, 200 * 10**6, 300 * 10**6]), 6


def test_vsknn_weights_similarities_and_scores_by_hand():
    data, n = _vsknn_toy()
    sc = fit_scorer("vsknn", data, n)
    s1, s2 = run_alone(sc, [1, 2])
    # step 1, s = [1]: L = 1, w_1 = div(1, 1) = 1, |s| = 1 -> vec sim 1 for A, B, C; d = 1
    assert np.allclose(s1, [1, 3, 2, 1, 1, 0])
    # step 2, s = [1, 2]: w_1 = 1/2, w_2 = 2/2 = 1, |s| = 2
    #   vec: A (1/2 + 1)/2 = 0.75, B (1/2)/2 = 0.25, C 0.75
    #   dec (div of d = L - p* + 1): A, C hold item 2 (p = 2): d = 1 -> 1; B only item 1: d = 2 -> 1/2
    fA, fB, fC = 0.75, 0.25 * 0.5, 0.75
    want = np.array([fA, fA + fB + fC, fA + fC, fB, fC, 0.0])
    np.testing.assert_allclose(s2, want, rtol=1e-6)
    # IDF: N = 3 sessions, event counts 0:1, 1:4 (C has it twice), 2:2, 3:1, 4:1
    sc = fit_scorer("vsknn", data, n, lambda_idf=2.0)
    s2 = run_alone(sc, [1, 2])[1]
    idf = {0: math.log(3), 1: math.log(3 / 4), 2: math.log(3 / 2), 3: math.log(3), 4: math.log(3)}
    want_idf = np.array([want[i] * (1 + 2.0 * idf[i]) if i in idf else 0.0 for i in range(n)])
    np.testing.assert_allclose(s2, want_idf, rtol=1e-6)
    # top-k: k = 2 keeps A and C (B has the lowest similarity); k = 1: A and C tie -> the more
    # recent C (the later last event)
    s2 = run_alone(fit_scorer("vsknn", data, n, k=2), [1, 2])[1]
    np.testing.assert_allclose(s2, [fA, fA + fC, fA + fC, 0, fC, 0], rtol=1e-6)
    s2 = run_alone(fit_scorer("vsknn", data, n, k=1), [1, 2])[1]
    np.testing.assert_allclose(s2, [0, fC, fC, 0, fC, 0], rtol=1e-6)


def test_vsknn_position_weight_uses_last_occurrence_and_all_events():
    """s = [1, 2, 1]: L = 3 events, item 1's last position is 3 (w 1), item 2's is 2 (w 2/3)."""
    data, n = _vsknn_toy()
    s3 = run_alone(fit_scorer("vsknn", data, n), [1, 2, 1])[2]
    # vec (|s| = 2): A (1 + 2/3)/2, B 1/2, C (1 + 2/3)/2; every neighbour holds item 1 (d = 1)
    a, b = (1 + 2 / 3) / 2, 0.5
    np.testing.assert_allclose(s3, [a, a + b + a, a + a, b, a, 0], rtol=1e-6)


def test_vsknn_linear_weights_and_negative_similarities_by_hand():
    """session-rec's ``linear``: w = 1 - 0.1 (L - p) for p <= 10, else 0 -- which can be
    negative; a neighbour with similarity <= 0 is no neighbour."""
    data = make_data([[7, 8], [9, 10]], end_us=[100 * 10**6, 200 * 10**6])
    sc = fit_scorer("vsknn", data, 11, weighting="linear", weighting_score="linear")
    s = [7] + [1] * 8 + [9, 2, 2]  # L = 12: item 7 at p = 1, item 1 at 9, item 9 at 10, item 2 at 12
    out = run_alone(sc, s)[-1]
    # w: 7 -> 1 - 1.1 = -0.1, 1 -> 0.7, 9 -> 0.8, 2 -> 0 (p > 10); |s| = 4 distinct items
    # A = [7, 8]: vec -0.1/4 < 0 -> not a neighbour (it would add (-0.025) * (1 - 1.2) > 0)
    # B = [9, 10]: vec 0.8/4 = 0.2, shared item at p* = 10: d = 3, linear score 1 - 0.3 = 0.7
    want = np.zeros(11)
    want[[9, 10]] = 0.2 * 0.7
    np.testing.assert_allclose(out, want, rtol=1e-6, atol=1e-12)


# --------------------------------------------------------------------------- 2. SKNN toy
def _sknn_toy():
    # A = [0, 1], B = [1, 2, 3], C = [1, 4], D = [5, 0]; last events at 100..400 s, but the
    # FIRST events in another order (A starts last): the recency sample must use the last
    sessions = [[0, 1], [1, 2, 3], [1, 4], [5, 0]]
    end = [100 * 10**6, 200 * 10**6, 300 * 10**6, 400 * 10**6]
    start = [90 * 10**6, 10 * 10**6, 20 * 10**6, 30 * 10**6]
    return make_data(sessions, end, start_us=start), 6


def test_sknn_cosine_topk_and_recency_sample_by_hand():
    data, n = _sknn_toy()
    r2 = 1 / math.sqrt(2)
    # s = [1]: candidates A, B, C: cos A 1/sqrt(1*2), B 1/sqrt(3), C 1/sqrt(2); k = 2 -> A, C
    s1, s2 = run_alone(fit_scorer("sknn", data, n, k=2), [1, 0])
    np.testing.assert_allclose(s1, [r2, 2 * r2, 0, 0, r2, 0], rtol=1e-6)
    # s = [1, 0]: candidates A, B, C, D: cos A 2/sqrt(2*2) = 1, B 1/sqrt(6), C 1/2, D 1/2;
    # k = 2: A, then C and D tie -> D (more recent)
    np.testing.assert_allclose(s2, [1.5, 1, 0, 0, 0, 0.5], rtol=1e-6)
    # k = 3: A, D, C
    s2 = run_alone(fit_scorer("sknn", data, n, k=3), [1, 0])[1]
    np.testing.assert_allclose(s2, [1.5, 1.5, 0, 0, 0.5, 0.5], rtol=1e-6)
    # sample_size = 3: the 3 most recent candidates by LAST event are D, C, B: A (the most
    # similar one, and the latest to start) is out; k = 2 -> C and D (1/2 each), B (0.408) cut
    s2 = run_alone(fit_scorer("sknn", data, n, k=2, sample_size=3), [1, 0])[1]
    np.testing.assert_allclose(s2, [0.5, 0.5, 0, 0, 0.5, 0.5], rtol=1e-6)
    # the sample follows the session: at step 1 (item 1) it is A, B, C, all of them
    s1 = run_alone(fit_scorer("sknn", data, n, k=2, sample_size=3), [1, 0])[0]
    np.testing.assert_allclose(s1, [r2, 2 * r2, 0, 0, r2, 0], rtol=1e-6)


def test_stan_decays_and_time_units_by_hand():
    """Neighbour recency in days (x 86400 s), event times in microseconds."""
    t0 = 1_400_000_000 * 10**6
    data = make_data([[0, 1], [0, 2]], end_us=[t0, t0 + 5 * DAY_US])
    sc = fit_scorer("stan", data, 3)  # lambda_spw 1.02, lambda_snh 5 days, lambda_inh 2.05
    assert sc.uses_time
    s = run_alone(sc, [0], ts=[t0 + 10 * DAY_US])[0]
    # cos = 1/sqrt(1*2) for both; decay A exp(-10/5), B exp(-5/5); inside a neighbour the
    # other item is 1 position away from the shared one: exp(-1/2.05)
    a, b, inh = math.exp(-2) / math.sqrt(2), math.exp(-1) / math.sqrt(2), math.exp(-1 / 2.05)
    np.testing.assert_allclose(s, [a + b, a * inh, b * inh], rtol=1e-6)
    # position weights exp((p - L)/1.02) in the cosine: s = [1, 0] (L = 2)
    s = run_alone(sc, [1, 0], ts=[t0 + 10 * DAY_US] * 2)[1]
    w1, w0 = math.exp(-1 / 1.02), 1.0
    norm = math.sqrt(w1 * w1 + w0 * w0)
    simA = (w0 + w1) / (norm * math.sqrt(2)) * math.exp(-2)  # A = [0, 1] shares both
    simB = w0 / (norm * math.sqrt(2)) * math.exp(-1)  # B = [0, 2] shares item 0 (position 1)
    # A: q* = 2 (item 1 at position 2): item 0 one away; B: q* = 1: item 2 one away
    np.testing.assert_allclose(s, [simA * inh + simB, simA, simB * inh], rtol=1e-6)


# ----------------------------------------------- 3. against the slow reference on real data
def _diginetica():
    df = pd.read_csv(shared_path("diginetica-sample", "sample_train-item-views.csv"), sep=";")
    day = pd.to_datetime(df["eventdate"]).astype("datetime64[us]").astype(np.int64)
    df["ts"] = day + df["timeframe"].astype(np.int64) * 1000  # timeframe: ms
    df = df.sort_values(["session_id", "ts"], kind="stable")
    last_day = df.groupby("session_id")["eventdate"].transform("max")
    test_mask = last_day >= "2016-05-27"  # the last 6 days
    train, test = df[~test_mask], df[test_mask]
    train = train[train.groupby("session_id")["item_id"].transform("size") >= 2]
    items = np.sort(train["item_id"].unique())
    test = test[test["item_id"].isin(items)]
    test = test[test.groupby("session_id")["item_id"].transform("size") >= 2]

    def sessions(t):
        sid = t["session_id"].to_numpy()
        cut = np.flatnonzero(np.r_[True, sid[1:] != sid[:-1], True])
        it, ts = np.searchsorted(items, t["item_id"].to_numpy()), t["ts"].to_numpy()
        seqs = [it[a:b] for a, b in zip(cut[:-1], cut[1:])]
        times = [ts[a:b] for a, b in zip(cut[:-1], cut[1:])]
        return seqs, times, sid[cut[:-1]].astype(np.int64)

    tr_s, tr_t, tr_id = sessions(train)
    te_s, te_t, _ = sessions(test)
    lengths = [len(s) for s in tr_s]
    offsets = np.r_[0, np.cumsum(lengths)].astype(np.int64)
    tsv = np.concatenate(tr_t).astype(np.int64)
    data = SessionData(items=np.concatenate(tr_s).astype(np.int64), offsets=offsets, session_ids=tr_id,
                       start_ts=tsv[offsets[:-1]], user_ids=None, end_ts_per_session=tsv[offsets[1:] - 1],
                       ts=tsv)
    return data, len(items), tr_s, te_s, te_t


@pytest.fixture(scope="module")
def diginetica():
    return _diginetica()


VARIANTS = [
    ("sknn", {}), ("sknn", {"k": 3, "sample_size": 8}), ("sknn", {"k": 4, "similarity": "jaccard"}),
    ("vsknn", {}), ("vsknn", {"k": 3, "sample_size": 8, "lambda_idf": 2.0}),
    ("vsknn", {"k": 4, "similarity": "cosine", "weighting": "quadratic", "weighting_score": "log"}),
    ("vsknn", {"k": 4, "sample_size": 10, "weighting": "linear", "weighting_score": "linear"}),
    ("vsknn", {"k": 4, "weighting": "log", "weighting_score": "quadratic"}),
    ("stan", {}), ("stan", {"k": 3, "sample_size": 8}),
    ("vstan", {}), ("vstan", {"k": 3, "sample_size": 8, "lambda_ipw": 2.0}),
]


@pytest.mark.parametrize("model,over", VARIANTS, ids=[f"{m}-{'-'.join(o) or 'defaults'}" for m, o in VARIANTS])
def test_every_score_matches_the_slow_reference_on_diginetica(diginetica, model, over):
    data, n_items, tr_s, te_s, te_t = diginetica
    assert len(te_s) >= 40 and data.n_sessions > 1000
    cfg = FAMILIES[model][1](**over)
    ref = SlowKNN(tr_s, data.end_ts_per_session.tolist(), data.session_ids.tolist(), n_items, cfg)
    got = run_parallel(fit_scorer(model, data, n_items, **over), te_s, te_t)
    n_checked = n_nonzero = 0
    for s, seq in enumerate(te_s):
        assert len(got[s]) == len(seq) - 1
        for p in range(len(seq) - 1):
            want = ref.scores(list(seq[:p + 1]), int(te_t[s][p]))
            np.testing.assert_allclose(got[s][p], want, rtol=1e-6, atol=0,
                                       err_msg=f"{model} {over}: test session {s}, after event {p}")
            n_checked += 1
            n_nonzero += int((want > 0).sum())
    assert n_checked > 100 and n_nonzero > 1000
    if over.get("sample_size"):  # the tight variants do exercise both cuts
        assert ref.cuts["sample"] > 10 and ref.cuts["topk"] > 10, ref.cuts


# ------------------------------------------------------- 4. session boundaries and select
@pytest.mark.parametrize("model,over", [("sknn", {}), ("sknn", {"sample_size": 2}), ("vstan", {}),
                                        ("vstan", {"sample_size": 2})])
def test_new_session_in_a_slot_sees_nothing_of_the_previous_one_and_select_keeps_rows(model, over):
    data, n = _sknn_toy()
    sc = fit_scorer(model, data, n, **over)
    # X's candidates: B only. Y = [0, 5] alone: A and D; with X's sample leaking in, B (more
    # recent than A) would push A out of a sample of 2; with X's items leaking, B would score
    X, Y, Z = [2, 3, 2], [0, 5], [1, 4, 1, 0]
    tX = [500 * 10**6 + i for i in range(3)]
    tY = [600 * 10**6 + i for i in range(2)]
    tZ = [700 * 10**6 + i for i in range(4)]
    alone = {name: run_alone(sc, s, t) for name, s, t in (("X", X, tX), ("Y", Y, tY), ("Z", Z, tZ))}
    assert not np.allclose(alone["Y"][1], run_alone(sc, X + Y, tX + tY)[4])  # the leak would show

    def step(st, items, ts):
        return sc.step(st, torch.tensor(items), torch.tensor(ts)) if sc.uses_time else \
            sc.step(st, torch.tensor(items))

    st = sc.begin(2)
    st = sc.start_session(st, torch.tensor([True, True]), None)
    for t in range(3):  # slot 0 runs X, slot 1 runs Z
        out, st = step(st, [X[t], Z[t]], [tX[t], tZ[t]])
        np.testing.assert_array_equal(out[0].numpy(), alone["X"][t].astype(np.float32))
        np.testing.assert_array_equal(out[1].numpy(), alone["Z"][t].astype(np.float32))
    st = sc.end_session(st, torch.tensor([True, False]))
    st = sc.start_session(st, torch.tensor([True, False]), None)  # Y starts in slot 0
    out, st = step(st, [Y[0], Z[3]], [tY[0], tZ[3]])
    np.testing.assert_array_equal(out[0].numpy(), alone["Y"][0].astype(np.float32))
    np.testing.assert_array_equal(out[1].numpy(), alone["Z"][3].astype(np.float32))
    # slot 1 goes idle: select keeps row 0 (Y) only, which must still be Y's session
    st = sc.select(st, torch.tensor([0]))
    out, st = step(st, [Y[1]], [tY[1]])
    assert out.shape == (1, n)
    np.testing.assert_array_equal(out[0].numpy(), alone["Y"][1].astype(np.float32))
    # and the other way round: keep row 1
    st = sc.begin(2)
    st = sc.start_session(st, torch.tensor([True, True]), None)
    out, st = step(st, [X[0], Z[0]], [tX[0], tZ[0]])
    st = sc.select(st, torch.tensor([1]))
    out, st = step(st, [Z[1]], [tZ[1]])
    np.testing.assert_array_equal(out[0].numpy(), alone["Z"][1].astype(np.float32))


# ------------------------------------------------------------------ config and registry
def test_registry_defaults_and_config_errors():
    assert registry.get("sknn") is SKNNFamily and registry.get("vstan") is VSTANFamily
    for fam in (SKNNFamily, VSKNNFamily, STANFamily, VSTANFamily):
        assert fam.trainable is False
    c = SKNNConfig()
    assert (c.k, c.sample_size, c.similarity, c.weighting) == (100, 500, "cosine", "same")
    c = VSKNNConfig()
    assert (c.k, c.sample_size, c.similarity, c.weighting, c.weighting_score) == (100, 500, "vec", "div", "div")
    c = STANConfig()
    assert (c.k, c.sample_size, c.lambda_spw, c.lambda_snh, c.lambda_inh) == (100, 5000, 1.02, 5.0, 2.05)
    c = VSTANConfig()
    assert (c.k, c.sample_size, c.similarity, c.lambda_spw, c.lambda_snh, c.lambda_inh, c.lambda_ipw,
            c.lambda_idf) == (1000, 5000, "cosine", 4.0, 5.0, 4.0, 1e-5, 1.0)
    for bad in ({"k": 0}, {"sample_size": -1}, {"similarity": "dice"}, {"weighting": "exp"},
                {"weighting_score": "x"}, {"lambda_snh": -1.0}, {"lambda_idf": float("nan")},
                {"weighting": "div", "lambda_spw": 1.0}, {"similarity": "jaccard", "weighting": "div"},
                {"block_entries": 0}):
        with pytest.raises(ConfigError):
            SKNNConfig(**bad)
    data, n = _sknn_toy()
    assert not fit_scorer("sknn", data, n).uses_time and fit_scorer("vstan", data, n).uses_time


def test_small_blocks_give_the_same_scores(diginetica):
    """The memory bound (row blocks, neighbour-item chunks) changes nothing: tiny blocks give
    the scores of one block (up to the float32 sums across chunks)."""
    data, n_items, _, te_s, te_t = diginetica
    sessions, times = te_s[:30], te_t[:30]
    a = run_parallel(fit_scorer("vstan", data, n_items), sessions, times)
    b = run_parallel(fit_scorer("vstan", data, n_items, block_entries=50), sessions, times)
    for x, y in zip(a, b):
        for u, v in zip(x, y):
            assert ((u > 0) == (v > 0)).all()
            np.testing.assert_allclose(u, v, rtol=1e-6)
