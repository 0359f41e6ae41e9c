"""Donkers et al.'s user-based GRUs (training/families/ugru.py): each cell against steps
computed here in numpy from the paper's equations, the rectified thresholds at their
boundaries, the attentional gate at initialisation, L2 on the user parameters only, the
mean-embedding fallback for unseen users, the user-mode state hand-over, truncated BPTT =
the unsplit user sequences, and the whole way through trainer, evaluator (user mode),
pyfunc (known and unknown user), fine-tuning, MLflow and the DAG."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from training import registry
from training.families import ugru as U

PRESETS = list(U.VARIANTS)
CELL_OF = {"ugru_linear": "linear", "ugru_rect": "rectified", "ugru_attn": "attentional"}


def _sig(x):
    return 1.0 / (1.0 + np.exp(-x))


def _cfg(name="ugru_linear", **kw):
    return registry.get(name).Config(**kw)


# ----------------------------------------------------------------------------- the equations in numpy
N, D, N_ITEMS = 3, 4, 6  # hidden n, embedding d (different, to catch a mixed-up block)
OMEGA = 0.2


def _ref_params(cell, seed=0):
    """Column-vector parameters as the paper writes them: T_{k,l} = (W [l, k], b [l])."""
    rng = np.random.default_rng(seed)
    w = lambda *s: rng.uniform(-0.8, 0.8, s)  # noqa: E731
    P = {"E_i": w(N_ITEMS, D), "E_v": w(3, D), "W_o": w(N_ITEMS, N), "b_o": w(N_ITEMS),
         "T3": w(2 * N, N + 2 * D), "b3": w(2 * N),  # eq. 3 / 9: [h; e; v] -> [u; r]
         "Tkh": w(N, N), "Tki": w(N, D), "Tkv": w(N, D), "bk": w(N)}  # eq. 4 / 10
    if cell == "rectified":  # eq. 7: small weights and biases -0.3 / +0.3, so that all three branches occur
        P["T7"] = rng.uniform(-0.05, 0.05, (2 * D, N + 2 * D))
        P["b7"] = np.r_[np.full(D, -0.3), np.full(D, 0.3)]
        P["E_v"] = np.array([[-0.8, 0.0, 0.1, 0.9], [0.6, -0.5, 0.2, -0.1], [0.4, 0.4, -0.6, 0.25]])
    if cell == "attentional":  # eq. 8: three maps
        P.update(Txh=w(D, N), Txi=w(D, D), Txv=w(D, D), bx=w(D))
    return P


def _ref_step(P, cell, h, e, v, branches=None):
    """One step from eq. 3-10, column vectors."""
    if cell == "rectified":
        kap = P["T7"] @ np.r_[h, e, v] + P["b7"]  # eq. 7
        k1, k2 = kap[:D], kap[D:]
        vf = np.empty(D)
        for l in range(D):  # eq. 6, component by component
            if v[l] < k1[l]:
                vf[l], b = 0.0, "zero"
            elif v[l] < k2[l]:
                vf[l], b = OMEGA * v[l], "leak"
            else:
                vf[l], b = v[l], "pass"
            if branches is not None:
                branches.add(b)
        v = vf
    if cell == "attentional":
        xi = _sig(P["Txh"] @ h + P["Txi"] @ e + P["Txv"] @ v + P["bx"])  # eq. 8
        e, v = (1 - xi) * e, xi * v
    ur = _sig(P["T3"] @ np.r_[h, e, v] + P["b3"])  # eq. 3 / 9
    u, r = ur[:N], ur[N:]
    k = np.tanh(P["Tkh"] @ (r * h) + P["Tki"] @ e + P["Tkv"] @ v + P["bk"])  # eq. 4 / 10
    return (1 - u) * h + u * k  # eq. 5


def _model_from(P, cell):
    cfg = _cfg(embedding=D, hidden=N, cell=cell, item_keep=1.0, user_keep=1.0, omega=OMEGA)
    m = U.UserGRU(N_ITEMS, np.array([10, 20, 30]), cfg).double()
    c = m.cell
    t = lambda a: torch.tensor(a, dtype=torch.float64)  # noqa: E731
    with torch.no_grad():  # the model multiplies row vectors (x @ W): it holds transposed blocks
        m.E_i.copy_(t(P["E_i"])), m.E_v.copy_(t(P["E_v"])), m.W_o.copy_(t(P["W_o"])), m.b_o.copy_(t(P["b_o"]))
        T3 = P["T3"]
        c.W_h.copy_(t(T3[:, :N].T)), c.W_i.copy_(t(T3[:, N:N + D].T)), c.W_v.copy_(t(T3[:, N + D:].T))
        c.b_g.copy_(t(P["b3"]))
        c.U_h.copy_(t(P["Tkh"].T)), c.U_i.copy_(t(P["Tki"].T)), c.U_v.copy_(t(P["Tkv"].T)), c.b_k.copy_(t(P["bk"]))
        if cell == "rectified":
            T7 = P["T7"]
            c.K_h.copy_(t(T7[:, :N].T)), c.K_i.copy_(t(T7[:, N:N + D].T)), c.K_v.copy_(t(T7[:, N + D:].T))
            c.b_kappa.copy_(t(P["b7"]))
        if cell == "attentional":
            c.A_h.copy_(t(P["Txh"].T)), c.A_i.copy_(t(P["Txi"].T)), c.A_v.copy_(t(P["Txv"].T))
            c.b_xi.copy_(t(P["bx"]))
    return m.eval()


@pytest.mark.parametrize("cell", U.CELLS)
def test_cell_matches_three_hand_computed_steps(cell):
    """Items 2, 5, 1 of user row 0 and user row 2 (two rows at once) from h0: every state and the
    output o = W_o h + b_o (eq. 1) against the equations written out above."""
    P = _ref_params(cell)
    m = _model_from(P, cell)
    items = [[2, 5, 1], [4, 0, 3]]
    rows = [0, 2]
    h0 = np.array([[0.3, -0.5, 0.1], [0.0, 0.0, 0.0]])
    branches: set = set()
    ref_h, ref_o = [], []
    for b in range(2):
        h, hs, os_ = h0[b], [], []
        for it in items[b]:
            h = _ref_step(P, cell, h, P["E_i"][it], P["E_v"][rows[b]], branches)
            hs.append(h)
            os_.append(P["W_o"] @ h + P["b_o"])
        ref_h.append(hs)
        ref_o.append(os_)
    with torch.no_grad():
        out, h = m(torch.tensor(items), torch.tensor([[r] * 3 for r in rows]), torch.tensor(h0))
        scores = m.scores(out)
    np.testing.assert_allclose(out.numpy(), np.array(ref_h), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(h.numpy(), np.array(ref_h)[:, -1], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(scores.numpy(), np.array(ref_o), rtol=1e-10, atol=1e-12)
    if cell == "rectified":
        assert branches == {"zero", "leak", "pass"}  # all three cases of eq. 6 were exercised
    # the scorer's one-event step is the same cell
    sc = U.UGRUScorer(m, torch.device("cpu"))
    st = sc.start_session(sc.begin(2), torch.tensor([True, True]), torch.tensor([10, 30]))
    st[0] = torch.tensor(h0)
    s1, _ = sc.step(st, torch.tensor([2, 4]))
    np.testing.assert_allclose(s1.numpy(), np.array(ref_o)[:, 0], rtol=1e-6)


def test_rectified_filter_at_its_boundaries():
    """Eq. 6 just below / above κ1 and κ2 (and exactly on them: the documented tie rule)."""
    eps = 1e-6
    k1, k2 = 0.2, 0.5
    v = torch.tensor([k1 - eps, k1, k1 + eps, k2 - eps, k2, k2 + eps, -3.0, 3.0], dtype=torch.float64)
    out = U.rectify(v, torch.full_like(v, k1), torch.full_like(v, k2), OMEGA)
    expect = [0.0, OMEGA * k1, OMEGA * (k1 + eps), OMEGA * (k2 - eps), k2, k2 + eps, 0.0, 3.0]
    np.testing.assert_allclose(out.numpy(), expect, rtol=0, atol=1e-15)
    # κ2 < κ1: no leaky band; below κ1 -> 0, above -> v
    v = torch.tensor([0.3 - eps, 0.3 + eps, 0.1 + eps], dtype=torch.float64)
    out = U.rectify(v, torch.full_like(v, 0.3), torch.full_like(v, 0.1), OMEGA)
    np.testing.assert_allclose(out.numpy(), [0.0, 0.3 + eps, 0.0], rtol=0, atol=1e-15)
    # negative thresholds: a negative component can pass, leak or vanish too
    v = torch.tensor([-0.6 - eps, -0.6 + eps, -0.2 + eps], dtype=torch.float64)
    out = U.rectify(v, torch.full_like(v, -0.6), torch.full_like(v, -0.2), OMEGA)
    np.testing.assert_allclose(out.numpy(), [0.0, OMEGA * (-0.6 + eps), -0.2 + eps], rtol=0, atol=1e-15)


def test_rectified_thresholds_come_from_eq_7_inside_the_cell():
    """κ = T_{3n,2n}[h; e; v]: with zero weights the thresholds are the bias, and the cell's
    filtered user vector switches exactly where v crosses them."""
    cell = U.UserGRUCell(2, 2, "rectified", omega=OMEGA).double()
    with torch.no_grad():
        cell.b_kappa.copy_(torch.tensor([0.1, -0.4, 0.3, 0.2], dtype=torch.float64))  # κ1 = (.1, -.4), κ2 = (.3, .2)
    eps = 1e-9
    h = torch.zeros(4, 2, dtype=torch.float64)
    e = torch.zeros(4, 2, dtype=torch.float64)
    v = torch.tensor([[0.1 - eps, -0.4 - eps], [0.1 + eps, -0.4 + eps], [0.3 - eps, 0.2 - eps],
                      [0.3 + eps, 0.2 + eps]], dtype=torch.float64)
    _, aux = cell.one_step(e, v, h)
    f = v.numpy() * np.array([[0, 0], [OMEGA, OMEGA], [OMEGA, OMEGA], [1, 1]])
    np.testing.assert_allclose(aux["v_filtered"].numpy(), f, rtol=0, atol=1e-15)
    # and a component of h moves κ1: K_h[0, 0] = 1 and h_0 = 0.05 -> κ1_0 = 0.15
    with torch.no_grad():
        cell.K_h[0, 0] = 1.0
    h1 = h.clone()
    h1[:, 0] = 0.05
    _, aux = cell.one_step(e[:2], torch.tensor([[0.15 - 1e-6, 0.0], [0.15 + 1e-6, 0.0]], dtype=torch.float64), h1[:2])
    vf = aux["v_filtered"][:, 0].tolist()
    assert vf[0] == 0.0 and vf[1] == pytest.approx(OMEGA * (0.15 + 1e-6))


def test_threshold_map_learns_only_through_the_surrogate_gradient():
    """The forward value is eq. 6 for every temperature; the thresholds' map gets a gradient with
    τ > 0 and none with τ = 0 (a step function's derivative)."""
    grads, outs = {}, {}
    for tau in (0.0, 0.1):
        torch.manual_seed(0)
        cell = U.UserGRUCell(3, 2, "rectified", omega=OMEGA, kappa_temperature=tau).double()
        for p in cell.parameters():
            torch.nn.init.uniform_(p, -0.3, 0.3)
        g = torch.Generator().manual_seed(1)
        e = torch.rand(5, 3, generator=g, dtype=torch.float64)
        v = torch.rand(5, 3, generator=g, dtype=torch.float64) - 0.5
        h, _ = cell.one_step(e, v, torch.zeros(5, 2, dtype=torch.float64))
        h.sum().backward()
        gk = cell.b_kappa.grad  # None: no path from the loss to the thresholds at all
        grads[tau] = 0.0 if gk is None else float(gk.abs().sum())
        outs[tau] = h.detach()
    assert grads[0.0] == 0.0 and grads[0.1] > 1e-4
    assert torch.equal(outs[0.0], outs[0.1])


def _toy_family(name, **kw):
    from training.data import SessionData
    from training.family import TrainContext

    rng = np.random.default_rng(0)
    n_s = 12
    lens = rng.integers(2, 9, n_s)
    d = SessionData(items=rng.integers(0, 15, int(lens.sum())), offsets=np.r_[0, np.cumsum(lens)],
                    session_ids=np.arange(n_s), start_ts=np.arange(n_s) * 100,
                    user_ids=np.array([7, 8, 9, -1] * 3))
    ctx = TrainContext(index=None, data=d, support=np.ones(15, np.int64), device=torch.device("cpu"))

    class _Index:
        n_items = 15
    ctx.index = _Index()
    fam = registry.get(name)(_cfg(name, **{"embedding": 8, "hidden": 6, **kw}), ctx)
    fam.init_weights(torch.Generator().manual_seed(0))
    return fam


def test_attention_gate_is_near_zero_at_initialisation_and_the_cell_a_plain_gru():
    fam = _toy_family("ugru_attn", embedding=32, hidden=32)
    m = fam.model.eval()
    g = torch.Generator().manual_seed(3)
    e = m.E_i[torch.randint(0, 15, (50,), generator=g)].detach()
    v = m.E_v[torch.randint(0, 3, (50,), generator=g)].detach()
    h = torch.rand(50, 32, generator=g) * 2 - 1
    with torch.no_grad():
        h_att, aux = m.cell.one_step(e, v, h)
        plain = U.UserGRUCell(32, 32, "linear")
        for k in ("W_h", "W_i", "b_g", "U_h", "U_i", "b_k"):  # the same GRU without the user vector
            getattr(plain, k).copy_(getattr(m.cell, k))
        h_gru, _ = plain.one_step(e, torch.zeros_like(v), h)
    assert float(aux["xi"].max()) < 0.01 and float(aux["xi"].min()) > 0
    assert float((h_att - h_gru).abs().max()) < 0.01
    # the literal "weights near zero" without the bias would give ξ = σ(0) = 1/2
    with torch.no_grad():
        m.cell.b_xi.zero_()
        _, aux = m.cell.one_step(e, v, h)
    assert float((aux["xi"] - 0.5).abs().max()) < 0.01


@pytest.mark.parametrize("item_keep,user_keep", [(0.8, 0.5), (0.6, 0.9)])
def test_dropout_keeps_the_given_fractions_of_item_and_user_vectors(item_keep, user_keep):
    m = U.UserGRU(5, np.array([1]), _cfg(embedding=4, hidden=4, item_keep=item_keep, user_keep=user_keep)).train()
    torch.manual_seed(0)
    for drop, keep in ((m.item_drop, item_keep), (m.user_drop, user_keep)):
        y = drop(torch.ones(200_000))
        assert abs(float((y != 0).float().mean()) - keep) < 0.005
        assert float(y.max()) == pytest.approx(1 / keep)  # inverted dropout: eval needs no rescaling
    assert torch.equal(m.eval().item_drop(torch.ones(3)), torch.ones(3))


def test_initialisation_is_uniform_in_plus_minus_0_1_and_the_gate_near_zero():
    """§4.1.3: weights and biases from U(-0.1, 0.1); the attention gate's weights near zero and
    its bias at attn_bias_init."""
    m = _toy_family("ugru_attn", embedding=40, hidden=40).model
    gate = {"cell.A_h", "cell.A_i", "cell.A_v", "cell.b_xi"}
    for k, p in m.named_parameters():
        a = p.detach().abs()
        if k == "cell.b_xi":
            assert torch.equal(p.detach(), torch.full_like(p, -5.0))
        elif k in gate:
            assert float(a.max()) <= 0.001 and float(a.max()) > 0.0009
        else:
            assert float(a.max()) <= 0.1 and float(a.max()) > 0.09, k
            assert abs(float(p.detach().mean())) < 0.02  # centred


def _names(params, model):
    ids = {id(p) for p in params}
    return {k for k, p in model.named_parameters() if id(p) in ids}


@pytest.mark.parametrize("name", PRESETS)
def test_l2_only_on_user_parameters(name):
    from training.optim import build_optimizer

    fam = _toy_family(name, user_l2=0.01, weight_decay=0.0)
    m = fam.model
    groups = fam.param_groups()
    by_decay = {g["weight_decay"]: _names(g["params"], m) for g in groups}
    user = {"E_v", "cell.W_v", "cell.U_v"} | ({"cell.K_v"} if name == "ugru_rect" else set()) \
        | ({"cell.A_v"} if name == "ugru_attn" else set())
    assert by_decay[0.01] == user
    assert by_decay[0.0] == {k for k, _ in m.named_parameters()} - user
    # one Adam step on zero data gradients: only the decayed (user) parameters move
    opt = build_optimizer("adam", groups, lr=0.001)
    before = {k: p.detach().clone() for k, p in m.named_parameters()}
    for p in m.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    moved = {k for k, p in m.named_parameters() if not torch.equal(p.detach(), before[k])}
    assert moved == user
    fam2 = _toy_family(name, user_l2_params="embedding")
    assert _names(fam2.param_groups()[1]["params"], fam2.model) == {"E_v"}


def test_unseen_and_anonymous_users_get_the_mean_user_embedding():
    fam = _toy_family("ugru_rect")
    m = fam.model.eval()
    assert m.user_ids.tolist() == [7, 8, 9]
    rows = m.user_rows(torch.tensor([8, 12345, -1, 7, 9]))
    assert rows.tolist() == [1, -1, -1, 0, 2]
    mean = m.E_v.detach().numpy().mean(0)  # the fallback: mean of the three training users' rows
    vec = m.user_vectors(rows).detach().numpy()
    np.testing.assert_allclose(vec[1], mean, rtol=1e-6)
    np.testing.assert_allclose(vec[2], mean, rtol=1e-6)
    np.testing.assert_allclose(vec[0], m.E_v[1].detach().numpy())
    # the scorer: an unseen user scores as the model with the mean vector, a known one with its row
    sc = U.UGRUScorer(m, torch.device("cpu"))
    st = sc.start_session(sc.begin(3), torch.tensor([True] * 3), torch.tensor([8, 12345, -1]))
    scores, _ = sc.step(st, torch.tensor([4, 4, 4]))
    with torch.no_grad():
        e = m.E_i[torch.tensor([4])]
        for r, v in ((0, m.E_v[1:2]), (1, torch.tensor(mean)[None]), (2, torch.tensor(mean)[None])):
            h, _ = m.cell.one_step(e, v, torch.zeros(1, 6))
            torch.testing.assert_close(scores[r:r + 1], m.scores(h))
    assert torch.equal(scores[1], scores[2]) and not torch.allclose(scores[0], scores[1])
    # begin() (no start_session, e.g. a row that never gets a user) is the mean user too
    s0, _ = sc.step(sc.begin(1), torch.tensor([4]))
    torch.testing.assert_close(s0[0], scores[1])


def test_user_mode_carries_the_state_across_a_users_sessions_only():
    fam = _toy_family("ugru_linear")
    sc = U.UGRUScorer(fam.model, torch.device("cpu"))
    both = torch.tensor([True, True])

    def second(mode, first_users, second_users):
        st = sc.begin(2, mode=mode)
        st = sc.start_session(st, both, torch.tensor(first_users))
        _, st = sc.step(st, torch.tensor([3, 4]))
        st = sc.end_session(st, both)
        st = sc.start_session(st, both, torch.tensor(second_users))
        return sc.step(st, torch.tensor([1, 1]))[0]

    def fresh(users):
        return sc.step(sc.start_session(sc.begin(2), both, torch.tensor(users)), torch.tensor([1, 1]))[0]

    carried = second("user", [7, 8], [7, 9])  # row 0: user 7 again (carried); row 1: a new user (reset)
    f = fresh([7, 9])
    assert not torch.allclose(carried[0], f[0]) and torch.equal(carried[1], f[1])
    # session mode: every session from h = 0, but with the user's own embedding
    torch.testing.assert_close(second("session", [7, 8], [7, 9]), f)
    assert not torch.allclose(f[0], f[1])  # users 7 and 9 score differently from the same h = 0
    # anonymous rows are never carried
    torch.testing.assert_close(second("user", [-1, -1], [-1, -1]), fresh([-1, -1]))
    # an id unseen in training is still one user: carried across its own sessions (mean embedding)
    c = second("user", [555, 555], [555, 556])
    assert not torch.allclose(c[0], fresh([555, 556])[0])
    torch.testing.assert_close(c[1], fresh([555, 556])[1])


def test_training_stream_pairs_every_event_with_its_own_user():
    """Every (input, target, user row) cell of an epoch is a consecutive pair of one user's
    chronological sequence, each pair exactly once; anonymous sessions get row -1."""
    fam = _toy_family("ugru_linear", batch_size=3, window=4)
    items, offs, ev_user = fam._items, fam._offsets, fam._ev_user
    row_of = {7: 0, 8: 1, 9: 2, -1: -1}
    want = []
    for s in range(len(offs) - 1):
        a, b = offs[s], offs[s + 1]
        want += [(int(items[j]), int(items[j + 1]), row_of[int(ev_user[j])]) for j in range(a, b - 1)]
    got = []
    for bt in fam.batches(0):
        m = bt.targets >= 0
        got += list(zip(bt.inputs[m].tolist(), bt.targets[m].tolist(), bt.user_rows[m].tolist()))
        assert bt.inputs.shape[1] <= 4
    assert sorted(got) == sorted(want) and len(got) > 40
    # each user's sessions, in time order, form one sequence (3 users + 3 anonymous sessions)
    assert len(offs) - 1 == 3 + 3
    d = fam.ctx.data
    u7 = np.flatnonzero(d.user_ids == 7)
    seq7 = np.concatenate([d.items[d.offsets[s]:d.offsets[s + 1]] for s in u7[np.argsort(d.start_ts[u7])]])
    k = [s for s in range(len(offs) - 1) if ev_user[offs[s]] == 7]
    assert len(k) == 1 and np.array_equal(items[offs[k[0]]:offs[k[0] + 1]], seq7)


@pytest.mark.parametrize("name", PRESETS)
def test_truncated_bptt_windows_give_the_loss_of_the_whole_user_sequences(name):
    """window 3, 3 rows: the summed loss over the windows (state carried, zeroed where a row takes
    its next user, idle rows skipped) equals the cross-entropy of every pair of the unsplit
    sequences, each run alone from h = 0 with its user's embedding."""
    torch.set_num_threads(1)
    fam = _toy_family(name, batch_size=3, window=3)
    fam.model.double().eval()  # no dropout: the two computations must agree exactly
    tot, n = 0.0, 0
    with torch.no_grad():
        for b in fam.batches(0):
            r = fam.loss(b)
            if r is not None:
                tot += float(r[0]) * r[1]
                n += r[1]
        m = fam.model
        ref, n_ref = 0.0, 0
        items, offs = fam._items, fam._offsets
        for s in range(len(offs) - 1):
            seq = torch.from_numpy(items[offs[s]:offs[s + 1]].astype(np.int64))
            row = m.user_rows(torch.tensor([int(fam._ev_user[offs[s]])]))
            out, _ = m(seq[None, :-1], row.expand(1, len(seq) - 1), m.init_state(1))
            ref += float(torch.nn.functional.cross_entropy(m.scores(out[0]), seq[1:], reduction="sum"))
            n_ref += len(seq) - 1
    assert n == n_ref and max(np.diff(offs)) > 7  # some sequences span 3+ windows
    assert tot == pytest.approx(ref, rel=1e-9)


@pytest.mark.parametrize("kw,match", [({"cell": "lstm"}, "cell"), ({"item_keep": 0.0}, "item_keep"),
                                      ({"user_keep": 1.5}, "user_keep"), ({"omega": 1.0}, "omega"),
                                      ({"user_l2_params": "none"}, "user_l2_params"), ({"window": 0}, "window")])
def test_bad_values_are_config_errors(kw, match):
    from training.config import ConfigError

    with pytest.raises(ConfigError, match=match):
        _cfg("ugru_linear", **kw)


def test_a_table_without_users_is_refused():
    from training.config import ConfigError
    from training.data import SessionData
    from training.family import TrainContext

    d = SessionData(items=np.array([0, 1, 1, 2]), offsets=np.array([0, 2, 4]), session_ids=np.array([1, 2]),
                    start_ts=np.array([0, 1]), user_ids=None)

    class _Index:
        n_items = 3
    ctx = TrainContext(index=_Index(), data=d, support=np.ones(3, np.int64), device=torch.device("cpu"))
    with pytest.raises(ConfigError, match="no user ids"):
        registry.get("ugru_attn")(_cfg("ugru_attn"), ctx)


def test_presets_and_paper_defaults():
    for name, cell in CELL_OF.items():
        c = _cfg(name)
        assert c.model == name and c.cell == cell
        assert (c.hidden, c.embedding, c.window, c.batch_size, c.n_epochs) == (1000, 1000, 20, 1000, 10)
        assert (c.optimizer, c.learning_rate, c.grad_clip) == ("adam", 0.001, 5.0)
        assert (c.item_keep, c.user_keep, c.user_l2, c.omega) == (0.8, 0.5, 0.01, 0.2)


# ----------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def split(tmp_path_factory):
    from tests.training.toy import events_table, random_sessions, write_split

    # 40 users with 3 sessions each; test: 15 sessions of 15 known users, 5 of unseen users
    sess = random_sessions(120, 25, seed=3, max_len=14)
    user = lambda s: 1000 + (s - 1) % 40  # noqa: E731
    train = events_table(sess, user_of=user)
    test = events_table(random_sessions(20, 25, seed=4, start_id=5000, max_len=8), t0=1_700_000_000,
                        user_of=lambda s: 1000 + (s - 5000) % 25 if s < 5015 else 9000 + s)
    # the recent table has a user the pre-trained model never saw (7777)
    recent = events_table(sess[-30:] + [(9999, [101, 102, 103, 104])],
                          user_of=lambda s: 7777 if s == 9999 else user(s))
    return write_split(tmp_path_factory.mktemp("ugru"), {
        "train_full": train, "train": train, "test": test, "train_recent_4": recent})


SMALL = {"num_threads": 1, "device": "cpu", "n_epochs": 2, "embedding": 12, "hidden": 12, "batch_size": 16,
         "learning_rate": 0.01}


@pytest.fixture(scope="module")
def trained(split, tmp_path_factory):
    from training.trainer import train

    root = tmp_path_factory.mktemp("ugru-runs")
    for name in PRESETS:
        train(name, split, root / name, show_progress=False, overrides=SMALL)
    return {name: root / name for name in PRESETS}


def test_user_mode_evaluation_scores_after_the_users_history(trained, split):
    """In user mode the loop feeds a test user's training sessions first: the first test
    prediction of a user equals the model run over that user's history (as the loop feeds it),
    then the first test item, with the user's embedding; in session mode it is the model from
    h = 0 with the same embedding."""
    from evaluation.loop import evaluate_sessions
    from training import checkpoint as ck
    from training.data import read_events

    ckpt = ck.load_checkpoint(trained["ugru_attn"])
    sc = U.UGRUFamily.scorer(ckpt, torch.device("cpu"))
    sc.model.double()  # both sides in float64: near-ties of a tiny model cannot flip a rank
    index = ck.item_index_from_ckpt(ckpt["item_index"])
    test = read_events(split, "test", index, min_session_length=2)
    hist = read_events(split, "train_full", index, min_session_length=2)
    res = evaluate_sessions(sc, test, n_slots=4, mode="user", history=[hist])
    res_s = evaluate_sessions(sc, test, n_slots=4, mode="session")
    u = int(test.user_ids[0])
    hs = np.flatnonzero(hist.user_ids == u)
    hs = hs[np.lexsort((hist.session_ids[hs], hist.start_ts[hs]))]
    unseen = len(np.unique(test.user_ids[test.user_ids >= 9000]))  # users not in training
    assert len(hs) == 3 and unseen >= 3 and res.n_users_without_history == unseen
    first = test.items[test.offsets[0]:test.offsets[0] + 1]
    m = sc.model
    row = m.user_rows(torch.tensor([u]))
    assert int(row) >= 0
    target = int(test.items[test.offsets[0] + 1])
    # every click of the user's history is fed (a session's last one at end_session), as the
    # model trained on the user's sequence
    fed = [hist.items[hist.offsets[s]:hist.offsets[s + 1]] for s in hs]
    for r, seq in ((res, np.concatenate(fed + [first])), (res_s, first)):
        x = torch.from_numpy(seq.astype(np.int64))[None]
        with torch.no_grad():
            out, _ = m(x, row.expand(1, x.shape[1]), m.init_state(1))
            scores = m.scores(out[0, -1]).float()
        i = np.flatnonzero((r.session_idx == 0) & (r.position == 0))
        assert len(i) == 1 and int(r.greater[i[0]]) == int((scores > scores[target]).sum()), r.mode


@pytest.mark.parametrize("name", PRESETS)
def test_trains_evaluates_in_user_mode_and_serves_known_and_unknown_users(name, trained, split, tmp_path):
    import mlflow.pyfunc
    import pandas as pd

    from evaluation import serving
    from evaluation.evaluate import evaluate
    from training import checkpoint as ck

    hist = json.loads((trained[name] / "history.json").read_text())
    assert len(hist["epochs"]) == 2 and hist["epochs"][1]["loss"] < hist["epochs"][0]["loss"]
    m = evaluate(trained[name], split, tmp_path / "eval", device="cpu", mode="user")
    assert m["model"] == name and m["mode"] == "user" and m["n_events"] > 0
    assert m["n_users_without_history"] >= 3  # the test sessions of users unseen in training
    ckpt = ck.load_checkpoint(trained[name])
    sd = ckpt["state_dict"]
    assert sd["user_ids"].tolist() == list(range(1000, 1040)) and tuple(sd["E_v"].shape) == (40, 12)
    path = tmp_path / "pyfunc"
    mlflow.pyfunc.save_model(str(path), python_model=str(serving.MODEL_CODE_PATH),
                             artifacts={serving.CHECKPOINT_ARTIFACT: str(trained[name] / "model.pt")},
                             signature=serving.signature(), pip_requirements=["torch"])
    served = mlflow.pyfunc.load_model(str(path))
    s = [105, 106, 107]
    out = served.predict(pd.DataFrame({"session": [s, s, s, s], "user_id": [1000, 1017, 424242, -1]}),
                         params={"k": 25})
    items = [list(x) for x in out["items"]]
    sc = [np.array(x) for x in out["scores"]]
    assert all(len(x) == 25 for x in items)
    assert items[2] == items[3] and np.allclose(sc[2], sc[3])  # unknown user = anonymous = mean embedding
    assert not np.allclose(sc[0], sc[2]) and not np.allclose(sc[0], sc[1])  # known users: their own rows
    # the served known user equals the scorer with that user's row, computed here from the weights
    scorer = registry.load_scorer(ckpt, torch.device("cpu"))
    mdl = scorer.model
    idx = ck.item_index_from_ckpt(ckpt["item_index"]).lookup(np.array(s))
    for r, uid in ((0, 1000), (2, None)):
        v = mdl.E_v[uid - 1000][None] if uid is not None else mdl.E_v.mean(0, keepdim=True)
        h = mdl.init_state(1)
        with torch.no_grad():
            for it in idx:
                h, _ = mdl.cell.one_step(mdl.E_i[torch.tensor([int(it)])], v, h)
            ref = mdl.scores(h)[0].numpy()
        top = np.argsort(-ref, kind="stable")[:25]
        np.testing.assert_allclose(sc[r], ref[top], rtol=1e-5)


def test_fine_tunes_from_its_weights_on_the_recent_table(trained, split, tmp_path):
    from training import checkpoint as ck
    from training.data import read_events, read_item_index
    from training.trainer import train

    name = "ugru_rect"
    over = {"num_threads": 1, "device": "cpu", "train_table": "train_recent_4", "n_epochs": 0}
    train(name, split, tmp_path / "ft0", overrides=over, init_from=trained[name], show_progress=False)
    pre = ck.load_checkpoint(trained[name])["state_dict"]
    start = ck.load_checkpoint(tmp_path / "ft0")["state_dict"]
    assert all(torch.equal(start[k], pre[k]) for k in pre if k not in ("user_ids", "E_v"))
    # every pre-trained user keeps its row; the new user 7777 starts from the pre-trained mean
    assert start["user_ids"].tolist() == list(range(1000, 1040)) + [7777]
    assert torch.equal(start["E_v"][:40], pre["E_v"])
    torch.testing.assert_close(start["E_v"][40], pre["E_v"].mean(0))
    from training.config import ConfigError

    with pytest.raises(ConfigError, match="init_optimizer=carry.*1 user"):  # the new user has no Adam state
        train(name, split, tmp_path / "ftc", overrides={**over, "init_optimizer": "carry"}, init_from=trained[name],
              show_progress=False)
    train(name, split, tmp_path / "ft1", overrides={**over, "n_epochs": 1}, init_from=trained[name],
          show_progress=False)
    run = json.loads((tmp_path / "ft1" / "history.json").read_text())["run"]
    recent = read_events(split, "train_recent_4", read_item_index(split), min_session_length=2)
    assert run["train_table"] == "train_recent_4" and run["train_sessions"] == recent.n_sessions < 40
    assert run["init_from_digest"] == ck.weights_digest(ck.load_checkpoint(trained[name]))
    after = ck.load_checkpoint(tmp_path / "ft1")["state_dict"]
    assert not torch.equal(after["cell.W_h"], pre["cell.W_h"])


def test_resume_is_exact(split, tmp_path):
    from training import checkpoint as ck
    from training.trainer import train

    over = {**SMALL, "n_epochs": 2}
    train("ugru_attn", split, tmp_path / "a", overrides=over, show_progress=False)
    train("ugru_attn", split, tmp_path / "b", overrides={**over, "n_epochs": 1}, show_progress=False)
    train("ugru_attn", split, tmp_path / "b", overrides=over, resume=True, show_progress=False)
    a, b = ck.load_checkpoint(tmp_path / "a")["state_dict"], ck.load_checkpoint(tmp_path / "b")["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_dag_families_param_takes_the_three_cells(tmp_path):
    from dags import pipeline_steps as steps

    cfg = steps.resolve({"data_dir": str(tmp_path), "families": [*PRESETS, "ppop", "pop"],
                         "fractions": [4], "epochs": 1, "device": "cpu"},
                        dag_id="session_rec_pipeline", dag_run_id="manual__u", interval_start="2014-04-07T00:00:00Z",
                        interval_end="2014-04-08T00:00:00Z")
    assert {"ugru_linear", "ugru_rect-recent4", "ugru_attn-recent4"} <= set(steps.planned_candidates(cfg))
    assert all(cfg["overrides"][n]["n_epochs"] == 1 for n in PRESETS)


def test_logs_to_mlflow_with_its_config_metrics_and_model(trained, split, tmp_path, monkeypatch):
    from tests.training.toy import logged_run

    name = "ugru_attn"
    run, items = logged_run(trained[name], split, tmp_path, name, monkeypatch)
    p = run.data
    assert p.params["model"] == name and p.params["cell"] == "attentional"
    assert p.params["user_keep"] == "0.5" and p.params["item_keep"] == "0.8" and p.params["user_l2"] == "0.01"
    assert p.params["window"] == "20" and p.params["grad_clip"] == "5.0"
    assert 0 <= p.metrics["recall_at_20"] <= 1 and "train_loss" in p.metrics
    assert len(items) == 3
