"""Fault: one family's loss turns NaN inside a real DAG run; the other family must still be trained,
evaluated, compared and registered (docs/reliability.md, "Faults").

    .venv/bin/python -m pytest tests/reliability/test_faults_dag.py -q

One ``dag.test()`` run (``dags.run_demo.run(..., runner="python")``, a fresh interpreter, SQLite
metadata and MLflow store in pytest's tmp dir) of families [gru4rec, pop] on 20k generated
events, where gru4rec gets a real config override that makes its first step's loss NaN
(``learning_rate: 1e38``). The notifier is this module's :class:`FileNotifier`
(``RNNREC_NOTIFIER``), which appends every call to a file.
"""
from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path

import pytest
from airflow.sdk import BaseNotifier

from tests.services import mlflow_sqlite_client

DATE = "2014-04-06"
INTERVAL = "20140405T000000Z_20140406T000000Z"
CONF = {"dataset": "synthetic", "synthetic_events": 20_000, "synthetic_days": 5, "synthetic_start": "2014-04-01",
        "families": ["gru4rec", "pop"], "epochs": 1, "fractions": [4], "device": "cpu",
        "overrides": {"gru4rec": {"layers": [32], "n_sample": 128, "batch_size": 32, "num_threads": 1,
                                  "learning_rate": 1e38}}}  # NaN at the first step: a real override


class FileNotifier(BaseNotifier):
    """Test notifier: appends ``{"message", "task_id", "map_index"}`` as a JSON line to
    ``$RNNREC_NOTIFY_FILE``."""

    def notify(self, context) -> None:
        from dags.session_rec_pipeline import failure_message

        ti = context.get("ti") or context.get("task_instance")
        rec = {"message": failure_message(context), "task_id": getattr(ti, "task_id", None),
               "map_index": getattr(ti, "map_index", None)}
        with open(os.environ["RNNREC_NOTIFY_FILE"], "a") as f:
            f.write(json.dumps(rec) + "\n")


@pytest.fixture(scope="module")
def nan_run(tmp_path_factory):
    from dags.run_demo import run

    data = tmp_path_factory.mktemp("faults-dag")
    notes = data / "notifications.jsonl"
    env = {"RNNREC_SPARK_CONF": "spark.sql.shuffle.partitions=2", "RNNREC_NOTIFY_FILE": str(notes),
           "RNNREC_NOTIFIER": f"{__name__}.FileNotifier"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        with pytest.raises(SystemExit, match="dag.test"):  # the DAG run fails: a candidate failed
            run(CONF, DATE, data, runner="python")
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    db = sqlite3.connect(data / "airflow" / "airflow.db")
    tis = db.execute("select task_id, map_index, state from task_instance").fetchall()
    (dr_state,) = db.execute("select state from dag_run").fetchone()
    db.close()
    notes_list = [json.loads(x) for x in notes.read_text().splitlines()] if notes.exists() else []
    return {"data": data, "root": data / "pipeline" / "synthetic" / INTERVAL, "tis": tis, "dag_run": dr_state,
            "notes": notes_list}


def _states(tis, task_id):
    return sorted(s for t, _, s in tis if t == task_id)


def test_nan_in_one_family_leaves_the_other_trained_evaluated_and_registered(nan_run):
    tis, root = nan_run["tis"], nan_run["root"]
    # gru4rec's train failed (not retried: a NaN is not transient), pop's succeeded
    assert _states(tis, "train") == ["failed", "success"], tis
    fail = json.loads((root / "status" / "failed" / "gru4rec.json").read_text())
    assert fail["step"] == "train" and "NonFiniteLoss" in fail["error"]
    assert "epoch 0 step 1" in fail["error"], fail["error"]  # the epoch and step of the first NaN
    # pop went on: fine-tuned, both evaluated, compared, registered
    assert _states(tis, "train_recent") == ["success"]
    assert _states(tis, "evaluate") == ["success"] and _states(tis, "evaluate_recent") == ["success"]
    assert _states(tis, "compare_and_register") == ["success"]
    comp = json.loads((root / "comparison" / "comparison.json").read_text())
    assert [c["candidate"] for c in comp["candidates"]] == ["pop", "pop-recent4"]
    failed = {f["candidate"]: f for f in comp["failed"]}
    assert sorted(failed) == ["gru4rec", "gru4rec-recent4"]
    assert "epoch 0 step 1" in failed["gru4rec"]["error"] and "base candidate 'gru4rec' failed" in \
        failed["gru4rec-recent4"]["error"]
    assert not (root / "models" / "gru4rec").exists() and (root / "models" / "pop" / "model.pt").is_file()

    c = mlflow_sqlite_client(nan_run["data"])
    assert c.get_model_version_by_alias("synthetic-pop", "champion") is not None
    assert c.get_model_version_by_alias("synthetic-best", "champion").tags["rnnrec_candidate"].startswith("pop")
    assert [m.name for m in c.search_registered_models() if "gru4rec" in m.name] == []
    exp = c.get_experiment_by_name("rnnrec-synthetic")
    (parent,) = c.search_runs([exp.experiment_id], "tags.rnnrec_role = 'parent'")
    # the design: a run that lost a candidate ends FAILED (never left RUNNING), naming it
    assert parent.info.status == "FAILED"
    assert parent.data.tags["rnnrec_failed_candidates"] == "gru4rec,gru4rec-recent4"
    assert "epoch 0 step 1" in parent.data.tags["rnnrec_failures"]
    kids = {r.data.tags["rnnrec_candidate"]: r
            for r in c.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")}
    assert kids["pop"].info.status == "FINISHED" and 0 < kids["pop"].data.metrics["recall_at_20"] <= 1
    assert "gru4rec" not in kids  # training fails before its child run is opened


def test_dag_run_fails_and_the_notifier_names_the_failed_task(nan_run):
    tis = nan_run["tis"]
    assert nan_run["dag_run"] == "failed"
    assert _states(tis, "finish_tracking") == ["failed"]  # fails the run, naming gru4rec
    train_notes = [n for n in nan_run["notes"] if n["task_id"] == "train"]
    assert len(train_notes) == 1, nan_run["notes"]
    assert "task train[" in train_notes[0]["message"] and "epoch 0 step 1" in train_notes[0]["message"]
    fin = [n for n in nan_run["notes"] if n["task_id"] == "finish_tracking"]
    assert fin and "gru4rec" in fin[0]["message"]
