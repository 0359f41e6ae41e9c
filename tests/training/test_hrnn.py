"""HRNN Init / HRNN All / RNN Concat (training/families/hrnn.py) against their equations
(Quadrana et al. 2017, eq. 1-5), written out here in numpy for a toy user with 3 sessions:
the session GRU's start from tanh(W_init c + b_init), one user-GRU step per finished session,
the reset for a new user, HRNN All's c at every step, RNN Concat's one sequence per user
(every click an input, a session's last included, the cross-session pair trained on) --
in the scorer (evaluation / serving) and in the user-parallel training step -- plus the
losses, the three dropouts, the stored per-user states, and the whole way through trainer,
evaluator (user mode), pyfunc (known / unknown user), fine-tuning, MLflow and the DAG."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from training import registry
from training.data import ItemIndex, SessionData
from training.families import hrnn as HR

NAMES = ("hrnn_init", "hrnn_all", "rnn_concat")
VARIANT = {"hrnn_init": "init", "hrnn_all": "all", "rnn_concat": "concat"}
N_ITEMS, H, U = 5, 3, 2  # H != U: a transposed matrix cannot pass


def _sig(x):
    return 1.0 / (1.0 + np.exp(-x))


# ----------------------------------------------------------------------------- the equations
def _params(seed=0):
    """Per-gate matrices of both GRUs, the initialisation and the output layer (numbers from a
    seeded generator; each gate its own matrix, as the equations are written)."""
    rng = np.random.default_rng(seed)
    P = {}
    for g in "rzn":
        P["W_i" + g] = rng.uniform(-0.9, 0.9, (H, N_ITEMS))  # one-hot input: column = item
        P["W_h" + g] = rng.uniform(-0.9, 0.9, (H, H))
        P["b_i" + g], P["b_h" + g] = rng.uniform(-0.5, 0.5, H), rng.uniform(-0.5, 0.5, H)
        P["W_c" + g] = rng.uniform(-0.9, 0.9, (H, U))  # HRNN All: [x; c] -> W_x x + W_c c
        P["Wu_i" + g] = rng.uniform(-0.9, 0.9, (U, H))
        P["Wu_h" + g] = rng.uniform(-0.9, 0.9, (U, U))
        P["bu_i" + g], P["bu_h" + g] = rng.uniform(-0.5, 0.5, U), rng.uniform(-0.5, 0.5, U)
    P["W_init"], P["b_init"] = rng.uniform(-0.9, 0.9, (H, U)), rng.uniform(-0.8, 0.8, H)
    P["Wy"], P["By"] = rng.uniform(-0.9, 0.9, (N_ITEMS, H)), rng.uniform(-0.3, 0.3, N_ITEMS)
    return P


def _gru(xr, xz, xn, h, Wr, Wz, Wn, br, bz, bn):
    """GRU4Rec's cell: r, z from input + recurrent products; reset inside the candidate."""
    r = _sig(xr + Wr @ h + br)
    z = _sig(xz + Wz @ h + bz)
    n = np.tanh(xn + r * (Wn @ h + bn))
    return (1 - z) * n + z * h


def ref_session_step(P, item, s, c, variant):
    x = {g: P["W_i" + g][:, item] + P["b_i" + g] + (P["W_c" + g] @ c if variant == "all" else 0.0) for g in "rzn"}
    return _gru(x["r"], x["z"], x["n"], s, P["W_hr"], P["W_hz"], P["W_hn"], P["b_hr"], P["b_hz"], P["b_hn"])


def ref_user_step(P, s_last, c):
    x = {g: P["Wu_i" + g] @ s_last + P["bu_i" + g] for g in "rzn"}
    return _gru(x["r"], x["z"], x["n"], c, P["Wu_hr"], P["Wu_hz"], P["Wu_hn"], P["bu_hr"], P["bu_hz"], P["bu_hn"])


def ref_init(P, c):
    return np.tanh(P["W_init"] @ c + P["b_init"])


def ref_walk(P, sessions, variant):
    """One user's sessions through eq. 1-5: per session (s_0, [s after each input], c after it).
    RNN Concat: the user's sessions are one sequence, so a session starts from the state after
    the previous session's last click (an input there, never scored)."""
    c = np.zeros(U)
    s = np.zeros(H)
    out = []
    for m, sess in enumerate(sessions):
        if variant == "concat":
            s0 = ref_session_step(P, sessions[m - 1][-1], s, None, "concat") if m else np.zeros(H)
        else:
            s0 = ref_init(P, c)
        s, states = s0, []
        for item in sess[:-1]:  # the last event is only a target
            s = ref_session_step(P, item, s, c, variant)
            states.append(s)
        if variant != "concat":
            c = ref_user_step(P, s, c)  # once per finished session, from its last state
        out.append((s0, states, c.copy()))
    return out


def ref_concat_states(P, items, hidden):
    """RNN Concat over one concatenated sequence: the state after each click (all of them)."""
    s, out = np.zeros(hidden), []
    for item in items:
        s = ref_session_step(P, int(item), s, None, "concat")
        out.append(s)
    return out


def load(model: HR.HRNNModel, P):
    """The per-gate matrices into the model's stacked layout ([r | z | n] blocks)."""
    t = lambda a: torch.tensor(np.asarray(a), dtype=torch.float32)  # noqa: E731
    with torch.no_grad():
        model.Wx0.copy_(t(np.concatenate([P["W_i" + g].T for g in "rzn"], 1)))
        model.b_ih.copy_(t(np.concatenate([P["b_i" + g] for g in "rzn"])))
        model.W_hh.copy_(t(np.concatenate([P["W_h" + g] for g in "rzn"], 0)))
        model.b_hh.copy_(t(np.concatenate([P["b_h" + g] for g in "rzn"])))
        if model.variant == "all":
            model.W_c.copy_(t(np.concatenate([P["W_c" + g] for g in "rzn"], 0)))
        if model.variant != "concat":
            model.Wu_ih.copy_(t(np.concatenate([P["Wu_i" + g] for g in "rzn"], 0)))
            model.bu_ih.copy_(t(np.concatenate([P["bu_i" + g] for g in "rzn"])))
            model.Wu_hh.copy_(t(np.concatenate([P["Wu_h" + g] for g in "rzn"], 0)))
            model.bu_hh.copy_(t(np.concatenate([P["bu_h" + g] for g in "rzn"])))
            model.W_init.copy_(t(P["W_init"]))
            model.b_init.copy_(t(P["b_init"]))
        model.Wy.copy_(t(P["Wy"]))
        model.By.copy_(t(P["By"]))
    return model


