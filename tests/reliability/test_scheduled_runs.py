"""Scheduled runs through the real scheduler on a folder that gains a day of data between two runs,
then two overlapping backfills of the same date (docs/reliability.md, "Scheduled runs" and "Faults").

    .venv/bin/python -m pytest tests/reliability/test_scheduled_runs.py -q      (about 6 minutes)

Production-shaped services, all on 127.0.0.1 (free ports, stopped by PID, none left behind): a
throwaway PostgreSQL (``tests/services.py``) holding Airflow's metadata DB and the backend store of
an ``mlflow server`` (served artifacts), and ``airflow standalone`` (scheduler, dag-processor,
triggerer, API server) on that database, its tasks logging to that server. While the runs go, the
REST API is checked to refuse requests without (or with a wrong) token and to answer with one from
``POST /auth/token``; at the end the MLflow runs and registry versions are read through the server
and from the ``mlflow`` database itself. The input is the real rsc15-100k sample, shifted by whole days so that its
last full day is yesterday, written as one file per UTC day into a folder. A dataset config
(``conf/datasets/clicks.yaml`` in a tmp conf dir) points the DAG at that folder, and the Airflow
Variable ``rnnrec_dataset_config`` selects it: no trigger conf, no code edited. The DAG's schedule
starts two days ago with catch-up (``RNNREC_START_DATE`` / ``RNNREC_CATCHUP``), so the scheduler
creates two daily runs:

1. ``[D-2, D-1)``: its input and arrival marker are there; it runs through.
2. ``[D-1, D)``: its marker is not; ``wait_for_input`` is deferred (the triggerer polls). The test
   then adds yesterday's file and the marker, and the run goes on, training on one day more.

Then ``airflow backfill create`` for the second date (reprocess completed) and, while it runs, the
same backfill again: the second is refused; the first re-runs the date with byte-identical Parquet,
one MLflow parent run for the interval and no new registry version ("byte-identical": every
byte before the Parquet footer, and the footer up to the order parquet-mr lists a column's
encodings in, which changes between JVM runs: ``tests/parquet_bytes.py``).

Skip locally with ``RNNREC_SKIP_STANDALONE=1``; skipped when PostgreSQL is not installed (CI
installs it). Standalone is stopped with SIGINT to its PID.
"""
from __future__ import annotations

import datetime as dt
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

from tests.parquet_bytes import parquet_tree_digests
from tests.services import (assert_none_left, free_port, mlflow_server, pid_alive, postgres_server, stop_process,
                            wait_http)

DATA = Path(__file__).resolve().parents[3] / "shared" / "data" / "rsc15-100k"
FILES = ["yoochoose-clicks-100k_train_full.txt", "yoochoose-clicks-100k_test.txt"]
pytestmark = [
    pytest.mark.skipif(os.environ.get("RNNREC_SKIP_STANDALONE") == "1",
                       reason="RNNREC_SKIP_STANDALONE=1 (the airflow standalone tests)"),
    pytest.mark.skipif(not all((DATA / f).is_file() for f in FILES), reason=f"real data absent: {DATA}"),
]
DAG_ID = "session_rec_pipeline"
LAST_FULL_DAY = dt.date(2014, 4, 7)  # rsc15-100k: 2014-04-01 .. 2014-04-08 00:50 UTC


def _write_days(src_rows, shift_s: int, folder: Path, days: set) -> dict:
    """Write the shifted events of ``days`` (UTC dates) as ``clicks-<day>.tsv``; returns events per day."""
    by_day: dict[dt.date, list[str]] = {}
    for sid, item, t in src_rows:
        ts = t + shift_s
        day = dt.datetime.fromtimestamp(ts, dt.timezone.utc).date()
        if day in days:
            by_day.setdefault(day, []).append(f"{sid}\t{item}\t{ts:.3f}\n")
    for day, lines in by_day.items():
        tmp = folder / f".clicks-{day}.tsv.part"
        tmp.write_text("SessionId\tItemId\tTime\n" + "".join(lines))
        tmp.rename(folder / f"clicks-{day}.tsv")  # a day's file appears complete
    return {str(d): len(v) for d, v in by_day.items()}


def _db(pg, sql: str, args=()) -> list[tuple]:
    try:
        return pg.query("airflow", sql, args)
    except Exception:  # noqa: BLE001 - tables not migrated yet or a transient error: ask again later
        return []


