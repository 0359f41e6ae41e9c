"""Preprocessing with ``spark-submit`` on a real Spark standalone cluster.

A master and two workers (1 core each) are started from the installed pyspark
on 127.0.0.1 only, ``spark_jobs/preprocess.py`` is submitted to them on
rsc15-100k, and its output must equal the local ``rsc15_out`` output table by
table, row for row. The driver must run with the JVM settings of
:func:`spark_jobs.session.submit_args`, and the work must have run in
executors on the workers. Every process is tracked by PID (its own process
group) and killed in ``finally``.

The executors get neither the project code nor a Python: the job uses only
the DataFrame API, so all Python runs in the driver and the executors run JVM
code only. ``spark.pyspark.python`` points the executors at a Python that does
not exist, so a future Python UDF (which would need ``--py-files`` with a zip
of ``spark_jobs/``, see ``RNNREC_SPARK_PY_FILES`` in the DAG) fails this test
instead of passing by accident on a one-machine cluster.
"""
from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.services import free_port

from tests.conftest import ROOT, shared_path

pytestmark = pytest.mark.slow

APP_NAME = "rnnrec-preprocess"
WORKERS = 2
START_TIMEOUT_S = 90  # master up + both workers registered
JOB_TIMEOUT_S = 240
STOP_TIMEOUT_S = 20
#: Manifest fields that differ between two runs of the same job: timings, where it ran, the output path.
VOLATILE = {"timings_s", "jvm_cpu_s", "spark_master", "spark"}


def _spark_home() -> Path:
    import pyspark

    return Path(pyspark.__file__).resolve().parent


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def _stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM the process group of ``proc`` (its own session), SIGKILL what is left, reap ``proc``."""
    for sig, wait_s in ((signal.SIGTERM, STOP_TIMEOUT_S), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            if proc.poll() is not None and not _group_alive(proc.pid):
                break
            time.sleep(0.2)
        else:
            continue
        break
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass


class StandaloneCluster:
    """A Spark standalone master and workers on 127.0.0.1, each a child process in its own group."""

    def __init__(self, root: Path, workers: int = WORKERS):
        self.root = root
        self.home = _spark_home()
        self.port, self.webui_port = free_port(), free_port()
        self.url = f"spark://127.0.0.1:{self.port}"
        self.work_dirs = [root / f"worker{i}" for i in range(workers)]
        self.procs: dict[str, subprocess.Popen] = {}
        (root / "conf").mkdir(parents=True)  # empty: no spark-defaults / spark-env from the machine
        (root / "logs").mkdir()
        self.env = {
            **os.environ,
            "SPARK_HOME": str(self.home),
            "SPARK_CONF_DIR": str(root / "conf"),
            "SPARK_LOG_DIR": str(root / "logs"),
            "SPARK_LOCAL_IP": "127.0.0.1",  # every socket, web UIs included, on loopback
            "SPARK_DAEMON_MEMORY": "256m",
            "SPARK_DAEMON_JAVA_OPTS": "-XX:+UseSerialGC -XX:TieredStopAtLevel=1",
            "SPARK_WORKER_DIR": str(root / "work"),
        }
        self.env.pop("PYSPARK_GATEWAY_PORT", None)
        self.env.pop("PYSPARK_GATEWAY_SECRET", None)

    def _spawn(self, name: str, cls: str, *args: str) -> None:
        log = open(self.root / "logs" / f"{name}.log", "wb")
        try:
            self.procs[name] = subprocess.Popen(
                [str(self.home / "bin" / "spark-class"), cls, *args], env=self.env, cwd=self.root,
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        finally:
            log.close()

    def start(self) -> None:
        self._spawn("master", "org.apache.spark.deploy.master.Master",
                    "--host", "127.0.0.1", "--port", str(self.port), "--webui-port", str(self.webui_port))
        for i, wd in enumerate(self.work_dirs):
            wd.mkdir()
            self._spawn(f"worker{i}", "org.apache.spark.deploy.worker.Worker",
                        "--host", "127.0.0.1", "--port", str(free_port()), "--webui-port", str(free_port()),
                        "--cores", "1", "--memory", "1g", "--work-dir", str(wd), self.url)

    def state(self) -> dict:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.webui_port}/json/", timeout=5) as r:
            return json.load(r)

    def wait_for_workers(self, timeout_s: float = START_TIMEOUT_S) -> dict:
        deadline = time.monotonic() + timeout_s
        last: object = None
        while time.monotonic() < deadline:
            dead = {n: p.returncode for n, p in self.procs.items() if p.poll() is not None}
            if dead:
                raise AssertionError(f"Spark daemon(s) exited: {dead}\n{self.logs()}")
            try:
                st = self.state()
                alive = [w for w in st["workers"] if w["state"] == "ALIVE"]
                if len(alive) == len(self.work_dirs):
                    return st
                last = st["workers"]
            except OSError as e:  # master web UI not up yet
                last = e
            time.sleep(0.5)
        raise AssertionError(f"{len(self.work_dirs)} workers not registered within {timeout_s} s "
                             f"(last: {last})\n{self.logs()}")

    def wait_for_app(self, app_id: str, timeout_s: float = 15) -> dict:
        """The master's completed applications, once ``app_id`` is among them."""
        deadline = time.monotonic() + timeout_s
        while True:
            apps = {a["id"]: a for a in self.state()["completedapps"]}
            if app_id in apps or time.monotonic() > deadline:
                assert app_id in apps, f"{app_id} not among the master's completed applications {list(apps)}"
                return apps
            time.sleep(0.5)

    def logs(self, tail: int = 3000) -> str:
        return "\n".join(f"--- {f.name}\n{f.read_text(errors='replace')[-tail:]}"
                         for f in sorted((self.root / "logs").glob("*.log")))

    def stop(self) -> None:
        for proc in self.procs.values():
            _stop_group(proc)
        left = {n: p.pid for n, p in self.procs.items() if p.poll() is None or _group_alive(p.pid)}
        assert not left, f"Spark daemons (process groups) still alive after stop: {left}"