def params_of(model: HR.HRNNModel):
    """Inverse of :func:`load` (for a trained model)."""
    a = {k: v.detach().double().numpy() for k, v in model.state_dict().items()}
    h, u = model.hidden, model.user_hidden
    P = {}
    for k, g in enumerate("rzn"):
        sl, su = slice(k * h, (k + 1) * h), slice(k * u, (k + 1) * u)
        P["W_i" + g], P["b_i" + g] = a["Wx0"][:, sl].T, a["b_ih"][sl]
        P["W_h" + g], P["b_h" + g] = a["W_hh"][sl], a["b_hh"][sl]
        if "W_c" in a:
            P["W_c" + g] = a["W_c"][sl]
        if "Wu_ih" in a:
            P["Wu_i" + g], P["bu_i" + g] = a["Wu_ih"][su], a["bu_ih"][su]
            P["Wu_h" + g], P["bu_h" + g] = a["Wu_hh"][su], a["bu_hh"][su]
    if "W_init" in a:
        P["W_init"], P["b_init"] = a["W_init"], a["b_init"]
    P["Wy"], P["By"] = a["Wy"], a["By"]
    return P


def _cfg(name, **kw):
    return registry.get(name).Config(**{"hidden": H, "user_hidden": U, **kw})


def _model(name, P=None):
    return load(HR.HRNNModel(N_ITEMS, _cfg(name)), P or _params())


# the toy user: 3 sessions (the last events are targets only)
TOY = [[1, 3, 2], [4, 0], [2, 2, 1, 3]]
ALL = torch.tensor([True])


def _close(t, a, tol=1e-5):
    np.testing.assert_allclose(t.detach().double().numpy().reshape(np.shape(a)), a, rtol=tol, atol=tol)


# ----------------------------------------------------------------------------- scorer: the hand-over
@pytest.mark.parametrize("name", NAMES)
def test_scorer_walks_a_users_three_sessions_as_the_equations(name):
    """User mode: every step's scores, the session GRU's start of each session (HRNN: tanh(W_init
    c + b_init) with c from the numpy user GRU; RNN Concat: the previous session's last state)
    and the user state after every finished session. end_session gets the session's last click
    (as the evaluation loop passes it): RNN Concat feeds it, HRNN ignores it."""
    P = _params()
    variant = VARIANT[name]
    ref = ref_walk(P, TOY, variant)
    sc = HR.HRNNScorer(_model(name, P), torch.device("cpu"))
    assert sc.wants_last_item
    st = sc.begin(1, mode="user")
    c_prev = np.zeros(U)
    flat = ref_concat_states(P, [i for sess in TOY for i in sess], H)
    for m, sess in enumerate(TOY):
        st = sc.start_session(st, ALL, torch.tensor([7]))
        s0, states, c_after = ref[m]
        if variant == "concat":  # the state after every click of the earlier sessions
            _close(st[0][0], flat[sum(len(x) for x in TOY[:m]) - 1] if m else np.zeros(H))
        else:
            _close(st[0][0], np.tanh(P["W_init"] @ c_prev + P["b_init"]))  # from the equations' c
        _close(st[0][0], s0)
        for item, s_ref in zip(sess[:-1], states):
            scores, st = sc.step(st, torch.tensor([item]))
            _close(st[0][0], s_ref)
            _close(scores[0], P["Wy"] @ s_ref + P["By"])
        st = sc.end_session(st, ALL, torch.tensor([sess[-1]]))
        if variant != "concat":
            _close(st[1][0], c_after)
            _close(st[0][0], states[-1])  # the last click is not an input of HRNN
            c_prev = c_after


@pytest.mark.parametrize("name", ["hrnn_init", "hrnn_all"])
def test_hrnn_ignores_the_last_click_at_the_session_end(name):
    """HRNN's user GRU reads the session's last state (in training the last click is never an
    input): end_session with or without last_items gives the same state."""
    sc = HR.HRNNScorer(_model(name), torch.device("cpu"))
    st = sc.start_session(sc.begin(1, mode="user"), ALL, torch.tensor([7]))
    _, st = sc.step(st, torch.tensor([1]))
    a = sc.end_session([t.clone() for t in st], ALL, torch.tensor([4]))
    b = sc.end_session([t.clone() for t in st], ALL)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_user_gru_advances_exactly_once_per_finished_session(monkeypatch):
    """c stays fixed inside a session, moves only at end_session, by one user-GRU step: after the
    3 sessions it is GRU_usr applied 3 times (not 2, not 4) and the user GRU ran on 3 rows."""
    P = _params()
    model = _model("hrnn_init", P)
    calls = []
    orig = model.user_step
    monkeypatch.setattr(model, "user_step", lambda s, c: calls.append(len(s)) or orig(s, c))
    sc = HR.HRNNScorer(model, torch.device("cpu"))
    st = sc.begin(1, mode="user")
    ref = ref_walk(P, TOY, "init")
    for m, sess in enumerate(TOY):
        st = sc.start_session(st, ALL, torch.tensor([7]))
        c_in = st[1].clone()
        for item in sess[:-1]:
            _, st = sc.step(st, torch.tensor([item]))
            assert torch.equal(st[1], c_in)  # fixed throughout the session
        assert sum(calls) == m
        st = sc.end_session(st, ALL)
        assert sum(calls) == m + 1
    c3 = np.zeros(U)
    for m in range(3):
        c3 = ref_user_step(P, ref[m][1][-1], c3)
    _close(st[1][0], c3)
    assert np.abs(c3 - ref_user_step(P, ref[2][1][-1], c3)).max() > 1e-3  # a 4th step would differ


