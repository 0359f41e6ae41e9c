"""Fault: the MLflow server is down when a trained candidate is to be logged. Training output is
kept; the task fails naming what was not logged; its retry (server back) logs without retraining
(docs/reliability.md, "Faults").

    .venv/bin/python -m pytest tests/reliability/test_faults_mlflow.py -q

A real ``mlflow server`` on 127.0.0.1 (free port, SQLite store and artifacts in tmp) holds the
DAG run's parent run; it is stopped (by its PID's process group) before the DAG's ``train`` step
(``dags.pipeline_steps.train_one``) runs, and started again on the same port and store before
the retry.
"""
from __future__ import annotations

import contextlib
import logging
import signal
from pathlib import Path

import pytest

from tests.services import free_port, mlflow_server, stop_process
from tests.training.toy import events_table, random_sessions, write_split


def test_mlflow_down_keeps_the_trained_model_and_the_retry_only_logs(tmp_path, monkeypatch, caplog):
    import mlflow
    from mlflow.tracking import MlflowClient

    from dags import pipeline_steps as steps
    from evaluation import mlflow_logging as ml

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # fail fast while the server is down
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    monkeypatch.setenv("RNNREC_MLFLOW_SYSTEM_METRICS", "0")
    train = random_sessions(200, 40, 0, start_id=1)
    split = write_split(tmp_path / "split", {"train_full": events_table(train), "train": events_table(train[:150])})
    cfg = steps.resolve({"data_dir": str(tmp_path / "data"), "families": ["gru4rec"], "fractions": [], "epochs": 1,
                         "device": "cpu", "overrides": {"gru4rec": {"layers": [16], "n_sample": 16, "batch_size": 16,
                                                                    "num_threads": 1}}},
                        dag_id="session_rec_pipeline", dag_run_id="manual__mlflow_down",
                        interval_start="2014-04-07T00:00:00Z", interval_end="2014-04-08T00:00:00Z")
    (spec,) = steps.plan_pretrain(cfg, {"split_dir": str(split)})
    store = f"sqlite:///{tmp_path / 'server.db'}"
    stack = contextlib.ExitStack()
    try:
        _, _, proc = mlflow_server(stack, tmp_path, store, port=port)
        ml.configure(cfg["data_dir"])
        parent = MlflowClient().create_run(ml.experiment_id("synthetic", cfg["data_dir"]),
                                           tags={"rnnrec_role": "parent"}).info.run_id
        stop_process(proc, signal.SIGINT, timeout=30, group=True)  # MLflow goes down before logging

        with pytest.raises(steps.MlflowNotLogged) as e:
            steps.train_one(cfg, spec, parent)
        msg = str(e.value)
        model = Path(cfg["root"]) / "models" / "gru4rec" / "model.pt"
        assert "candidate 'gru4rec'" in msg and "not logged to MLflow" in msg and url in msg
        assert str(model.parent) in msg and "select" in msg
        assert model.is_file() and (Path(cfg["root"]) / "select" / "gru4rec" / "model.pt").is_file()
        mtime = model.stat().st_mtime_ns
        rec = steps._read_json(Path(cfg["root"]) / "status" / "failed" / "gru4rec.json")
        assert rec["step"] == "train" and "MlflowNotLogged" in rec["error"]

        mlflow_server(stack, tmp_path, store, port=port)  # back, same port and store
        with caplog.at_level(logging.INFO, logger="dags.pipeline_steps"):
            out = steps.train_one(cfg, spec, parent)
        assert out["training"] == {"select": {"trained": False, "resumed_from_epoch": None},
                                   "final": {"trained": False, "resumed_from_epoch": None}}
        assert model.stat().st_mtime_ns == mtime, "the retry trained again"
        assert "training of gru4rec (final) skipped" in caplog.text
        assert not (Path(cfg["root"]) / "status" / "failed" / "gru4rec.json").exists()  # cleared by the success
        c = MlflowClient()
        run = c.get_run(out["child_run_id"])
        assert run.info.status == "FINISHED" and run.data.tags["mlflow.parentRunId"] == parent
        assert run.data.tags["rnnrec_ckpt_digest"] == out["digest"] and run.data.params["layers"] == "[16]"
        loaded = mlflow.pyfunc.load_model(out["model_uri"])  # the model itself reached the server
        assert loaded is not None
        kids = c.search_runs([run.info.experiment_id], f"tags.mlflow.parentRunId = '{parent}'")
        assert len(kids) == 1  # the failed try's child run (if any) was replaced, not duplicated
    finally:
        stack.close()  # stops the server (both starts)
        from mlflow.tracking._model_registry import utils as reg_utils
        from mlflow.tracking._tracking_service import utils as trk_utils

        trk_utils._tracking_uri = None  # later tests must not talk to the stopped server
        reg_utils._registry_uri = None
