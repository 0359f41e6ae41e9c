"""BPR-MF (Hidasi et al. 2016's baseline) and CoEvent MF (Villatel et al. 2018), untied and tied.

Expected values are computed independently in the tests (by hand / plain Python loops).
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from training import checkpoint as ck
from training.baselines.bprmf import BPRMFConfig, BPRMFFamily, BPRMFScorer
from training.baselines.coevent import CoEventConfig, CoEventFamily, TiedCoEventConfig, TiedCoEventFamily
from training.config import ConfigError, config_to_dict, resolve_config
from training.data import ItemIndex, SessionData, read_events, read_item_index
from training.family import TrainContext
from training.trainer import train

CPU = torch.device("cpu")


def _ctx(sessions: list[list[int]], n_items: int) -> TrainContext:
    items = np.array([i for s in sessions for i in s], np.int64)
    offsets = np.r_[0, np.cumsum([len(s) for s in sessions])].astype(np.int64)
    n = len(sessions)
    data = SessionData(items=items, offsets=offsets, session_ids=np.arange(10, 10 + n, dtype=np.int64),
                       start_ts=np.arange(n, dtype=np.int64), user_ids=None)
    support = np.bincount(items, minlength=n_items).astype(np.int64)
    index = ItemIndex(item_ids=np.arange(100, 100 + n_items, dtype=np.int64), support=support)
    return TrainContext(index=index, data=data, support=support, device=CPU)


def _ckpt(fam, model: str) -> dict:
    return {"model": model, "config": config_to_dict(fam.cfg), "state_dict": fam.state_dict(),
            "item_index": {"item_id": torch.from_numpy(fam.ctx.index.item_ids)}}


# ----------------------------------------------------------------------------- BPR-MF
@pytest.mark.parametrize("bias", [False, True])
def test_bpr_loss_of_a_toy_batch_equals_the_hand_computation(bias):
    fam = BPRMFFamily(BPRMFConfig(n_factors=2, item_bias=bias), _ctx([[0, 1], [2, 1, 0]], 3))
    m = fam.model
    with torch.no_grad():
        m.S.copy_(torch.tensor([[1.0, 2.0], [-0.5, 0.25]]))
        m.I.copy_(torch.tensor([[0.1, 0.3], [-0.2, 0.4], [0.5, -1.0]]))
        if bias:
            m.b.copy_(torch.tensor([0.3, -0.1, 0.2]))
    s, i, j = torch.tensor([0, 1, 1]), torch.tensor([1, 0, 2]), torch.tensor([2, 1, 2])
    loss, n = fam.loss((s, i, j))
    S = [[1.0, 2.0], [-0.5, 0.25]]
    I = [[0.1, 0.3], [-0.2, 0.4], [0.5, -1.0]]
    b = [0.3, -0.1, 0.2] if bias else [0.0, 0.0, 0.0]

    def x(u, k):
        return S[u][0] * I[k][0] + S[u][1] * I[k][1] + b[k]

    expect = sum(-math.log(1 / (1 + math.exp(-(x(u, p) - x(u, q))))) for u, p, q in
                 [(0, 1, 2), (1, 0, 1), (1, 2, 2)]) / 3
    assert n == 3 and loss.item() == pytest.approx(expect, rel=1e-6)
    loss.backward()  # row-sparse gradients: only the batch's sessions / items have rows
    assert m.S.grad.is_sparse and set(m.S.grad.coalesce().indices()[0].tolist()) == {0, 1}


def test_bpr_scorer_is_the_mean_of_the_item_factors_so_far_and_resets_at_a_new_session():
    I = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 1.0], [-1.0, 1.0]])
    b = torch.tensor([0.5, 0.0, -0.5, 1.0])
    for bias in (None, b):
        sc = BPRMFScorer(I, bias, CPU)
        st = sc.begin(3)
        st = sc.start_session(st, torch.tensor([True, True, True]), None)
        _, st = sc.step(st, torch.tensor([0, 1, 3]))
        scores, st = sc.step(st, torch.tensor([2, 2, 0]))
        # slot 0 has seen items 0, 2: mean (2, 0.5); slot 1 items 1, 2: (1.5, 1.5); slot 2 items 3, 0: (0, 0.5)
        means = [(2.0, 0.5), (1.5, 1.5), (0.0, 0.5)]
        bb = [0.0] * 4 if bias is None else b.tolist()
        expect = [[u0 * I[k, 0].item() + u1 * I[k, 1].item() + bb[k] for k in range(4)] for u0, u1 in means]
        assert scores.dtype == torch.float32 and scores.shape == (3, 4)
        assert torch.allclose(scores, torch.tensor(expect))
        # slot 1 starts a new session: its first step sees item 3 only; slot 0 goes on
        st = sc.start_session(st, torch.tensor([False, True, False]), None)
        scores, st = sc.step(st, torch.tensor([1, 3, 1]))
        m0 = ((1 + 3 + 0) / 3, (0 + 1 + 2) / 3)  # items 0, 2, 1
        assert torch.allclose(scores[1], I @ I[3] + torch.tensor(bb))
        assert torch.allclose(scores[0], I @ torch.tensor(m0) + torch.tensor(bb))
        # select keeps rows aligned: drop slot 0, step the others
        st = sc.select(st, torch.tensor([1, 2]))
        scores, st = sc.step(st, torch.tensor([0, 0]))
        assert torch.allclose(scores[0], I @ ((I[3] + I[0]) / 2) + torch.tensor(bb))
        assert torch.allclose(scores[1], I @ ((I[3] + I[0] + I[1] + I[0]) / 4) + torch.tensor(bb))


def test_bpr_batches_are_every_event_once_per_epoch_with_negatives_from_the_epoch_generator():
    ctx = _ctx([[0, 1], [2, 1, 0], [3, 3]], 4)
    fam = BPRMFFamily(BPRMFConfig(batch_size=3, neg_sampling="popularity"), ctx)
    b0 = list(fam.batches(0))
    s = torch.cat([b[0] for b in b0])
    i = torch.cat([b[1] for b in b0])
    pairs = sorted(zip(s.tolist(), i.tolist()))
    assert pairs == sorted([(0, 0), (0, 1), (1, 2), (1, 1), (1, 0), (2, 3), (2, 3)])
    again = list(fam.batches(0))
    assert all(torch.equal(x, y) for a, b in zip(b0, again) for x, y in zip(a, b))
    j = torch.cat([b[2] for b in fam.batches(1)] + [b[2] for b in b0])
    assert j.min() >= 0 and j.max() < 4


def test_bpr_config_errors():
    with pytest.raises(ConfigError, match="neg_sampling"):
        BPRMFConfig(neg_sampling="hard")
    with pytest.raises(ConfigError, match="lambda_session"):
        BPRMFConfig(weight_decay=0.1)
    with pytest.raises(ConfigError, match="n_factors"):
        resolve_config("bprmf", sets=["n_factors=0"])


# ----------------------------------------------------------------------------- CoEvent
def test_coevent_scores_are_U_j_dot_V_i_for_set_weights():
    ctx = _ctx([[0, 1, 2], [3, 4]], 5)
    fam = CoEventFamily(CoEventConfig(dim=3), ctx)
    g = torch.Generator().manual_seed(0)
    V, U = torch.randn(5, 3, generator=g), torch.randn(5, 3, generator=g)
    with torch.no_grad():
        fam.model.V.copy_(V)
        fam.model.U.copy_(U)
    sc = CoEventFamily.scorer(_ckpt(fam, "coevent"), CPU)
    st = sc.start_session(sc.begin(2), torch.tensor([True, True]), None)
    scores, st = sc.step(st, torch.tensor([2, 4]))
    for r, i in enumerate([2, 4]):
        for j in range(5):
            ref = sum(U[j, k].item() * V[i, k].item() for k in range(3))
            assert scores[r, j].item() == pytest.approx(ref, abs=1e-5)
    assert scores.dtype == torch.float32
    st = sc.select(st, torch.tensor([1]))
    s2, _ = sc.step(st, torch.tensor([4]))
    assert torch.allclose(s2[0], scores[1])
    # training forward on sampled columns = the same products
    cols = torch.tensor([3, 0])
    assert torch.allclose(fam.model(torch.tensor([2]), cols), (V[2] @ U[cols].t()).unsqueeze(0))


def test_coevent_full_softmax_loss_is_cross_entropy_over_all_items():
    ctx = _ctx([[0, 1, 2], [3, 4]], 5)
    fam = CoEventFamily(CoEventConfig(dim=3), ctx)
    fam.init_weights(torch.Generator().manual_seed(1))
    cur, nxt = torch.tensor([0, 1, 3]), torch.tensor([1, 2, 4])
    loss, n = fam.loss((cur, nxt, None))
    V, U = fam.model.V.detach(), fam.model.U.detach()
    ref = 0.0
    for i, j in zip(cur.tolist(), nxt.tolist()):
        z = [float(V[i] @ U[k]) for k in range(5)]
        ref += -(z[j] - math.log(sum(math.exp(v) for v in z)))
    assert n == 3 and loss.item() == pytest.approx(ref / 3, rel=1e-5)
    # the pairs of an epoch: every consecutive pair of every session, once
    pairs = sorted((a, b) for c, x, _ in fam.batches(0) for a, b in zip(c.tolist(), x.tolist()))
    assert pairs == [(0, 1), (1, 2), (3, 4)]


def test_tied_coevent_has_one_item_table_of_n_items_times_d():
    ctx = _ctx([[0, 1, 2], [3, 4, 5, 6]], 7)
    tied = TiedCoEventFamily(TiedCoEventConfig(dim=4), ctx)
    params = list(tied.model.parameters())
    assert len(params) == 1 and params[0].shape == (7, 4)
    assert sum(p.numel() for p in tied.model.parameters()) == 7 * 4
    assert len(tied.param_groups()) == 1 and len(tied.param_groups()[0]["params"]) == 1
    untied = CoEventFamily(CoEventConfig(dim=4), ctx)
    assert sum(p.numel() for p in untied.model.parameters()) == 2 * 7 * 4
    tied.init_weights(torch.Generator().manual_seed(0))
    W = tied.model.W.detach().clone()
    sc = TiedCoEventFamily.scorer(_ckpt(tied, "coevent_tied"), CPU)
    scores, _ = sc.step(None, torch.tensor([5]))
    assert torch.allclose(scores[0], torch.stack([W[j] @ W[5] for j in range(7)]), atol=1e-6)


def test_coevent_softmax_choice():
    ctx = _ctx([[0, 1, 2], [3, 4]], 5)
    assert not CoEventFamily(CoEventConfig(), ctx).sampled  # 5 items: full
    assert CoEventFamily(CoEventConfig(full_softmax_max_items=4), ctx).sampled
    assert CoEventFamily(CoEventConfig(softmax="sampled"), ctx).sampled
    with pytest.raises(ConfigError, match="softmax"):
        CoEventConfig(softmax="hierarchical")
    with pytest.raises(ConfigError, match="dim"):
        resolve_config("coevent_tied", sets=["dim=0"])


# ----------------------------------------------------------------------------- training runs
@pytest.fixture(scope="module")
def split(tmp_path_factory):
    from tests.training.toy import toy_split

    return toy_split(tmp_path_factory.mktemp("mf"), n_train=150, n_test=20, n_items=30)


def _weights(run) -> dict:
    return ck.load_checkpoint(run)["state_dict"]


@pytest.mark.parametrize("model,extra", [("bprmf", []), ("coevent", []), ("coevent_tied", []),
                                         ("coevent", ["softmax=sampled", "n_sample=8"])])
def test_a_tiny_training_run_lowers_the_loss_and_is_reproducible(split, tmp_path, model, extra):
    sets = ["n_epochs=3", "num_threads=1", "batch_size=32"] + extra
    a = train(model, split, tmp_path / "a", sets=sets, show_progress=False)
    b = train(model, split, tmp_path / "b", sets=sets, show_progress=False)
    c = train(model, split, tmp_path / "c", sets=sets + ["seed=7"], show_progress=False)
    la, lb = [h["loss"] for h in a["history"]], [h["loss"] for h in b["history"]]
    assert la[-1] < la[0]
    assert la == lb
    wa, wb, wc = _weights(tmp_path / "a"), _weights(tmp_path / "b"), _weights(tmp_path / "c")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert any(not torch.equal(wa[k], wc[k]) for k in wa if wa[k].is_floating_point())


def test_bprmf_resume_is_exact_and_init_from_maps_session_factors_by_id(split, tmp_path):
    sets = ["n_epochs=3", "num_threads=1", "batch_size=32"]
    train("bprmf", split, tmp_path / "full", sets=sets, show_progress=False)
    train("bprmf", split, tmp_path / "part", sets=["n_epochs=1", "num_threads=1", "batch_size=32"],
          show_progress=False)
    train("bprmf", split, tmp_path / "part", resume=True, sets=["n_epochs=3"], show_progress=False)
    wf, wp = _weights(tmp_path / "full"), _weights(tmp_path / "part")
    assert all(torch.equal(wf[k], wp[k]) for k in wf)
    # fine-tune on train_recent_4 (a subset of train_full's sessions) with 0 epochs of change
    ft = tmp_path / "ft"
    train("bprmf", split, ft, init_from=tmp_path / "full", show_progress=False,
          sets=["train_table=train_recent_4", "n_epochs=1", "learning_rate=0.0"])
    w = _weights(ft)
    assert torch.equal(w["I"], wf["I"])
    pos = {int(s): r for r, s in enumerate(wf["session_ids"].tolist())}
    recent = read_events(split, "train_recent_4", read_item_index(split), min_session_length=2)
    assert w["session_ids"].tolist() == recent.session_ids.tolist()
    for r, s in enumerate(w["session_ids"].tolist()):
        assert torch.equal(w["S"][r], wf["S"][pos[s]])


def test_coevent_learns_a_deterministic_bigram(tmp_path):
    """A -> B always (B also starts other sessions, followed by random items): B ranks first
    after A. Tied, score(A | A) = |W_A|² is the top of a symmetric form's row unless
    |W_B| cos > |W_A|, which this data (B -> random items) does not allow: there B must rank
    first among the items other than A itself."""
    from tests.training.toy import events_table, write_split
    from training.registry import load_scorer

    rng = np.random.default_rng(0)
    A, B = 100, 101
    others = list(range(102, 112))
    sess = []
    for k in range(120):
        if k % 2 == 0:
            sess.append((k + 1, [int(rng.choice(others)), A, B, int(rng.choice(others))]))
        else:
            sess.append((k + 1, [B] + [int(x) for x in rng.choice(others, 3)]))
    t = events_table(sess)
    split = write_split(tmp_path / "bigram", {"train_full": t, "test": t})
    a, b = (int(x) for x in read_item_index(split).lookup(np.array([A, B])))
    for model, extra in [("coevent", []), ("coevent", ["softmax=sampled", "n_sample=4"]), ("coevent_tied", [])]:
        run = tmp_path / f"{model}{len(extra)}"
        train(model, split, run, show_progress=False, sets=["n_epochs=15", "num_threads=1", "batch_size=16"] + extra)
        sc = load_scorer(ck.load_checkpoint(run), CPU)
        scores, _ = sc.step(sc.begin(1), torch.tensor([a]))
        row = scores[0].clone()
        if model == "coevent_tied":
            row[a] = -float("inf")
        order = torch.argsort(row, descending=True)
        assert int(order[0]) == b and row[b] > row[order[1]], (model, extra)
