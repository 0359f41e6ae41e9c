"""Shared pytest fixtures: one SparkSession per test session, the shared data folder."""
from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
os.environ.setdefault("PYSPARK_PYTHON", os.sys.executable)
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("RNNREC_SPARK_LOG_LEVEL", "ERROR")
logging.getLogger("py4j").setLevel(logging.WARNING)

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("SHARED_DATA", ROOT.parent / "shared" / "data"))


#: mlflow.set_tracking_uri / set_registry_uri also write these into os.environ, so a test that calls
#: them would send the MLflow runs of every later test's subprocesses (DAG runs, servers) to its store
_MLFLOW_URI_VARS = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")
_MLFLOW_URIS_AT_START = {k: os.environ.get(k) for k in _MLFLOW_URI_VARS}


@pytest.fixture(autouse=True)
def _mlflow_uris_do_not_leak():
    """After every test, the MLflow URI variables are what they were when the session started."""
    yield
    for k, v in _MLFLOW_URIS_AT_START.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def shared_path(*parts: str) -> Path:
    """Path under ../shared/data, skipping the test with a clear reason when absent."""
    p = SHARED_DATA.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"real data not available: {p} is missing (CI provides ../shared/data)")
    return p


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.exists():
        pytest.skip(f"real data folder {SHARED_DATA} is absent (CI provides it)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def spark():
    """One local SparkSession for the whole test run (JVM start costs ~9 s)."""
    from spark_jobs.session import get_spark, sizing_conf

    # test inputs are small: the job's own sizing for a small input (2 partitions, quick JIT)
    s = get_spark("tests", {**sizing_conf(1 << 20, cores=2), "spark.ui.enabled": "false"})
    yield s
    s.stop()


@pytest.fixture(scope="session")
def rsc15_out(spark, tmp_path_factory):
    """rsc15-100k ``train_full`` + ``test`` through the GRU4Rec time split (1 day, no extra filtering).

    Built once per test run and shared (read-only) by the Spark, expectations
    and training tests: returns ``(OUT, manifest)``; the split is ``OUT/splits/time``.
    Tests that modify it must copy it first.
    """
    from spark_jobs.preprocess import PreprocessConfig, run

    files = [str(shared_path("rsc15-100k", f"yoochoose-clicks-100k_{n}.txt")) for n in ("train_full", "test")]
    out = tmp_path_factory.mktemp("rsc15") / "out"
    manifest = run(PreprocessConfig(input=files, format="gru4rec", split="time", test_days=1, out=str(out)), spark)
    return out, manifest
