"""The pipeline's MLflow steps against a real ``mlflow server`` on 127.0.0.1, then serving.

    .venv/bin/python -m pytest tests/dags/test_mlflow_server.py -q

Starts ``mlflow server`` (SQLite store + proxied artifacts in tmp), points
``MLFLOW_TRACKING_URI`` at it, runs the DAG's step functions (parent run ->
train + fine-tune -> evaluate -> compare & register) on a tiny contract-layout
split (no Spark/Airflow needed for these steps), loads
``models:/synthetic-best@champion`` from the server and asks for recommendations.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.training.toy import events_table, random_sessions, write_split


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def mlflow_server(tmp_path):
    port = _free_port()
    exe = str(Path(sys.executable).with_name("mlflow"))
    log = open(tmp_path / "server.log", "w")
    proc = subprocess.Popen(
        [exe, "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
         "--artifacts-destination", str(tmp_path / "server-artifacts")],
        stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"},
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 180
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert proc.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            assert time.time() < deadline, "mlflow server did not come up"
            time.sleep(1)
        yield url
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def _split(root: Path) -> Path:
    train = random_sessions(300, 40, 0, start_id=1)
    valid = random_sessions(40, 40, 2, start_id=5_000)
    test = random_sessions(60, 40, 1, start_id=10_000)
    split = write_split(root / "processed" / "splits" / "time_strict", {
        "train_full": events_table(train + valid), "train": events_table(train),
        "valid": events_table(valid, t0=1_650_000_000), "test": events_table(test, t0=1_700_000_000),
        "train_recent_4": events_table((train + valid)[-85:])})
    tables = {t: {"events": 1, "sessions": 1, "items": 1, "users": 0} for t in
              ("train_full", "train", "valid", "test", "train_recent_4")}
    (root / "processed" / "manifest.json").write_text(json.dumps({"splits": {"time_strict": {"tables": tables}}}))
    return split


def test_pipeline_logs_to_server_and_champion_serves(mlflow_server, tmp_path, monkeypatch):
    import mlflow
    import pandas as pd

    from dags import pipeline_steps as steps

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    split = _split(tmp_path)
    cfg = steps.resolve({"data_dir": str(tmp_path), "families": ["gru4rec", "pop"], "fractions": [4], "epochs": 2,
                         "device": "cpu", "overrides": {"gru4rec": {"layers": [24], "n_sample": 16,
                                                                     "batch_size": 16, "learning_rate": 0.1}}},
                        dag_id="session_rec_pipeline", dag_run_id="manual__test",
                        interval_start="2014-04-07T00:00:00Z", interval_end="2014-04-08T00:00:00Z")
    prep = {"processed": str(tmp_path / "processed"), "split_dir": str(split)}
    parent = steps.start_tracking(cfg, prep, {"quality_dir": str(tmp_path / "no-quality")})
    pre = [steps.train_one(cfg, s, parent) for s in steps.plan_pretrain(cfg, prep)]
    fine = [steps.train_one(cfg, s, parent) for s in steps.plan_finetune(cfg, pre)]
    assert [f["candidate"] for f in fine] == ["gru4rec-recent4", "pop-recent4"]
    evaluated = [steps.evaluate_one(cfg, t) for t in pre + fine]
    summary = steps.compare_and_register(cfg, evaluated, parent)
    assert {d["model"]: d["action"] for d in summary["registry"]} == {
        "synthetic-gru4rec": "promoted", "synthetic-pop": "promoted", "synthetic-best": "promoted"}

    assert mlflow.get_tracking_uri() == mlflow_server
    c = mlflow.tracking.MlflowClient()
    run = c.get_run(parent)
    assert run.info.status == "FINISHED" and run.data.tags["rnnrec_interval"].startswith("2014-04-07")
    assert run.info.artifact_uri.startswith("mlflow-artifacts:")  # proxied through the server
    best = max(summary["candidates"], key=lambda r: r["valid_mrr_at_20"])
    assert c.get_model_version_by_alias("synthetic-best", "champion").tags["rnnrec_ckpt_digest"] == best["digest"]

    model = mlflow.pyfunc.load_model("models:/synthetic-best@champion")
    out = model.predict(pd.DataFrame({"session": [[105, 106], [120]], "user_id": [3, -1]}), params={"k": 5})
    assert [len(x) for x in out["items"]] == [5, 5]
    assert all(100 <= i < 140 for x in out["items"] for i in x)
    if best["family"] == "gru4rec":  # the pattern is "next = item + 1": a trained GRU ranks it high
        assert 107 in out["items"][0]

    # a worse candidate never takes the alias
    from evaluation import mlflow_logging as ml

    d = ml.promote_if_better("synthetic-best", "999", -1.0, best["valid_mrr_at_20"])
    assert d["action"] == "kept current champion"
    assert c.get_model_version_by_alias("synthetic-best", "champion").version == \
        summary["registry"][-1]["candidate_version"]