@pytest.mark.parametrize("name", NAMES)
def test_a_new_user_resets_both_states(name):
    """In the same slot, after user 7's 3 sessions, user 8 starts from c = 0 (HRNN: s_0 =
    tanh(b_init); RNN Concat: s = 0) and scores exactly as a fresh scorer would."""
    P = _params()
    sc = HR.HRNNScorer(_model(name, P), torch.device("cpu"))
    st = sc.begin(1, mode="user")
    for sess in TOY:
        st = sc.start_session(st, ALL, torch.tensor([7]))
        for item in sess[:-1]:
            _, st = sc.step(st, torch.tensor([item]))
        st = sc.end_session(st, ALL)
    st = sc.start_session(st, ALL, torch.tensor([8]))
    _close(st[1][0], np.zeros(U if name != "rnn_concat" else 0))
    _close(st[0][0], np.zeros(H) if name == "rnn_concat" else np.tanh(P["b_init"]))
    got, _ = sc.step(st, torch.tensor([3]))
    fresh = HR.HRNNScorer(_model(name, P), torch.device("cpu"))
    want, _ = fresh.step(fresh.start_session(fresh.begin(1, mode="user"), ALL, torch.tensor([8])), torch.tensor([3]))
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_hrnn_all_feeds_c_at_every_step():
    """Session 3 of the toy user: every step's state equals eq. 5 with c_2 in the input; the
    same equations with c fed at the first step only (or never) give other states."""
    P = _params()
    ref = ref_walk(P, TOY, "all")
    sc = HR.HRNNScorer(_model("hrnn_all", P), torch.device("cpu"))
    st = sc.begin(1, mode="user")
    for m, sess in enumerate(TOY):
        st = sc.start_session(st, ALL, torch.tensor([7]))
        c = ref[m - 1][2] if m else np.zeros(U)
        s_only_first = s_never = st[0][0].double().numpy()
        for n, item in enumerate(sess[:-1]):
            _, st = sc.step(st, torch.tensor([item]))
            _close(st[0][0], ref[m][1][n])
            s_only_first = ref_session_step(P, item, s_only_first, c if n == 0 else np.zeros(U), "all")
            s_never = ref_session_step(P, item, s_never, c, "init")
        if m == 2:  # 3 inputs: c matters at steps 2 and 3 as well
            assert np.abs(s_only_first - ref[m][1][-1]).max() > 1e-3
            assert np.abs(s_never - ref[m][1][-1]).max() > 1e-3
        st = sc.end_session(st, ALL)


def test_rnn_concat_carries_the_state_across_the_users_sessions():
    """User mode: the state after the user's every click, each session's last one fed at
    end_session (only the ending rows); session mode does not feed it."""
    P = _params()
    sc = HR.HRNNScorer(_model("rnn_concat", P), torch.device("cpu"))
    st = sc.begin(2, mode="user")
    s = np.zeros(H)
    both = torch.tensor([True, True])
    for sess in TOY:
        st = sc.start_session(st, both, torch.tensor([7, 8]))
        _close(st[0][0], s)  # where the previous session left it (zero only before the first)
        for item in sess[:-1]:
            s = ref_session_step(P, item, s, None, "concat")
            _, st = sc.step(st, torch.tensor([item, item]))
        before = st[0][1].clone()
        st = sc.end_session(st, torch.tensor([True, False]), torch.tensor([sess[-1], 0]))
        assert torch.equal(st[0][1], before)  # row 1 is not ending: untouched
        s = ref_session_step(P, sess[-1], s, None, "concat")
        _close(st[0][0], s)
        st = sc.start_session(st, torch.tensor([False, True]), torch.tensor([-1, 9]))  # row 1: fresh
    _close(st[0][0], ref_concat_states(P, [i for x in TOY for i in x], H)[-1])
    sess_mode = sc.begin(1, mode="session")
    _, sess_mode = sc.step(sc.start_session(sess_mode, ALL, torch.tensor([7])), torch.tensor([1]))
    after = sc.end_session([t.clone() for t in sess_mode], ALL, torch.tensor([3]))
    assert torch.equal(after[0], sess_mode[0])
    assert np.abs(s).max() > 0.1
    assert tuple(st[1].shape) == (2, 0)  # no user GRU, no user state
    assert not any(k.startswith(("Wu", "bu", "W_init", "b_init")) for k in _model("rnn_concat").state_dict())


@pytest.mark.parametrize("name", NAMES)
def test_fallback_session_mode_anonymous_and_unseen_users(name):
    """Session mode (even for a user with history), an anonymous session (-1) in user mode and
    an unknown user in serving all start from the zero user state: s_0 = tanh(b_init) (RNN
    Concat: 0). A known user in serving starts from the stored state."""
    P = _params()
    zero_s = np.zeros(H) if name == "rnn_concat" else np.tanh(P["b_init"])
    dim = H if name == "rnn_concat" else U
    table = torch.tensor([[0.3, -0.7, 0.5][:dim]], dtype=torch.float32)
    sc = HR.HRNNScorer(_model(name, P), torch.device("cpu"), torch.tensor([7]), table)

    def after_history(mode, user):
        st = sc.begin(1, mode=mode)
        for sess in TOY[:2]:
            st = sc.start_session(st, ALL, torch.tensor([user]))
            for item in sess[:-1]:
                _, st = sc.step(st, torch.tensor([item]))
            st = sc.end_session(st, ALL)
        return sc.start_session(st, ALL, torch.tensor([user]))

    _close(after_history("session", 7)[0][0], zero_s)
    _close(after_history("user", -1)[0][0], zero_s)
    assert np.abs(after_history("user", 7)[0][0].numpy() - zero_s).max() > 1e-3  # carried
    for users in (torch.tensor([12345]), torch.tensor([-1]), None):  # serving: unknown / anonymous / none
        _close(sc.start_session(sc.begin(1), ALL, users)[0][0], zero_s)
    known = sc.start_session(sc.begin(1), ALL, torch.tensor([7]))
    t = table[0].double().numpy()
    _close(known[0][0], t if name == "rnn_concat" else ref_init(P, t))
    # serving a known user mid-slot: a second session of the same user carries on from the first
    st = sc.start_session(sc.begin(1), ALL, torch.tensor([7]))
    _, st = sc.step(st, torch.tensor([2]))
    st = sc.end_session(st, ALL)
    st2 = sc.start_session(st, ALL, torch.tensor([7]))
    assert not torch.allclose(st2[0], known[0])


