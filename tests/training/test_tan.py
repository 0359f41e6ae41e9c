"""Tan et al. 2016 (training/families/tan.py): prefix augmentation = one prefix at a time from a
zero state (long sequences included), click deletion (binomial rate, a draw per epoch, never
below 2 clicks), the teacher sees only each prefix's (nearest) future, the distillation loss
by hand, M4 ranks by cosine with fixed embeddings, the window scorer, Table 2's parameter
count, config errors, and the chain tan -> tan_teacher -> tan_distill -> tan_emb -> fine-tuning
through trainer and evaluator."""
from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
import torch

from training import checkpoint as ck
from training import registry
from training.config import ConfigError, config_from_dict, config_to_dict
from training.data import ItemIndex, SessionData
from training.families import tan as T
from training.family import TrainContext


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def _ctx(sessions: list[list[int]], n_items: int) -> TrainContext:
    items = np.concatenate([np.asarray(s, np.int64) for s in sessions])
    offsets = np.r_[0, np.cumsum([len(s) for s in sessions])].astype(np.int64)
    n = len(sessions)
    data = SessionData(items=items, offsets=offsets, session_ids=np.arange(n, dtype=np.int64),
                       start_ts=np.arange(n, dtype=np.int64), user_ids=None)
    index = ItemIndex(item_ids=np.arange(n_items, dtype=np.int64) + 100, support=np.ones(n_items, np.int64))
    return TrainContext(index=index, data=data, support=np.bincount(items, minlength=n_items).astype(np.int64),
                        device=torch.device("cpu"))


def _family(name: str, ctx: TrainContext, seed: int = 0, **kw):
    fam = registry.get(name)(registry.get(name).Config(**kw), ctx)
    fam.init_weights(torch.Generator().manual_seed(seed))
    return fam


def _randomise(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.5)


def _last_output(model, inputs) -> torch.Tensor:
    """The model's output after ``inputs`` (a list of item_idx), from a zero state, one row."""
    x = torch.tensor([list(inputs)], dtype=torch.int64)
    out, _ = model(x, model.init_state(1))
    return out[0, -1]


def _random_sessions(n: int, n_items: int, max_len: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, n_items, int(rng.integers(2, max_len + 1))).tolist() for _ in range(n)]


# ----------------------------------------------------------------------------- augmentation
@pytest.mark.parametrize("dropout", [0.0, 0.25])
def test_all_positions_loss_is_the_mean_of_per_prefix_losses(dropout):
    """The batches' loss (mean over examples) times their example counts = the sum over every
    prefix [s_1..s_k] -> s_{k+1} of the (pruned) sequences of the cross-entropy of that prefix
    truncated to its last max_len inputs and run alone from a zero state."""
    sessions = _random_sessions(40, 15, 11, seed=1)
    ctx = _ctx(sessions, 15)
    M = 3
    fam = _family("tan", ctx, embedding=4, hidden=6, max_len=M, click_dropout=dropout, batch_size=16)
    fam.model.double()
    _randomise(fam.model, 2)
    with torch.no_grad():
        got, n_got, n_batches = 0.0, 0, 0
        for b in fam.batches(0):
            loss, n = fam.loss(b)
            got += float(loss) * n
            n_got += n
            n_batches += 1
        _, items, offs, _ = fam.epoch_sequences(0)
        ref, n_ref = 0.0, 0
        for s in range(len(offs) - 1):
            seq = items[offs[s]:offs[s + 1]].tolist()
            for k in range(1, len(seq)):
                logits = fam.model.all_scores(_last_output(fam.model, seq[max(0, k - M):k]))
                ref -= float(torch.log_softmax(logits, 0)[seq[k]])
                n_ref += 1
    assert max(np.diff(offs)) > M + 2  # some prefixes are truncated windows
    if dropout:
        assert len(items) < sum(map(len, sessions))  # clicks were deleted
    else:
        assert n_ref == sum(len(s) - 1 for s in sessions)
    assert n_got == n_ref and n_batches > 3
    assert got == pytest.approx(ref, rel=1e-10)


