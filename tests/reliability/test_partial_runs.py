"""Partial runs (Param ``stages``) and the empty interval, each a real ``dag.test()`` run
(docs/reliability.md, "Partial runs" and "Scheduled runs").

    .venv/bin/python -m pytest tests/reliability/test_partial_runs.py -q     (about 4 minutes)

One Airflow home, SQLite metadata and MLflow store in pytest's tmp dir; 20k generated events over
6 days (2014-04-01 .. 04-06), families [gru4rec (tiny), pop], no fine-tuning:

1. ``stages=all`` on the interval ending 2014-04-06: the reference run.
2. ``stages=evaluate`` on the same interval: no Spark, no training; the models on disk are scored
   again (same metrics), under a new parent run.
3. ``stages=train`` on the same interval with families [pop]: no Spark; pop trained again.
4. ``stages=evaluate_registered`` on the NEXT interval (ending 04-07): the interval is processed,
   nothing is trained or registered, each family's champion (from run 1, trained through 04-04)
   is scored on 04-06.
5. ``stages=all`` on an interval after the data (ending 04-10): its test period is empty, so the
   run ends as a skip (DAG run ``success``, every task after ``interval_has_data`` skipped).
"""
from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path

import pytest

from tests.services import mlflow_sqlite_client

BASE = {"dataset": "synthetic", "synthetic_events": 20_000, "synthetic_days": 6, "synthetic_start": "2014-04-01",
        "families": ["gru4rec", "pop"], "epochs": 1, "fractions": [], "device": "cpu",
        "overrides": {"gru4rec": {"layers": [16], "n_sample": 64, "batch_size": 32, "num_threads": 1}}}
I6 = "20140405T000000Z_20140406T000000Z"
I7 = "20140406T000000Z_20140407T000000Z"
I10 = "20140409T000000Z_20140410T000000Z"


def _dag_test(conf: dict, date: str, data: Path) -> tuple[str, dict]:
    """One ``dag.test()`` run; returns the DAG run's state and {task_id: [states]} of that run."""
    from dags.run_demo import run

    try:
        run(conf, date, data, runner="python")
    except SystemExit as e:
        if "no comparison.json" not in str(e):  # a skipped run writes none: judged by the states below
            raise
    db = sqlite3.connect(data / "airflow" / "airflow.db")
    try:
        (run_id, state), = db.execute("SELECT run_id, state FROM dag_run ORDER BY id DESC LIMIT 1").fetchall()
        tis: dict[str, list] = {}
        for t, s in db.execute("SELECT task_id, state FROM task_instance WHERE run_id = ?", (run_id,)):
            tis.setdefault(t, []).append(s)
    finally:
        db.close()
    return state, tis


def _mtimes(d: Path) -> dict[str, float]:
    return {str(p.relative_to(d)): p.stat().st_mtime_ns for p in sorted(d.rglob("*")) if p.is_file()}


def _metrics(root: Path) -> dict:
    return {p.parent.parent.name: json.loads(p.read_text())["mrr_at_20"] for p in sorted((root / "eval").glob("*/test/metrics.json"))}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    data = tmp_path_factory.mktemp("partial")
    old = os.environ.get("RNNREC_SPARK_CONF")
    os.environ["RNNREC_SPARK_CONF"] = "spark.sql.shuffle.partitions=2"
    out = {"data": data}
    root6 = data / "pipeline" / "synthetic" / I6
    try:
        out["all"] = _dag_test(BASE, "2014-04-06", data)
        out["processed_before"] = _mtimes(root6 / "processed")
        out["models_before"] = _mtimes(root6 / "models")
        out["metrics_all"] = _metrics(root6)
        out["comparison_all"] = json.loads((root6 / "comparison" / "comparison.json").read_text())
        out["evaluate"] = _dag_test({**BASE, "stages": "evaluate"}, "2014-04-06", data)
        out["models_after_evaluate"] = _mtimes(root6 / "models")
        out["metrics_evaluate"] = _metrics(root6)
        out["comparison_evaluate"] = json.loads((root6 / "comparison" / "comparison.json").read_text())
        out["train"] = _dag_test({**BASE, "families": ["pop"], "overrides": {}, "stages": "train"}, "2014-04-06", data)
        out["processed_after"] = _mtimes(root6 / "processed")
        out["models_after_train"] = _mtimes(root6 / "models")
        out["registered"] = _dag_test({**BASE, "stages": "evaluate_registered"}, "2014-04-07", data)
        out["empty"] = _dag_test(BASE, "2014-04-10", data)
    finally:
        if old is None:
            os.environ.pop("RNNREC_SPARK_CONF", None)
        else:
            os.environ["RNNREC_SPARK_CONF"] = old
    return out


