"""The one trainer (training/trainer.py) on the autograd path: exact resume, early stopping on
an unseen table, clipping and LR schedules as hand-computed, NaN failing with epoch + step,
and POP unchanged on the new layer."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from tests.training.toy import events_table, random_sessions, toy_split, write_split
from training import checkpoint as ck
from training.config import ConfigError
from training.train import train
from training.trainer import NonFiniteLoss

SMALL = ["n_sample=16", "batch_size=8", "layers=16", "num_threads=1", "train_path=torch"]


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    """Toy split with a ``valid`` table disjoint from ``train`` (and inside train_full)."""
    root = tmp_path_factory.mktemp("trainer")
    train_s = random_sessions(240, 40, 0, start_id=1)
    valid_s = random_sessions(40, 40, 5, start_id=5000)
    test_s = random_sessions(40, 40, 1, start_id=10_000)
    return write_split(root, {"train": events_table(train_s), "valid": events_table(valid_s, t0=1_650_000_000),
                              "train_full": events_table(train_s + valid_s),
                              "test": events_table(test_s, t0=1_700_000_000)})


@pytest.mark.parametrize("extra", [
    [],  # row-sparse Adagrad + momentum (the official optimizer) on autograd
    ["optimizer=adam", "learning_rate=0.01", "lr_schedule=polynomial", "lr_decay_steps=40",
     "lr_end=0.001", "lr_power=0.5", "grad_clip=1.0", "dropout_embed=0.2"],
], ids=["adagrad", "adam-poly-clip"])
def test_resume_after_epoch_k_is_bit_identical_on_cpu(split, tmp_path, extra):
    full, part = tmp_path / "full", tmp_path / "part"
    train("gru4rec", split, full, sets=SMALL + extra + ["n_epochs=3"], show_progress=False)
    train("gru4rec", split, part, sets=SMALL + extra + ["n_epochs=1"], show_progress=False)
    r = train("gru4rec", split, part, resume=True, sets=["n_epochs=3"], show_progress=False)
    assert r["train_path"] == "torch"
    a, b = ck.load_checkpoint(full), ck.load_checkpoint(part)
    for k in a["state_dict"]:
        assert torch.equal(a["state_dict"][k], b["state_dict"][k]), k
    ha = json.loads((full / "history.json").read_text())["epochs"]
    hb = json.loads((part / "history.json").read_text())["epochs"]
    assert [e["loss"] for e in ha] == [e["loss"] for e in hb]
    # the optimizer and schedule state travelled too
    assert a["optimizer"]["schedule"] == b["optimizer"]["schedule"]


def test_resume_refuses_another_training_path(split, tmp_path):
    run = tmp_path / "r"
    train("gru4rec", split, run, sets=SMALL + ["n_epochs=1"], show_progress=False)
    with pytest.raises(ConfigError, match="train_path='torch'"):
        train("gru4rec", split, run, resume=True, sets=["n_epochs=2", "train_path=native"], show_progress=False)


def test_nan_fails_with_epoch_and_step_on_the_autograd_path(split, tmp_path):
    with pytest.raises(NonFiniteLoss, match=r"at epoch 0 step \d+"):
        train("gru4rec", split, tmp_path / "nan", show_progress=False,
              sets=SMALL + ["n_epochs=1", "learning_rate=1e38"])  # Adagrad: weights overflow float32 at once


def test_early_stopping_stops_on_the_unseen_table_and_keeps_the_best(split, tmp_path, monkeypatch):
    """Scripted validation values 0.1, 0.3, 0.2, 0.25, 0.5: best after epoch 2; patience 2
    stops after epoch 4 (epoch 5 never runs) and model.pt holds epoch 2's weights."""
    from training import validation

    seen = []
    script = iter([0.1, 0.3, 0.2, 0.25, 0.5])
    real_ranks = validation.conservative_ranks

    def ranks(scorer, data, n_slots=256):
        seen.append(data.n_sessions)
        return real_ranks(scorer, data, n_slots)

    monkeypatch.setattr(validation, "conservative_ranks", ranks)
    monkeypatch.setattr(validation, "metric", lambda name, rank: next(script))
    run = tmp_path / "es"
    res = train("gru4rec", split, run, show_progress=False,
                sets=SMALL + ["n_epochs=5", "train_table=train", "early_stop_patience=2"])
    hist = json.loads((run / "history.json").read_text())
    assert [e["early_stop_value"] for e in res["history"]] == [0.1, 0.3, 0.2, 0.25]
    assert hist["run"]["best_epoch"] == 2 and hist["run"]["stopped_after_epoch"] == 4
    n_valid = sum(len(items) >= 2 for _, items in random_sessions(40, 40, 5, start_id=5000))
    assert seen == [n_valid] * 4  # the valid table (its sessions of >= 2 events), once per epoch
    best = torch.load(ck.epoch_path(run, 2), weights_only=True)["state_dict"]
    final = ck.load_checkpoint(run)["state_dict"]
    for k in best:
        assert torch.equal(best[k], final[k]), k
    assert ck.load_checkpoint(run)["epoch"] == 2