def test_batches_hold_about_batch_size_examples():
    sessions = _random_sessions(60, 10, 8, seed=3)
    fam = _family("tan", _ctx(sessions, 10), click_dropout=0.0, batch_size=20, max_len=19)
    sizes = [len(b.targets) for b in fam.batches(0)]
    assert sum(sizes) == sum(len(s) - 1 for s in sessions)
    # a sequence goes to the batch where its first example falls (sequences of <= 7 examples):
    # batch b holds the examples from its first sequence's (in [20b, 20b + 6]) to the next one's
    assert all(20 - 6 <= n <= 20 + 6 for n in sizes[:-1]) and sizes[-1] <= 26 and len(sizes) > 5


def test_prefix_rows_read_each_prefix_where_it_ends():
    items = np.array([10, 11, 12, 13, 14, 15, 20, 21], np.int64)
    offsets = np.array([0, 6, 8])
    r = T.prefix_rows(items, offsets, seq=np.array([0, 0, 0, 0, 1]), k=np.array([1, 3, 4, 5, 1]), max_len=3)
    got = [r.inputs[i, :r.lengths[i]][:c + 1].tolist() for i, c in zip(r.row, r.col)]
    assert got == [[10], [10, 11, 12], [11, 12, 13], [12, 13, 14], [20]]
    assert len(r.lengths) == 4  # one head row per sequence + one window per prefix beyond max_len


# ----------------------------------------------------------------------------- click deletion
def test_click_deletion_rate_is_binomial():
    n_seq, L, p = 2000, 10, 0.25
    offsets = np.arange(n_seq + 1, dtype=np.int64) * L
    keep = T.delete_clicks(offsets, p, torch.Generator().manual_seed(5))
    n = n_seq * L
    sd = math.sqrt(n * p * (1 - p))
    assert abs(int((~keep).sum()) - n * p) < 5 * sd
    # every position of a sequence equally likely (not, e.g., only the inputs or the first ones)
    per_pos = (~keep).reshape(n_seq, L).mean(0)
    assert np.all(np.abs(per_pos - p) < 5 * math.sqrt(p * (1 - p) / n_seq))


def test_click_deletion_never_leaves_fewer_than_two_clicks():
    lens = [2, 3, 2, 3, 5] * 200
    offsets = np.r_[0, np.cumsum(lens)].astype(np.int64)
    keep = T.delete_clicks(offsets, 0.9, torch.Generator().manual_seed(0))
    kept = np.add.reduceat(keep.astype(int), offsets[:-1])
    assert kept.min() >= 2
    whole = kept == np.array(lens)
    assert whole.mean() > 0.9  # p = 0.9: nearly every short sequence would drop below 2: kept whole
    assert (kept[np.array(lens) == 5] < 5).any()  # and some 5-click ones kept 2-4 clicks


def test_a_new_deletion_every_epoch_the_same_for_the_same_epoch():
    sessions = _random_sessions(200, 20, 9, seed=4)
    fam = _family("tan", _ctx(sessions, 20), click_dropout=0.25)
    a, b, c = fam.epoch_sequences(3), fam.epoch_sequences(3), fam.epoch_sequences(4)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a[3], c[3]) or not np.array_equal(a[2], c[2])
    # the labels of the batches are exactly the kept clicks after the first of each sequence
    order, items, offs, pos = a
    labels = sorted((s, int(p_)) for s in range(len(offs) - 1) for p_ in pos[offs[s] + 1:offs[s + 1]])
    got = sorted((int(s), int(p_)) for bt in fam.batches(3) for s, p_ in zip(bt.session, bt.label_pos))
    assert got == labels
    dropped = sum(map(len, sessions)) - len(items)
    assert 0 < dropped and all(np.diff(offs) >= 2)