def _tables(out: Path) -> dict[str, Path]:
    """Every Parquet table (a folder holding .parquet files) under ``out``, by relative path."""
    return {str(d.relative_to(out)): d for d in sorted({f.parent for f in out.rglob("*.parquet")})}


def _sorted_table(path: Path):
    t = pq.read_table(path)
    return t.sort_by([(c, "ascending") for c in t.column_names]) if t.num_rows else t


def assert_same_output(got: Path, want: Path) -> None:
    got_tables, want_tables = _tables(got), _tables(want)
    assert sorted(got_tables) == sorted(want_tables), (
        f"tables only in {got}: {sorted(set(got_tables) - set(want_tables))}, "
        f"only in {want}: {sorted(set(want_tables) - set(got_tables))}")
    assert want_tables, f"no Parquet tables under {want}"
    for name in want_tables:
        a, b = _sorted_table(got_tables[name]), _sorted_table(want_tables[name])
        assert a.schema.equals(b.schema), f"{name}: schema {a.schema} != {b.schema}"
        assert a.num_rows == b.num_rows, f"{name}: {a.num_rows} rows != {b.num_rows}"
        assert a.equals(b), f"{name}: same row count ({a.num_rows}), different rows"
    # the job's own side files; quality/ is the gates' report, which other tests of the session write
    # into the shared local output (the rsc15_out fixture)
    def job_jsons(root: Path) -> list[str]:
        return sorted(str(p.relative_to(root)) for p in root.rglob("*.json")
                      if p.name != "manifest.json" and p.relative_to(root).parts[0] != "quality")

    jsons = job_jsons(want)
    assert jsons == job_jsons(got), "JSON files"
    for rel in jsons:
        assert json.loads((got / rel).read_text()) == json.loads((want / rel).read_text()), rel


def comparable_manifest(m: dict) -> dict:
    m = {k: v for k, v in m.items() if k not in VOLATILE}
    m["parameters"] = {k: v for k, v in m["parameters"].items() if k != "out"}
    # the default upper bound of plausible times is each job's own start time
    m["read"] = {**m["read"], "plausible_ts": {k: v for k, v in m["read"]["plausible_ts"].items() if k != "ts_max"}}
    return m