def _runs(pg) -> dict[str, tuple]:
    """logical date (YYYY-MM-DD) -> (run_id, state, run_type, backfill_id)."""
    rows = _db(pg, "SELECT logical_date, run_id, state, run_type, backfill_id FROM dag_run WHERE dag_id = %s",
               (DAG_ID,))
    return {str(r[0])[:10]: tuple(r[1:]) for r in rows}


def _ti_state(pg, run_id: str, task_id: str):
    rows = _db(pg, "SELECT state FROM task_instance WHERE dag_id = %s AND run_id = %s AND task_id = %s",
               (DAG_ID, run_id, task_id))
    return rows[0][0] if rows else None


def _http(method: str, url: str, token: str | None = None, body: dict | None = None):
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


def _wait(what: str, cond, timeout: float, proc, log: Path, every: float = 3.0):
    end = time.time() + timeout
    while time.time() < end:
        v = cond()
        if v:
            return v
        assert proc.poll() is None, f"airflow standalone exited while waiting for {what}: {log.read_text()[-3000:]}"
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}; standalone log tail:\n"
                         + log.read_text()[-3000:])


def test_scheduled_runs_on_a_growing_folder_then_overlapping_backfills(tmp_path):
    from dags.pipeline_steps import interval_key
    from dags.run_demo import airflow_env, setup_airflow

    today = dt.datetime.now(dt.timezone.utc).date()
    d1, d2 = today - dt.timedelta(days=2), today - dt.timedelta(days=1)  # the two intervals' starts
    shift_s = ((today - dt.timedelta(days=1)) - LAST_FULL_DAY).days * 86400
    rows = []
    for f in FILES:
        with open(DATA / f) as fh:
            next(fh)
            rows += [(a, b, float(c)) for a, b, c in (ln.rstrip("\n").split("\t") for ln in fh)]
    src_days = {LAST_FULL_DAY - dt.timedelta(days=i) for i in range(1, 7)}  # 04-01 .. 04-06 -> D-7 .. D-2
    raw = tmp_path / "raw" / "clicks"
    raw.mkdir(parents=True)
    shifted = lambda d: d + dt.timedelta(days=(today - dt.timedelta(days=1) - LAST_FULL_DAY).days)  # noqa: E731
    first_days = _write_days(rows, shift_s, raw, {shifted(d) for d in src_days})
    assert sorted(first_days) == [str(today - dt.timedelta(days=i)) for i in range(7, 1, -1)]
    (raw / f"_ARRIVED_{d2}").touch()  # the marker of the interval ending at D-1: its input is complete

    conf_dir = tmp_path / "conf"
    conf_dir.mkdir()
    (conf_dir / "clicks.yaml").write_text(
        "name: clicks\n"
        f"input: [{raw}/clicks-*.tsv]\n"
        "format: gru4rec\n"
        f"arrival: {raw}/_ARRIVED_{{end:%Y-%m-%d}}\n"
        "retention: {keep_intervals: 2, sweep_after_hours: 1}\n"
        "families: [pop]\nfractions: []\nepochs: 0\ndevice: cpu\nmin_item_support: 5\nmin_session_length: 2\n")
    data = tmp_path / "data"
    ds_root = data / "pipeline" / "clicks"
    # what retention must remove: an interval folder older than the 2 kept, and a killed run's leftover
    old_interval = ds_root / "20140101T000000Z_20140102T000000Z"
    (old_interval / "processed").mkdir(parents=True)
    leftover = ds_root / ".processed.tmp-deadbeef"
    leftover.mkdir()
    (leftover / "part-0.parquet").write_bytes(b"half")
    os.utime(leftover / "part-0.parquet", (time.time() - 7200, time.time() - 7200))
    os.utime(leftover, (time.time() - 7200, time.time() - 7200))

    home = tmp_path / "airflow"
    marker = uuid.uuid4().hex
    with ExitStack() as stack:
        pg = stack.enter_context(postgres_server(tmp_path))
        mlflow_url, artifacts, mlflow_proc = mlflow_server(stack, tmp_path, pg.mlflow_url, {"RNNREC_TEST_RUN": marker})
        env = {**os.environ, **airflow_env(data, home)}
        port = free_port()
        env.update({"AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": pg.airflow_url,
                    "AIRFLOW__API__PORT": str(port), "AIRFLOW__CORE__PARALLELISM": "2",
                    "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{port}/execution/",
                    "AIRFLOW__SCHEDULER__MIN_FILE_PROCESS_INTERVAL": "5",
                    "MLFLOW_TRACKING_URI": mlflow_url, "RNNREC_TEST_RUN": marker,
                    "RNNREC_START_DATE": str(d1), "RNNREC_CATCHUP": "true",
                    "RNNREC_DATASET_CONF_DIR": str(conf_dir), "RNNREC_ARRIVAL_POKE_SECONDS": "2",
                    "RNNREC_SPARK_CONF": "spark.sql.shuffle.partitions=2"})
        env.pop("MLFLOW_REGISTRY_URI", None)
        setup_airflow(env)
        assert not (home / "airflow.db").exists(), "Airflow created a SQLite metadata DB"
        af = str(Path(sys.executable).with_name("airflow"))

        def cli(*args, check=True):
            r = subprocess.run([af, *args], env=env, capture_output=True, text=True)
            assert not check or r.returncode == 0, f"airflow {' '.join(args)}: {r.stdout[-2000:]}{r.stderr[-3000:]}"
            return r

        cli("variables", "set", "rnnrec_dataset_config", "clicks")
        log = tmp_path / "standalone.log"
        logf = stack.enter_context(open(log, "w"))
        # SIGINT at its default action (a background shell starts children with it ignored)
        proc = subprocess.Popen([af, "standalone"], env=env, stdout=logf, stderr=subprocess.STDOUT, cwd=tmp_path,
                                start_new_session=True,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        stack.callback(stop_process, proc, signal.SIGINT, 90, True)
        api = f"http://127.0.0.1:{port}"
        wait_http(f"{api}/api/v2/monitor/health", timeout=240, alive=lambda: proc.poll() is None,
                  what="airflow standalone", log=log)
        # unpause once the dag-processor has registered the DAG (an earlier unpause is overwritten
        # by "paused on creation"); the scheduler then creates the catch-up runs
        _wait("the DAG to be registered", lambda: _db(pg, "SELECT 1 FROM dag WHERE dag_id = %s", (DAG_ID,)),
              240, proc, log)
        _wait("the DAG to be unpaused", lambda: cli("dags", "unpause", DAG_ID, check=False).returncode == 0
              and _db(pg, "SELECT is_paused FROM dag WHERE dag_id = %s", (DAG_ID,)) == [(False,)], 120, proc, log)
        _check_api_auth(api, home, time.time() + 60)  # while the runs go: the REST API wants a token
        r1 = _wait(f"the scheduled run of {d1} to finish",
                   lambda: (_runs(pg).get(str(d1)) or (0, None))[1] in ("success", "failed")
                   and _runs(pg)[str(d1)], 600, proc, log)
        assert r1[1] == "success" and r1[2] == "scheduled", r1
        k1 = interval_key(f"{d1}T00:00:00+00:00", f"{d2}T00:00:00+00:00")
        k2 = interval_key(f"{d2}T00:00:00+00:00", f"{today}T00:00:00+00:00")
        # the second run waits, deferred, for its input (the marker of the interval ending today)
        r2 = _wait(f"the run of {d2} to wait for its input",
                   lambda: str(d2) in _runs(pg)
                   and _ti_state(pg, _runs(pg)[str(d2)][0], "wait_for_input") == "deferred"
                   and _runs(pg)[str(d2)], 300, proc, log, every=2)
        time.sleep(6)  # a few trigger polls: still waiting, nothing processed for it
        assert _ti_state(pg, r2[0], "wait_for_input") == "deferred"
        assert _ti_state(pg, r2[0], "ingest") in (None, "none", "scheduled")
        assert not (ds_root / k2 / "processed").exists()
        man1 = json.loads((ds_root / k1 / "processed" / "manifest.json").read_text())

        # the folder gains a day; then its marker says the day is complete
        added = _write_days(rows, shift_s, raw, {d2})
        assert list(added) == [str(d2)] and added[str(d2)] > 1000
        (raw / f"_ARRIVED_{today}").touch()
        r2 = _wait(f"the scheduled run of {d2} to finish",
                   lambda: _runs(pg)[str(d2)][1] in ("success", "failed") and _runs(pg)[str(d2)], 600, proc, log)
        assert r2[1] == "success" and r2[2] == "scheduled", r2
        snap2 = parquet_tree_digests(ds_root / k2 / "processed")

        # two overlapping backfills of the second date: the second is refused while the first runs
        bf = cli("backfill", "create", "--dag-id", DAG_ID, "--from-date", str(d2), "--to-date", str(d2),
                 "--max-active-runs", "1", "--reprocess-behavior", "completed")
        bf2 = cli("backfill", "create", "--dag-id", DAG_ID, "--from-date", str(d2), "--to-date", str(d2),
                  "--max-active-runs", "1", "--reprocess-behavior", "completed", check=False)
        assert bf2.returncode != 0 and "Another backfill is running" in bf2.stdout + bf2.stderr, \
            (bf.stdout[-1000:], bf2.stdout[-2000:], bf2.stderr[-2000:])
        r3 = _wait(f"the backfill of {d2} to finish",
                   lambda: _runs(pg)[str(d2)][3] is not None and _runs(pg)[str(d2)][1] in ("success", "failed")
                   and _runs(pg)[str(d2)], 600, proc, log)
        assert r3[1] == "success" and r3[2] == "backfill", r3
        out = cli("dags", "list-runs", DAG_ID, "-o", "json")
        js = [ln for ln in out.stdout.splitlines() if ln.startswith("[")]
        cli_runs = {r["run_id"]: r["state"] for r in json.loads(js[-1])}
        assert cli_runs == {r1[0]: "success", r2[0]: "success"}, cli_runs  # the backfill re-ran run 2 in place

        # MLflow through the server: one parent run per interval, FINISHED; no version added by the re-run
        from mlflow.tracking import MlflowClient

        c = MlflowClient(tracking_uri=mlflow_url, registry_uri=mlflow_url)
        exp = c.get_experiment_by_name("rnnrec-clicks")
        parents = c.search_runs([exp.experiment_id], "tags.rnnrec_role = 'parent'")
        assert sorted(p.data.tags.get("rnnrec_interval_start") for p in parents) == \
            [f"{d1}T00:00:00+00:00", f"{d2}T00:00:00+00:00"], [p.data.tags for p in parents]
        assert {p.info.status for p in parents} == {"FINISHED"}
        assert all(p.info.artifact_uri.startswith("mlflow-artifacts:") for p in parents)
        assert any(artifacts.rglob("manifest.json")), f"no artifacts under {artifacts}"
        versions = c.search_model_versions("name = 'clicks-pop'")
        assert sorted(int(v.version) for v in versions) == [1, 2]
        # ... and really stored in PostgreSQL (both metadata stores: no SQLite file anywhere)
        ids = [p.info.run_id for p in parents]
        stored = dict(pg.query("mlflow", "SELECT run_uuid, status FROM runs WHERE run_uuid = ANY(%s)", (ids,)))
        assert set(stored) == set(ids) and set(stored.values()) == {"FINISHED"}, stored
        assert pg.query("mlflow", "SELECT count(*) FROM model_versions WHERE name = 'clicks-pop'") == [(2,)]
        assert not (home / "airflow.db").exists() and not (data / "mlflow" / "mlflow.db").exists()
    # every server is stopped (ExitStack, in reverse order: standalone, MLflow, PostgreSQL)
    assert not pid_alive(proc.pid) and not pid_alive(mlflow_proc.pid) and not pid_alive(pg.pid)
    assert_none_left(marker)

    # run 2 trained on one day more than run 1, and tested on the day that arrived
    man2 = json.loads((ds_root / k2 / "processed" / "manifest.json").read_text())
    t1, t2 = man1["splits"]["time_strict"]["tables"], man2["splits"]["time_strict"]["tables"]
    assert t2["train_full"]["events"] > t1["train_full"]["events"] + t1["test"]["events"] * 0.9, (t1, t2)
    assert 0 < t2["test"]["events"] <= added[str(d2)]
    import pyarrow.dataset as pads

    ts = pads.dataset(str(ds_root / k2 / "processed" / "splits" / "time_strict" / "test"),
                      format="parquet").to_table(columns=["ts"]).column("ts").to_pylist()
    assert min(ts).date() == d2 and max(ts).date() == d2
    for k in (k1, k2):
        assert json.loads((ds_root / k / "comparison" / "comparison.json").read_text())["candidates"][0]["family"] == "pop"
    # retention (keep 2 intervals, sweep after 1 h): the old interval and the leftover are gone
    assert not old_interval.exists() and not leftover.exists()
    assert sorted(p.name for p in ds_root.iterdir()) == sorted([k1, k2])
    # the backfill's re-run: byte-identical Parquet (up to parquet-mr's footer encoding order)
    assert parquet_tree_digests(ds_root / k2 / "processed") == snap2