# ----------------------------------------------------------------------------- M3
def _save_teacher(root, ctx: TrainContext, seed: int = 7, reverse: bool = True, **kw):
    cfg = registry.get("tan_teacher").Config(reverse=reverse, **kw)
    model = T.TanRNN(ctx.index.n_items, cfg.embedding, cfg.hidden)
    _randomise(model, seed)
    ckpt = {"model": "tan_teacher", "config": config_to_dict(cfg), "optimizer": {}, "epoch": 1, "history": [],
            "state_dict": {k: v.detach().clone() for k, v in model.state_dict().items()},
            "item_index": ck.item_index_to_ckpt(ctx.index)}
    ck.save_checkpoint(root, ckpt)
    return root, model


def _soft_label_of(fam, session: int, label_pos: int) -> torch.Tensor | None:
    for b in fam.batches(0):
        q = fam.soft_labels(b)
        has = np.flatnonzero(b.has_teacher)
        for j, i in enumerate(has):
            if b.session[i] == session and b.label_pos[i] == label_pos:
                return q[j]
        hit = (b.session == session) & (b.label_pos == label_pos)
        if hit.any():
            return None
    raise AssertionError("no such example")


def test_teacher_sees_only_the_nearest_future_of_each_prefix(tmp_path):
    """Session x = [x0..x7], teacher max_len 3: the label x2 gets softmax(M*([x5, x4, x3])), so
    its soft labels move with x3 and x5 but not with the past (x0, x1), the label itself, or
    the future beyond the teacher's window (x6, x7)."""
    base = [[0, 1, 2, 3, 4, 5, 6, 7], [8, 9, 1]]
    teacher_dir, teacher = _save_teacher(tmp_path / "t", _ctx(base, 12), embedding=4, hidden=5, max_len=3)
    kw = dict(teacher_run=str(teacher_dir), click_dropout=0.0, embedding=4, hidden=5, batch_size=64)

    def soft(x):
        return _soft_label_of(_family("tan_distill", _ctx([x, base[1]], 12), **kw), 0, 2)

    q = soft(base[0])
    with torch.no_grad():
        ref = torch.softmax(teacher.all_scores(_last_output(teacher, [5, 4, 3])), 0)
    torch.testing.assert_close(q, ref)
    for pos in (0, 1, 2, 6, 7):  # past, the label, beyond the window: no change
        x = list(base[0])
        x[pos] = 11
        torch.testing.assert_close(soft(x), q, rtol=0, atol=0)
    for pos in (3, 5):
        x = list(base[0])
        x[pos] = 11
        assert (soft(x) - q).abs().max() > 1e-4
    fam = _family("tan_distill", _ctx(base, 12), **kw)
    assert _soft_label_of(fam, 0, 7) is None and _soft_label_of(fam, 1, 2) is None  # last clicks: no future


def test_distillation_loss_by_hand_and_lambda_zero_is_m1(tmp_path):
    sessions = [[0, 1, 2, 3], [4, 1, 3]]
    ctx = _ctx(sessions, 6)
    teacher_dir, teacher = _save_teacher(tmp_path / "t", ctx, embedding=3, hidden=4)
    lam, temp = 0.3, 2.0
    kw = dict(click_dropout=0.0, embedding=3, hidden=4, batch_size=64)
    fam = _family("tan_distill", ctx, teacher_run=str(teacher_dir), distill_lambda=lam, temperature=temp, **kw)
    _randomise(fam.model, 11)
    (b,) = list(fam.batches(0))
    loss, n = fam.loss(b)
    ref = []
    with torch.no_grad():
        for x in sessions:
            for i in range(1, len(x)):
                s = fam.model.all_scores(_last_output(fam.model, x[:i])).numpy().astype(np.float64)
                ls = s - np.log(np.exp(s).sum())
                ce = -ls[x[i]]
                if i == len(x) - 1:  # empty future: hard label only
                    ref.append(ce)
                    continue
                t = teacher.all_scores(_last_output(teacher, x[:i:-1])).numpy().astype(np.float64)
                q = np.exp(t / temp) / np.exp(t / temp).sum()
                lst = s / temp - np.log(np.exp(s / temp).sum())
                ref.append((1 - lam) * ce + lam * -(q * lst).sum())
    assert n == 5 and float(loss.detach()) == pytest.approx(float(np.mean(ref)), rel=1e-5)
    loss.backward()
    assert all(p.grad is None for p in fam.teacher.parameters())  # the teacher stays frozen
    zero = _family("tan_distill", ctx, teacher_run=str(teacher_dir), distill_lambda=0.0, **kw)
    m1 = _family("tan", ctx, **kw)
    zero.model.load_state_dict(fam.model.state_dict())
    m1.model.load_state_dict(fam.model.state_dict())
    (b0,) = list(zero.batches(0))
    (b1,) = list(m1.batches(0))
    torch.testing.assert_close(zero.loss(b0)[0], m1.loss(b1)[0])


