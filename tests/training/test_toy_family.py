"""Adding a family = one module + one registry line: a toy one-layer GRU, defined and
registered in THIS file alone, goes through the training CLI, the evaluation CLI, the MLflow
pyfunc and the DAG's mapped train/evaluate tasks.

Other processes find it through ``$RNNREC_PLUGINS=tests.training.test_toy_family`` (the
registry imports the modules listed there), exactly as an out-of-tree family would be found.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

from training import registry
from training.batching import pack, sequence_batches
from training.config import TrainConfig, config_from_dict
from training.family import Family, generator
from training.scoring import RNNScorer

ROOT = Path(__file__).resolve().parents[2]
PLUGIN = "tests.training.test_toy_family"


# ----------------------------------------------------------------------------- the family
@dataclass
class ToyConfig(TrainConfig):
    """Toy: embedding -> one GRU layer -> full softmax (padded BPTT batches, truncated)."""

    model: str = "toygru"
    hidden: int = 16
    max_len: int = 6
    n_epochs: int = 2
    batch_size: int = 16
    learning_rate: float = 0.01


class ToyGRU(nn.Module):
    def __init__(self, n_items: int, hidden: int):
        super().__init__()
        self.n_items = n_items
        self.emb = nn.Embedding(n_items, hidden)
        self.gru = nn.GRU(hidden, hidden, batch_first=True)
        self.out = nn.Linear(hidden, n_items)

    def init_state(self, n: int, device=None):
        return [torch.zeros(n, self.gru.hidden_size, device=device)]

    def forward(self, items, state):  # one step per row (the scorer's interface)
        o, h = self.gru(self.emb(items).unsqueeze(1), state[0].unsqueeze(0))
        return o[:, 0], [h[0]]

    def all_scores(self, out):
        return self.out(out)


class ToyFamily(Family):
    name = "toygru"
    Config = ToyConfig

    def __init__(self, cfg, ctx):
        super().__init__(cfg, ctx)
        self.model = ToyGRU(ctx.index.n_items, cfg.hidden).to(ctx.device)

    def init_weights(self, gen):
        for p in self.model.parameters():
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)

    def batches(self, epoch):
        d = self.ctx.data
        order = torch.randperm(d.n_sessions, generator=generator(self.cfg.seed, epoch)).numpy()
        yield from sequence_batches(d.items, d.offsets, order, self.cfg.batch_size, self.cfg.max_len)

    def loss(self, b):
        x = torch.from_numpy(b.inputs).to(self.ctx.device)
        y = torch.from_numpy(b.targets).to(self.ctx.device)
        o, _ = self.model.gru(pack(b, self.model.emb(x)))
        o, _ = nn.utils.rnn.pad_packed_sequence(o, batch_first=True, total_length=x.shape[1])
        m = y >= 0  # padding is never scored
        return nn.functional.cross_entropy(self.model.out(o[m]), y[m]), int(m.sum())

    @classmethod
    def scorer(cls, ckpt, device):
        cfg = config_from_dict(ckpt["config"])
        model = ToyGRU(int(ckpt["item_index"]["item_id"].shape[0]), cfg.hidden)
        model.load_state_dict(ckpt["state_dict"])
        return RNNScorer(model, device)


registry.register(ToyFamily)  # <- the one registry line
# ----------------------------------------------------------------------------- the tests


def _env():
    return {**os.environ, "RNNREC_PLUGINS": PLUGIN, "PYTHONPATH": str(ROOT), "MLFLOW_DISABLE_TELEMETRY": "true"}


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    from tests.training.toy import toy_split

    return toy_split(tmp_path_factory.mktemp("toyfam"), n_train=200, n_test=40)


@pytest.fixture(scope="module")
def cli_run(split, tmp_path_factory):
    """``python -m training.train`` in a fresh process, then ``python -m evaluation.evaluate``."""
    tmp = tmp_path_factory.mktemp("toyfam-run")
    run, ev = tmp / "run", tmp / "eval"
    r = subprocess.run([sys.executable, "-m", "training.train", "--model", "toygru", "--data", str(split),
                        "--out", str(run), "--set", "n_epochs=3", "--set", "num_threads=1", "--no-progress"],
                       cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "train_path=torch" in r.stdout
    r = subprocess.run([sys.executable, "-m", "evaluation.evaluate", "--model-dir", str(run), "--data", str(split),
                        "--out", str(ev), "--device", "cpu"], cwd=ROOT, env=_env(), capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return run, ev


def test_registered_without_touching_the_registry_file():
    assert "toygru" in registry.names() and registry.get("toygru") is ToyFamily
    src = (ROOT / "training" / "registry.py").read_text()
    assert "toygru" not in src
    with pytest.raises(ValueError, match="already registered"):
        registry.register(type("Other", (ToyFamily,), {"name": "gru4rec"}))


def test_cli_lists_and_trains_and_evaluates_the_toy_family(cli_run):
    run, ev = cli_run
    hist = json.loads((run / "history.json").read_text())
    assert hist["run"]["train_path"] == "torch" and len(hist["epochs"]) == 3
    assert hist["epochs"][-1]["loss"] < hist["epochs"][0]["loss"]  # it learns
    m = json.loads((ev / "metrics.json").read_text())
    assert m["model"] == "toygru" and m["n_events"] > 0
    # the toy data's next item is usually item + 1: a learning GRU beats chance (20/40) clearly
    assert m["recall_at_20"] > 0.6
    r = subprocess.run([sys.executable, "-m", "training.train", "--list"], cwd=ROOT, env=_env(),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "toygru: Toy:" in r.stdout and "max_len=6" in r.stdout


def test_unknown_family_and_wrong_checkpoint_fail_clearly(split, cli_run, tmp_path):
    r = subprocess.run([sys.executable, "-m", "training.train", "--model", "nope", "--data", str(split),
                        "--out", str(tmp_path / "x")], cwd=ROOT, env=_env(), capture_output=True, text=True)
    assert r.returncode == 2 and "unknown model family 'nope'" in r.stderr and "toygru" in r.stderr
    r = subprocess.run([sys.executable, "-m", "training.train", "--model", "toygru", "--data", str(split),
                        "--out", str(tmp_path / "x"), "--set", "hidden=abc"], cwd=ROOT, env=_env(),
                       capture_output=True, text=True)
    assert r.returncode == 2 and "'hidden'" in r.stderr and "is not an int" in r.stderr
    r = subprocess.run([sys.executable, "-m", "training.train", "--model", "gru4rec", "--data", str(split),
                        "--out", str(tmp_path / "ft"), "--init-from", str(cli_run[0])], cwd=ROOT, env=_env(),
                       capture_output=True, text=True)
    assert r.returncode == 2 and f"--init-from {cli_run[0]}: a 'toygru' checkpoint, not 'gru4rec'" in r.stderr


def test_pyfunc_serves_the_toy_family(cli_run, tmp_path):
    import mlflow.pyfunc
    import pandas as pd

    from evaluation import serving

    run, _ = cli_run
    path = tmp_path / "pyfunc"
    mlflow.pyfunc.save_model(str(path), python_model=str(serving.MODEL_CODE_PATH),
                             artifacts={serving.CHECKPOINT_ARTIFACT: str(run / "model.pt")},
                             signature=serving.signature(),
                             pip_requirements=["torch"])  # skip MLflow's requirement inference (~12 s)
    model = mlflow.pyfunc.load_model(str(path))
    out = model.predict(pd.DataFrame({"session": [[105, 106, 107]]}), params={"k": 5})
    assert len(out["items"][0]) == 5 and 108 in out["items"][0]  # "next = item + 1" learnt


def test_one_mapped_dag_task_runs_the_toy_family(split, tmp_path, monkeypatch):
    """The DAG's ``families`` Param accepts it (validated against the registry) and its mapped
    train / evaluate task bodies run it and log it to MLflow."""
    import mlflow

    from dags import pipeline_steps as steps

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("RNNREC_PLUGINS", PLUGIN)
    cfg = steps.resolve({"data_dir": str(tmp_path), "families": ["toygru"], "fractions": [], "epochs": 1,
                         "device": "cpu", "overrides": {"toygru": {"hidden": 8}}},
                        dag_id="session_rec_pipeline", dag_run_id="manual__toy",
                        interval_start="2014-04-07T00:00:00Z", interval_end="2014-04-08T00:00:00Z")
    assert cfg["overrides"]["toygru"]["hidden"] == 8
    with pytest.raises(steps.PipelineParamError, match="expected int"):
        steps.resolve({"data_dir": str(tmp_path), "families": ["toygru"], "overrides": {"toygru": {"hidden": "8"}}},
                      dag_id="d", dag_run_id="r", interval_start="2014-04-07T00:00:00Z",
                      interval_end="2014-04-08T00:00:00Z")
    from evaluation import mlflow_logging as ml

    ml.configure(tmp_path)
    with mlflow.start_run(experiment_id=ml.experiment_id("toy", tmp_path)) as parent:
        pass
    (spec,) = steps.plan_pretrain(cfg, {"split_dir": str(split)})
    # valid == test here: the toy split has no valid table, and evaluate_one scores both
    import shutil

    shutil.copytree(split / "test", split / "valid", dirs_exist_ok=True)
    trained = steps.train_one(cfg, spec, parent.info.run_id)
    out = steps.evaluate_one(cfg, trained)
    assert out["family"] == "toygru" and 0 < out["recall_at_20"] <= 1
    run = mlflow.tracking.MlflowClient().get_run(trained["child_run_id"])
    assert run.data.params["hidden"] == "8" and run.data.tags["rnnrec_train_path"] == "torch"