# ----------------------------------------------------------------------------- training path
# user 7: the toy sessions; user 8: 2 sessions; user 9: 1 session (takes user 8's slot)
TRAIN_SESSIONS = [(7, TOY[0]), (8, [0, 1]), (7, TOY[1]), (8, [3, 4, 2]), (7, TOY[2]), (9, [1, 4, 0])]


def _toy_data():
    items = np.concatenate([s for _, s in TRAIN_SESSIONS]).astype(np.int64)
    lens = [len(s) for _, s in TRAIN_SESSIONS]
    return SessionData(items=items, offsets=np.r_[0, np.cumsum(lens)].astype(np.int64),
                       session_ids=np.arange(1, 7, dtype=np.int64),
                       start_ts=np.array([10, 20, 30, 40, 50, 60], np.int64) * 1_000_000,
                       user_ids=np.array([u for u, _ in TRAIN_SESSIONS], np.int64))


def _toy_family(name, P=None, data=None, **kw):
    from training.family import TrainContext
    from training.trainer import table_support

    data = data if data is not None else _toy_data()
    ctx = TrainContext(index=ItemIndex(np.arange(N_ITEMS, dtype=np.int64), np.ones(N_ITEMS, np.int64)), data=data,
                       support=table_support(data, N_ITEMS), device=torch.device("cpu"))
    over = {"batch_size": 2, "session_order": "time", "dropout_user": 0.0, "dropout_session": 0.0,
            "dropout_init": 0.0, **kw}
    fam = registry.get(name)(_cfg(name, **over), ctx)
    if fam.cfg.embedding == "onehot":
        load(fam.model, P or _params())
    else:
        fam.init_weights(torch.Generator().manual_seed(0))
    return fam


def _slot_walks(P, variant):
    """What each of the 2 slots computes, step by step, from the equations: slot 0 walks user 7
    (6 steps), slot 1 user 8 (3 steps) and then user 9 (2 steps) -- both users at once. RNN
    Concat: one sequence per user, every consecutive pair (user 7: 9 events, 8 steps; user 8:
    5 events, 4 steps; user 9: 2 steps)."""
    walks = []
    for users in ([7], [8, 9]):
        steps = []
        for u in users:
            sess = [s for uu, s in TRAIN_SESSIONS if uu == u]
            if variant == "concat":
                seq = [i for x in sess for i in x]
                steps += [(s, seq[n + 1]) for n, s in enumerate(ref_concat_states(P, seq[:-1], H))]
                continue
            for (s0, states, _), ss in zip(ref_walk(P, sess, variant), sess):
                steps += [(s, ss[n + 1]) for n, s in enumerate(states)]
        walks.append(steps)
    return walks


def _top1(R):
    """TOP1 (tanh scores): per row, the mean over the other columns j of σ(r_j - r_i) + σ(r_j²)."""
    R = np.tanh(R)
    n = len(R)
    return sum(np.mean([_sig(R[i, j] - R[i, i]) + _sig(R[i, j] ** 2) for j in range(n) if j != i])
               for i in range(n))


@pytest.mark.parametrize("name", NAMES)
def test_training_steps_follow_the_equations_with_users_in_parallel(name, monkeypatch):
    """The user-parallel training step (2 slots, no dropout) carries each slot's states exactly
    as eq. 1-5 walk its users (hand-over at each session start, reset for user 9 in slot 1),
    and each step's loss is TOP1 over the in-batch targets of the two users / batch_size. The
    schedule is user_parallel_schedule's (2 users at once, not one after the other)."""
    P = _params()
    used = []
    orig = HR.user_parallel_schedule
    monkeypatch.setattr(HR, "user_parallel_schedule", lambda *a, **k: used.append(a[-1]) or orig(*a, **k))
    fam = _toy_family(name, P)
    walks = _slot_walks(P, VARIANT[name])
    n_steps = 0
    with torch.no_grad():
        for t, b in enumerate(fam.batches(0)):
            res = fam.loss(b)
            act = [k for k in range(2) if t < len(walks[k])]
            for k in act:
                _close(fam._s[k], walks[k][t][0])
            if len(act) == 2:
                R = np.array([[P["Wy"][walks[j][t][1]] @ walks[i][t][0] + P["By"][walks[j][t][1]] for j in act]
                              for i in act])
                assert float(res[0]) == pytest.approx(_top1(R) / 2, rel=1e-5) and res[1] == 2
            else:
                assert res is None  # one row left: nothing to rank it against
            n_steps += 1
    # 11 pairs (17 events - 6 sessions) in 6 steps; RNN Concat 14 (17 - 3 users) in 8: both slots busy
    assert used == [2] and n_steps == (8 if name == "rnn_concat" else 6)


def test_rnn_concat_trains_on_every_pair_of_a_users_events_across_sessions():
    """Hand-counted on the toy table: RNN Concat's schedule holds each user's events as one
    sequence, so pairs = events - 1 per user (user 7: 3+2+4 = 9 events -> 8 pairs, user 8: 2+3
    -> 4, user 9: 3 -> 2; 14 in all), the cross-session pairs included (user 7: 2 -> 4 and
    0 -> 2, user 8: 1 -> 3); a new user (9, after 8 in slot 1) starts from s = 0. HRNN Init:
    17 - 6 sessions = 11 pairs, no cross-session pair."""
    def pairs_of(sch):
        act = sch.targets >= 0
        return sorted(zip(sch.user[act].tolist(), sch.inputs[act].tolist(), sch.targets[act].tolist()))

    want = []
    for u in (7, 8, 9):
        seq = [i for uu, x in TRAIN_SESSIONS if uu == u for i in x]
        want += [(u, a, b) for a, b in zip(seq[:-1], seq[1:])]
    concat = _toy_family("rnn_concat").schedule(torch.Generator().manual_seed(0))
    assert concat.n_events == 14 == len(want) and concat.n_steps == 8
    # the schedule's "user" is the sequence's lane (the user id)
    assert pairs_of(concat) == sorted(want)
    for cross in ((7, 2, 4), (7, 0, 2), (8, 1, 3)):
        assert cross in pairs_of(concat)
    assert int(concat.user_start.sum()) == int(concat.session_start.sum()) == 3  # one sequence per user
    init = _toy_family("hrnn_init").schedule(torch.Generator().manual_seed(0))
    assert init.n_events == 11 and (7, 2, 4) not in pairs_of(init) and (8, 1, 3) not in pairs_of(init)
    rnd = _toy_family("rnn_concat", session_order="random").schedule(torch.Generator().manual_seed(3))
    assert pairs_of(rnd) == sorted(want)