def test_teacher_trains_on_the_reversed_futures():
    """tan_teacher's examples are [x_n..x_{r+2}] -> x_{r+1}, r = 1..n-2: the prefixes of
    z = [x_n..x_2]; x_1 is never a label."""
    fam = _family("tan_teacher", _ctx([[0, 1, 2, 3, 4], [5, 6]], 8), click_dropout=0.0)
    (b,) = list(fam.batches(0))
    got = sorted((tuple(b.rows.inputs[r, :c + 1].tolist()), int(y))
                 for r, c, y in zip(b.rows.row, b.rows.col, b.targets))
    assert got == sorted([((4,), 3), ((4, 3), 2), ((4, 3, 2), 1)])


# ----------------------------------------------------------------------------- M4
def test_m4_ranks_by_cosine_not_dot_product():
    """E = [(1, 0), (3, 3), (0, 1)] and a prediction (1, 0.2): the dot product ranks item 1
    first (3.6 > 1), the cosine item 0 (0.981 > 0.832); the scorer and the evaluation ranks
    follow the cosine."""
    from training.validation import conservative_ranks

    model = T.TanEmbRNN(3, embedding=2, hidden=4, emb_hidden=5)
    with torch.no_grad():
        model.E.copy_(torch.tensor([[1.0, 0.0], [3.0, 3.0], [0.0, 1.0]]))
        model.proj.weight.zero_()
        model.proj.bias.copy_(torch.tensor([1.0, 0.2]))
    pred = np.array([1.0, 0.2])
    E = model.E.numpy()
    cos = E @ pred / np.linalg.norm(E, axis=1) / np.linalg.norm(pred)
    assert np.argmax(E @ pred) == 1 and np.argmax(cos) == 0
    sc = T.WindowScorer(model, torch.device("cpu"), max_len=3)
    st = sc.start_session(sc.begin(1), torch.tensor([True]), None)
    scores, _ = sc.step(st, torch.tensor([2]))
    np.testing.assert_allclose(scores[0].numpy(), cos, rtol=1e-6)
    ranks = conservative_ranks(sc, _ctx([[2, 1], [2, 0]], 3).data)
    assert sorted(ranks.tolist()) == [1.0, 2.0]  # item 0 after item 2: rank 1; item 1: rank 2


