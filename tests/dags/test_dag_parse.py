"""The DAG file imports nothing heavy and parses fast; Params are validated with clear errors.

    .venv/bin/python -m pytest tests/dags/test_dag_parse.py -q
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

PARSE = r"""
import json, sys, time
t0 = time.perf_counter()
from airflow.dag_processing.dagbag import DagBag
bag = DagBag(dag_folder=sys.argv[1])
dag = bag.dags.get("session_rec_pipeline")
heavy = sorted(m for m in ("torch", "pyspark", "mlflow", "great_expectations", "pandas") if m in sys.modules)
print(json.dumps({
    "errors": {k: str(v) for k, v in bag.import_errors.items()},
    "dags": sorted(bag.dags),
    "parse_s": max(s.duration.total_seconds() for s in bag.dagbag_stats),
    "files": [s.file for s in bag.dagbag_stats],
    "heavy": heavy,
    "tasks": sorted(t.task_id for t in dag.tasks) if dag else [],
    "pools": sorted({t.pool for t in dag.tasks}) if dag else [],
    "timetable": type(dag.timetable).__name__ if dag else None,
    "params": sorted(dag.params.keys()) if dag else [],
    "doc": bool(dag and dag.doc_md),
    "train_pool": [t.pool for t in dag.tasks if t.task_id.startswith("train")] if dag else [],
    "upstream": {t.task_id: sorted(t.upstream_task_ids) for t in dag.tasks} if dag else {},
    "train_retries": [t.retries for t in dag.tasks if t.task_id == "train"] if dag else [],
    "trigger_rules": {t.task_id: getattr(t.trigger_rule, "value", t.trigger_rule) for t in dag.tasks} if dag else {},
    "max_active_runs": dag.max_active_runs if dag else None,
    "dagrun_timeout_s": dag.dagrun_timeout.total_seconds() if dag and dag.dagrun_timeout else None,
    "dag_failure_callbacks": [type(c).__name__ for c in (dag.on_failure_callback or [])] if dag else [],
    "task_failure_callbacks": sorted({type(c).__name__ for t in dag.tasks for c in (t.on_failure_callback or [])})
                              if dag else [],
}))
"""


def _env(tmp_path: Path) -> dict:
    return {**os.environ, "AIRFLOW_HOME": str(tmp_path / "airflow"), "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__LOGGING__LOGGING_LEVEL": "ERROR", "PYTHONPATH": str(ROOT)}


def test_dagbag_imports_without_errors_and_parses_fast(tmp_path):
    out = subprocess.run([sys.executable, "-c", PARSE, str(ROOT / "dags")], capture_output=True, text=True,
                         env=_env(tmp_path), cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["errors"] == {}
    assert r["dags"] == ["session_rec_pipeline"]
    # helper modules are in .airflowignore: only the DAG file is parsed
    assert r["files"] == ["session_rec_pipeline.py"]
    assert r["parse_s"] < 2.0, f"DAG file took {r['parse_s']:.2f} s to parse"
    assert r["heavy"] == [], f"DAG file imported heavy modules at parse time: {r['heavy']}"
    assert r["timetable"] == "CronDataIntervalTimetable"
    assert r["doc"]
    assert {"resolve", "ingest", "preprocess", "quality_gates", "start_tracking", "train", "train_recent",
            "evaluate", "evaluate_recent", "compare_and_register"} <= set(r["tasks"])
    assert r["train_pool"] == ["gpu"] * 4
    # the families that need another run (tan_distill, tan_emb) train after `train`, fine-tune and are
    # evaluated like the others, and the comparison waits for them
    up = r["upstream"]
    assert up["plan_dependent"] == ["resolve", "start_tracking", "train"] and up["train_dependent"] == ["plan_dependent", "resolve",
                                                                                     "start_tracking"]
    assert up["plan_finetune_dependent"] == ["resolve", "train_dependent"]
    assert up["evaluate_dependent"] == ["resolve", "train_dependent"]
    assert {"evaluate", "evaluate_recent", "evaluate_dependent", "evaluate_recent_dependent"} <= set(
        up["compare_and_register"])
    assert r["train_retries"] == [2]
    # isolation (docs/reliability.md, "Faults"): what follows the mapped train / evaluate runs when one
    # instance failed; finish_tracking always runs last and ends the parent MLflow run
    tr = r["trigger_rules"]
    for t in ("plan_finetune", "plan_dependent", "evaluate", "evaluate_recent", "evaluate_dependent",
              "compare_and_register", "finish_tracking"):
        assert tr[t] == "all_done", (t, tr[t])
    assert tr["train"] == "all_success" and up["finish_tracking"] == ["compare_and_register", "resolve",
                                                                      "start_tracking"]
    assert r["max_active_runs"] == 1 and r["dagrun_timeout_s"] == 24 * 3600
    assert r["dag_failure_callbacks"] == ["LogNotifier"] and r["task_failure_callbacks"] == ["LogNotifier"]
    assert {"dataset", "input", "families", "epochs", "fractions", "device", "overrides"} <= set(r["params"])


# ---------------------------------------------------------------- Param validation (no scheduler needed)

def _resolve(**params):
    from dags.pipeline_steps import resolve

    return resolve(params, dag_id="d", dag_run_id="r", interval_start="2014-04-07T00:00:00+00:00",
                   interval_end="2014-04-08T00:00:00Z")


def test_resolve_keys_outputs_by_interval_and_builds_per_family_overrides(tmp_path):
    cfg = _resolve(data_dir=str(tmp_path), families=["gru4rec", "pop"], epochs=2, fractions=[4, 16],
                   overrides={"gru4rec": {"layers": [64, 32], "batch_size": 16}})
    assert cfg["root"] == str(tmp_path / "pipeline" / "synthetic" / "20140407T000000Z_20140408T000000Z")
    assert cfg["interval_end"] == "2014-04-08T00:00:00+00:00"
    # typed values all the way (no "key=value" strings): what the training step receives
    assert cfg["overrides"]["gru4rec"] == {"layers": [64, 32], "batch_size": 16, "n_epochs": 2,
                                           "device": "auto", "train_table": "train_full"}
    assert "n_epochs" not in cfg["overrides"]["pop"]  # POP has nothing to train
    from training.config import resolve_config

    c = resolve_config("gru4rec", overrides=cfg["overrides"]["gru4rec"])
    assert c.layers == [64, 32] and c.batch_size == 16 and c.n_epochs == 2


def test_dag_params_and_step_defaults_come_from_one_source():
    """The DAG's Params are built from pipeline_steps.PARAM_SPECS: change a default there and
    both the DAG and resolve() see it."""
    from dags import pipeline_steps as s
    from dags.session_rec_pipeline import _params

    ps = _params()
    assert set(ps) == set(s.PARAM_SPECS) == set(s.DEFAULT_PARAMS)
    for k, p in ps.items():
        assert p.value == s.DEFAULT_PARAMS[k], k
    assert s.DEVICES == ("auto", "cpu", "cuda")


@pytest.mark.parametrize("params, needle", [
    ({"families": ["gru4rec", "nope"]}, "param 'families': unknown ['nope']"),
    ({"families": []}, "param 'families' is empty"),
    ({"fractions": [0]}, "param 'fractions'"),
    ({"device": "tpu"}, "param 'device'"),
    ({"select_metric": "mrr_at_7"}, "param 'select_metric'"),
    ({"dataset": "a b"}, "param 'dataset'"),
    ({"overrides": {"gru4rec": {"no_such_key": 1}}}, "no_such_key"),
    ({"overrides": {"gru4rec": {"batch_size": "many"}}}, "batch_size"),
    ({"overrides": {"gru4rec": {"batch_size": "32"}}}, "expected int, got str"),  # typed: no string round trip
    ({"overrides": {"gru4rec": {"layers": 100}}}, "expected a list of int"),
    ({"overrides": {"hrnn": {"x": 1}}}, "not in 'families'"),
    ({"input": ["/definitely/not/here/*.csv"], "format": "csv"}, "path(s) not found"),
    ({"format": "xml", "input": ["/"]}, "param 'format'"),
    ({"bogus": 1}, "unknown param(s) ['bogus']"),
])
def test_bad_params_fail_with_a_clear_message(params, needle, tmp_path):
    from dags.pipeline_steps import PipelineParamError

    with pytest.raises(PipelineParamError) as e:
        _resolve(data_dir=str(tmp_path), **params)
    assert needle in str(e.value)


def test_clear_errors_turns_domain_errors_into_a_fail_without_retry():
    from airflow.sdk.exceptions import AirflowFailException

    from dags.pipeline_steps import clear_errors
    from training.trainer import NonFiniteLoss

    with pytest.raises(AirflowFailException) as e:
        with clear_errors():
            raise NonFiniteLoss("non-finite loss nan at epoch 0 step 3")
    assert str(e.value) == "NonFiniteLoss: non-finite loss nan at epoch 0 step 3"
    assert e.value.__cause__ is None and e.value.__suppress_context__
    with pytest.raises(KeyError):  # unexpected errors stay as they are (and are retried)
        with clear_errors():
            raise KeyError("x")


def test_every_expected_error_is_matched_by_name_including_subclasses():
    """clear_errors matches by (module, class name) to stay import-free: each name must
    resolve to the real exception class, and a subclass must be matched too."""
    import importlib

    from airflow.sdk.exceptions import AirflowFailException

    from dags.pipeline_steps import EXPECTED_ERRORS, clear_errors

    for mod, name in sorted(EXPECTED_ERRORS):
        cls = getattr(importlib.import_module(mod), name)
        assert issubclass(cls, Exception) and (cls.__module__, cls.__qualname__) == (mod, name)
        sub = type("Sub" + name, (cls,), {})
        err = sub.__new__(sub)  # some take a report object: build it without their __init__
        Exception.__init__(err, "boom")
        with pytest.raises(AirflowFailException, match="Sub" + name):
            with clear_errors():
                raise err


def test_spark_conf_env_is_parsed_and_bad_entries_are_named(monkeypatch):
    from dags import pipeline_steps as s

    monkeypatch.setenv("RNNREC_SPARK_CONF", "spark.sql.shuffle.partitions=4, spark.driver.memory = 2g")
    assert s.spark_conf_from_env() == {"spark.sql.shuffle.partitions": "4", "spark.driver.memory": "2g"}
    monkeypatch.delenv("RNNREC_SPARK_CONF")
    assert s.spark_conf_from_env() == {}
    monkeypatch.setenv("RNNREC_SPARK_CONF", "spark.sql.shuffle.partitions=4,oops")
    with pytest.raises(s.PipelineParamError, match="'oops' is not key=value"):
        s.spark_conf_from_env()


def test_spark_submit_config_carries_every_option_including_several_inputs(tmp_path, monkeypatch):
    """Cluster mode hands the job its options as one YAML file: read back by the job's own CLI
    it must give the in-process configuration (less the in-process Spark settings)."""
    import dataclasses

    from dags import pipeline_steps as s
    from spark_jobs.preprocess import config_from_args

    monkeypatch.delenv("RNNREC_SPARK_CONF", raising=False)
    cfg = {"root": str(tmp_path / "run"), "interval_start": "2014-04-05T00:00:00+00:00",
           "interval_end": "2014-04-06T00:00:00+00:00", "fractions": [4, 16],
           "params": {"test_days": 1.0, "min_item_support": 5, "min_session_length": 2}}
    raw = {"input": [str(tmp_path / "a dir" / "x.csv"), str(tmp_path / "y.csv")], "format": "gru4rec"}
    (tmp_path / "a dir").mkdir()
    (tmp_path / "a dir" / "x.csv").write_bytes(b"x" * (20 << 20))  # 20 MB: past the quick-JIT bound
    (tmp_path / "y.csv").write_bytes(b"y" * 10)
    out = s.write_submit_config(cfg, raw)
    got = config_from_args(["--config", out["config"]])
    want = dataclasses.replace(s.preprocess_config(cfg, raw), spark_conf={})
    assert got == want and got.input == raw["input"] and got.recent_fractions == [4, 16]
    # the driver's JVM settings travel to the spark-submit command line (the builder can't set them)
    assert out["conf"]["spark.driver.memory"] == os.environ.get("RNNREC_SPARK_DRIVER_MEMORY", "4g")
    assert "TieredStopAtLevel" not in out["conf"]["spark.driver.extraJavaOptions"]
    assert out["conf"]["spark.executor.extraJavaOptions"] == out["conf"]["spark.driver.extraJavaOptions"]
    (tmp_path / "a dir" / "x.csv").write_bytes(b"x")  # a small input: quick JIT only
    assert "-XX:TieredStopAtLevel=1" in s.write_submit_config(cfg, raw)["conf"]["spark.driver.extraJavaOptions"]


def test_spark_submit_operator_gets_the_driver_settings_on_its_command_line():
    """With a Spark connection the DAG submits the job with the config file and the driver's JVM
    settings rendered (in a sandboxed Jinja environment, as Airflow renders) from the config task's
    output. (The Spark provider is in the Airflow image, not in the lock: its pyspark-client
    dependency would replace the locked pyspark, so the operator itself is not built here.)"""
    import jinja2.sandbox

    from dags import pipeline_steps as s

    pushed = {"config": "/data/run/spark_submit_preprocess.yaml",
              "conf": {"spark.driver.memory": "6g", "spark.driver.extraJavaOptions": "-XX:+UseParallelGC",
                       "spark.executor.extraJavaOptions": "-XX:+UseParallelGC -XX:TieredStopAtLevel=1"}}

    class TI:
        def xcom_pull(self, task_ids=None, **_):
            assert task_ids == "spark_submit_config"
            return pushed

    kw = s.spark_submit_kwargs("spark_submit_config")
    env = jinja2.sandbox.SandboxedEnvironment()
    render = lambda v: env.from_string(v).render(ti=TI())  # noqa: E731
    assert [render(a) for a in kw["application_args"]] == ["--config", pushed["config"]]
    assert {k: render(v) for k, v in kw["conf"].items()} == pushed["conf"]
    assert kw["application"] == str(ROOT / "spark_jobs" / "preprocess.py") and Path(kw["application"]).exists()
    src = (ROOT / "dags" / "session_rec_pipeline.py").read_text()
    assert "spark_submit_kwargs(\"spark_submit_config\")" in src and "def spark_submit_config(" in src


def test_eval_mode_auto_scores_user_models_in_user_mode(tmp_path):
    """eval_mode=auto: HRNN, the user GRUs and user-sequence RNNs in the loop's user mode (their
    session mode is only a fallback), everything else per session; a set Param wins."""
    from dags.pipeline_steps import eval_mode_of
    from training.config import config_to_dict, resolve_config

    want = {("hrnn_init", ()): "user", ("rnn_concat", ()): "user", ("ugru_attn", ()): "user",
            ("seqrnn", (("sequence", "user"),)): "user", ("seqrnn", (("sequence", "session"),)): "session",
            ("gru4rec", ()): "session", ("itemknn", ()): "session", ("tan", ()): "session"}
    for (fam, over), mode in want.items():
        d = tmp_path / f"{fam}-{len(over)}-{mode}"
        d.mkdir()
        (d / "config.json").write_text(json.dumps(config_to_dict(resolve_config(fam, overrides=dict(over)))))
        assert eval_mode_of({"params": {"eval_mode": "auto"}}, d) == mode, fam
        assert eval_mode_of({"params": {"eval_mode": "session"}}, d) == "session"
    with pytest.raises(Exception, match="eval_mode"):
        _resolve(data_dir=str(tmp_path), eval_mode="users")
