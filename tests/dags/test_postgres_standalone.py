"""One DAG run through a real scheduler with both metadata stores on a real PostgreSQL.

    .venv/bin/python -m pytest tests/dags/test_postgres_standalone.py -q

Starts (all on 127.0.0.1, free ports, stopped by PID afterwards):

* PostgreSQL (``tests/services.py``) with the databases ``airflow`` and ``mlflow``;
* ``mlflow server`` with its backend store on the ``mlflow`` database (given as
  ``MLFLOW_BACKEND_STORE_URI``, the env form of ``--backend-store-uri``, so the
  password is not on a command line) and proxied artifacts in tmp;
* ``airflow standalone`` with ``AIRFLOW__DATABASE__SQL_ALCHEMY_CONN`` on the
  ``airflow`` database and ``MLFLOW_TRACKING_URI`` pointing at the server.

Then it backfills ONE date (synthetic data, ``pop`` only, no training epochs),
waits for the run by reading ``dag_run`` in Postgres, and checks the MLflow runs,
metrics and registry through the server and in the ``mlflow`` database itself.
While the run goes, it checks that the Airflow REST API refuses requests without
(or with a wrong) token and answers with one from ``POST /auth/token``.
About 3-5 minutes on 2 cores. Skipped with ``RNNREC_SKIP_STANDALONE=1`` (like the
backfill test) or when PostgreSQL is not installed.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from contextlib import ExitStack
from pathlib import Path

import pytest

from tests.services import free_port, pid_alive, postgres_server, stop_process, wait_http

pytestmark = pytest.mark.skipif(os.environ.get("RNNREC_SKIP_STANDALONE") == "1",
                                reason="RNNREC_SKIP_STANDALONE=1 (the airflow standalone tests)")

DAG_ID = "session_rec_pipeline"
DATE = "2014-04-05"  # the interval 2014-04-04 .. 2014-04-05 of the 5 synthetic days from 2014-04-01
CONF = {"dataset": "synthetic", "synthetic_events": 20_000, "synthetic_days": 5, "families": ["pop"],
        "fractions": [], "epochs": 0, "device": "cpu"}
EXPERIMENT = "rnnrec-synthetic"  # evaluation/mlflow_logging.py: rnnrec-<dataset>
MODEL = "synthetic-pop"  # dags/pipeline_steps.py: <dataset>-<family>
BIN = Path(sys.executable).parent


def _http(method: str, url: str, token: str | None = None, body: dict | None = None) -> tuple[int, dict | str]:
    headers = {"Accept": "application/json"}
    data = None
    if body is not None:
        data, headers["Content-Type"] = json.dumps(body).encode(), "application/json"
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            status, raw = r.status, r.read()
    except urllib.error.HTTPError as e:
        status, raw = e.code, e.read()
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode(errors="replace")


def _our_processes(marker: str) -> list[str]:
    """Processes (other than this one) whose environment carries this test's marker."""
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid() or not pid_alive(int(d.name)):
            continue
        try:
            if f"RNNREC_TEST_RUN={marker}".encode() in (d / "environ").read_bytes().split(b"\0"):
                cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ")[:200].decode(errors="replace")
                found.append(f"{d.name}: {cmd}")
        except OSError:  # gone meanwhile, or not ours to read
            pass
    return found


def _check_api_auth(api: str, home: Path, deadline: float) -> None:
    """The REST API: no token / a wrong token -> refused; the admin's token -> 200 and the DAG listed."""
    # Airflow 3.3 (api_fastapi/core_api/security.py): no token -> 401 "Not authenticated", an
    # invalid one -> 403 "Invalid JWT token" (only an expired one gets 401)
    status, body = _http("GET", f"{api}/api/v2/dags")
    assert status == 401, f"GET /api/v2/dags without a token answered {status}: {body}"
    for bad in ("not-a-token", "eyJhbGciOiJIUzUxMiJ9.eyJzdWIiOiIxIn0.c2lnbmF0dXJl"):  # garbage; forged signature
        status, body = _http("GET", f"{api}/api/v2/dags", token=bad)
        assert status in (401, 403) and "dags" not in body, f"GET /api/v2/dags with token {bad!r}: {status} {body}"
    pw_file = home / "simple_auth_manager_passwords.json.generated"
    while not pw_file.exists():
        assert time.time() < deadline, f"{pw_file} was not written"
        time.sleep(1)
    users = json.loads(pw_file.read_text())
    status, tok = _http("POST", f"{api}/auth/token", body={"username": "admin", "password": users["admin"]})
    assert status in (200, 201) and isinstance(tok, dict) and tok.get("access_token"), (status, tok)
    status, _ = _http("POST", f"{api}/auth/token", body={"username": "admin", "password": users["admin"] + "x"})
    assert status in (401, 403), f"POST /auth/token with a wrong password answered {status}"
    status, dags = _http("GET", f"{api}/api/v2/dags", token=tok["access_token"])
    assert status == 200, (status, dags)
    assert DAG_ID in {d["dag_id"] for d in dags["dags"]}, dags


