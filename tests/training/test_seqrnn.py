"""Villatel et al.'s sequence RNNs (training/families/seqrnn.py): the GRU and LN-GRU cells
against steps computed here from the equations (numpy), tying = one tensor and their Table 3
parameter counts, truncated BPTT = the unsplit sequence, user sequences and the user-mode
state hand-over, and the whole way through trainer, evaluator, pyfunc, fine-tuning and DAG."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from training import registry
from training.families import seqrnn as S

PRESETS = list(S.TABLE4)


def _sig(x):
    return 1.0 / (1.0 + np.exp(-x))


def _ln(x, g, b, eps=1e-5):
    return (x - x.mean()) / np.sqrt(x.var() + eps) * g + b


# hand-picked weights of a 2-unit layer on a 2-d input: one matrix per gate, as in eq. 4
WE = {"r": np.array([[0.5, -0.3], [0.2, 0.8]]), "z": np.array([[-0.6, 0.1], [0.4, 0.3]]),
      "h": np.array([[0.7, 0.2], [-0.5, 0.9]])}  # W_e^g [H, in]
WH = {"r": np.array([[0.3, 0.1], [-0.2, 0.4]]), "z": np.array([[0.2, -0.7], [0.5, 0.1]]),
      "h": np.array([[-0.4, 0.6], [0.3, 0.2]])}  # W_h^g [H, H]
BIAS = {"r": np.array([0.1, -0.2]), "z": np.array([0.3, 0.0]), "h": np.array([-0.1, 0.2])}
LN_E = {"r": ([1.2, 0.8], [0.1, -0.1]), "z": ([0.9, 1.1], [0.0, 0.2]), "h": ([1.0, 1.3], [-0.2, 0.05])}
LN_H = {"r": ([0.7, 1.4], [0.05, 0.0]), "z": ([1.1, 0.6], [-0.1, 0.1]), "h": ([1.5, 0.9], [0.0, -0.3])}


def _ref_step(e, h, ln: bool):
    """Eq. 4 (reset before the recurrent product) / its LN form, written out per gate."""
    def pre(g, part, v):
        W = WE[g] if part == "e" else WH[g]
        y = W @ v
        if ln:
            gain, bias = (LN_E if part == "e" else LN_H)[g]
            y = _ln(y, np.array(gain), np.array(bias))
        return y
    b = {g: (0.0 if ln else BIAS[g]) for g in "rzh"}
    r = _sig(pre("r", "e", e) + pre("r", "h", h) + b["r"])
    z = _sig(pre("z", "e", e) + pre("z", "h", h) + b["z"])
    cand = np.tanh(pre("h", "e", e) + pre("h", "h", r * h) + b["h"])
    return (1 - z) * h + z * cand


def _layer(ln: bool) -> S.GRULayer:
    layer = S.GRULayer(2, 2, ln).double()
    with torch.no_grad():  # the layer multiplies row vectors: x @ W, so it holds the transposes
        layer.W_e.copy_(torch.tensor(np.concatenate([WE[g].T for g in "rzh"], 1)))
        layer.W_hrz.copy_(torch.tensor(np.concatenate([WH["r"].T, WH["z"].T], 1)))
        layer.W_hh.copy_(torch.tensor(WH["h"].T))
        if ln:
            layer.ln_e_g.copy_(torch.tensor([LN_E[g][0] for g in "rzh"], dtype=torch.float64))
            layer.ln_e_b.copy_(torch.tensor([LN_E[g][1] for g in "rzh"], dtype=torch.float64))
            layer.ln_h_g.copy_(torch.tensor([LN_H[g][0] for g in "rzh"], dtype=torch.float64))
            layer.ln_h_b.copy_(torch.tensor([LN_H[g][1] for g in "rzh"], dtype=torch.float64))
        else:
            layer.b.copy_(torch.tensor(np.concatenate([BIAS[g] for g in "rzh"])))
    return layer


@pytest.mark.parametrize("ln", [False, True], ids=["gru", "ln-gru"])
def test_cell_matches_two_hand_computed_steps(ln):
    e = [np.array([0.9, -0.4]), np.array([-0.3, 1.1])]
    h0 = np.array([0.25, -0.6])
    h1 = _ref_step(e[0], h0, ln)
    h2 = _ref_step(e[1], h1, ln)
    out, h = _layer(ln)(torch.tensor(np.stack(e))[None], torch.tensor(h0)[None])
    np.testing.assert_allclose(out[0].detach().numpy(), np.stack([h1, h2]), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(h[0].detach().numpy(), h2, rtol=1e-10, atol=1e-12)


def test_reset_gate_acts_before_the_recurrent_product():
    """Eq. 4's W_h^h (r ⊙ h) differs from cuDNN's r ⊙ (W_h^h h): the reference above uses the
    former; the cuDNN form gives another state on the same weights."""
    e, h0 = np.array([0.9, -0.4]), np.array([0.25, -0.6])
    r = _sig(WE["r"] @ e + WH["r"] @ h0 + BIAS["r"])
    z = _sig(WE["z"] @ e + WH["z"] @ h0 + BIAS["z"])
    cudnn = (1 - z) * h0 + z * np.tanh(WE["h"] @ e + r * (WH["h"] @ h0) + BIAS["h"])
    _, h = _layer(False)(torch.tensor(e)[None, None], torch.tensor(h0)[None])
    assert np.abs(h[0].detach().numpy() - cudnn).max() > 1e-3


def test_masked_steps_keep_the_state_and_padding_changes_nothing():
    layer = _layer(True)
    x = torch.tensor([[[0.9, -0.4], [-0.3, 1.1], [0.5, 0.5]]], dtype=torch.float64)
    h0 = torch.tensor([[0.25, -0.6]], dtype=torch.float64)
    _, h_two = layer(x[:, :2], h0)
    _, h_pad = layer(x, h0, torch.tensor([[True, True, False]]))
    torch.testing.assert_close(h_pad, h_two, rtol=0, atol=0)


def _cfg(name="seqrnn", **kw):
    return registry.get(name).Config(**kw)


def test_stacked_layer_two_reads_layer_one():
    torch.manual_seed(0)
    m = S.SeqRNN(12, _cfg(n_layers=2, embedding=4, hidden=4)).double()
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.5)
    items = torch.tensor([[3, 7, 1]])
    out, (h1, h2) = m(items, m.init_state(1))
    e = m.W_I[items].detach()
    o1, _ = m.layers[0](e, torch.zeros(1, 4, dtype=torch.float64))
    o2, _ = m.layers[1](o1, torch.zeros(1, 4, dtype=torch.float64))
    torch.testing.assert_close(out, o2)
    torch.testing.assert_close(h1, o1[:, -1])


def test_tied_model_has_one_item_table_and_scores_with_it():
    tied, untied = S.SeqRNN(50, _cfg("seqrnn_re")), S.SeqRNN(50, _cfg("seqrnn"))
    shapes = lambda m: [tuple(p.shape) for p in m.parameters() if p.shape[0] == 50]  # noqa: E731
    assert shapes(tied) == [(50, 100)] and shapes(untied) == [(50, 100), (50, 100)]
    torch.nn.init.normal_(tied.W_I)
    out = torch.randn(3, 100)
    torch.testing.assert_close(tied.all_scores(out), out @ tied.W_I.t())
    assert tied.output_table is tied.W_I
    with pytest.raises(Exception, match="hidden .* must equal"):
        _cfg("seqrnn_re", hidden=64)


# Villatel et al. Table 3 (millions, one decimal): Yoochoose has 37,483 items, Internal 208,418
TABLE3 = {"seqrnn": (7.6, 41.7), "seqrnn_re": (3.8, 20.9), "seqrnn_ln": (7.6, 41.7),
          "seqrnn_re_ln": (3.8, 20.9), "seqrnn_stack_re_ln": (3.9, 21.0), "hmlstm_re_ln": (4.0, 21.1)}


@pytest.mark.parametrize("name", PRESETS)
def test_parameter_count_of_their_table_3(name):
    got = []
    for n_items in (37_483, 208_418):
        with torch.device("meta"):
            m = S.SeqRNN(n_items, _cfg(name))
        got.append(round(sum(p.numel() for p in m.parameters()) / 1e6, 1))
    assert tuple(got) == TABLE3[name]


def test_gru_parameter_count_by_hand():
    m = S.SeqRNN(1000, _cfg("seqrnn_stack_re_ln"))
    H = E = 100
    per_layer = 3 * H * (E + H) + 12 * H  # products + LN gains/biases (6 LNs of H)
    assert sum(p.numel() for p in m.parameters()) == 1000 * E + 2 * per_layer


def test_user_sequences_concatenate_a_users_sessions_in_time_order():
    from training.data import SessionData

    # sessions: 0 (user 7, t=30), 1 (user 8, t=10), 2 (user 7, t=20), 3 (anonymous, t=5)
    d = SessionData(items=np.array([1, 2, 3, 4, 5, 6, 7, 8, 9]), offsets=np.array([0, 2, 4, 7, 9]),
                    session_ids=np.array([10, 11, 12, 13]), start_ts=np.array([30, 10, 20, 5]),
                    user_ids=np.array([7, 8, 7, -1]))
    items, offs = S.user_sequences(d, "user")
    seqs = sorted(items[offs[i]:offs[i + 1]].tolist() for i in range(len(offs) - 1))
    assert seqs == [[3, 4], [5, 6, 7, 1, 2], [8, 9]]
    items, offs = S.user_sequences(d, "session")
    assert offs.tolist() == [0, 2, 4, 7, 9]


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    from tests.training.toy import events_table, random_sessions, write_split

    # 40 users with 3 sessions each (some long: truncated BPTT windows are exercised)
    sess = random_sessions(120, 25, seed=3, max_len=14)
    train = events_table(sess, user_of=lambda s: 1000 + (s - 1) % 40)
    test = events_table(random_sessions(20, 25, seed=4, start_id=5000, max_len=8), t0=1_700_000_000,
                        user_of=lambda s: 1000 + (s - 5000) % 25 if s < 5015 else 9000 + s)
    return write_split(tmp_path_factory.mktemp("seqrnn"), {
        "train_full": train, "train": train, "test": test,
        "train_recent_4": events_table(sess[-30:], user_of=lambda s: 1000 + (s - 1) % 40)})


def _family(split, name="seqrnn", **kw):
    from training.data import read_events, read_item_index
    from training.family import TrainContext
    from training.trainer import table_support

    index = read_item_index(split)
    data = read_events(split, "train_full", index, min_session_length=2)
    ctx = TrainContext(index=index, data=data, support=table_support(data, index.n_items), device=torch.device("cpu"))
    fam = registry.get(name)(_cfg(name, **kw), ctx)
    fam.init_weights(torch.Generator().manual_seed(0))
    return fam


@pytest.mark.parametrize("name,sequence,bptt", [("seqrnn_re_ln", "session", "split"), ("seqrnn_stack_re_ln", "user", "split"), ("seqrnn_re_ln", "session", "parallel"), ("hmlstm_re_ln", "user", "parallel")])
def test_truncated_bptt_windows_give_the_loss_of_the_whole_sequence(split, name, sequence, bptt):
    """bptt=split (max_len 3) / parallel (window 3) carry the state from window to window (and
    parallel resets it where a row starts its next sequence): the summed loss over
    the windows equals the cross-entropy of every pair of the unsplit sequences, computed one
    sequence at a time straight from the model."""
    torch.set_num_threads(1)
    fam = _family(split, name, bptt=bptt, max_len=3, window=3, batch_size=8, sequence=sequence)
    fam.model.double()
    tot, n = 0.0, 0
    with torch.no_grad():
        for b in fam.batches(0):
            r = fam.loss(b)
            if r is not None:
                tot += float(r[0]) * r[1]
                n += r[1]
        items, offs = fam._items, fam._offsets
        ref, n_ref = 0.0, 0
        for s in range(len(offs) - 1):
            seq = torch.from_numpy(items[offs[s]:offs[s + 1]].astype(np.int64))
            if len(seq) < 2:
                continue
            out, _ = fam.model(seq[None, :-1], fam.model.init_state(1))
            ref += float(torch.nn.functional.cross_entropy(fam.model.all_scores(out[0]), seq[1:], reduction="sum"))
            n_ref += len(seq) - 1
    assert n == n_ref and n > 100
    assert max(np.diff(offs)) > 6  # some sequences span 3+ windows
    assert tot == pytest.approx(ref, rel=1e-9)


def test_user_mode_carries_the_state_across_a_users_sessions_only():
    torch.manual_seed(1)
    model = S.SeqRNN(10, _cfg("seqrnn_re_ln", embedding=8, hidden=8, sequence="user"))
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.5)
    sc = S.SeqRNNScorer(model, torch.device("cpu"), carry_users=True)
    both = torch.tensor([True, True])

    def after(mode, second_users, first_users=(5, 6)):
        st = sc.begin(2, mode=mode)
        st = sc.start_session(st, both, torch.tensor(first_users))
        _, st = sc.step(st, torch.tensor([3, 4]))
        st = sc.end_session(st, both)
        st = sc.start_session(st, both, torch.tensor(second_users))
        return sc.step(st, torch.tensor([1, 1]))[0]

    fresh = sc.step(sc.start_session(sc.begin(2), both, torch.tensor([1, 2])), torch.tensor([1, 1]))[0]
    carried = after("user", [5, 9])  # row 0: same user again (carried); row 1: a new user (reset)
    assert not torch.allclose(carried[0], fresh[0]) and torch.allclose(carried[1], fresh[1])
    assert torch.allclose(after("session", [5, 6]), fresh)  # session mode: every session from zero
    assert torch.allclose(after("user", [-1, -1], (-1, -1)), fresh)  # anonymous: never carried
    sc_s = S.SeqRNNScorer(model, torch.device("cpu"), carry_users=False)  # sequence=session model
    st = sc_s.begin(1, mode="user")
    st = sc_s.start_session(st, torch.tensor([True]), torch.tensor([5]))
    _, st = sc_s.step(st, torch.tensor([3]))
    st = sc_s.start_session(st, torch.tensor([True]), torch.tensor([5]))
    assert torch.allclose(sc_s.step(st, torch.tensor([1]))[0][0], fresh[0])


def test_user_mode_evaluation_scores_after_the_users_history(split):
    """In user mode the loop feeds a test user's training sessions first: the first test
    prediction of a user then equals the model's output after that user's whole history."""
    from evaluation.loop import evaluate_sessions
    from training.data import read_events

    fam = _family(split, "seqrnn_re_ln", sequence="user", embedding=8, hidden=8)
    sc = S.SeqRNNScorer(fam.model, torch.device("cpu"), carry_users=True)
    index = fam.ctx.index
    test = read_events(split, "test", index, min_session_length=2)
    hist = read_events(split, "train_full", index, min_session_length=2)
    res = evaluate_sessions(sc, test, n_slots=4, mode="user", history=[hist])
    u = int(test.user_ids[0])  # test session 0 belongs to a user with 3 training sessions
    hs = np.flatnonzero(hist.user_ids == u)
    hs = hs[np.lexsort((hist.session_ids[hs], hist.start_ts[hs]))]
    assert len(hs) == 3 and res.n_users_without_history > 0  # the anonymous test sessions
    # the user's whole history, every click (the last of each session too: the model trained on
    # it as the input before the user's next session), then the test session
    t_items = test.items[test.offsets[0]:test.offsets[1]]
    seq = np.concatenate([hist.items[hist.offsets[s]:hist.offsets[s + 1]] for s in hs] + [t_items])
    n_hist = len(seq) - len(t_items)
    with torch.no_grad():
        out, _ = fam.model(torch.from_numpy(seq.astype(np.int64))[None], fam.model.init_state(1))
        scores = fam.model.all_scores(out[0])  # [len(seq), n_items]
    for p in range(len(t_items) - 1):
        sc_p = scores[n_hist + p]
        expect = int((sc_p > sc_p[int(t_items[p + 1])]).sum())
        row = np.flatnonzero((res.session_idx == 0) & (res.position == p))
        assert len(row) == 1 and int(res.greater[row[0]]) == expect, p


@pytest.fixture(scope="module")
def trained(split, tmp_path_factory):
    from training.trainer import train

    root = tmp_path_factory.mktemp("seqrnn-runs")
    out = {}
    for name in ("seqrnn_stack_re_ln", "hmlstm_re_ln"):
        train(name, split, root / name, show_progress=False,
              overrides={"num_threads": 1, "device": "cpu", "n_epochs": 2, "embedding": 16, "hidden": 16,
                         "sequence": "user", "max_len": 5})
        out[name] = root / name
    return out


@pytest.mark.parametrize("name", ["seqrnn_stack_re_ln", "hmlstm_re_ln"])
def test_trains_evaluates_in_user_mode_and_serves(name, trained, split, tmp_path):
    import mlflow.pyfunc
    import pandas as pd

    from evaluation import serving
    from evaluation.evaluate import evaluate

    hist = json.loads((trained[name] / "history.json").read_text())
    assert len(hist["epochs"]) == 2 and hist["epochs"][1]["loss"] < hist["epochs"][0]["loss"]
    m = evaluate(trained[name], split, tmp_path / "eval", device="cpu", mode="user")
    assert m["model"] == name and m["mode"] == "user" and m["n_events"] > 0
    from training import checkpoint as ck

    n_items = int(ck.load_checkpoint(trained[name])["item_index"]["item_id"].shape[0])
    model = S.SeqRNN(n_items, _cfg(name, embedding=16, hidden=16))
    assert m["n_parameters"] == sum(p.numel() for p in model.parameters())
    path = tmp_path / "pyfunc"
    mlflow.pyfunc.save_model(str(path), python_model=str(serving.MODEL_CODE_PATH),
                             artifacts={serving.CHECKPOINT_ARTIFACT: str(trained[name] / "model.pt")},
                             signature=serving.signature(), pip_requirements=["torch"])
    out = mlflow.pyfunc.load_model(str(path)).predict(
        pd.DataFrame({"session": [[105, 106, 107], [110]], "user_id": [1000, 424242]}), params={"k": 5})
    assert [len(x) for x in out["items"]] == [5, 5]


def test_fine_tunes_from_its_weights_on_the_recent_table(trained, split, tmp_path):
    from training import checkpoint as ck
    from training.trainer import train

    name = "seqrnn_stack_re_ln"
    over = {"num_threads": 1, "device": "cpu", "train_table": "train_recent_4", "n_epochs": 0}
    train(name, split, tmp_path / "ft0", overrides=over, init_from=trained[name], show_progress=False)
    pre = ck.load_checkpoint(trained[name])["state_dict"]
    start = ck.load_checkpoint(tmp_path / "ft0")["state_dict"]
    assert all(torch.equal(start[k], pre[k]) for k in pre)
    train(name, split, tmp_path / "ft1", overrides={**over, "n_epochs": 1}, init_from=trained[name],
          show_progress=False)
    run = json.loads((tmp_path / "ft1" / "history.json").read_text())["run"]
    from training.data import read_events, read_item_index

    recent = read_events(split, "train_recent_4", read_item_index(split), min_session_length=2)
    assert run["train_table"] == "train_recent_4" and run["train_sessions"] == recent.n_sessions < 40
    assert run["init_from_digest"] == ck.weights_digest(ck.load_checkpoint(trained[name]))
    after = ck.load_checkpoint(tmp_path / "ft1")["state_dict"]
    assert not all(torch.equal(after[k], pre[k]) for k in pre)


def test_dag_families_param_takes_every_table4_row(tmp_path):
    from dags import pipeline_steps as steps

    cfg = steps.resolve({"data_dir": str(tmp_path), "families": [*PRESETS, "coevent_tied", "itemknn", "pop"],
                         "fractions": [4], "epochs": 1, "device": "cpu"},
                        dag_id="session_rec_pipeline", dag_run_id="manual__v", interval_start="2014-04-07T00:00:00Z",
                        interval_end="2014-04-08T00:00:00Z")
    assert "hmlstm_re_ln-recent4" in steps.planned_candidates(cfg)
    assert all(cfg["overrides"][n]["n_epochs"] == 1 for n in PRESETS)
    for name, row in S.TABLE4.items():
        c = _cfg(name)
        assert c.model == name and ("RE" in row) == c.tied and ("LN" in row) == c.layer_norm
        assert (c.n_layers == 2) == ("Stacked" in row or "HM" in row) and (c.cell == "hmlstm") == ("HM" in row)


def test_logs_to_mlflow_with_its_config_metrics_and_model(trained, split, tmp_path, monkeypatch):
    from tests.training.toy import logged_run

    name = "hmlstm_re_ln"
    run, items = logged_run(trained[name], split, tmp_path, name, monkeypatch)
    assert run.data.params["model"] == name and run.data.params["cell"] == "hmlstm"
    assert run.data.params["tied"] == "True" and run.data.params["sequence"] == "user"
    assert 0 <= run.data.metrics["recall_at_20"] <= 1 and "train_loss" in run.data.metrics
    assert len(items) == 3


def test_early_stopping_in_user_mode_is_the_user_mode_evaluation(tmp_path, monkeypatch):
    """early_stop_mode=user scores valid as `evaluate --mode user` does after the training
    table (history fed first, the user-sequence state carried); session mode scores another way."""
    from evaluation.evaluate import evaluate
    from tests.training.toy import events_table, random_sessions, write_split
    from training import validation
    from training.config import ConfigError
    from training.trainer import train

    sess = random_sessions(90, 20, seed=5, max_len=10)
    tr = events_table(sess, user_of=lambda s: 1000 + (s - 1) % 30)
    va = events_table(random_sessions(30, 20, seed=6, start_id=7000, max_len=8), t0=1_700_000_000,
                      user_of=lambda s: 1000 + (s - 7000) % 30)
    split = write_split(tmp_path / "split", {"train_full": tr, "train": tr, "valid": va, "test": va})
    got = {}
    real = validation.metric
    monkeypatch.setattr(validation, "metric", lambda name, rank: got.setdefault(len(got), real(name, rank)))
    over = {"num_threads": 1, "device": "cpu", "n_epochs": 1, "embedding": 8, "hidden": 8, "sequence": "user",
            "train_table": "train", "early_stop_patience": 1, "early_stop_metric": "mrr_at_20"}
    for mode in ("user", "session"):
        train("seqrnn", split, tmp_path / mode, show_progress=False, overrides={**over, "early_stop_mode": mode})
    m = evaluate(tmp_path / "user", split, tmp_path / "ev", table="valid", mode="user", history_tables=["train"])
    assert got[0] == pytest.approx(m["mrr_at_20"], abs=1e-12)
    assert got[1] != pytest.approx(got[0], abs=1e-6)  # same weights (seed), scored without the history
    hist = json.loads((tmp_path / "user" / "history.json").read_text())
    assert hist["epochs"][0]["early_stop_metric"] == "valid/mrr_at_20 (user mode)"
    with pytest.raises(ConfigError, match="early_stop_mode 'users'"):
        train("seqrnn", split, tmp_path / "bad", show_progress=False, overrides={**over, "early_stop_mode": "users"})