def test_training_advances_the_user_gru_once_per_session_followed_by_another(monkeypatch):
    """In training the user update is part of the next session's first step (so its loss trains
    the user GRU and W_init): 6 sessions of 3 users -> 3 user-GRU rows; the states match."""
    fam = _toy_family("hrnn_init")
    rows = []
    orig = fam.model.user_step
    monkeypatch.setattr(fam.model, "user_step", lambda s, c: rows.append(len(s)) or orig(s, c))
    with torch.no_grad():
        for b in fam.batches(0):
            fam.loss(b)
    assert sum(rows) == 6 - 3


def test_the_first_step_of_a_session_trains_the_user_gru_and_the_initialisation():
    fam = _toy_family("hrnn_init")
    grads = []
    for b in fam.batches(0):
        fam.model.zero_grad(set_to_none=True)
        res = fam.loss(b)
        if res is None:
            continue
        res[0].backward()
        g = {k: p.grad is not None and float(p.grad.abs().sum()) > 0 for k, p in fam.model.named_parameters()}
        grads.append((bool((b.session_start & ~b.user_start).any()), bool(b.session_start.any()),
                      g["Wu_ih"], g["W_init"], g["b_init"]))
    # the user GRU and W_init get gradient exactly at the steps where a user goes on with a new
    # session; b_init wherever a session starts (a new user's s_0 = tanh(b_init) too)
    assert [x[2] for x in grads] == [x[0] for x in grads] == [x[3] for x in grads]
    assert any(x[0] for x in grads) and [x[4] for x in grads] == [x[1] for x in grads]


@pytest.mark.parametrize("key", ["dropout_user", "dropout_session", "dropout_init"])
def test_each_dropout_acts_on_its_own_part(key):
    """Each probability (0.5) drops only its part: the user GRU's new c, the session GRU's
    output (the carried state), or s_0 = tanh(W_init c + b_init); kept units are scaled by 2."""
    P = _params()
    ref_fam = _toy_family("hrnn_init", P)
    fam = _toy_family("hrnn_init", P, **{key: 0.5})
    seen = {"user": [], "session": [], "init": []}
    with torch.no_grad():
        for b, rb in zip(fam.batches(0), ref_fam.batches(0)):
            assert (b.u_mask is not None, b.s_mask is not None, b.i_mask is not None) == \
                (key == "dropout_user", key == "dropout_session", key == "dropout_init")
            # the reference family walks with fam's states, without dropout
            ref_fam._s, ref_fam._c = fam._s.clone(), fam._c.clone()
            starts = np.flatnonzero(b.session_start & ~b.user_start)
            if len(starts):
                rows = torch.from_numpy(starts)
                c_free = ref_fam.model.user_step(fam._s[rows], fam._c[rows])
            fam.loss(b)
            ref_fam.loss(rb)
            for r_, k in enumerate(starts):
                seen["user"].append((fam._c[k].numpy(), c_free[r_].numpy()))
            seen["session"].append((fam._s.numpy(), ref_fam._s.numpy()))
    def ratios(pairs):  # dropped-out / free value, where the free value is not ~0
        r = np.concatenate([np.divide(a, b, out=np.full_like(a, np.nan), where=np.abs(b) > 1e-6).ravel()
                            for a, b in pairs])
        return r[np.isfinite(r)]

    r_user = ratios(seen["user"])
    if key == "dropout_user":
        assert set(np.round(r_user, 5)) == {0.0, 2.0}
    else:
        np.testing.assert_allclose(r_user, 1.0, rtol=1e-5)
    if key == "dropout_session":
        assert set(np.round(ratios(seen["session"]), 5)) == {0.0, 2.0}


def test_init_dropout_drops_the_initial_state_only():
    model = _model("hrnn_init")
    s, c = torch.randn(2, H), torch.randn(2, U)
    mask = torch.tensor([[2.0, 0.0, 2.0]])
    s2, c2 = model.hand_over(s, c, torch.tensor([1]), torch.tensor([False]), torch.tensor([0]), None, mask)
    c_ref = model.user_step(s[1:], c[1:])
    torch.testing.assert_close(c2[1:], c_ref)
    torch.testing.assert_close(s2[1:], model.session_init(c_ref) * mask)
    torch.testing.assert_close(s2[0], s[0])  # other rows untouched


def test_sampled_cross_entropy_with_logq_by_hand():
    """loss=cross-entropy, 3 shared extra negatives: one step's loss = -Σ_i log softmax_j(R_ij -
    logq_j)[i] / B, R over the in-batch targets + the samples, logq = log support (in-batch)
    and alpha · log support (samples), as GRU4Rec does."""
    P = _params()
    fam = _toy_family("hrnn_init", P, loss="cross-entropy", final_act="softmax", n_sample=3, sample_alpha=0.5)
    walks = _slot_walks(P, "init")
    support = fam.ctx.support.astype(np.float64)
    with torch.no_grad():
        b = next(iter(fam.batches(0)))
        loss, n = fam.loss(b)
    cols = [walks[0][0][1], walks[1][0][1]] + b.samples.tolist()
    w = np.r_[1.0, 1.0, 0.5, 0.5, 0.5]
    R = np.array([[P["Wy"][j] @ walks[i][0][0] + P["By"][j] for j in cols] for i in range(2)])
    R = R - w * np.log(np.maximum(support[cols], 1))
    lse = np.log(np.exp(R).sum(1))
    assert n == 2 and float(loss) == pytest.approx(-(R[0, 0] - lse[0] + R[1, 1] - lse[1]) / 2, rel=1e-5)