def _dag_runs(pg) -> dict[str, str]:
    try:
        return dict(pg.query("airflow", "SELECT run_id, state FROM dag_run WHERE dag_id = %s", (DAG_ID,)))
    except Exception:  # noqa: BLE001 - table not there yet or a transient error: ask again later
        return {}


def test_one_run_on_postgres_with_mlflow_server_and_api_auth(tmp_path):
    pytest.importorskip("psycopg2", reason="psycopg2 (requirements.txt) is needed to talk to PostgreSQL")
    try:
        import asyncpg  # noqa: F401
    except ImportError:
        pytest.fail("Airflow 3 also opens an async engine on its metadata DB: for PostgreSQL that needs "
                    "the 'asyncpg' package (add it to requirements), or set "
                    "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN_ASYNC to an installed async driver")
    from mlflow.tracking import MlflowClient

    from dags.run_demo import airflow_env, setup_airflow

    marker = uuid.uuid4().hex
    t0 = time.time()
    with ExitStack() as stack:
        pg = stack.enter_context(postgres_server(tmp_path))

        # ---- MLflow server on the `mlflow` database
        mport = free_port()
        mlog_path = tmp_path / "mlflow-server.log"
        mlog = stack.enter_context(open(mlog_path, "w"))
        artifacts = tmp_path / "mlflow-artifacts"
        mlflow_proc = subprocess.Popen(
            [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(mport), "--workers", "1",
             "--artifacts-destination", str(artifacts), "--serve-artifacts"],
            env={**os.environ, "MLFLOW_BACKEND_STORE_URI": pg.mlflow_url, "MLFLOW_DISABLE_TELEMETRY": "true",
                 "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "RNNREC_TEST_RUN": marker},
            stdout=mlog, stderr=subprocess.STDOUT, cwd=tmp_path,
            start_new_session=True)  # its own process group: the uvicorn worker goes with it
        stack.callback(stop_process, mlflow_proc, signal.SIGINT, 30, True)
        mlflow_url = f"http://127.0.0.1:{mport}"

        # ---- Airflow metadata on the `airflow` database (migrated while the MLflow server starts)
        data = tmp_path / "data"
        home = tmp_path / "airflow"
        aport = free_port()
        env = {**os.environ, **airflow_env(data, home)}
        env.update({"AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": pg.airflow_url,
                    "AIRFLOW__API__PORT": str(aport), "AIRFLOW__CORE__PARALLELISM": "2",
                    "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{aport}/execution/",
                    "AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE": "False",  # only the backfill run
                    "AIRFLOW__SCHEDULER__MIN_FILE_PROCESS_INTERVAL": "5",
                    "MLFLOW_TRACKING_URI": mlflow_url, "RNNREC_TEST_RUN": marker})
        env.pop("MLFLOW_REGISTRY_URI", None)
        setup_airflow(env)
        assert not (home / "airflow.db").exists(), "Airflow created a SQLite metadata DB"
        wait_http(f"{mlflow_url}/health", timeout=240, alive=lambda: mlflow_proc.poll() is None,
                  what="mlflow server", log=mlog_path)

        # ---- airflow standalone: SIGINT at its default action, stopped with SIGINT to its PID
        af = str(BIN / "airflow")
        alog_path = tmp_path / "standalone.log"
        alog = stack.enter_context(open(alog_path, "w"))
        standalone = subprocess.Popen([af, "standalone"], env=env, stdout=alog, stderr=subprocess.STDOUT,
                                      cwd=tmp_path,
                                      preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        stack.callback(stop_process, standalone, signal.SIGINT, 90)
        api = f"http://127.0.0.1:{aport}"
        wait_http(f"{api}/api/v2/monitor/health", timeout=240, alive=lambda: standalone.poll() is None,
                  what="airflow standalone", log=alog_path)

        deadline = time.time() + 240
        while True:  # the dag-processor must have parsed and serialized the DAG first
            bf = subprocess.run([af, "backfill", "create", "--dag-id", DAG_ID, "--from-date", DATE,
                                 "--to-date", DATE, "--dag-run-conf", json.dumps(CONF)],
                                env=env, capture_output=True, text=True, timeout=120)
            if bf.returncode == 0 or "DagNotFound" not in bf.stderr or time.time() > deadline:
                break
            time.sleep(5)
        assert bf.returncode == 0, bf.stdout[-2000:] + bf.stderr[-3000:]
        # unpause only once the DAG is registered (else "paused on creation" wins, STACK.md)
        while subprocess.run([af, "dags", "unpause", DAG_ID], env=env, capture_output=True,
                             timeout=120).returncode != 0:
            assert time.time() < deadline, "could not unpause the DAG"
            time.sleep(5)

        # while the run goes: the REST API wants a token
        _check_api_auth(api, home, time.time() + 60)

        deadline = time.time() + 600
        runs: dict[str, str] = {}
        while time.time() < deadline:
            runs = _dag_runs(pg)
            if runs and all(st in ("success", "failed") for st in runs.values()):
                break
            assert standalone.poll() is None, f"standalone exited:\n{alog_path.read_text()[-3000:]}"
            time.sleep(5)
        assert len(runs) == 1 and next(iter(runs)).startswith("backfill__"), runs
        assert list(runs.values()) == ["success"], f"{runs}\n{alog_path.read_text()[-3000:]}"
        dag_run_id = next(iter(runs))

        # ---- MLflow, through the server
        client = MlflowClient(tracking_uri=mlflow_url, registry_uri=mlflow_url)
        exp = client.get_experiment_by_name(EXPERIMENT)
        assert exp is not None, [e.name for e in client.search_experiments()]
        parents = client.search_runs([exp.experiment_id], "tags.rnnrec_role = 'parent'")
        assert len(parents) == 1, [p.info for p in parents]
        parent = parents[0]
        assert parent.info.status == "FINISHED", parent.info
        assert parent.data.tags.get("rnnrec_dag_run_id") == dag_run_id, parent.data.tags
        # artifacts went through the server's proxy into its artifacts destination
        assert parent.info.artifact_uri.startswith("mlflow-artifacts:"), parent.info.artifact_uri
        assert any(artifacts.rglob("manifest.json")), f"no artifacts under {artifacts}"
        children = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
        pop = [c for c in children if c.data.tags.get("rnnrec_candidate") == "pop"]
        assert pop, [c.data.tags for c in children]
        for c in pop:
            assert c.info.status == "FINISHED", c.info
            assert "recall_at_20" in c.data.metrics, sorted(c.data.metrics)
        versions = client.search_model_versions(f"name = '{MODEL}'")
        assert versions, [m.name for m in client.search_registered_models()]

        # ---- ... and really stored in PostgreSQL
        ids = {parent.info.run_id, *(c.info.run_id for c in children)}
        stored = dict(pg.query("mlflow", "SELECT run_uuid, status FROM runs WHERE run_uuid = ANY(%s)", (list(ids),)))
        assert set(stored) == ids and set(stored.values()) == {"FINISHED"}, (ids, stored)
        metric = pg.query("mlflow", "SELECT count(*) FROM metrics WHERE key = 'recall_at_20' AND run_uuid = ANY(%s)",
                          ([c.info.run_id for c in pop],))
        assert metric[0][0] >= len(pop), metric
        assert pg.query("mlflow", "SELECT count(*) FROM model_versions WHERE name = %s", (MODEL,))[0][0] >= 1
        assert pg.query("airflow", "SELECT state FROM dag_run WHERE dag_id = %s AND run_id = %s",
                        (DAG_ID, dag_run_id)) == [("success",)]
        print(f"\nPostgres standalone run: {time.time() - t0:.0f} s to success; "
              f"MLflow runs {sorted(ids)}; model {MODEL} v{max(int(v.version) for v in versions)}")
    # every server is stopped (ExitStack, in reverse order: standalone, MLflow, PostgreSQL)
    assert not pid_alive(standalone.pid) and not pid_alive(mlflow_proc.pid) and not pid_alive(pg.pid)
    left = []
    for _ in range(20):  # children that were told to stop may take a moment to go
        left = _our_processes(marker)
        if not left:
            break
        time.sleep(1)
    for line in left:  # ours (they carry our marker): clean up, then fail
        try:
            os.kill(int(line.split(":")[0]), signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert not left, "processes left behind:\n" + "\n".join(left)
    assert (data / "pipeline" / "synthetic").is_dir()
