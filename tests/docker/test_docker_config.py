"""docker/ validated without a Docker engine: the compose file resolves, and every path, image tag,
command, module and environment variable that it and the Dockerfiles name exists in the repo, in
the locked packages, or in the documented list below.

    .venv/bin/python -m pytest tests/docker -q

`docker-compose config` (docker-compose v1, Debian's package; `.ci/run` installs it) resolves the
file with `docker/.env.example` the way `docker compose` would; everything else is read from the
files themselves and checked against the repo, `requirements.lock`, Airflow's own config
description, Airflow's and MLflow's CLI parsers, and the jars of the locked pyspark.
"""
from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
COMPOSE = DOCKER / "compose.yaml"
ENV_EXAMPLE = DOCKER / ".env.example"
DOCKERFILES = sorted(DOCKER.glob("*.Dockerfile"))

#: pins in the Dockerfiles that are not in requirements.lock, with why (anything else must equal the lock)
NOT_IN_LOCK = {
    "apache-airflow-providers-apache-spark": "installed --no-deps: its pyspark-client would replace the locked pyspark",
    "nvidia-ml-py": "GPU system metrics in MLflow runs, trainer image only (no GPU in the lock's environment)",
}
#: executables that are not the project's console scripts: what provides each
SYSTEM_TOOLS = {"bash": "every image", "curl": "the official Airflow image",
                "python": "every image", "pg_isready": "the postgres image"}
#: variables read by third-party images or programs rather than by this repo, with their documentation
DOCUMENTED_ENV = {
    "POSTGRES_USER": "postgres image", "POSTGRES_DB": "postgres image", "POSTGRES_PASSWORD": "postgres image",
    "SPARK_LOCAL_HOSTNAME": "Spark (conf/spark-env: the hostname the driver advertises)",
    "SPARK_WORKER_DIR": "Spark (standalone worker scratch dir)",
    "SPARK_NO_DAEMONIZE": "Spark (sbin scripts stay in the foreground)",
    "PYTHONPATH": "Python", "PYTHONUNBUFFERED": "Python",
}


def _lock() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, ver = line.split("==", 1)
            pins[_norm(name)] = ver.strip()
    return pins


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())  # safe_load resolves the YAML anchors and merge keys


def _dockerfile_lines(path: Path) -> list[str]:
    """Instructions with continuation lines joined, comments dropped."""
    out, cur = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        cur += " " + line[:-1] if line.endswith("\\") else " " + line
        if not line.endswith("\\"):
            out.append(cur.strip())
            cur = ""
    return out


# ------------------------------------------------------------------------------------- compose

def test_compose_resolves_with_the_example_env_and_refuses_without_credentials(tmp_path):
    dc = shutil.which("docker-compose")
    if dc is None:
        pytest.skip("docker-compose is not installed (.ci/run installs Debian's docker-compose)")
    ok = subprocess.run([dc, "-f", str(COMPOSE), "--env-file", str(ENV_EXAMPLE), "config"],
                        capture_output=True, text=True, timeout=120, cwd=DOCKER)
    assert ok.returncode == 0, ok.stderr[-3000:]
    resolved = yaml.safe_load(ok.stdout)
    assert "change-me" in resolved["services"]["airflow-scheduler"]["environment"]["AIRFLOW__API_AUTH__JWT_SECRET"]
    # no secret has a default: without docker/.env the file does not resolve
    env = {k: v for k, v in os.environ.items() if not k.startswith(("POSTGRES", "AIRFLOW", "MLFLOW"))}
    (tmp_path / "empty.env").write_text("")
    bad = subprocess.run([dc, "-f", str(COMPOSE), "--env-file", str(tmp_path / "empty.env"), "config"], capture_output=True,
                         text=True, timeout=120, cwd=DOCKER, env=env)
    assert bad.returncode != 0 and "set in docker/.env" in bad.stderr