@pytest.mark.parametrize("loss,act", [("top1", "tanh"), ("bpr-max", "linear"), ("cross-entropy", "softmax")])
def test_every_gru4rec_loss_trains(loss, act):
    fam = _toy_family("hrnn_all", loss=loss, final_act=act, bpreg=0.5)
    vals = [float(r[0]) for b in fam.batches(0) if (r := fam.loss(b)) is not None]
    assert len(vals) == 5 and all(np.isfinite(vals))


@pytest.mark.parametrize("embedding", ["tied", "separate"])
def test_embedding_inputs_follow_the_equations(embedding):
    """embedding=tied|separate: the session GRU reads W_ih e + b_ih (+ W_c c) with e = Wy[i] or
    E[i] instead of a one-hot column; one scorer step against the cell written out here."""
    torch.manual_seed(0)
    model = HR.HRNNModel(N_ITEMS, _cfg("hrnn_all", embedding=embedding, embedding_dim=4))
    for p in model.parameters():
        torch.nn.init.uniform_(p, -0.8, 0.8)
    a = {k: v.detach().double().numpy() for k, v in model.state_dict().items()}
    e = (a["Wy"] if embedding == "tied" else a["E"])[3]
    s0 = np.tanh(a["b_init"])
    gi = a["W_ih"] @ e + a["b_ih"]  # c = 0 at a new user: no W_c term
    gh = a["W_hh"] @ s0 + a["b_hh"]
    r, z = _sig(gi[:H] + gh[:H]), _sig(gi[H:2 * H] + gh[H:2 * H])
    n = np.tanh(gi[2 * H:] + r * gh[2 * H:])
    sc = HR.HRNNScorer(model, torch.device("cpu"))
    scores, st = sc.step(sc.start_session(sc.begin(1, mode="user"), ALL, torch.tensor([7])), torch.tensor([3]))
    _close(st[0][0], (1 - z) * n + z * s0)
    fam = _toy_family("hrnn_all", embedding=embedding, embedding_dim=4)
    vals = [float(r[0]) for b in fam.batches(0) if (r := fam.loss(b)) is not None]
    assert len(vals) == 5 and all(np.isfinite(vals))


def test_user_parallel_batches_hold_many_users_at_once():
    """40 users with 3 sessions, batch 8: 8 different users in the first step, the epoch takes
    about events / 8 steps (one user at a time would take all events), every pair once."""
    rng = np.random.default_rng(0)
    sess = [rng.integers(0, N_ITEMS, int(rng.integers(2, 6))) for _ in range(120)]
    users = np.arange(120) % 40
    data = SessionData(items=np.concatenate(sess).astype(np.int64),
                       offsets=np.r_[0, np.cumsum([len(s) for s in sess])].astype(np.int64),
                       session_ids=np.arange(120, dtype=np.int64), start_ts=np.arange(120, dtype=np.int64),
                       user_ids=users.astype(np.int64))
    fam = _toy_family("hrnn_init", data=data, batch_size=8, session_order="random")
    sch = fam.schedule(torch.Generator().manual_seed(1))
    assert len(np.unique(sch.user[0])) == 8
    pairs = sum(len(s) - 1 for s in sess)
    assert sch.n_events == pairs and sch.n_steps < pairs / 8 * 1.3
    sch2 = fam.schedule(torch.Generator().manual_seed(2))
    assert not np.array_equal(sch.user[0], sch2.user[0])  # users shuffled per epoch
    for s in range(8):  # a slot walks one user's sessions in time order before the next user
        u = sch.user[:, s][sch.user[:, s] >= 0]
        ss = sch.session[:, s][sch.session[:, s] >= 0]
        change = np.flatnonzero(u[1:] != u[:-1])
        assert len(np.unique(u)) == len(change) + 1  # never comes back to an earlier user
        for uu in np.unique(u):
            assert np.all(np.diff(ss[u == uu]) >= 0)  # sessions in time order (ids = time here)


# ----------------------------------------------------------------------------- config
def test_defaults_are_table_2_large():
    i, a, c = (registry.get(n).Config() for n in NAMES)
    assert (i.variant, a.variant, c.variant) == ("init", "all", "concat")
    assert (i.hidden, i.user_hidden, a.hidden, a.user_hidden, c.hidden) == (500,) * 5
    assert (i.dropout_user, i.dropout_session, i.dropout_init) == (0.1, 0.2, 0.2)
    assert (a.dropout_user, a.dropout_session, a.dropout_init) == (0.0, 0.2, 0.2)
    assert (i.batch_size, i.learning_rate, i.momentum) == (100, 0.1, 0.1)
    assert (a.batch_size, a.learning_rate, a.momentum) == (50, 0.05, 0.3)
    assert all(x.optimizer == "adagrad" and x.loss == "top1" and x.n_epochs == 10 and x.n_sample == 0
               and x.session_order == "random" and x.embedding == "onehot" for x in (i, a, c))


@pytest.mark.parametrize("kw,match", [({"variant": "both"}, "variant"), ({"dropout_init": 1.0}, "dropout_init"),
                                      ({"loss": "cross-entropy"}, "softmax"), ({"user_hidden": 0}, "user_hidden"),
                                      ({"embedding": "separate"}, "embedding_dim")])
def test_bad_values_are_config_errors(kw, match):
    from training.config import ConfigError

    with pytest.raises(ConfigError, match=match):
        registry.get("hrnn_init").Config(**kw)


@pytest.mark.parametrize("name", NAMES)
def test_parameter_count_by_hand(name):
    n, h, u = 1000, 100, 50
    m = HR.HRNNModel(n, registry.get(name).Config(hidden=h, user_hidden=u))
    want = n * 3 * h + 3 * h * h + 6 * h + n * h + n  # one-hot input, session GRU, output layer
    if name != "rnn_concat":
        want += 3 * u * h + 3 * u * u + 6 * u + h * u + h  # user GRU + initialisation
    if name == "hrnn_all":
        want += 3 * h * u  # c in the session GRU's input
    assert sum(p.numel() for p in m.parameters()) == want


