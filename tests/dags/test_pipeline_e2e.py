"""The whole DAG on a tiny generated clickstream, twice for the same date (``dag.test()``).

    .venv/bin/python -m pytest tests/dags/test_pipeline_e2e.py -q

Each run executes every task for real in a fresh interpreter (Airflow home, SQLite
metadata, MLflow SQLite store all inside pytest's tmp dir): synthetic data ->
Spark preprocessing (time_strict cut at the interval end) -> GX gates -> GRU4Rec
and POP on train_full + fine-tuning on the most recent 1/4 -> evaluation ->
MLflow runs, registry, ``champion``. Then the same date again: outputs and
metrics must be identical and the registry must not grow.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from tests.services import mlflow_sqlite_client

DATE = "2014-04-06"  # interval [2014-04-05, 2014-04-06): data covers 04-01 .. 04-05
INTERVAL = "20140405T000000Z_20140406T000000Z"
CONF = {"dataset": "synthetic", "synthetic_events": 20_000, "synthetic_days": 5, "synthetic_start": "2014-04-01",
        "families": ["gru4rec", "pop", "toygru", "vsknn", "tan_distill", "tan_emb", "tan", "tan_teacher", "hrnn_init"],
        "epochs": 1, "fractions": [4], "device": "cpu",
        "overrides": {"gru4rec": {"layers": [32], "n_sample": 128, "batch_size": 32, "num_threads": 1},
                      "toygru": {"hidden": 8, "num_threads": 1},
                      **{f: {"embedding": 8, "hidden": 8, "batch_size": 128, "num_threads": 1}
                         for f in ("tan", "tan_teacher", "tan_distill")},
                      "tan_emb": {"embedding": 8, "hidden": 8, "emb_hidden": 8, "batch_size": 128, "num_threads": 1},
                      "hrnn_init": {"hidden": 8, "user_hidden": 8, "batch_size": 16, "num_threads": 1}}}
# toygru: the one-layer GRU defined and registered in tests/training/test_toy_family.py alone,
# found by every Airflow task process through $RNNREC_PLUGINS (a family added without
# touching the registry runs in the DAG's mapped train / evaluate tasks); vsknn: a session-kNN
# baseline (issue 14) in the same tasks, its "fine-tuned" candidate refit on train_recent_4;
# Tan et al.'s M1 (tan), M3 (tan_teacher -> tan_distill) and M4 (tan -> tan_emb): the students
# are trained by train_dependent from this run's teacher / M1 (issue 16); hrnn_init (issue 15),
# scored in user mode (eval_mode=auto)
PLUGIN = "tests.training.test_toy_family"
CANDIDATES = sorted(f + s for f in CONF["families"] for s in ("", "-recent4"))


def _snapshot(data: Path) -> dict:
    from evaluation.mlflow_logging import checkpoint_digest

    c = mlflow_sqlite_client(data)
    root = data / "pipeline" / "synthetic" / INTERVAL
    return {
        "comparison": json.loads((root / "comparison" / "comparison.json").read_text())["candidates"],
        "digests": {p.parent.name: checkpoint_digest(p) for p in sorted((root / "models").glob("*/model.pt"))},
        "versions": {m.name: sorted(v.version for v in c.search_model_versions(f"name = '{m.name}'"))
                     for m in c.search_registered_models()},
        "test_metrics": {p.parent.parent.name: json.loads(p.read_text())["mrr_at_20"]
                         for p in sorted((root / "eval").glob("*/test/metrics.json"))},
        # Spark part files carry a random job id in their names: compare names without it
        "files": sorted(re.sub(r"part-(\d+)-[0-9a-f-]{36}", r"part-\1", str(p.relative_to(root)))
                        for p in root.rglob("*") if p.is_file() and "quality" not in p.parts),
        "splits": json.loads((root / "processed" / "manifest.json").read_text())["splits"],
    }


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    from dags.run_demo import run

    data = tmp_path_factory.mktemp("pipeline")
    # tiny data: a few shuffle partitions, as `make demo` does (the DAG runs inherit the environment)
    old = os.environ.get("RNNREC_SPARK_CONF")
    os.environ["RNNREC_SPARK_CONF"] = "spark.sql.shuffle.partitions=2"
    old_plugins = os.environ.get("RNNREC_PLUGINS")
    os.environ["RNNREC_PLUGINS"] = PLUGIN
    try:
        first = run(CONF, DATE, data, runner="python")
        snap1 = _snapshot(data)
        second = run(CONF, DATE, data, runner="python")
        snap2 = _snapshot(data)
    finally:
        if old is None:
            os.environ.pop("RNNREC_SPARK_CONF", None)
        else:
            os.environ["RNNREC_SPARK_CONF"] = old
        if old_plugins is None:
            os.environ.pop("RNNREC_PLUGINS", None)
        else:
            os.environ["RNNREC_PLUGINS"] = old_plugins
    return {"data": data, "first": first, "second": second, "snap1": snap1, "snap2": snap2}


def test_mlflow_parent_and_child_runs_with_metrics_and_artifacts(pipeline):
    data = pipeline["data"]
    c = mlflow_sqlite_client(data)
    exp = c.get_experiment_by_name("rnnrec-synthetic")
    assert exp is not None
    parents = c.search_runs([exp.experiment_id], "tags.rnnrec_role = 'parent'")
    assert len(parents) == 1, "a re-run of the interval must replace (soft-delete) the earlier parent run"
    p = parents[0]
    assert p.info.status == "FINISHED"
    assert p.data.tags["rnnrec_dag_id"] == "session_rec_pipeline"
    assert p.data.tags["rnnrec_interval"] == "2014-04-05T00:00:00+00:00/2014-04-06T00:00:00+00:00"
    assert p.data.tags["rnnrec_dag_run_id"] and p.data.tags["rnnrec_git_commit"]
    assert p.data.params["pipeline.families"] == json.dumps(CONF["families"])
    assert p.inputs.dataset_inputs and p.inputs.dataset_inputs[0].dataset.digest == \
        p.data.tags["rnnrec_manifest_sha256"][:32]
    parent_files = {f.path for f in c.list_artifacts(p.info.run_id, "comparison")}
    assert {"comparison/comparison.png", "comparison/comparison.csv", "comparison/comparison.json"} <= parent_files
    assert any(f.path == "data_docs/index.html" for f in c.list_artifacts(p.info.run_id, "data_docs"))
    assert p.data.metrics["best_valid_mrr_at_20"] > 0

    kids = c.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{p.info.run_id}'")
    by = {r.data.tags["rnnrec_candidate"]: r for r in kids}
    assert sorted(by) == CANDIDATES
    # the plugin family ran in the DAG's mapped tasks, on the autograd trainer
    assert by["toygru"].data.tags["rnnrec_train_path"] == "torch" and by["toygru"].data.params["hidden"] == "8"
    assert by["gru4rec"].data.tags["rnnrec_train_path"] == "chunk"
    g = by["gru4rec"]
    assert g.data.params["layers"] == "[32]" and g.data.params["n_epochs"] == "1"
    assert by["gru4rec-recent4"].data.params["train_table"] == "train_recent_4"
    assert by["gru4rec-recent4"].data.tags["rnnrec_fraction"] == "4"
    # a baseline's "fine-tuned" candidate: refit (counted again) on the recent table, nothing trained
    assert by["vsknn-recent4"].data.params["train_table"] == "train_recent_4"
    assert by["vsknn"].data.tags["rnnrec_train_path"] == "none"
    for r in kids:
        m = r.data.metrics
        for k in ("recall_at_20", "mrr_at_20", "precision_at_20", "valid_mrr_at_20", "recall_at_5"):
            assert 0.0 <= m[k] <= 1.0, (r.data.tags["rnnrec_candidate"], k)
        assert m["precision_at_20"] == pytest.approx(m["recall_at_20"] / 20)
        assert m["mrr_at_20"] <= m["recall_at_20"]
    hist = c.get_metric_history(g.info.run_id, "train_loss")
    assert len(hist) == 1 and hist[0].step == 1 and hist[0].value > 0
    assert c.get_metric_history(g.info.run_id, "train_events_per_s")[0].value > 0
    # the trained GRU beats popularity on this sequential data (sanity of the whole chain)
    assert g.data.metrics["recall_at_20"] > by["pop"].data.metrics["recall_at_20"]
    arts = {f.path for d in ("plots", "evaluation/test", "config") for f in c.list_artifacts(g.info.run_id, d)}
    assert {"plots/training_curve.png", "plots/breakdown_test.png", "plots/breakdown_valid.png",
            "evaluation/test/metrics.json", "evaluation/test/breakdown_length.csv",
            "evaluation/test/breakdown_position.csv", "config/config.json"} <= arts
    # DAG-side metrics == MLflow metrics == evaluation output on disk
    row = {r["candidate"]: r for r in pipeline["second"]["candidates"]}["gru4rec"]
    assert row["mrr_at_20"] == pytest.approx(g.data.metrics["mrr_at_20"])


def test_students_learn_from_this_runs_teacher_and_m1_with_lineage(pipeline):
    """tan_distill and tan_emb were trained after, and from, the tan_teacher / tan runs of the same
    DAG run: the final model from the source's final model, the selection copy from the source's
    selection copy (which never saw valid); the child runs record which run and weights."""
    from training import checkpoint as ck

    data = pipeline["data"]
    root = data / "pipeline" / "synthetic" / INTERVAL
    c = mlflow_sqlite_client(data)
    exp = c.get_experiment_by_name("rnnrec-synthetic")
    (p,) = c.search_runs([exp.experiment_id], "tags.rnnrec_role = 'parent'")
    by = {r.data.tags["rnnrec_candidate"]: r
          for r in c.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{p.info.run_id}'")}
    for student, key, src, dkey in (("tan_distill", "teacher_run", "tan_teacher", "teacher_digest"),
                                    ("tan_emb", "item_embeddings_from", "tan", "item_embeddings_digest")):
        for cand in (student, f"{student}-recent4"):
            for where in ("models", "select"):
                conf = json.loads((root / where / cand / "config.json").read_text())
                assert conf[key] == str(root / where / src), (cand, where)
                assert conf[dkey] == ck.weights_digest(ck.load_checkpoint(root / where / src)), (cand, where)
            t = by[cand].data.tags
            assert t[f"rnnrec_source.{key}.candidate"] == src
            assert t[f"rnnrec_source.{key}.run_id"] == by[src].info.run_id
            assert t[f"rnnrec_source.{key}.digest"] == by[src].data.tags["rnnrec_ckpt_digest"]
    # M4's item table is M1's, fixed
    m1, m4 = (ck.load_checkpoint(root / "models" / f)["state_dict"] for f in ("tan", "tan_emb"))
    import torch

    assert torch.equal(m1["W_I"], m4["E"])
    # every one of them is served by the pyfunc from the registry
    import mlflow
    import pandas as pd

    import pyarrow.parquet as pq

    known = pq.read_table(root / "processed" / "splits" / "time_strict" / "item_index").column("item_id").to_pylist()
    for fam in ("tan", "tan_distill", "tan_emb"):
        out = mlflow.pyfunc.load_model(f"models:/synthetic-{fam}@champion").predict(
            pd.DataFrame({"session": [known[:2]]}), params={"k": 5})
        assert len(out["items"][0]) == 5 and set(out["items"][0]) <= set(known)


def test_user_models_are_scored_in_user_mode(pipeline):
    root = pipeline["data"] / "pipeline" / "synthetic" / INTERVAL
    for cand, mode in (("hrnn_init", "user"), ("hrnn_init-recent4", "user"), ("gru4rec", "session")):
        res = json.loads((root / "eval" / cand / "result.json").read_text())
        assert (res["valid_mode"], res["test_mode"]) == (mode, mode), cand
        m = json.loads((root / "eval" / cand / "test" / "metrics.json").read_text())
        assert m["mode"] == mode and (mode == "session" or m["n_history_sessions"] > 0)


def test_registry_versions_champion_and_pyfunc_serving(pipeline):
    import mlflow
    import numpy as np
    import pandas as pd

    data = pipeline["data"]
    c = mlflow_sqlite_client(data)
    names = {m.name for m in c.search_registered_models()}
    assert {"synthetic-gru4rec", "synthetic-pop", "synthetic-best"} <= names
    rows = {r["candidate"]: r for r in pipeline["snap1"]["comparison"]}
    best = max(rows.values(), key=lambda r: r["valid_mrr_at_20"])
    champ = c.get_model_version_by_alias("synthetic-best", "champion")
    assert champ.tags["rnnrec_ckpt_digest"] == best["digest"]
    fam_champ = c.get_model_version_by_alias("synthetic-gru4rec", "champion")
    gru_best = max((r for r in rows.values() if r["family"] == "gru4rec"), key=lambda r: r["valid_mrr_at_20"])
    assert fam_champ.tags["rnnrec_ckpt_digest"] == gru_best["digest"]
    assert len(c.search_model_versions("name = 'synthetic-gru4rec'")) == 2  # train_full + recent4
    # the honest rule: the choice was made by selection copies (trained on train) scored on valid;
    # the registered final models say which tables trained, selected and reported them
    for r in rows.values():
        assert r["train_table"] in ("train_full", "train_recent_4") and r["selection"].startswith("valid")
    t = champ.tags
    assert t["rnnrec_train_table"] in ("train_full", "train_recent_4") and t["rnnrec_report_table"] == "test"
    assert int(t["rnnrec_selection_train_end_us"]) < int(t["rnnrec_final_train_end_us"])
    from dags.pipeline_steps import format_table

    text = format_table(pipeline["first"])
    assert "selection: each candidate's selection copy (trained on 'train'" in text and "scored on 'valid'" in text
    assert "report:    the final models" in text and "scored on 'test'" in text

    model = mlflow.pyfunc.load_model("models:/synthetic-gru4rec@champion")
    import pyarrow.parquet as pq

    root = data / "pipeline" / "synthetic" / INTERVAL
    test = pq.read_table(root / "processed" / "splits" / "time_strict" / "test").to_pandas()
    sess = test.sort_values(["session_id", "seq"]).groupby("session_id")["item_id"].apply(list).head(3)
    k = 7
    out = model.predict(pd.DataFrame({"session": [s[:2] for s in sess], "user_id": [-1] * len(sess)}),
                        params={"k": k})
    assert len(out) == 3
    known = set(pq.read_table(root / "processed" / "splits" / "time_strict" / "item_index")
                .column("item_id").to_pylist())
    for items, scores in zip(out["items"], out["scores"]):
        assert len(items) == k and len(set(items)) == k and set(items) <= known
        assert all(np.diff(scores) <= 1e-6)  # best first
    # different sessions get different recommendations (the GRU looks at the session)
    assert len({tuple(x) for x in out["items"]}) > 1
    empty = model.predict(pd.DataFrame({"session": [[]]}), params={"k": 3})
    assert len(empty["items"][0]) == 3  # cold start: most popular training items


def test_rerun_of_same_date_gives_same_outputs_and_no_duplicate_versions(pipeline):
    s1, s2 = pipeline["snap1"], pipeline["snap2"]
    assert s1["digests"] == s2["digests"], "training is not deterministic: re-runs would register new versions"
    assert s1["versions"] == s2["versions"]
    assert s1["test_metrics"] == s2["test_metrics"]
    assert s1["files"] == s2["files"]
    assert s1["splits"] == s2["splits"]
    assert sorted(s1["digests"]) == CANDIDATES
    assert all(not r["registered_new"] for r in s2["comparison"])
    acts = {d["model"]: d["action"] for d in pipeline["second"]["registry"]}
    assert set(acts.values()) == {"unchanged (already champion)"}
