"""Real services for tests: a throwaway PostgreSQL server, free ports, waiting for HTTP.

    from tests.services import postgres_server
    with postgres_server(tmp_path) as pg:
        pg.airflow_url   # postgresql+psycopg2://rnnrec:<pw>@127.0.0.1:<port>/airflow
        pg.mlflow_url    # postgresql+psycopg2://rnnrec:<pw>@127.0.0.1:<port>/mlflow

Both URLs name the psycopg2 driver: SQLAlchemy 2.1 (in the lock) maps a bare
``postgresql://`` to psycopg 3, which is not installed (psycopg2-binary is).

``postgres_server`` runs ``initdb`` + ``postgres`` from the installed PostgreSQL
(``/usr/lib/postgresql/<v>/bin``, ``$PG_BIN`` or ``PATH``) on 127.0.0.1 only, a
free port, a generated superuser password (scram-sha-256 for every connection,
no trust), the unix socket inside its throwaway folder, and stops it by PID.
It skips the calling test only when no PostgreSQL binaries are installed.
PostgreSQL refuses to run as root: as root, the server runs as the ``postgres``
system user (``nobody`` when there is none) in a folder under the system temp
dir owned by that user (pytest's own tmp dir is not readable by other users).
"""
from __future__ import annotations

import glob
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import pytest

DATABASES = ("airflow", "mlflow")
SUPERUSER = "rnnrec"


def mlflow_sqlite_client(data: Path):
    """An ``MlflowClient`` on the DAG's default store under ``data`` (``sqlite:///<data>/mlflow/mlflow.db``),
    with the process-wide tracking and registry URIs pointed at it too (an earlier test in this
    process may have pointed them at a stopped server; tests/conftest.py restores them after)."""
    import mlflow
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{Path(data) / 'mlflow' / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, *, timeout: float = 120, alive: Callable[[], bool] | None = None,
              what: str = "server", log: Path | None = None, ok=(200,)) -> int:
    """Poll ``url`` until it answers with a status in ``ok``; returns the status.

    Fails (AssertionError with the log's tail) when ``alive()`` turns False or after ``timeout`` s."""
    deadline = time.time() + timeout
    last = ""
    while True:
        try:
            with urllib.request.urlopen(url, timeout=3) as r:
                if r.status in ok:
                    return r.status
                last = f"HTTP {r.status}"
        except urllib.error.HTTPError as e:
            if e.code in ok:
                return e.code
            last = f"HTTP {e.code}"
        except OSError as e:
            last = repr(e)
        tail = "" if log is None or not log.exists() else "\n" + log.read_text(errors="replace")[-3000:]
        assert alive is None or alive(), f"{what} exited before answering {url}{tail}"
        assert time.time() < deadline, f"{what} did not answer {url} in {timeout:.0f} s ({last}){tail}"
        time.sleep(1)


def pid_alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


def stop_process(proc: subprocess.Popen, sig: int = signal.SIGINT, timeout: float = 60, group: bool = False) -> None:
    """Stop a process this test started, by PID (``group``: the process group it leads, made by
    ``start_new_session=True``, so its workers go too); SIGKILL after ``timeout`` s."""
    def send(s):
        try:
            os.killpg(proc.pid, s) if group else proc.send_signal(s)
        except ProcessLookupError:
            pass

    if proc.poll() is None:
        send(sig)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            send(signal.SIGKILL)
            proc.wait(timeout=15)
    if group:
        send(signal.SIGKILL)  # workers that outlived their leader