# ----------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def split(tmp_path_factory):
    from tests.training.toy import events_table, random_sessions, write_split

    sess = random_sessions(120, 25, seed=3, max_len=10)  # 40 users with 3 sessions each
    user_of = lambda s: 1000 + (s - 1) % 40  # noqa: E731
    train = events_table(sess, user_of=user_of)
    test = events_table(random_sessions(20, 25, seed=4, start_id=5000, max_len=8), t0=1_700_000_000,
                        user_of=lambda s: 1000 + (s - 5000) % 25 if s < 5015 else 9000 + s)
    return write_split(tmp_path_factory.mktemp("hrnn"), {
        "train_full": train, "train": train, "test": test,
        "train_recent_4": events_table(sess[-30:], user_of=user_of)})


OVER = {"num_threads": 1, "device": "cpu", "n_epochs": 2, "hidden": 12, "user_hidden": 8, "batch_size": 8}


@pytest.fixture(scope="module")
def trained(split, tmp_path_factory):
    from training.trainer import train

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("hrnn-runs")
    for name in NAMES:
        train(name, split, root / name, show_progress=False, overrides=OVER)
    return {n: root / n for n in NAMES}


@pytest.mark.parametrize("name", NAMES)
def test_checkpoint_stores_each_users_state_after_the_training_sessions(name, trained, split):
    """served_user_states[u] = the numpy equations run over user u's training sessions in time
    order with the checkpoint's weights (HRNN: c after the last one; RNN Concat: s)."""
    from training import checkpoint as ck
    from training.data import read_events, read_item_index

    ckpt = ck.load_checkpoint(trained[name])
    sc = registry.load_scorer(ckpt, torch.device("cpu"))
    P = params_of(sc.model)
    data = read_events(split, "train_full", read_item_index(split), min_session_length=2)
    users = ckpt["state_dict"]["served_user_ids"].numpy()
    assert users.tolist() == sorted(set(data.user_ids.tolist())) and len(users) == 40
    global H, U
    h0, u0 = H, U
    H, U = sc.model.hidden, sc.model.user_hidden
    try:
        for k in (0, 17, 39):
            idx = np.flatnonzero(data.user_ids == users[k])
            idx = idx[np.argsort(data.start_ts[idx])]
            sess = [data.items[data.offsets[s]:data.offsets[s + 1]] for s in idx]
            if name == "rnn_concat":  # the state after every training click, each session's last too
                want = ref_concat_states(P, np.concatenate(sess), H)[-1]
            else:
                want = ref_walk(P, sess, VARIANT[name])[-1][2]
            _close(ckpt["state_dict"]["served_user_states"][k], want, tol=1e-4)
    finally:
        H, U = h0, u0


@pytest.mark.parametrize("name", NAMES)
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
    from training.data import read_events, read_item_index

    test = read_events(split, "test", read_item_index(split), min_session_length=2)
    known = {int(u) for u in test.user_ids if u < 9000}
    assert m["n_users_without_history"] == int((test.user_ids >= 9000).sum()) > 0
    train_full = read_events(split, "train_full", read_item_index(split), min_session_length=2)
    assert m["n_history_sessions"] == int(np.isin(train_full.user_ids, list(known)).sum()) > len(known)
    ckpt = ck.load_checkpoint(trained[name])
    model = HR.HRNNModel(int(ckpt["item_index"]["item_id"].shape[0]), registry.get(name).Config(**{
        k: v for k, v in OVER.items() if k in ("hidden", "user_hidden")}))
    stored = ckpt["state_dict"]["served_user_states"].numel()
    assert m["n_parameters"] == sum(p.numel() for p in model.parameters()) + stored
    path = tmp_path / "pyfunc"
    mlflow.pyfunc.save_model(str(path), python_model=str(serving.MODEL_CODE_PATH),
                             artifacts={serving.CHECKPOINT_ARTIFACT: str(trained[name] / "model.pt")},
                             signature=serving.signature(), pip_requirements=["torch"])
    served = mlflow.pyfunc.load_model(str(path))
    out = served.predict(pd.DataFrame({"session": [[105, 106, 107]] * 3, "user_id": [1000, 424242, -1]}),
                         params={"k": 25})
    assert [len(x) for x in out["items"]] == [25, 25, 25]
    assert out["scores"][1] == out["scores"][2]  # unknown user = anonymous = the fallback
    assert out["scores"][0] != out["scores"][1]  # the known user starts from their stored state
    alone = served.predict(pd.DataFrame({"session": [[105, 106, 107]]}), params={"k": 25})
    assert alone["scores"][0] == out["scores"][1]


@pytest.mark.parametrize("name", ["hrnn_init", "rnn_concat"])
def test_serving_a_known_user_equals_user_mode_after_their_history(name, trained, split):
    """The stored state is what user mode rebuilds from the training table: the first test
    prediction of a user in evaluate_sessions (history = train_full) has the rank the served
    scorer (begin(1), start_session(user)) gives."""
    from evaluation.loop import evaluate_sessions
    from training import checkpoint as ck
    from training.data import read_events, read_item_index

    sc = registry.load_scorer(ck.load_checkpoint(trained[name]), torch.device("cpu"))
    index = read_item_index(split)
    test = read_events(split, "test", index, min_session_length=2)
    hist = read_events(split, "train_full", index, min_session_length=2)
    res = evaluate_sessions(sc, test, n_slots=4, mode="user", history=[hist])
    for s in (0, 3):
        u = int(test.user_ids[s])
        first = test.items[test.offsets[s]]
        st = sc.start_session(sc.begin(1), ALL, torch.tensor([u]))
        scores, _ = sc.step(st, torch.tensor([int(first)]))
        target = int(test.items[test.offsets[s] + 1])
        row = np.flatnonzero((res.session_idx == s) & (res.position == 0))
        assert int(res.greater[row[0]]) == int((scores[0] > scores[0, target]).sum())


