"""Run the whole ``session_rec_pipeline`` DAG once, end to end, without a scheduler.

    python -m dags.run_demo --data-dir data/demo                     # what `make demo` runs (demo size)
    python -m dags.run_demo --data-dir /tmp/x --events 20000 --days 5 --epochs 1 --runner python
    python -m dags.run_demo --data-dir data/demo --standalone         # what `make airflow` runs

It sets up an Airflow home inside the data dir (SQLite metadata, no examples,
DAGs from ``dags/``), creates the ``gpu`` pool, runs one DAG run for the data
interval ending at ``--date`` (default: the last day of the generated data) with
``airflow dags test`` (``--runner cli``) or ``dag.test()`` in this process
(``--runner python``), then prints the comparison table and the command that
opens the MLflow UI. Spark runs in-process (local[*]); MLflow uses
``sqlite:///<data-dir>/mlflow/mlflow.db`` unless ``MLFLOW_TRACKING_URI`` is set.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DAG_ID = "session_rec_pipeline"
DEMO_OVERRIDES = {"gru4rec": {"layers": [64], "batch_size": 64, "n_sample": 512, "num_threads": 1}}


def airflow_env(data_dir: Path, airflow_home: Path | None = None) -> dict[str, str]:
    """Environment for a self-contained Airflow (never ~/airflow)."""
    home = Path(airflow_home or data_dir / "airflow").resolve()
    home.mkdir(parents=True, exist_ok=True)
    env = {
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__PARALLELISM": "4",
        "AIRFLOW__CORE__MAX_ACTIVE_TASKS_PER_DAG": "2",
        "AIRFLOW__CORE__DAGBAG_IMPORT_TIMEOUT": "60",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home / 'airflow.db'}",
        "AIRFLOW__API__HOST": "127.0.0.1",
        "AIRFLOW__LOGGING__LOGGING_LEVEL": os.environ.get("AIRFLOW__LOGGING__LOGGING_LEVEL", "WARNING"),
        "RNNREC_DATA_DIR": str(Path(data_dir).resolve()),
        "SPARK_LOCAL_IP": os.environ.get("SPARK_LOCAL_IP", "127.0.0.1"),
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        # standalone starts `airflow scheduler` etc. by name: the venv's bin must come first
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
    }
    return env


def _airflow(args: list[str], env: dict) -> None:
    exe = Path(sys.executable).with_name("airflow")
    subprocess.run([str(exe), *args], env={**os.environ, **env}, check=True, stdout=subprocess.DEVNULL)


def setup_airflow(env: dict) -> None:
    """Migrate the SQLite metadata DB and create the ``gpu`` pool (idempotent)."""
    _airflow(["db", "migrate"], env)
    _airflow(["pools", "set", "gpu", "1", "one GPU: training tasks run one at a time"], env)


def run(conf: dict, date: str, data_dir: Path, runner: str = "cli") -> dict:
    """One DAG run for the interval ending at ``date``; returns the comparison summary."""
    env = airflow_env(data_dir)
    setup_airflow(env)
    end = dt.datetime.fromisoformat(date).replace(tzinfo=dt.timezone.utc)
    conf = {**conf, "data_dir": str(Path(data_dir).resolve())}
    if runner == "cli":
        exe = Path(sys.executable).with_name("airflow")
        # A daily CronDataIntervalTimetable run "at" 00:00 of `date` covers the previous day.
        proc = subprocess.run([str(exe), "dags", "test", DAG_ID, end.isoformat(), "-c", json.dumps(conf)],
                              env={**os.environ, **env})
        if proc.returncode != 0:
            raise SystemExit(f"airflow dags test failed (exit {proc.returncode}); task logs above")
    else:
        code = (
            "import datetime as dt, json, sys\n"
            "from airflow.dag_processing.dagbag import DagBag\n"
            f"bag = DagBag(dag_folder={str(ROOT / 'dags')!r})\n"
            f"dag = bag.dags[{DAG_ID!r}]\n"
            f"dr = dag.test(logical_date=dt.datetime.fromisoformat({end.isoformat()!r}), run_conf=json.loads(sys.argv[1]))\n"
            "sys.exit(0 if str(dr.state) in ('success', 'DagRunState.SUCCESS') else 3)\n"
        )
        proc = subprocess.run([sys.executable, "-c", code, json.dumps(conf)], env={**os.environ, **env}, cwd=ROOT)
        if proc.returncode != 0:
            raise SystemExit(f"dag.test() failed (exit {proc.returncode}); task logs above")
    return latest_summary(data_dir, conf.get("dataset", "synthetic"))


def latest_summary(data_dir: Path, dataset: str = "synthetic") -> dict:
    runs = sorted((Path(data_dir) / "pipeline" / dataset).glob("*/comparison/comparison.json"),
                  key=lambda p: p.stat().st_mtime)
    if not runs:
        raise SystemExit(f"no comparison.json under {data_dir}/pipeline/{dataset}: did the DAG run finish?")
    d = json.loads(runs[-1].read_text())
    return {"candidates": d["candidates"], "registry": d["registry"], "comparison": str(runs[-1].parent)}


def standalone(data_dir: Path, port: int = 8080) -> None:
    """``airflow standalone`` on 127.0.0.1 with the DAG, the ``gpu`` pool and this project's stores.

    Replaces this process (so Ctrl-C / SIGINT reaches standalone and stops all its children)."""
    env = {**os.environ, **airflow_env(data_dir), "AIRFLOW__API__PORT": str(port),
           "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{port}/execution/",
           "AIRFLOW__CORE__PARALLELISM": os.environ.get("AIRFLOW__CORE__PARALLELISM", "4"),
           "AIRFLOW__LOGGING__LOGGING_LEVEL": "INFO"}
    setup_airflow(env)
    home = env["AIRFLOW_HOME"]
    print(f"Airflow on http://127.0.0.1:{port}  (AIRFLOW_HOME={home})")
    print(f"login: admin / the password that standalone prints below, also in "
          f"{home}/simple_auth_manager_passwords.json.generated")
    print("pool 'gpu' (1 slot) is ready; the DAG starts paused: airflow dags unpause session_rec_pipeline")
    print("stop with Ctrl-C (SIGINT)", flush=True)
    exe = str(Path(sys.executable).with_name("airflow"))
    os.execve(exe, [exe, "standalone"], env)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dags.run_demo", description=__doc__.split("\n\n")[0])
    # Demo-size defaults (also the Makefile's DEMO_*): the whole DAG in a few minutes on 2 CPU cores.
    ap.add_argument("--data-dir", default="data/demo")
    ap.add_argument("--events", type=int, default=80_000, help="synthetic clickstream size")
    ap.add_argument("--days", type=int, default=6)
    ap.add_argument("--start", default="2014-04-01", help="first day of the synthetic data")
    ap.add_argument("--date", help="data interval end (YYYY-MM-DD); default: the day after the last data day")
    ap.add_argument("--families", default="gru4rec,pop")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--fractions", default="4", help="comma list of recent fractions k ('' for none)")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    # One torch thread: on a shared 2-core machine two spin-waiting threads were up to 10x slower
    # (benchmarks/README_gru4rec.md); batch 64 roughly doubles CPU events/s over 32.
    ap.add_argument("--overrides", default=json.dumps(DEMO_OVERRIDES), help="JSON: family -> {config key: value}")
    ap.add_argument("--runner", default="cli", choices=["cli", "python"],
                    help="cli = `airflow dags test`; python = dag.test() in a fresh interpreter")
    ap.add_argument("--standalone", action="store_true",
                    help="instead of one run: start `airflow standalone` on 127.0.0.1 (make airflow)")
    ap.add_argument("--port", type=int, default=8080, help="--standalone: API server port")
    a = ap.parse_args(argv)
    data_dir = Path(a.data_dir).resolve()
    if a.standalone:
        standalone(data_dir, a.port)
    date = a.date or (dt.date.fromisoformat(a.start) + dt.timedelta(days=a.days)).isoformat()
    conf = {"dataset": "synthetic", "synthetic_events": a.events, "synthetic_days": a.days,
            "synthetic_start": a.start, "families": [f for f in a.families.split(",") if f],
            "epochs": a.epochs, "fractions": [int(k) for k in a.fractions.split(",") if k.strip()],
            "device": a.device, "overrides": json.loads(a.overrides)}
    t0 = time.perf_counter()
    print(f"running DAG {DAG_ID} for the interval ending {date} (data in {data_dir})", flush=True)
    summary = run(conf, date, data_dir, a.runner)
    from dags.pipeline_steps import format_table

    print()
    print(format_table(summary))
    print(f"\ncomparison chart: {summary['comparison']}/comparison.png")
    print(f"pipeline finished in {time.perf_counter() - t0:.0f} s")
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        print(f"MLflow runs are on {uri}")
    else:
        print(f"\nopen the MLflow UI (runs side by side, registry, champion) on http://127.0.0.1:5000 :\n"
              f"    {mlflow_ui_command(data_dir)}")
    return 0


def mlflow_ui_command(data_dir: Path) -> str:
    """The one command that opens the MLflow UI over this demo's store (the Makefile's ``mlflow-ui``)."""
    data_dir = Path(data_dir).resolve()
    if data_dir == (ROOT / "data" / "demo").resolve():
        return "make mlflow-ui"
    if data_dir.name == "demo":  # `make demo DATA_DIR=X` writes X/demo
        return f"make mlflow-ui DATA_DIR={data_dir.parent}"
    return (f"{Path(sys.executable).with_name('mlflow')} ui --backend-store-uri sqlite:///{data_dir}/mlflow/mlflow.db "
            "--host 127.0.0.1 --port 5000 --workers 1")


if __name__ == "__main__":
    sys.exit(main())