# ----------------------------------------------------------------------------- scoring
@pytest.mark.parametrize("history", ["window", "full"])
def test_scorer_steps_give_the_trained_prefix_scores(history):
    sess = [3, 1, 4, 1, 5, 9, 2, 6, 5]
    M = 3
    fam = _family("tan", _ctx([sess], 10), embedding=4, hidden=6, max_len=M, eval_history=history)
    _randomise(fam.model, 5)
    ckpt = {"config": config_to_dict(fam.cfg), "state_dict": fam.model.state_dict(),
            "item_index": ck.item_index_to_ckpt(fam.ctx.index)}
    sc = T.TanFamily.scorer(ckpt, torch.device("cpu"))
    assert isinstance(sc, T.WindowScorer) == (history == "window")
    st = sc.start_session(sc.begin(2), torch.tensor([True, True]), None)
    for k in range(1, len(sess) + 1):
        scores, st = sc.step(st, torch.tensor([sess[k - 1], 7]))
        with torch.no_grad():
            inputs = sess[max(0, k - M):k] if history == "window" else sess[:k]
            ref = fam.model.all_scores(_last_output(fam.model, inputs))
        torch.testing.assert_close(scores[0], ref, rtol=1e-5, atol=1e-6)
    st = sc.start_session(st, torch.tensor([True, False]), None)  # a new session starts afresh
    scores, _ = sc.step(st, torch.tensor([2, 7]))
    with torch.no_grad():
        torch.testing.assert_close(scores[0], fam.model.all_scores(_last_output(fam.model, [2])), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- parameters
@pytest.mark.parametrize("hidden,theirs", [(100, 5_705_384), (1000, 42_548_684)])
def test_parameter_count_against_their_table_2(hidden, theirs):
    """Their M1-M3 count = ours with a padding row (50 + H + 1 more) and Keras' one GRU bias
    (3H fewer than torch's two)."""
    m_items = 37_483
    with torch.device("meta"):
        m = T.TanRNN(m_items, 50, hidden)
    ours = sum(p.numel() for p in m.parameters())
    assert ours == 50 * m_items + 3 * (50 * hidden + hidden ** 2 + 2 * hidden) + m_items * (hidden + 1)
    assert ours + 50 + hidden + 1 - 3 * hidden == theirs


# ----------------------------------------------------------------------------- sampled
def test_sampled_softmax_loss_by_hand():
    sessions = _random_sessions(10, 12, 5, seed=8)
    fam = _family("tan", _ctx(sessions, 12), embedding=3, hidden=4, softmax="sampled", n_sample=5,
                  sample_alpha=0.5, batch_size=8)
    b = next(iter(fam.batches(0)))
    loss, n = fam.loss(b)
    with torch.no_grad():
        h = torch.stack([_last_output(fam.model, b.rows.inputs[r, :c + 1].tolist())
                         for r, c in zip(b.rows.row, b.rows.col)])
        cols = np.r_[b.targets, b.negatives.numpy()]
        logits = (h @ fam.model.W_O[cols].t() + fam.model.b_O[cols]).numpy()
        logq = np.log(np.maximum(fam.ctx.support[cols], 1)) * np.r_[np.ones(n), np.full(5, 0.5)]
        R = logits - logq
        ref = -np.mean([R[i, i] - np.log(np.exp(R[i]).sum()) for i in range(n)])
    assert float(loss) == pytest.approx(ref, rel=1e-5)
    loss.backward()
    assert fam.model.W_O.grad.is_sparse  # row-sparse: only the sampled rows get updates


# ----------------------------------------------------------------------------- config
@pytest.mark.parametrize("name,kw,match", [
    ("tan", {"click_dropout": 1.0}, "click_dropout"), ("tan", {"max_len": 0}, "max_len"),
    ("tan", {"softmax": "hier"}, "softmax"), ("tan", {"eval_history": "all"}, "eval_history"),
    ("tan_distill", {"distill_lambda": 1.5}, "distill_lambda"), ("tan_distill", {"temperature": 0.0}, "temperature"),
    ("tan_distill", {"softmax": "sampled"}, "full softmax"), ("tan_distill", {"reverse": True}, "reverse"),
    ("tan_emb", {"emb_hidden": 0}, "emb_hidden")])
def test_bad_values_are_config_errors(name, kw, match):
    with pytest.raises(ConfigError, match=match):
        registry.get(name).Config(**kw)


def test_missing_or_wrong_sources_are_config_errors(tmp_path):
    ctx = _ctx([[0, 1, 2], [3, 4]], 6)
    with pytest.raises(ConfigError, match="teacher_run is required"):
        _family("tan_distill", ctx)
    with pytest.raises(ConfigError, match="item_embeddings_from is required"):
        _family("tan_emb", ctx)
    with pytest.raises(ConfigError, match="no checkpoint"):
        _family("tan_distill", ctx, teacher_run=str(tmp_path / "nowhere"))
    fwd, _ = _save_teacher(tmp_path / "fwd", ctx, reverse=False)
    with pytest.raises(ConfigError, match="reverse=false"):
        _family("tan_distill", ctx, teacher_run=str(fwd))
    t, _ = _save_teacher(tmp_path / "t", ctx)
    with pytest.raises(ConfigError, match="does not match"):
        _family("tan_distill", ctx, teacher_run=str(t), teacher_digest="0" * 64)
    with pytest.raises(ConfigError, match="another item index"):
        _family("tan_distill", _ctx([[0, 1, 2], [3, 4]], 7), teacher_run=str(t))
    with pytest.raises(ConfigError, match=re.escape("is a 'tan_teacher' checkpoint, not tan | tan_distill")):
        _family("tan_emb", ctx, item_embeddings_from=str(t))


# ----------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def split(tmp_path_factory):
    from tests.training.toy import toy_split

    return toy_split(tmp_path_factory.mktemp("tan-split"), n_train=200, n_test=40, n_items=30)


SMALL = {"num_threads": 1, "device": "cpu", "n_epochs": 2, "embedding": 8, "hidden": 12, "batch_size": 64,
         "max_len": 5, "learning_rate": 0.01}


@pytest.fixture(scope="module")
def runs(split, tmp_path_factory):
    from training.trainer import train

    root = tmp_path_factory.mktemp("tan-runs")
    train("tan", split, root / "m1", overrides=SMALL, show_progress=False)
    train("tan_teacher", split, root / "teacher", overrides=SMALL, show_progress=False)
    train("tan_distill", split, root / "m3", overrides={**SMALL, "teacher_run": str(root / "teacher")},
          show_progress=False)
    train("tan_emb", split, root / "m4", overrides={**SMALL, "item_embeddings_from": str(root / "m1")},
          show_progress=False)
    return root


@pytest.mark.parametrize("name,run", [("tan", "m1"), ("tan_teacher", "teacher"), ("tan_distill", "m3"),
                                      ("tan_emb", "m4")])
def test_trains_and_evaluates(name, run, runs, split, tmp_path):
    from evaluation.evaluate import evaluate

    hist = json.loads((runs / run / "history.json").read_text())
    assert len(hist["epochs"]) == 2 and hist["epochs"][1]["loss"] < hist["epochs"][0]["loss"]
    m = evaluate(runs / run, split, tmp_path / "eval", device="cpu")
    assert m["model"] == name and m["n_events"] > 0 and 0 <= m["recall_at_20"] <= 1
    if name != "tan_teacher":  # a forward-reading model beats chance (20 of 30 items: 0.67) on the toy pattern
        assert m["recall_at_20"] > 0.75


@pytest.mark.parametrize("run", ["m3", "m4"])
def test_served_by_the_pyfunc(run, runs, split):
    """The pyfunc's scorer on a session longer than max_len (5) gives the evaluation's scores:
    the model's output on its last 5 inputs from a zero state."""
    from types import SimpleNamespace

    from evaluation import serving

    model = serving.SessionRecModel()
    model.load_context(SimpleNamespace(artifacts={serving.CHECKPOINT_ARTIFACT: str(runs / run / "model.pt")}))
    session = [100, 101, 102, 103, 104, 105, 106, 107]
    out = model.predict(None, {"session": [session]}, params={"k": 5})
    ckpt = ck.load_checkpoint(runs / run)
    net = registry.get(ckpt["model"]).build_model(int(ckpt["item_index"]["item_id"].shape[0]),
                                                  config_from_dict(ckpt["config"]))
    net.load_state_dict(ckpt["state_dict"])
    idx = ck.item_index_from_ckpt(ckpt["item_index"]).lookup(np.array(session))
    with torch.no_grad():
        scores = net.all_scores(_last_output(net, idx[-5:].tolist())).numpy()
    ids = ck.item_index_from_ckpt(ckpt["item_index"]).item_ids
    assert out["items"][0] == ids[np.argsort(-scores, kind="stable")[:5]].tolist()
    np.testing.assert_allclose(out["scores"][0], np.sort(scores)[::-1][:5], rtol=1e-5)


def test_student_records_its_teacher(runs):
    cfg = json.loads((runs / "m3" / "config.json").read_text())
    assert cfg["teacher_run"] == str(runs / "teacher")
    assert cfg["teacher_digest"] == ck.weights_digest(ck.load_checkpoint(runs / "teacher"))
    assert ck.load_checkpoint(runs / "m3")["config"]["teacher_digest"] == cfg["teacher_digest"]
    assert not any(k.startswith("teacher") for k in ck.load_checkpoint(runs / "m3")["state_dict"])


def test_m4_keeps_the_m1_embeddings_fixed(runs):
    m1, m4 = ck.load_checkpoint(runs / "m1"), ck.load_checkpoint(runs / "m4")
    assert torch.equal(m4["state_dict"]["E"], m1["state_dict"]["W_I"])
    assert m4["config"]["item_embeddings_digest"] == ck.weights_digest(m1)
    first = ck.load_checkpoint(ck.epoch_path(runs / "m4", 1))["state_dict"]
    assert not torch.equal(first["proj.weight"], m4["state_dict"]["proj.weight"])  # the rest trains


def test_resume_is_exact_for_the_student(runs, split, tmp_path):
    """Click deletion and batches come from generator(seed, epoch): 1 epoch + --resume = 2 epochs."""
    from training.trainer import train

    over = {**SMALL, "teacher_run": str(runs / "teacher")}
    train("tan_distill", split, tmp_path / "r", overrides={**over, "n_epochs": 1}, show_progress=False)
    train("tan_distill", split, tmp_path / "r", overrides=over, resume=True, show_progress=False)
    a, b = ck.load_checkpoint(tmp_path / "r")["state_dict"], ck.load_checkpoint(runs / "m3")["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in b)


def test_fine_tunes_from_its_weights_on_the_recent_table(runs, split, tmp_path):
    from training.data import read_events, read_item_index
    from training.trainer import train

    over = {"num_threads": 1, "device": "cpu", "train_table": "train_recent_4", "n_epochs": 0}
    train("tan", split, tmp_path / "ft0", overrides=over, init_from=runs / "m1", show_progress=False)
    pre = ck.load_checkpoint(runs / "m1")["state_dict"]
    start = ck.load_checkpoint(tmp_path / "ft0")["state_dict"]
    assert all(torch.equal(start[k], pre[k]) for k in pre)
    train("tan", split, tmp_path / "ft1", overrides={**over, "n_epochs": 1}, init_from=runs / "m1", show_progress=False)
    run = json.loads((tmp_path / "ft1" / "history.json").read_text())["run"]
    recent = read_events(split, "train_recent_4", read_item_index(split), min_session_length=2)
    assert run["train_table"] == "train_recent_4" and run["train_sessions"] == recent.n_sessions
    assert run["init_from_digest"] == ck.weights_digest(ck.load_checkpoint(runs / "m1"))
    assert json.loads((tmp_path / "ft1" / "config.json").read_text())["hidden"] == SMALL["hidden"]
    after = ck.load_checkpoint(tmp_path / "ft1")["state_dict"]
    assert not all(torch.equal(after[k], pre[k]) for k in pre)


def _resolve(tmp_path, fams, overrides=None, train_table="train_full"):
    from dags import pipeline_steps as steps

    return steps.resolve({"data_dir": str(tmp_path), "families": fams, "fractions": [4], "epochs": 1,
                          "device": "cpu", "overrides": overrides or {}, "train_table": train_table},
                         dag_id="session_rec_pipeline", dag_run_id="manual__t",
                         interval_start="2014-04-07T00:00:00Z", interval_end="2014-04-08T00:00:00Z")


def test_dag_trains_a_student_after_its_source_run_or_says_what_to_add(tmp_path):
    from dags import pipeline_steps as steps

    # no source family in the run: the error says which to add (or which override to set)
    for fam, key, src in (("tan_distill", "teacher_run", "tan_teacher"), ("tan_emb", "item_embeddings_from", "tan")):
        with pytest.raises(steps.PipelineParamError, match=f"{fam!r} needs {key}.*add {src!r} to param 'families'"):
            _resolve(tmp_path, ["gru4rec", fam])
        cfg = _resolve(tmp_path, ["tan", fam], {fam: {key: str(tmp_path / "run")}})  # given: trained at once
        assert cfg["overrides"][fam][key] == str(tmp_path / "run") and cfg["sources"] == {}
        assert [s["family"] for s in steps.plan_pretrain(cfg, {"split_dir": "S"})] == ["tan", fam]
    # a source that needs a source itself cannot serve: tan_emb accepts tan_distill, but not here
    with pytest.raises(steps.PipelineParamError, match="cannot serve"):
        _resolve(tmp_path, ["tan_teacher", "tan_distill", "tan_emb"])

    cfg = _resolve(tmp_path, ["tan_emb", "tan_distill", "tan", "tan_teacher"])
    assert cfg["sources"] == {"tan_emb": {"item_embeddings_from": "tan"}, "tan_distill": {"teacher_run": "tan_teacher"}}
    pre = steps.plan_pretrain(cfg, {"split_dir": "S"})
    assert [s["candidate"] for s in pre] == ["tan", "tan_teacher"]  # the students wait
    trained = [{**s, "run_dir": f"/m/{s['candidate']}", "select_run_dir": f"/s/{s['candidate']}",
                "child_run_id": f"run-{s['candidate']}", "digest": f"d-{s['candidate']}"} for s in pre]
    dep = {s["candidate"]: s for s in steps.plan_dependent(cfg, trained)}
    assert sorted(dep) == ["tan_distill", "tan_emb"]
    # final model <- the source's final model; selection copy <- the source's selection copy
    assert dep["tan_distill"]["final"]["overrides"]["teacher_run"] == "/m/tan_teacher"
    assert dep["tan_distill"]["select"]["overrides"]["teacher_run"] == "/s/tan_teacher"
    assert dep["tan_distill"]["select"]["overrides"]["train_table"] == "train"
    assert dep["tan_emb"]["final"]["overrides"]["item_embeddings_from"] == "/m/tan"
    assert dep["tan_emb"]["select"]["overrides"]["item_embeddings_from"] == "/s/tan"
    assert dep["tan_distill"]["sources"] == {"teacher_run": {"candidate": "tan_teacher", "run_id": "run-tan_teacher",
                                                             "digest": "d-tan_teacher"}}
    assert "teacher_run" not in cfg["overrides"]["tan_distill"]  # the plan did not write into the run config
    # their fine-tuned copies keep the same teacher and lineage
    ft = steps.plan_finetune(cfg, [{**s, "run_dir": "/m/tan_distill", "select_run_dir": "/s/tan_distill",
                                    "child_run_id": "run-d", "digest": "dd"} for s in [dep["tan_distill"]]])
    assert [f["candidate"] for f in ft] == ["tan_distill-recent4"]
    assert ft[0]["final"]["overrides"]["teacher_run"] == "/m/tan_teacher"
    assert ft[0]["select"]["overrides"]["teacher_run"] == "/s/tan_teacher"
    assert ft[0]["final"]["init_from"] == "/m/tan_distill" and ft[0]["sources"] == dep["tan_distill"]["sources"]
    # without a refit the selection copy is the model: one teacher, the one trained on train
    cfg = _resolve(tmp_path, ["tan_teacher", "tan_distill"], train_table="train")
    trained = [{**s, "run_dir": "/s/tan_teacher", "select_run_dir": "/s/tan_teacher", "child_run_id": "r",
                "digest": "d"} for s in steps.plan_pretrain(cfg, {"split_dir": "S"})]
    (d,) = steps.plan_dependent(cfg, trained)
    assert d["final"] is None and d["select"]["overrides"]["teacher_run"] == "/s/tan_teacher"