def test_evaluate_only_scores_the_trained_models_again_without_spark_or_training(runs):
    state, tis = runs["evaluate"]
    assert state == "success", tis
    assert runs["models_after_evaluate"] == runs["models_before"]  # not one file of a model rewritten
    assert runs["metrics_evaluate"] == runs["metrics_all"] and sorted(runs["metrics_all"]) == ["gru4rec", "pop"]
    # a new parent run, new child runs; the same checkpoints, so no new registry version
    a, e = runs["comparison_all"]["candidates"], runs["comparison_evaluate"]["candidates"]
    assert {r["candidate"]: r["digest"] for r in a} == {r["candidate"]: r["digest"] for r in e}
    assert {r["child_run_id"] for r in a}.isdisjoint({r["child_run_id"] for r in e})
    assert all(not r["registered_new"] for r in e)


def test_train_only_reuses_the_processed_data(runs):
    state, tis = runs["train"]
    assert state == "success", tis
    # Spark did not run: every processed file is the one run 1 wrote (gates write only quality/)
    strip = lambda m: {k: v for k, v in m.items() if not k.startswith("quality")}  # noqa: E731
    assert strip(runs["processed_after"]) == strip(runs["processed_before"])
    before, after = runs["models_before"], runs["models_after_train"]
    assert after["pop/model.pt"] != before["pop/model.pt"]  # pop trained again
    assert after["gru4rec/model.pt"] == before["gru4rec/model.pt"]  # not in this run's families


def test_evaluate_registered_scores_each_champion_on_the_new_interval_and_registers_nothing(runs):
    state, tis = runs["registered"]
    assert state == "success", tis
    assert tis["train"] == ["skipped"] and tis["evaluate_registered"] == ["success"]
    data = runs["data"]
    root7 = data / "pipeline" / "synthetic" / I7
    assert not (root7 / "models").exists()
    comp = json.loads((root7 / "comparison" / "comparison.json").read_text())
    assert sorted(r["candidate"] for r in comp["candidates"]) == ["registered-gru4rec", "registered-pop"]
    assert comp["registry"] == [] and comp["failed"] == []
    c = mlflow_sqlite_client(data)
    for fam in ("gru4rec", "pop"):
        res = json.loads((root7 / "eval" / f"registered-{fam}" / "result.json").read_text())
        champ = c.get_model_version_by_alias(f"synthetic-{fam}", "champion")
        assert str(res["registered_version"]) == str(champ.version) and res["saw_test"] is False
        # the champion's own checkpoint was scored: its test metrics are those of a direct evaluation
        from evaluation import mlflow_logging as ml
        from evaluation.evaluate import evaluate

        ckpt = ml.download_checkpoint(f"models:/synthetic-{fam}@champion", data / "dl" / fam)
        m = evaluate(ckpt, str(root7 / "processed" / "splits" / "time_strict"), data / "ev" / fam, table="test",
                     device="cpu")
        assert res["mrr_at_20"] == m["mrr_at_20"] and res["recall_at_20"] == m["recall_at_20"]
        # run 2 registered nothing new (same checkpoints); pop, retrained in run 3, gives the same digest
        assert sorted(int(v.version) for v in c.search_model_versions(f"name = 'synthetic-{fam}'")) == [1]


def test_an_interval_without_test_events_ends_as_a_skip_not_a_failure(runs):
    state, tis = runs["empty"]
    assert state == "success", tis
    assert tis["preprocess"] == ["success"] and tis["interval_has_data"] == ["success"]
    for t in ("quality_gates", "start_tracking", "train", "compare_and_register", "finish_tracking"):
        assert set(tis[t]) == {"skipped"}, (t, tis[t])
    root10 = runs["data"] / "pipeline" / "synthetic" / I10
    man = json.loads((root10 / "processed" / "manifest.json").read_text())
    assert man["splits"]["time_strict"]["tables"]["test"]["events"] == 0
    assert not (root10 / "comparison").exists()