def test_rnn_concat_user_mode_evaluation_is_the_model_over_the_users_whole_history(trained, split):
    """User mode (history = train_full): every scored position of a known user's test session
    ranks as the numpy RNN Concat run over the user's training sessions, every click (each
    session's last included), then the test session; the same run without the history's last
    clicks ranks otherwise somewhere."""
    from evaluation.loop import evaluate_sessions
    from training import checkpoint as ck
    from training.data import read_events, read_item_index

    sc = registry.load_scorer(ck.load_checkpoint(trained["rnn_concat"]), torch.device("cpu"))
    P, h = params_of(sc.model), sc.model.hidden
    index = read_item_index(split)
    test = read_events(split, "test", index, min_session_length=2)
    hist = read_events(split, "train_full", index, min_session_length=2)
    res = evaluate_sessions(sc, test, n_slots=4, mode="user", history=[hist])
    n_checked, differs = 0, False
    for s in range(test.n_sessions):
        u = int(test.user_ids[s])
        hs = np.flatnonzero(hist.user_ids == u)
        if not len(hs):
            continue
        assert np.sum(test.user_ids == u) == 1  # the user's only test session: history = training
        hs = hs[np.lexsort((hist.session_ids[hs], hist.start_ts[hs]))]
        t_items = test.items[test.offsets[s]:test.offsets[s + 1]]
        h_sess = [hist.items[hist.offsets[k]:hist.offsets[k + 1]] for k in hs]
        seq = np.concatenate(h_sess + [t_items])
        n_hist = len(seq) - len(t_items)
        states = ref_concat_states(P, seq[:-1], h)
        no_last = ref_concat_states(P, np.concatenate([x[:-1] for x in h_sess] + [t_items[:-1]]), h)
        for p in range(len(t_items) - 1):
            sc_p = P["Wy"] @ states[n_hist + p] + P["By"]
            tgt = sc_p[int(t_items[p + 1])]
            row = np.flatnonzero((res.session_idx == s) & (res.position == p))
            assert len(row) == 1
            g = int(res.greater[row[0]])
            assert int((sc_p > tgt + 1e-5).sum()) <= g <= int((sc_p > tgt - 1e-5).sum()), (s, p)
            alt = P["Wy"] @ no_last[n_hist - len(h_sess) + p] + P["By"]
            differs |= int((alt > alt[int(t_items[p + 1])]).sum()) != g
            n_checked += 1
    assert n_checked > 20 and differs


def test_fine_tunes_from_its_weights_on_the_recent_table(trained, split, tmp_path):
    from training import checkpoint as ck
    from training.data import read_events, read_item_index
    from training.trainer import train

    name = "hrnn_init"
    over = {"num_threads": 1, "device": "cpu", "train_table": "train_recent_4", "n_epochs": 0}
    train(name, split, tmp_path / "ft0", overrides=over, init_from=trained[name], show_progress=False)
    pre = ck.load_checkpoint(trained[name])["state_dict"]
    start = ck.load_checkpoint(tmp_path / "ft0")["state_dict"]
    weights = [k for k in pre if k not in HR.SERVED_KEYS]
    assert all(torch.equal(start[k], pre[k]) for k in weights)
    recent = read_events(split, "train_recent_4", read_item_index(split), min_session_length=2)
    # the stored states are recomputed on the table trained on
    assert start["served_user_ids"].tolist() == sorted(set(recent.user_ids.tolist())) != pre["served_user_ids"].tolist()
    train(name, split, tmp_path / "ft1", overrides={**over, "n_epochs": 1}, init_from=trained[name],
          show_progress=False)
    run = json.loads((tmp_path / "ft1" / "history.json").read_text())["run"]
    assert run["train_table"] == "train_recent_4" and run["train_sessions"] == recent.n_sessions < 40
    assert run["init_from_digest"] == ck.weights_digest(ck.load_checkpoint(trained[name]))
    after = ck.load_checkpoint(tmp_path / "ft1")["state_dict"]
    assert not all(torch.equal(after[k], pre[k]) for k in weights)


def test_resume_is_exact(split, tmp_path):
    from training import checkpoint as ck
    from training.trainer import train

    over = {**OVER, "dropout_user": 0.3, "dropout_session": 0.3, "dropout_init": 0.3, "n_sample": 4}
    train("hrnn_all", split, tmp_path / "full", overrides=over, show_progress=False)
    train("hrnn_all", split, tmp_path / "part", overrides={**over, "n_epochs": 1}, show_progress=False)
    train("hrnn_all", split, tmp_path / "part", resume=True, overrides={"n_epochs": 2}, show_progress=False)
    a, b = (ck.load_checkpoint(tmp_path / d)["state_dict"] for d in ("full", "part"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_logs_to_mlflow_with_its_config_metrics_and_model(trained, split, tmp_path, monkeypatch):
    from tests.training.toy import logged_run

    name = "hrnn_all"
    run, items = logged_run(trained[name], split, tmp_path, name, monkeypatch)
    p = run.data.params
    assert p["model"] == name and p["variant"] == "all" and p["hidden"] == "12" and p["user_hidden"] == "8"
    assert (p["dropout_user"], p["dropout_session"], p["dropout_init"]) == ("0.0", "0.2", "0.2")
    assert p["loss"] == "top1" and p["optimizer"] == "adagrad" and p["momentum"] == "0.3"
    assert 0 <= run.data.metrics["recall_at_20"] <= 1 and "train_loss" in run.data.metrics
    assert len(items) == 3


def test_dag_families_param_takes_the_three_names(tmp_path):
    from dags import pipeline_steps as steps

    cfg = steps.resolve({"data_dir": str(tmp_path), "families": [*NAMES, "gru4rec", "ppop"], "fractions": [4],
                         "epochs": 1, "device": "cpu"},
                        dag_id="session_rec_pipeline", dag_run_id="manual__h", interval_start="2014-04-07T00:00:00Z",
                        interval_end="2014-04-08T00:00:00Z")
    assert "hrnn_init-recent4" in steps.planned_candidates(cfg) and "rnn_concat" in steps.planned_candidates(cfg)
    assert all(cfg["overrides"][n]["n_epochs"] == 1 for n in NAMES)