def mlflow_server(stack, tmp_path: Path, backend_uri: str, env_extra: dict | None = None,
                  timeout: float = 240, port: int | None = None, args=(), env_drop=(),
                  artifacts: Path | None = None) -> tuple[str, Path, subprocess.Popen]:
    """``mlflow server`` on 127.0.0.1 (one worker) with its backend store at ``backend_uri``
    (given as ``MLFLOW_BACKEND_STORE_URI``: a password stays off the command line) and served
    artifacts in ``artifacts`` (default ``tmp_path/mlflow-artifacts``); its own process group,
    stopped by ``stack`` (an ExitStack). ``port``: a free one unless given (a restart on the same
    port and store); ``args``: extra server options (``--app-name basic-auth``, ``--allowed-hosts``,
    ...); ``env_drop``: variables removed from its environment (e.g. credentials). The log
    ``tmp_path/mlflow-server.log`` is appended to. Returns (url, artifacts dir, process) once
    /health answers (it is not behind the basic-auth login)."""
    port = port or free_port()
    log_path = tmp_path / "mlflow-server.log"
    log = stack.enter_context(open(log_path, "a"))
    artifacts = artifacts or tmp_path / "mlflow-artifacts"
    env = {k: v for k, v in os.environ.items() if k not in set(env_drop)}
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1", "--artifacts-destination", str(artifacts), "--serve-artifacts", *args],
        env={**env, "MLFLOW_BACKEND_STORE_URI": backend_uri, "MLFLOW_DISABLE_TELEMETRY": "true",
             "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **(env_extra or {})},
        stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path,
        start_new_session=True)  # its own process group: the uvicorn worker goes with it
    stack.callback(stop_process, proc, signal.SIGINT, 30, True)
    url = f"http://127.0.0.1:{port}"
    wait_http(f"{url}/health", timeout=timeout, alive=lambda: proc.poll() is None, what="mlflow server",
              log=log_path)
    return url, artifacts, proc


def processes_marked(marker: str) -> list[str]:
    """Processes (other than this one) whose environment carries ``RNNREC_TEST_RUN=<marker>``."""
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


def assert_none_left(marker: str) -> None:
    """Fail (after killing them) if processes carrying ``marker`` outlived their stop."""
    left = []
    for _ in range(20):  # children that were told to stop may take a moment to go
        left = processes_marked(marker)
        if not left:
            break
        time.sleep(1)
    for line in left:
        try:
            os.kill(int(line.split(":")[0]), signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert not left, "processes left behind:\n" + "\n".join(left)


# --------------------------------------------------------------------------- PostgreSQL

def postgres_bin() -> Path | None:
    """Folder with ``initdb``/``postgres``/``pg_ctl`` (newest installed version), or None."""
    cands = [os.environ.get("PG_BIN", "")]
    cands += sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(p.split("/")[-2]) if
                    p.split("/")[-2].isdigit() else 0, reverse=True)
    cands += sorted(glob.glob("/usr/pgsql-*/bin"), reverse=True)
    which = shutil.which("initdb")
    if which:
        cands.append(str(Path(which).parent))
    for c in cands:
        if c and all((Path(c) / exe).is_file() for exe in ("initdb", "postgres", "pg_ctl")):
            return Path(c)
    return None


@dataclass
class Postgres:
    host: str
    port: int
    user: str
    password: str
    pid: int
    data_dir: Path
    socket_dir: Path
    log: Path

    def url(self, db: str, driver: str = "postgresql") -> str:
        return (f"{driver}://{urllib.parse.quote(self.user, safe='')}:{urllib.parse.quote(self.password, safe='')}"
                f"@{self.host}:{self.port}/{db}")

    @property
    def airflow_url(self) -> str:
        """For ``AIRFLOW__DATABASE__SQL_ALCHEMY_CONN``."""
        return self.url("airflow", "postgresql+psycopg2")

    @property
    def mlflow_url(self) -> str:
        """For ``mlflow server --backend-store-uri`` (a bare ``postgresql://`` would mean psycopg 3
        under SQLAlchemy 2.1)."""
        return self.url("mlflow", "postgresql+psycopg2")

    def connect(self, db: str = "postgres"):
        """A psycopg2 connection (autocommit) over TCP with the password."""
        import psycopg2

        con = psycopg2.connect(host=self.host, port=self.port, user=self.user, password=self.password,
                               dbname=db, connect_timeout=10)
        con.autocommit = True
        return con

    def query(self, db: str, sql: str, args: tuple = ()) -> list[tuple]:
        con = self.connect(db)
        try:
            with con.cursor() as cur:
                cur.execute(sql, args)
                return cur.fetchall()
        finally:
            con.close()