def test_early_stopping_refuses_a_table_the_model_trains_on(split, tmp_path):
    with pytest.raises(ConfigError, match=r"(\d+) of its \1 sessions are in the training table"):
        train("gru4rec", split, tmp_path / "x", show_progress=False,
              sets=SMALL + ["n_epochs=2", "early_stop_patience=1"])  # train_full contains valid


def test_early_stopping_metric_equals_the_evaluator(split, tmp_path):
    """training.validation (used for early stopping) and evaluation.evaluate agree."""
    from evaluation.evaluate import evaluate
    from training.registry import load_scorer
    from training.data import read_events
    from training.validation import conservative_ranks, metric

    run = tmp_path / "m"
    train("gru4rec", split, run, sets=SMALL + ["n_epochs=1", "train_table=train"], show_progress=False)
    ckpt = ck.load_checkpoint(run)
    data = read_events(split, "valid", ck.item_index_from_ckpt(ckpt["item_index"]), min_session_length=2)
    r = conservative_ranks(load_scorer(ckpt, torch.device("cpu")), data)
    m = evaluate(run, split, tmp_path / "ev", table="valid", device="cpu")
    assert metric("mrr_at_20", r) == pytest.approx(m["mrr_at_20"], abs=1e-12)
    assert metric("recall_at_5", r) == pytest.approx(m["recall_at_5"], abs=1e-12)


def test_clipping_and_polynomial_schedule_match_hand_computed_values(split, tmp_path, monkeypatch):
    """Every optimizer step sees lr(t) = (lr0 - end) (1 - t/N)^p + end (t = steps taken) and
    gradients whose global norm is min(norm, clip) (norms computed here, independently)."""
    from training import optim

    lrs, pre, post = [], [], []
    real_clip = optim.clip_grad_norm

    def norm_of(params):
        tot = 0.0
        for p in params:
            if p.grad is None:
                continue
            g = p.grad.coalesce().values() if p.grad.is_sparse else p.grad
            tot += float((g.double() ** 2).sum())
        return math.sqrt(tot)

    def clip(params, max_norm):
        params = list(params)
        pre.append(norm_of(params))
        out = real_clip(params, max_norm)
        post.append(norm_of(params))
        return out

    real_step = optim.Adam.step

    def step(self, closure=None):
        lrs.append(self.param_groups[0]["lr"])
        return real_step(self, closure)

    monkeypatch.setattr(optim, "clip_grad_norm", clip)
    monkeypatch.setattr(optim.Adam, "step", step)
    N, lr0, end, p, clip_to = 30, 0.01, 0.002, 0.5, 0.5
    train("gru4rec", split, tmp_path / "c", show_progress=False, sets=SMALL + [
        "n_epochs=2", "optimizer=adam", f"learning_rate={lr0}", "lr_schedule=polynomial", f"lr_decay_steps={N}",
        f"lr_end={end}", f"lr_power={p}", f"grad_clip={clip_to}"])
    assert len(lrs) > N + 5  # past the end of the decay
    for t, lr in enumerate(lrs):
        want = (lr0 - end) * (1 - min(t, N) / N) ** p + end
        assert lr == pytest.approx(want, rel=1e-6), t
    assert any(n > clip_to for n in pre)
    for a, b in zip(pre, post):
        assert b == pytest.approx(min(a, clip_to), rel=1e-4)


