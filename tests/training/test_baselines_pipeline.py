"""Every baseline of issue 14 is a registered family that goes the whole way: trains from a
SPLIT_DIR through the one trainer, evaluates through the one loop (with its cost recorded),
serves through the MLflow pyfunc, is accepted by the DAG's ``families`` Param, and "fine-tunes"
on ``train_recent_k`` the way a baseline should: a counting baseline is refit on the recent
table (its pre-trained counts are not carried over), a trained one starts from its weights."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from training import registry

BASELINES = ["pop", "spop", "ppop", "itemknn", "itemknn_td", "bprmf", "coevent", "coevent_tied",
             "sknn", "vsknn", "stan", "vstan"]
FAST = {"bprmf": {"n_epochs": 1}, "coevent": {"n_epochs": 1}, "coevent_tied": {"n_epochs": 1}}
# BPR-MF's per-training-session factors (and their ids) belong to the table it trained on: a
# fine-tuning run on another table keeps only the shared sessions' rows (training/baselines/bprmf.py)
TABLE_BOUND = {"bprmf": ("S", "session_ids")}


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    from tests.training.toy import toy_split

    return toy_split(tmp_path_factory.mktemp("baselines"), n_train=120, n_test=30, n_items=30)


@pytest.fixture(scope="module")
def trained(split, tmp_path_factory):
    from training.trainer import train

    root = tmp_path_factory.mktemp("baseline-runs")
    out = {}
    for name in BASELINES:
        over = {"num_threads": 1, "device": "cpu", **FAST.get(name, {})}
        train(name, split, root / name, overrides=over, show_progress=False)
        out[name] = root / name
    return out


def test_every_baseline_is_registered():
    assert set(BASELINES) <= set(registry.names())
    for name in BASELINES:
        fam = registry.get(name)
        assert fam.name == name and fam.Config().model == name


@pytest.mark.parametrize("name", BASELINES)
def test_trains_evaluates_and_records_its_cost(name, trained, split, tmp_path):
    from evaluation.evaluate import evaluate

    hist = json.loads((trained[name] / "history.json").read_text())
    assert hist["run"]["train_table"] == "train_full" and hist["run"]["fit_seconds"] >= 0
    m = evaluate(trained[name], split, tmp_path / "eval", device="cpu")
    assert m["model"] == name and m["n_events"] > 0
    assert 0.0 <= m["mrr_at_20"] <= m["recall_at_20"] <= 1.0
    assert m["fit_seconds"] == hist["run"]["fit_seconds"] and m["model_bytes"] > 0
    assert (tmp_path / "eval" / "per_event.parquet").exists()


@pytest.mark.parametrize("name", BASELINES)
def test_pyfunc_serves_it(name, trained, tmp_path):
    import mlflow.pyfunc
    import pandas as pd

    from evaluation import serving

    path = tmp_path / "pyfunc"
    mlflow.pyfunc.save_model(str(path), python_model=str(serving.MODEL_CODE_PATH),
                             artifacts={serving.CHECKPOINT_ARTIFACT: str(trained[name] / "model.pt")},
                             signature=serving.signature(),
                             pip_requirements=["torch"])  # skip MLflow's requirement inference (~12 s a model)
    out = mlflow.pyfunc.load_model(str(path)).predict(pd.DataFrame({"session": [[105, 106, 107], [110]]}),
                                                      params={"k": 5})
    assert [len(x) for x in out["items"]] == [5, 5]


def _tensors_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k] for k in a)


@pytest.mark.parametrize("name", [n for n in BASELINES if not registry.get(n).trainable])
def test_counting_baseline_is_refit_on_the_recent_table(name, trained, split, tmp_path):
    """init_from a model fitted on train_full + train_table=train_recent_4 gives exactly the
    model fitted from scratch on train_recent_4 (same item index), not the pre-trained one."""
    from training import checkpoint as ck
    from training.trainer import train

    over = {"num_threads": 1, "device": "cpu", "train_table": "train_recent_4"}
    train(name, split, tmp_path / "ft", overrides=over, init_from=trained[name], show_progress=False)
    train(name, split, tmp_path / "scratch", overrides=over, show_progress=False)
    ft, scratch, pre = (ck.load_checkpoint(p)["state_dict"] for p in (tmp_path / "ft", tmp_path / "scratch",
                                                                      trained[name]))
    assert _tensors_equal(ft, scratch)
    assert not _tensors_equal(ft, pre)
    hist = json.loads((tmp_path / "ft" / "history.json").read_text())["run"]
    assert hist["train_table"] == "train_recent_4" and hist["init_from"] == str(trained[name])


@pytest.mark.parametrize("name", [n for n in BASELINES if registry.get(n).trainable])
def test_trained_baseline_fine_tunes_from_its_weights(name, trained, split, tmp_path):
    from training import checkpoint as ck
    from training.trainer import train

    over = {"num_threads": 1, "device": "cpu", "train_table": "train_recent_4", "n_epochs": 0}
    train(name, split, tmp_path / "ft0", overrides=over, init_from=trained[name], show_progress=False)
    pre = ck.load_checkpoint(trained[name])["state_dict"]
    start = ck.load_checkpoint(tmp_path / "ft0")["state_dict"]
    keep = [k for k in pre if k not in TABLE_BOUND.get(name, ())]
    assert keep and _tensors_equal({k: start[k] for k in keep}, {k: pre[k] for k in keep})  # starts from them
    train(name, split, tmp_path / "ft1", overrides={**over, "n_epochs": 1}, init_from=trained[name],
          show_progress=False)
    after = ck.load_checkpoint(tmp_path / "ft1")["state_dict"]
    assert not _tensors_equal({k: after[k] for k in keep}, {k: pre[k] for k in keep})


def test_dag_families_param_takes_every_baseline(tmp_path):
    from dags import pipeline_steps as steps

    cfg = steps.resolve({"data_dir": str(tmp_path), "families": ["gru4rec", *BASELINES], "fractions": [4],
                         "epochs": 1, "device": "cpu"},
                        dag_id="session_rec_pipeline", dag_run_id="manual__b", interval_start="2014-04-07T00:00:00Z",
                        interval_end="2014-04-08T00:00:00Z")
    assert cfg["families"] == ["gru4rec", *BASELINES]
    cands = steps.planned_candidates(cfg)
    assert "vsknn-recent4" in cands and "itemknn" in cands
    # --epochs applies to the trained ones only
    for name in BASELINES:
        assert ("n_epochs" in cfg["overrides"][name]) == registry.get(name).trainable, name
    assert np.all([isinstance(cfg["overrides"][n], dict) for n in BASELINES])


def test_event_times_are_read_per_event_and_follow_recent(split):
    """Time-aware baselines (STAN, itemknn_td) read per-event times: toy session k's event j is
    at t0 + 1000 k + 10 j seconds (tests/training/toy.py); recent(k) keeps them aligned."""
    from training.data import read_events, read_item_index

    d = read_events(split, "train_full", read_item_index(split))
    lengths = np.diff(d.offsets)
    within = np.concatenate([np.arange(n) for n in lengths])
    # short sessions (< 2 events) are dropped: compare through the sessions' own start times
    assert np.array_equal(d.ts - np.repeat(d.start_ts, lengths), 10 * within * 1_000_000)
    assert np.array_equal(d.ts[d.offsets[:-1]], d.start_ts) and np.array_equal(d.ts[d.offsets[1:] - 1],
                                                                                 d.end_ts_per_session)
    r = d.recent(4)
    rl = np.diff(r.offsets)
    assert np.array_equal(r.ts - np.repeat(r.start_ts, rl), 10 * np.concatenate([np.arange(n) for n in rl]) * 1_000_000)