def _run_as() -> pwd.struct_passwd | None:
    """The unprivileged account the server runs as when we are root (None: run as ourselves)."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            pass
    pytest.fail("running as root and neither a 'postgres' nor a 'nobody' account exists to run PostgreSQL")


@contextmanager
def postgres_server(tmp_path: Path | None = None, databases=DATABASES, timeout: float = 60) -> Iterator[Postgres]:
    """A throwaway PostgreSQL on 127.0.0.1 with ``databases`` created; stopped by PID on exit.

    ``tmp_path`` gets the server log (``postgres.log``); the data dir and socket live in a
    temp folder the server's account owns, removed afterwards."""
    bindir = postgres_bin()
    if bindir is None:
        pytest.skip("PostgreSQL is not installed (no initdb/postgres/pg_ctl in /usr/lib/postgresql/*/bin, "
                    "$PG_BIN or PATH); CI installs it")
    acct = _run_as()
    as_user = {} if acct is None else {"user": acct.pw_uid, "group": acct.pw_gid, "extra_groups": []}
    root = Path(tempfile.mkdtemp(prefix="rnnrec-pg-"))  # short: the socket path must fit 107 bytes
    data, sock = root / "data", root / "sock"
    log_path = Path(tmp_path or root) / "postgres.log"
    password = secrets.token_urlsafe(24)
    env = {"PATH": f"{bindir}:/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8",
           "HOME": str(root), "TZ": "UTC"}
    proc = None
    log = open(log_path, "w")
    try:
        sock.mkdir()
        pwfile = root / "pw"
        pwfile.write_text(password + "\n")
        os.chmod(pwfile, 0o600)
        if acct is not None:
            for p in (root, sock, pwfile):
                os.chown(p, acct.pw_uid, acct.pw_gid)
        init = subprocess.run(
            [str(bindir / "initdb"), "-D", str(data), "-U", SUPERUSER, f"--pwfile={pwfile}", "-E", "UTF8",
             "--locale=C", "--auth-local=scram-sha-256", "--auth-host=scram-sha-256", "--no-sync"],
            env=env, cwd=root, capture_output=True, text=True, timeout=timeout, **as_user)
        pwfile.unlink()
        assert init.returncode == 0, f"initdb failed:\n{init.stdout[-2000:]}\n{init.stderr[-2000:]}"
        # password authentication only, loopback only (replaces initdb's own pg_hba.conf)
        (data / "pg_hba.conf").write_text("local all all scram-sha-256\n"
                                          "host all all 127.0.0.1/32 scram-sha-256\n")
        port = free_port()
        proc = subprocess.Popen(
            [str(bindir / "postgres"), "-D", str(data), "-p", str(port), "-k", str(sock),
             "-c", "listen_addresses=127.0.0.1", "-c", "password_encryption=scram-sha-256",
             # throwaway data: no durability needed, and small enough for a 2-core CI machine
             "-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off",
             "-c", "max_connections=200", "-c", "shared_buffers=64MB", "-c", "logging_collector=off"],
            env=env, cwd=root, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, **as_user)
        pg = Postgres("127.0.0.1", port, SUPERUSER, password, proc.pid, data, sock, log_path)
        deadline = time.time() + timeout
        while True:
            try:
                pg.connect().close()
                break
            except Exception as e:  # noqa: BLE001 - still starting up
                log.flush()
                assert proc.poll() is None, f"postgres exited (rc {proc.returncode}):\n{log_path.read_text()[-3000:]}"
                assert time.time() < deadline, f"postgres not ready in {timeout:.0f} s: {e}\n{log_path.read_text()[-3000:]}"
                time.sleep(0.3)
        con = pg.connect()
        try:
            with con.cursor() as cur:
                for db in databases:
                    cur.execute(f'CREATE DATABASE "{db}"')
        finally:
            con.close()
        yield pg
    finally:
        try:
            if proc is not None:
                if proc.poll() is None:
                    subprocess.run([str(bindir / "pg_ctl"), "stop", "-D", str(data), "-m", "fast", "-w", "-t", "30"],
                                   env=env, cwd=root, capture_output=True, timeout=45, **as_user)
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)  # its own session: the postmaster and its children
                    proc.wait(timeout=15)
                assert not pid_alive(proc.pid), f"postgres (PID {proc.pid}) is still running"
        finally:
            log.close()
            shutil.rmtree(root, ignore_errors=True)