def test_pop_on_the_new_layer_equals_a_hand_count(tmp_path):
    """POP's numbers, recomputed independently: support counted here from the raw sessions and
    ranks counted with ties against the model, for every test prediction."""
    from evaluation.evaluate import evaluate

    split = toy_split(tmp_path / "pop", n_train=120, n_test=30)
    run = tmp_path / "run"
    r = train("pop", split, run, show_progress=False)
    assert r["train_path"] == "none" and r["history"] == []
    m = evaluate(run, split, tmp_path / "ev", device="cpu")
    train_s = random_sessions(120, 40, 0, start_id=1)
    test_s = random_sessions(30, 40, 1, start_id=10_000)
    # the item index holds every training item; POP counts the events of the training sessions
    # the trainer reads (sessions of >= 2 events, as every family)
    support = {i: 0 for _, items in train_s for i in items}
    for _, items in train_s:
        for i in items:
            support[i] += len(items) >= 2
    ranks = []
    for _, items in test_s:
        items = [i for i in items if i in support]
        if len(items) < 2:
            continue
        for t in items[1:]:
            ranks.append(1 + sum(1 for j, c in support.items() if j != t and c >= support[t]))
    ranks = np.array(ranks, float)
    assert m["n_events"] == len(ranks)
    assert m["recall_at_20"] == pytest.approx(float((ranks <= 20).mean()))
    assert m["mrr_at_20"] == pytest.approx(float(np.where(ranks <= 20, 1 / ranks, 0).mean()))


@pytest.mark.parametrize("mode", ["reset", "carry"])
def test_fine_tuning_lineage_and_optimizer_choice(split, tmp_path, mode):
    """A fine-tuned run records where it started (path, epoch, weights digest) and whether the
    optimizer state came along; ``carry`` really carries it, ``reset`` starts afresh."""
    pre = tmp_path / "pre"
    train("gru4rec", split, pre, sets=SMALL + ["n_epochs=1"], show_progress=False)
    ft = tmp_path / "ft"
    train("gru4rec", split, ft, init_from=str(pre), show_progress=False,
          sets=["n_epochs=0", f"init_optimizer={mode}", "learning_rate=0.05", "train_table=train"])
    a, b = ck.load_checkpoint(pre), ck.load_checkpoint(ft)
    run = json.loads((ft / "history.json").read_text())["run"]
    assert run["init_from"] == str(pre) and run["init_from_epoch"] == 1
    assert run["init_from_digest"] == ck.weights_digest(a) and run["init_optimizer"] == mode
    assert run["learning_rate"] == 0.05 and run["train_table"] == "train"
    sa = a["optimizer"]["optimizer"]["state"]
    sb = b["optimizer"]["optimizer"]["state"]
    if mode == "carry":
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k]["acc"], sb[k]["acc"]) for k in sa)
    else:
        assert sb == {}  # a fresh optimizer: no accumulators yet


def test_recent_fraction_of_a_table_equals_the_spark_recent_tables(rsc15_out):
    """``recent_fraction=k`` (used for selection copies of fine-tuned candidates, trained on
    ``train``) applies spark_jobs' train_recent_<k> rule: same sessions as Spark's tables."""
    from training.data import read_events, read_item_index

    split = rsc15_out[0] / "splits" / "time"
    idx = read_item_index(split)
    full = read_events(split, "train_full", idx, min_session_length=1)
    for k in (4, 16, 64):
        spark = read_events(split, f"train_recent_{k}", idx, min_session_length=1)
        mine = full.recent(k)
        assert np.array_equal(np.sort(mine.session_ids), np.sort(spark.session_ids)), k
        assert mine.n_events == spark.n_events
