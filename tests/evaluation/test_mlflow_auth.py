"""MLflow's basic-auth app: a real ``mlflow server --app-name basic-auth`` on 127.0.0.1 refuses
requests without valid credentials and accepts the admin's, over REST and through MlflowClient.

    .venv/bin/python -m pytest tests/evaluation/test_mlflow_auth.py -q

The server gets a SQLite tracking store, an artifact folder, an auth database and a
``basic_auth.ini`` (``MLFLOW_AUTH_CONFIG_PATH``), all in tmp_path, with a throwaway admin
password and Flask secret key made for this test. It is started as its own process group and stopped by its PID
in a ``finally``; every wait is bounded.
"""
from __future__ import annotations

import base64
import contextlib
import json
import secrets
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.services import mlflow_server

ADMIN = "rnnrec-admin"
#: environment variables that would change who the server or the client thinks we are
CREDENTIAL_VARS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN",
                   "MLFLOW_AUTH_ADMIN_USERNAME", "MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_TRACKING_URI")
SEARCH = "/api/2.0/mlflow/experiments/search?max_results=1"


def auth_ini(tmp: Path, password: str) -> str:
    """The server's auth config: admin bootstrapped from it on first start, users with no
    grant see nothing (NO_PERMISSIONS), users and permissions kept in a SQLite file."""
    return "\n".join([
        "[mlflow]",
        "default_permission = NO_PERMISSIONS",
        f"database_uri = sqlite:///{tmp / 'basic_auth.db'}",
        f"admin_username = {ADMIN}",
        f"admin_password = {password}",
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth",
        "grant_default_workspace_access = false",
        ""])


def _get(url: str, user: str | None = None, password: str | None = None) -> int:
    """HTTP status of a GET (basic auth when ``user`` is given)."""
    req = urllib.request.Request(url)
    if user is not None:
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        req.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mlflow-auth")
    password = secrets.token_urlsafe(18)  # throwaway; MLflow wants >= 12 characters
    ini = tmp / "basic_auth.ini"
    ini.write_text(auth_ini(tmp, password))
    with contextlib.ExitStack() as stack:
        url, _, _ = mlflow_server(
            stack, tmp, f"sqlite:///{tmp / 'mlflow.db'}", args=["--app-name", "basic-auth"],
            artifacts=tmp / "artifacts", env_drop=CREDENTIAL_VARS,
            env_extra={"MLFLOW_AUTH_CONFIG_PATH": str(ini),
                       # the auth app signs CSRF tokens with it and refuses to start without one
                       "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(16)})
        yield {"url": url, "password": password, "tmp": tmp, "log": tmp / "mlflow-server.log"}


def _get_or_none(url: str) -> int | None:
    try:
        return _get(url)
    except OSError:
        return None


@pytest.fixture
def client_env(monkeypatch):
    """No credentials in the environment, and MLflow's HTTP client bounded (no retry storms)."""
    for k in CREDENTIAL_VARS:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
    return monkeypatch


def test_rest_needs_valid_credentials(auth_server):
    url, password = auth_server["url"], auth_server["password"]
    assert _get(url + SEARCH) == 401
    assert _get(url + SEARCH, ADMIN, password) == 200
    assert _get(url + SEARCH, ADMIN, password + "x") == 401
    assert _get(url + SEARCH, "nobody", password) == 401
    # the admin exists because the ini bootstrapped it, in the auth database the ini names
    assert (auth_server["tmp"] / "basic_auth.db").is_file()


def test_client_logs_a_run_with_env_credentials_and_fails_without(auth_server, client_env, tmp_path):
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    url = auth_server["url"]
    with pytest.raises(MlflowException) as e:
        MlflowClient(tracking_uri=url).create_experiment("rnnrec-auth-anonymous")
    assert "401" in str(e.value) or "authenticat" in str(e.value).lower()

    client_env.setenv("MLFLOW_TRACKING_USERNAME", ADMIN)
    client_env.setenv("MLFLOW_TRACKING_PASSWORD", auth_server["password"])
    c = MlflowClient(tracking_uri=url)
    exp = c.create_experiment("rnnrec-auth")
    run = c.create_run(exp, run_name="auth-check")
    rid = run.info.run_id
    c.log_param(rid, "family", "gru4rec")
    c.log_metric(rid, "recall_at_20", 0.5)
    (tmp_path / "note.json").write_text(json.dumps({"ok": True}))
    c.log_artifact(rid, str(tmp_path / "note.json"))  # proxied artifact upload, behind the same login
    c.set_terminated(rid)
    got = c.get_run(rid)
    assert got.data.params == {"family": "gru4rec"} and got.data.metrics == {"recall_at_20": 0.5}
    assert got.info.status == "FINISHED"
    assert [a.path for a in c.list_artifacts(rid)] == ["note.json"]

    # wrong password in the environment: refused as well
    client_env.setenv("MLFLOW_TRACKING_PASSWORD", auth_server["password"] + "x")
    with pytest.raises(MlflowException):
        MlflowClient(tracking_uri=url).get_run(rid)
    client_env.delenv("MLFLOW_TRACKING_USERNAME")
    client_env.delenv("MLFLOW_TRACKING_PASSWORD")
    with pytest.raises(MlflowException):
        MlflowClient(tracking_uri=url).get_run(rid)


def test_new_user_sees_nothing_without_a_grant(auth_server, client_env):
    """``default_permission = NO_PERMISSIONS``: a user the admin creates can log in but cannot
    read the admin's experiment until granted READ."""
    from mlflow.exceptions import MlflowException
    from mlflow.server import get_app_client
    from mlflow.tracking import MlflowClient

    url, password = auth_server["url"], auth_server["password"]
    client_env.setenv("MLFLOW_TRACKING_USERNAME", ADMIN)
    client_env.setenv("MLFLOW_TRACKING_PASSWORD", password)
    exp = MlflowClient(tracking_uri=url).create_experiment("rnnrec-auth-private")
    reader_pw = secrets.token_urlsafe(18)
    auth = get_app_client("basic-auth", tracking_uri=url)
    auth.create_user("reader", reader_pw)

    assert _get(f"{url}/api/2.0/mlflow/experiments/get?experiment_id={exp}", "reader", reader_pw) == 403
    auth.grant_user_permission("reader", "experiment", exp, "READ")
    assert _get(f"{url}/api/2.0/mlflow/experiments/get?experiment_id={exp}", "reader", reader_pw) == 200
    client_env.setenv("MLFLOW_TRACKING_USERNAME", "reader")
    client_env.setenv("MLFLOW_TRACKING_PASSWORD", reader_pw)
    with pytest.raises(MlflowException):  # READ does not allow writing
        MlflowClient(tracking_uri=url).create_run(exp)