def test_preprocess_on_a_standalone_cluster_equals_local(request, tmp_path):
    from spark_jobs.preprocess import input_bytes
    from spark_jobs.session import submit_args

    inputs = [str(shared_path("rsc15-100k", f"yoochoose-clicks-100k_{n}.txt")) for n in ("train_full", "test")]
    cluster = StandaloneCluster(tmp_path / "cluster")
    submit: subprocess.Popen | None = None
    t0 = time.monotonic()
    try:
        cluster.start()
        # the local reference run (shared with other tests) while the daemons boot
        local_out = Path(request.getfixturevalue("rsc15_out")[0])
        cluster.wait_for_workers()
        t_up = time.monotonic()

        out = tmp_path / "out"
        launch = submit_args(input_bytes(inputs))
        cmd = [
            str(cluster.home / "bin" / "spark-submit"), "--master", cluster.url,
            *launch,
            "--executor-memory", "768m",
            "--conf", "spark.ui.enabled=false",
            # executors run no Python (see the module docstring): give them none
            "--conf", f"spark.pyspark.driver.python={sys.executable}",
            "--conf", "spark.pyspark.python=/nonexistent/python-on-executors",
            str(ROOT / "spark_jobs" / "preprocess.py"),
            "--input", *inputs, "--format", "gru4rec", "--split", "time", "--test-days", "1", "--out", str(out),
        ]
        env = {**cluster.env, "PYSPARK_PYTHON": sys.executable, "RNNREC_SPARK_LOG_LEVEL": "WARN"}
        env.pop("SPARK_MASTER", None)
        env.pop("PYSPARK_SUBMIT_ARGS", None)
        log_path = tmp_path / "spark-submit.log"
        with open(log_path, "wb") as log:
            submit = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdin=subprocess.DEVNULL, stdout=log,
                                      stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = submit.wait(timeout=JOB_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            rc = None
        submit_log = log_path.read_text(errors="replace")
        assert rc == 0, (f"spark-submit {'timed out' if rc is None else f'exited {rc}'}: {shlex.join(cmd)}\n"
                         f"{submit_log[-6000:]}\n{cluster.logs()}")
        t_job = time.monotonic()

        # ---- it ran on the cluster: a finished application, executors in both workers' dirs
        manifest = json.loads((out / "manifest.json").read_text())
        driver = manifest["spark"]
        assert manifest["spark_master"] == driver["master"] == cluster.url
        apps = cluster.wait_for_app(driver["app_id"])
        assert apps[driver["app_id"]]["name"] == APP_NAME and apps[driver["app_id"]]["state"] == "FINISHED"
        for wd in cluster.work_dirs:
            executors = list((wd / driver["app_id"]).glob("*/stderr"))
            assert executors, f"no executor of {driver['app_id']} ran in {wd}"
            # the worker logs each executor's command line first: submit_args' flags reached the executors
            command = executors[0].read_text(errors="replace").split("\n", 1)[0]
            assert "Executor" in command and "-XX:TieredStopAtLevel=1" in command, command[:500]

        # ---- the driver JVM really ran with submit_args' settings (not just asked for them)
        memory = launch[launch.index("--driver-memory") + 1]
        java_opts = launch[launch.index("--driver-java-options") + 1].split()
        assert driver["launched_by_spark_submit"] is True
        assert f"-Xmx{memory}" in driver["jvm_args"], driver["jvm_args"]
        assert "-XX:TieredStopAtLevel=1" in java_opts  # rsc15-100k is a small input
        for opt in java_opts:
            assert opt in driver["jvm_args"], f"{opt} not in the driver JVM's arguments {driver['jvm_args']}"
        assert "running under spark-submit" not in submit_log

        # ---- the same output as local[*], table by table, row for row
        assert_same_output(out, local_out)
        local_manifest = json.loads((local_out / "manifest.json").read_text())
        assert comparable_manifest(manifest) == comparable_manifest(local_manifest)
        print(f"\ncluster up {t_up - t0:.0f} s (overlapping the local run), spark-submit {t_job - t_up:.0f} s, "
              f"compare {time.monotonic() - t_job:.0f} s\n{shlex.join(cmd)}")
    finally:
        try:
            if submit is not None:
                _stop_group(submit)
                assert not _group_alive(submit.pid), "spark-submit's process group is still alive"
        finally:
            cluster.stop()