def test_services_start_in_order_on_loopback_with_a_gpu_for_the_trainer():
    svc = _compose()["services"]
    assert {"postgres", "airflow-init", "airflow-api-server", "airflow-scheduler", "airflow-dag-processor",
            "airflow-triggerer", "mlflow", "spark-master", "spark-worker-1", "spark-worker-2", "trainer"} <= set(svc)
    for name, s in svc.items():
        for p in s.get("ports", []):
            assert str(p).startswith("127.0.0.1:"), f"{name} publishes {p} beyond loopback"
        deps = s.get("depends_on", {})
        assert isinstance(deps, dict), f"{name}: depends_on without conditions"
        for dep, cond in deps.items():
            assert dep in svc, f"{name} depends on unknown {dep}"
            assert cond["condition"] in ("service_healthy", "service_completed_successfully"), (name, dep)
            if cond["condition"] == "service_healthy":
                assert "healthcheck" in svc[dep], f"{name} waits for {dep} to be healthy, which has no healthcheck"
        if name not in ("airflow-init", "trainer"):  # one-off jobs; everything long-running reports health
            assert "healthcheck" in s, f"{name} has no healthcheck"
    assert svc["airflow-init"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    for name in ("airflow-api-server", "airflow-dag-processor", "airflow-triggerer"):
        assert svc[name]["depends_on"] == {"airflow-init": {"condition": "service_completed_successfully"}} or \
            "airflow-api-server" in svc[name]["depends_on"]
    assert svc["airflow-scheduler"]["depends_on"]["mlflow"]["condition"] == "service_healthy"
    assert svc["spark-worker-2"]["depends_on"]["spark-master"]["condition"] == "service_healthy"
    (dev,) = svc["trainer"]["deploy"]["resources"]["reservations"]["devices"]
    assert dev["driver"] == "nvidia" and dev["count"] >= 1 and "gpu" in dev["capabilities"]
    assert svc["trainer"]["profiles"] == ["gpu"]


def test_airflow_components_share_one_jwt_secret_and_postgres():
    svc = _compose()["services"]
    af = [n for n in svc if n.startswith("airflow-")]
    assert len(af) == 5
    envs = {n: svc[n]["environment"] for n in af}
    for key in ("AIRFLOW__API_AUTH__JWT_SECRET", "AIRFLOW__API__SECRET_KEY", "AIRFLOW__CORE__FERNET_KEY",
                "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", "AIRFLOW__CORE__EXECUTION_API_SERVER_URL"):
        values = {e[key] for e in envs.values()}
        assert len(values) == 1, f"{key} differs between Airflow components: {values}"
    e = envs["airflow-scheduler"]
    assert e["AIRFLOW__API_AUTH__JWT_SECRET"].startswith("${AIRFLOW_JWT_SECRET")
    assert e["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"].startswith("postgresql+psycopg2://")
    assert e["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"].startswith("http://airflow-api-server:8080/")
    assert e["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert e["SPARK_LOCAL_HOSTNAME"] == "airflow-scheduler" == svc["airflow-scheduler"]["hostname"]
    m = svc["mlflow"]
    # SQLAlchemy 2.1 reads a bare postgresql:// as psycopg 3, which the images do not have
    assert m["environment"]["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql+psycopg2://")
    assert "--app-name" in m["command"] and m["command"][m["command"].index("--app-name") + 1] == "basic-auth"
    assert "mlflow:5000" in m["environment"]["MLFLOW_SERVER_ALLOWED_HOSTS"].split(",")
    # data, logs and artifacts live in volumes shared by the services that need them
    vols = set(_compose()["volumes"])
    assert {"data", "airflow-logs", "mlflow-artifacts", "pgdata"} <= vols
    for n in ("airflow-scheduler", "spark-worker-1", "spark-worker-2", "trainer"):
        assert "data:/data" in svc[n]["volumes"], n


def test_no_credentials_or_loopback_binding_committed():
    text = "\n".join(p.read_text() for p in [COMPOSE, ENV_EXAMPLE, *DOCKERFILES])
    assert "SPARK_LOCAL_IP" not in text, "a cluster's Spark driver must not bind 127.0.0.1"
    for line in ENV_EXAMPLE.read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            k, v = line.split("=", 1)
            if re.search(r"PASSWORD|SECRET|FERNET", k):
                assert v == "change-me", f".env.example sets {k} to a real-looking value"
    assert "docker/.env" in (ROOT / ".dockerignore").read_text().split()
    ign = subprocess.run(["git", "check-ignore", "-q", "docker/.env"], cwd=ROOT)
    assert ign.returncode == 0, "docker/.env is not git-ignored"
    for d in (".git", ".venv", "data/"):
        assert d in (ROOT / ".dockerignore").read_text().split(), f".dockerignore lacks {d}"


def test_every_compose_variable_is_in_env_example():
    example = {ln.split("=", 1)[0] for ln in ENV_EXAMPLE.read_text().splitlines() if "=" in ln and ln[0] != "#"}
    used = set(re.findall(r"\$\{([A-Z0-9_]+)", COMPOSE.read_text()))
    assert used - example == set(), f"used in compose.yaml but not in .env.example: {used - example}"
    assert example - used == set(), f"in .env.example but never used: {example - used}"


# ------------------------------------------------------------------------------------- images

def test_dockerfiles_copy_only_what_exists_and_run_as_non_root():
    assert {p.name for p in DOCKERFILES} == {"airflow.Dockerfile", "trainer.Dockerfile", "mlflow.Dockerfile",
                                             "spark.Dockerfile"}
    for df in DOCKERFILES:
        lines = _dockerfile_lines(df)
        for ln in lines:
            if ln.startswith("COPY"):
                srcs = [a for a in shlex.split(ln)[1:] if not a.startswith("--")][:-1]
                for s in srcs:  # the build context is the repo root (compose: context ..)
                    assert (ROOT / s).exists(), f"{df.name}: COPY {s} does not exist"
                    assert not any(s.startswith(x) for x in (".venv", "data", ".git")), s
        users = [ln.split()[1] for ln in lines if ln.startswith("USER")]
        assert users and users[-1] not in ("root", "0"), f"{df.name} runs as root"
    svc = _compose()["services"]
    for name, s in svc.items():
        b = s.get("build")
        if b:
            assert (DOCKER / b["context"] / b["dockerfile"]).exists(), f"{name}: no {b['dockerfile']}"
        for v in s.get("volumes", []):
            src = v.split(":")[0]
            if src.startswith("."):
                assert (DOCKER / src).exists(), f"{name} mounts {src}, which does not exist"


def test_pinned_versions_equal_the_lock():
    lock = _lock()
    req_python = re.search(r'requires-python = ">=(\d+\.\d+)', (ROOT / "pyproject.toml").read_text()).group(1)
    torch_pin = re.search(r"pip install -q (torch==[\d.]+)", (ROOT / "Makefile").read_text()).group(1)
    for df in DOCKERFILES:
        text = df.read_text()
        froms = re.findall(r"^FROM\s+(\S+)", text, flags=re.M)
        for image in froms:
            assert ":" in image and not image.endswith(":latest"), f"{df.name}: unpinned base {image}"
            if image.startswith("apache/airflow:"):
                af_arg = re.search(r"ARG AIRFLOW_VERSION=([\d.]+)", text).group(1)
                assert af_arg == lock["apache-airflow"], f"Airflow image {af_arg} vs lock {lock['apache-airflow']}"
                assert image.endswith(f"-python{req_python}"), image
            else:
                assert image.startswith(f"python:{req_python}-"), f"{df.name}: {image} is not Python {req_python}"
        for name, ver in re.findall(r"([A-Za-z0-9_.\-]+)==([\w.+]+)", text):
            n = _norm(name)
            if n == "torch":
                assert f"torch=={ver}" == torch_pin, f"{df.name}: torch {ver} vs the Makefile's {torch_pin}"
            elif n in lock:
                assert lock[n] == ver, f"{df.name}: {name}=={ver} but requirements.lock has {lock[n]}"
            else:
                assert n in NOT_IN_LOCK, f"{df.name}: {name}=={ver} is neither in the lock nor documented"
        # packages installed against the lock as constraints must be in it (else they float)
        for m in re.finditer(r"pip install[^\n&]*?-c \S*requirements\.lock((?: [A-Za-z][\w.\-]*)+)", text):
            for name in m.group(1).split():
                assert _norm(name) in lock, f"{df.name}: {name} installed with -c requirements.lock is not in it"
    spark_df = (DOCKER / "spark.Dockerfile").read_text()
    assert "-c /tmp/requirements.lock pyspark" in spark_df  # the cluster's Spark is the locked pyspark


# ------------------------------------------------------------------------------------- commands

def _entrypoint(df: Path) -> list[str]:
    import json

    eps = [json.loads(ln.split(None, 1)[1]) for ln in _dockerfile_lines(df) if ln.startswith("ENTRYPOINT")]
    return eps[-1] if eps else []


def _commands():
    """(where, argv) of every command compose and the Dockerfiles run (a service's command
    follows its image's ENTRYPOINT)."""
    svc = _compose()["services"]
    for name, s in svc.items():
        if isinstance(s.get("command"), list):
            b = s.get("build")
            ep = _entrypoint(DOCKER / b["context"] / b["dockerfile"]) if b else []
            yield name, ep + s["command"]
        hc = s.get("healthcheck", {}).get("test")
        if hc and hc[0] == "CMD":
            yield f"{name} healthcheck", hc[1:]
        elif hc and hc[0] == "CMD-SHELL":
            for part in hc[1].split("&&"):
                yield f"{name} healthcheck", shlex.split(part)
    for df in DOCKERFILES:
        if _entrypoint(df):
            yield f"{df.name} ENTRYPOINT", _entrypoint(df)


def test_every_command_module_and_subcommand_exists():
    from airflow.cli.cli_parser import get_parser

    venv_bin = Path(sys.executable).parent
    seen = set()
    for where, argv in _commands():
        exe = argv[0]
        seen.add(exe)
        assert exe in SYSTEM_TOOLS or (venv_bin / exe).exists(), f"{where}: unknown executable {exe}"
        if exe == "python" and argv[1] == "-m":
            mod = argv[2]
            assert (ROOT / (mod.replace(".", "/") + ".py")).exists(), f"{where}: no module {mod} in the repo"
            if mod == "training.train" and len(argv) > 3:  # the trainer's arguments parse (--list runs, cheap)
                from training.train import main as train_main

                assert train_main(list(argv[3:])) == 0
        if exe == "airflow":
            get_parser().parse_args(argv[1:])  # SystemExit on an unknown subcommand or option
        if exe == "mlflow":
            import mlflow.cli

            mlflow.cli.cli.make_context("mlflow", list(argv[1:]))
        if exe == "spark-class":
            cls = argv[1].replace(".", "/") + ".class"
            jars = Path(__import__("pyspark").__file__).parent / "jars"
            assert any(cls in zipfile.ZipFile(j).namelist() for j in jars.glob("spark-core_*.jar")), \
                f"{where}: {argv[1]} is not in the locked pyspark's spark-core"
        if exe == "bash" and argv[1] == "-c":
            for part in argv[2].split("&&"):
                sub = shlex.split(part)
                assert sub[0] == "airflow"
                get_parser().parse_args(sub[1:])
    assert {"airflow", "mlflow", "spark-class", "python"} <= seen
    trainer = [a for w, a in _commands() if w == "trainer.Dockerfile ENTRYPOINT"]
    assert trainer == [["python", "-m", "training.train"]]


# ------------------------------------------------------------------------------------- environment

def _airflow_options() -> dict[str, set[str]]:
    from airflow.configuration import conf

    conf.load_providers_configuration()
    return {sec: set(body.get("options", {})) for sec, body in conf.configuration_description.items()}


def _repo_reads(var: str) -> bool:
    """Whether the project's code (not its tests) names ``var``."""
    for folder in ("dags", "spark_jobs", "training", "evaluation", "expectations", "docker"):
        for p in (ROOT / folder).rglob("*"):
            if p.is_file() and p.suffix in (".py", ".sh") and var in p.read_text(errors="ignore"):
                return True
    return False


def test_every_environment_variable_is_read_by_something():
    import mlflow.cli
    import mlflow.environment_variables as mev

    af = _airflow_options()
    server_env = {p.envvar for p in mlflow.cli.server.params if getattr(p, "envvar", None)}
    env_keys = []
    for name, s in _compose()["services"].items():
        env_keys += [(name, k) for k in (s.get("environment") or {})]
    for df in DOCKERFILES:
        for ln in _dockerfile_lines(df):
            if ln.startswith("ENV"):
                env_keys += [(df.name, kv.split("=", 1)[0]) for kv in shlex.split(ln)[1:]]
    assert len(env_keys) > 40
    for where, k in env_keys:
        if k.startswith("AIRFLOW__"):
            _, sec, opt = k.split("__", 2)
            assert opt.lower() in af.get(sec.lower(), set()), f"{where}: {k} is no Airflow option"
        elif k.startswith("AIRFLOW_CONN_"):
            assert k[len("AIRFLOW_CONN_"):].lower() in ("spark_cluster",) and _repo_reads("RNNREC_SPARK_CONN_ID")
        elif k in ("AIRFLOW_DB_PASSWORD", "MLFLOW_DB_PASSWORD"):
            assert k in (DOCKER / "postgres" / "init-databases.sh").read_text()
        elif k.startswith("MLFLOW_"):
            assert hasattr(mev, k) or k in server_env or k in ("MLFLOW_TRACKING_URI",), f"{where}: {k} unknown"
        elif k.startswith("RNNREC_"):
            assert _repo_reads(k), f"{where}: {k} is read nowhere in the project"
        else:
            assert k in DOCUMENTED_ENV, f"{where}: {k} is neither read by the project nor documented"
