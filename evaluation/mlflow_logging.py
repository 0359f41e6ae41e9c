"""MLflow for the pipeline: runs, metrics, artifacts, the pyfunc model, the registry and ``champion``.

Layout in MLflow (what the DAG produces; usable without Airflow too)::

    experiment  rnnrec-<dataset>
      parent run  one per DAG run (tags: dag id, run id, data interval, git commit;
                  input dataset = the preprocess manifest digest; GX Data Docs; comparison)
        child run one per candidate = model family x (train_full | recent fraction k)
                  params = the resolved config; per-epoch train_loss / train_events_per_s;
                  recall_at_K, mrr_at_K, precision_at_K on test, valid_* on validation;
                  model size and prediction latency (n_parameters, model_bytes,
                  latency_ms_p50 / _p99 per batch, predict_us_per_event);
                  artifacts: config, history, metrics JSON, breakdown tables, PNG plots;
                  model: evaluation.serving.SessionRecModel (pyfunc, logged from code:
                  evaluation/serving_model.py) over the checkpoint
    registry    <dataset>-<family>  one version per distinct checkpoint (digest tag);
                                    alias ``champion`` = best of that family
                <dataset>-best      the overall best candidate; alias ``champion``

Re-running a data interval soft-deletes that interval's earlier runs and logs
fresh ones; a checkpoint whose digest is already registered is not registered
again. ``champion`` moves only when the chosen candidate beats the current champion on
this run's validation table, which neither model trained on (evaluation/selection.py:
the candidate's selection copy, trained on ``train``, against a model of the champion
that ended training before the validation period; better mean and paired Wilcoxon
p < 0.05 by default); the registry records why it moved or did not.

Tracking URI: ``$MLFLOW_TRACKING_URI`` when set, else
``sqlite:///<data_dir>/mlflow/mlflow.db`` with artifacts in ``<data_dir>/mlflow/artifacts``.
Open it with ``mlflow ui --backend-store-uri sqlite:///data/mlflow/mlflow.db --host 127.0.0.1``.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

log = logging.getLogger("evaluation.mlflow_logging")

ROOT = Path(__file__).resolve().parents[1]
#: selection metric (validation table); keys never contain '@'
SELECT_METRIC = "valid_mrr_at_20"
TAG = "rnnrec_"  # tag prefix (no dots: simple search filters)


# --------------------------------------------------------------------------- setup

def default_tracking_uri(data_dir: str | os.PathLike) -> str:
    return f"sqlite:///{(Path(data_dir).resolve() / 'mlflow' / 'mlflow.db')}"


def configure(data_dir: str | os.PathLike) -> str:
    """Point MLflow at ``$MLFLOW_TRACKING_URI`` or the local SQLite store; returns the URI."""
    import mlflow

    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    uri = os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri(data_dir)
    if uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return uri


#: database schemes of a tracking URI that MLflow reads directly (no server to store artifacts)
_DB_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql")


def local_artifact_location(tracking_uri: str, data_dir: str | os.PathLike, name: str) -> str | None:
    """Where a new experiment keeps its artifacts: ``<data_dir>/mlflow/artifacts/<name>`` when the
    tracking URI is a database (SQLite or a server's Postgres / MySQL read directly), since MLflow
    would otherwise put them in ``./mlruns`` of each task's working directory; ``None`` (the
    server's own artifact store) for an MLflow server."""
    scheme = tracking_uri.split(":", 1)[0].split("+", 1)[0].lower()
    if scheme not in _DB_SCHEMES:
        return None
    return (Path(data_dir).resolve() / "mlflow" / "artifacts" / name).as_uri()


def experiment_id(dataset: str, data_dir: str | os.PathLike) -> str:
    """Experiment ``rnnrec-<dataset>`` (created on first use; local artifacts beside the DB)."""
    import mlflow

    name = f"rnnrec-{dataset}"
    exp = mlflow.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            mlflow.tracking.MlflowClient().restore_experiment(exp.experiment_id)
        return exp.experiment_id
    loc = local_artifact_location(mlflow.get_tracking_uri(), data_dir, name)
    try:
        return mlflow.create_experiment(name, artifact_location=loc)
    except Exception:  # created concurrently by a parallel backfill run
        exp = mlflow.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def git_commit(root: str | os.PathLike = ROOT) -> str:
    """HEAD commit of the project (``+dirty`` when the tree has changes), or ``unknown``."""
    try:
        sha = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (sha + ("+dirty" if dirty else "")) if sha else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def file_digest(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def checkpoint_digest(ckpt_path: str | os.PathLike) -> str:
    """sha256 of what defines a model (``training.checkpoint.weights_digest``): family, resolved
    config, item index and weights; not the file bytes, which also hold timings."""
    from training import checkpoint as ck

    return ck.weights_digest(ck.load_checkpoint(ckpt_path))


def _flat_params(d: dict[str, Any], prefix: str = "") -> dict[str, str]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat_params(v, key + "."))
        else:
            s = json.dumps(v) if isinstance(v, (list, tuple)) else str(v)
            out[key] = s[:6000]
    return out


def _client():
    from mlflow.tracking import MlflowClient

    return MlflowClient()


def _delete_tree(client, experiment: str, run_id: str) -> None:
    for child in client.search_runs([experiment], f"tags.mlflow.parentRunId = '{run_id}'", max_results=1000):
        _delete_tree(client, experiment, child.info.run_id)
    client.delete_run(run_id)


# --------------------------------------------------------------------------- parent run

def start_parent_run(*, dataset: str, data_dir, dag_id: str, dag_run_id: str, interval_start: str,
                     interval_end: str, params: dict, processed_dir: str | os.PathLike,
                     quality_dir: str | os.PathLike | None = None) -> str:
    """Create the DAG run's parent run (replacing this interval's earlier ones); returns its id."""
    import mlflow
    import pandas as pd

    configure(data_dir)
    exp = experiment_id(dataset, data_dir)
    client = _client()
    key = f"{interval_start}/{interval_end}"
    old = client.search_runs(
        [exp], f"tags.{TAG}role = 'parent' and tags.{TAG}dag_id = '{dag_id}' and tags.{TAG}interval = '{key}'",
        max_results=100)
    for r in old:  # a re-run of this interval replaces its runs (soft delete; registry versions stay)
        log.info("replacing earlier MLflow run %s of interval %s", r.info.run_id, key)
        _delete_tree(client, exp, r.info.run_id)
    tags = {f"{TAG}role": "parent", f"{TAG}dag_id": dag_id, f"{TAG}dag_run_id": dag_run_id,
            f"{TAG}interval": key, f"{TAG}interval_start": interval_start, f"{TAG}interval_end": interval_end,
            f"{TAG}git_commit": git_commit(), f"{TAG}dataset": dataset, "mlflow.source.git.commit": git_commit()}
    run = client.create_run(exp, tags=tags, run_name=f"{dag_id} {interval_end[:10]}")
    rid = run.info.run_id
    with mlflow.start_run(run_id=rid):
        mlflow.log_params(_flat_params(params, "pipeline."))
        processed = Path(processed_dir)
        manifest = processed / "manifest.json"
        digest = file_digest(manifest)
        m = json.loads(manifest.read_text())
        rows = [{"split": s, "table": t, **{k: c.get(k) for k in ("events", "sessions", "items", "users")}}
                for s, sm in m.get("splits", {}).items() for t, c in sm.get("tables", {}).items()]
        ds = mlflow.data.from_pandas(pd.DataFrame(rows), source=str(processed.resolve()),
                                     name=f"{dataset}@{interval_end[:10]}".replace("@", "_"), digest=digest[:32])
        mlflow.log_input(ds, context="training")
        mlflow.set_tag(f"{TAG}manifest_sha256", digest)
        mlflow.log_artifact(str(manifest), "data")
        if quality_dir:
            q = Path(quality_dir)
            if (q / "data_docs").is_dir():
                mlflow.log_artifacts(str(q / "data_docs"), "data_docs")
            if (q / "summary.json").is_file():
                mlflow.log_artifact(str(q / "summary.json"), "data_docs")
    client.update_run(rid, status="RUNNING")
    return rid


def finish_parent_run(run_id: str, status: str = "FINISHED", failed: list[dict] | None = None) -> None:
    """End the DAG run's parent run (``FINISHED`` | ``FAILED``). ``failed``: the candidates that
    failed (``{"candidate", "step", "error"}``), named in the tags ``rnnrec_failed_candidates``
    (comma list; empty when none failed) and ``rnnrec_failures`` (step and error of each)."""
    client = _client()
    names = ",".join(sorted({f["candidate"] for f in failed or []}))
    client.set_tag(run_id, f"{TAG}failed_candidates", names)
    if failed:
        client.set_tag(run_id, f"{TAG}failures",
                       "; ".join(f"{f['candidate']} ({f['step']}): {f['error']}" for f in failed)[:4900])
    client.set_terminated(run_id, status)


# --------------------------------------------------------------------------- child runs

@contextmanager
def child_run(parent_run_id: str, candidate: str, *, family: str, fraction: int | None,
              system_metrics: bool = True) -> Iterator[str]:
    """Open (replacing any earlier one of this candidate) the child run; yields its id."""
    import mlflow

    client = _client()
    parent = client.get_run(parent_run_id)
    exp = parent.info.experiment_id
    for r in client.search_runs([exp], f"tags.mlflow.parentRunId = '{parent_run_id}' and "
                                       f"tags.{TAG}candidate = '{candidate}'", max_results=100):
        _delete_tree(client, exp, r.info.run_id)  # a retried / cleared task replaces its run
    inherited = {k: v for k, v in parent.data.tags.items()
                 if k.startswith(TAG) and k not in (f"{TAG}role", f"{TAG}manifest_sha256")}
    tags = {**inherited, f"{TAG}role": "candidate", f"{TAG}candidate": candidate, f"{TAG}family": family,
            f"{TAG}fraction": "full" if fraction is None else str(fraction),
            "mlflow.parentRunId": parent_run_id}
    run = client.create_run(exp, tags=tags, run_name=candidate)
    # system metrics need psutil (and pynvml on GPU); skip quietly when unavailable
    sysm = system_metrics and os.environ.get("RNNREC_MLFLOW_SYSTEM_METRICS", "1") != "0"
    try:
        import psutil  # noqa: F401
    except ImportError:
        sysm = False
    with mlflow.start_run(run_id=run.info.run_id, log_system_metrics=sysm):
        yield run.info.run_id


def _pip_requirements() -> list[str]:
    import numpy
    import pandas
    import pyarrow
    import torch

    return [f"torch=={torch.__version__.split('+')[0]}", f"numpy=={numpy.__version__}",
            f"pandas=={pandas.__version__}", f"pyarrow=={pyarrow.__version__}",
            f"mlflow=={__import__('mlflow').__version__}"]


def log_training(run_id: str, run_dir: str | os.PathLike, *, name: str = "model") -> dict:
    """Params, per-epoch metrics, config/history artifacts, curve PNG and the pyfunc model."""
    import mlflow
    from evaluation import plots

    run_dir = Path(run_dir)
    cfg = json.loads((run_dir / "config.json").read_text())
    hist = json.loads((run_dir / "history.json").read_text())
    epochs = hist.get("epochs", [])
    active = mlflow.active_run()
    with _noop() if active is not None and active.info.run_id == run_id else mlflow.start_run(run_id=run_id):
        client = _client()
        client.log_batch(run_id, params=[_param(k, v) for k, v in _flat_params(cfg).items()])
        for k, v in _flat_params(hist.get("run", {}), "train.").items():
            if k in ("train.data", "train.init_from"):
                continue
            client.set_tag(run_id, f"{TAG}{k.replace('.', '_')}", v)
        # the training path that actually ran (chunk | native | manual | torch | compiled | none)
        client.set_tag(run_id, f"{TAG}train_path", str(hist.get("run", {}).get("train_path", "unknown")))
        for h in epochs:
            step = int(h["epoch"]) + 1
            mlflow.log_metrics({"train_loss": float(h["loss"]), "train_events_per_s": float(h["events_per_s"]),
                                "epoch_seconds": float(h["seconds"])}, step=step)
        mlflow.log_artifact(str(run_dir / "config.json"), "config")
        mlflow.log_artifact(str(run_dir / "history.json"), "training")
        if epochs:
            with tempfile.TemporaryDirectory() as td:
                png = plots.training_curve(epochs, Path(td) / "training_curve.png", title=cfg.get("model", ""))
                mlflow.log_artifact(str(png), "plots")
        logged = _log_pyfunc(run_dir, name)
        mlflow.set_tags({f"{TAG}ckpt_digest": logged["digest"], f"{TAG}model_uri": logged["model_uri"]})
    return logged


#: project packages the pyfunc imports (``training`` for the scorers, ``evaluation`` for the model
#: class, ``spark_jobs`` for the data contract that ``training`` reads); copied into the model's ``code/``
PYFUNC_CODE_PATHS = ("training", "evaluation", "spark_jobs")


def _log_pyfunc(run_dir: Path, name: str) -> dict:
    """The run dir's checkpoint as a pyfunc model (``evaluation.serving``) in the active run.

    Models from code: ``python_model`` is the path of ``evaluation/serving_model.py`` (MLflow
    copies and runs it at load time), not a pickled ``SessionRecModel``; the checkpoint (and
    the resolved config, for reading) are artifacts; the project packages are ``code_paths``."""
    import mlflow

    from evaluation import serving
    from training import checkpoint as ck

    ckpt_path = Path(run_dir) / ck.FINAL
    digest = checkpoint_digest(ckpt_path)
    c = ck.load_checkpoint(ckpt_path)
    artifacts = {serving.CHECKPOINT_ARTIFACT: str(ckpt_path)}
    if (Path(run_dir) / "config.json").is_file():
        artifacts[serving.CONFIG_ARTIFACT] = str(Path(run_dir) / "config.json")
    info = mlflow.pyfunc.log_model(
        name=name, python_model=str(serving.MODEL_CODE_PATH), artifacts=artifacts,
        code_paths=[str(ROOT / p) for p in PYFUNC_CODE_PATHS],
        pip_requirements=_pip_requirements(), signature=serving.signature(),
        input_example=serving.example_input(c["item_index"]["item_id"].numpy()[:3]),
        tags={f"{TAG}ckpt_digest": digest},
    )
    return {"model_uri": info.model_uri, "digest": digest}


def log_model_only(run_id: str, run_dir: str | os.PathLike, *, name: str) -> dict:
    """A second model of a run (the selection copy): pyfunc + its history, no params (a run's
    params describe its final model and cannot be re-logged with other values)."""
    import mlflow

    active = mlflow.active_run()
    with _noop() if active is not None and active.info.run_id == run_id else mlflow.start_run(run_id=run_id):
        mlflow.log_artifact(str(Path(run_dir) / "history.json"), f"training/{name}")
        mlflow.log_artifact(str(Path(run_dir) / "config.json"), f"config/{name}")
        return _log_pyfunc(Path(run_dir), name)


def set_tags(run_id: str, tags: dict) -> None:
    """``rnnrec_``-prefixed tags on a run (None values skipped)."""
    client = _client()
    for k, v in tags.items():
        if v is not None:
            client.set_tag(run_id, f"{TAG}{k}", str(v))


@contextmanager
def _noop():
    yield None


def _param(k, v):
    from mlflow.entities import Param

    return Param(k, v)


#: evaluation counts logged as metrics (not only in metrics.json)
EVAL_COUNTS = ("n_events", "n_sessions", "n_users", "n_items_ranked", "dropped_unknown_events",
               "dropped_short_sessions", "n_users_without_history", "eval_events_per_s")
#: what the model costs (evaluation.evaluate: size and prediction latency), logged as metrics
#: when the evaluation recorded them (None and older metrics.json files are skipped)
COST_METRICS = ("n_parameters", "model_bytes", "latency_ms_p50", "latency_ms_p99", "latency_batch_rows_p50",
                "predict_us_per_event")


def log_evaluation(run_id: str, eval_dir: str | os.PathLike, table: str = "test", split_dir=None) -> dict:
    """Metrics (``valid_`` prefix for the validation table), eval counts and the model's cost
    (``COST_METRICS``), the table as an ``mlflow.data`` input of the run (with its digest),
    JSON/CSV tables and breakdown PNG."""
    import mlflow

    from evaluation import plots

    eval_dir = Path(eval_dir)
    m = json.loads((eval_dir / "metrics.json").read_text())
    prefix = "" if table == "test" else f"{table}_"
    keys = [k for k in m if k.startswith(("recall_at_", "mrr_at_", "precision_at_", "ndcg_at_", "coverage_at_",
                                           "mean_popularity_at_")) and isinstance(m[k], (int, float))]
    metrics = {f"{prefix}{k}": float(m[k]) for k in keys}
    metrics.update({f"{prefix}{k}": float(m[k]) for k in EVAL_COUNTS + COST_METRICS
                    if isinstance(m.get(k), (int, float))})
    client = _client()
    client.log_batch(run_id, metrics=[_metric(k, v) for k, v in metrics.items()])
    if (eval_dir / "per_event.parquet").exists():
        _log_eval_input(run_id, eval_dir, table, m, split_dir)
    for f in ("metrics.json", "breakdowns.json", "breakdown_length.csv", "breakdown_position.csv",
              "breakdown_position_coarse.csv", "breakdown_user_history.csv", "recall_per_step.csv"):
        if (eval_dir / f).exists():
            client.log_artifact(run_id, str(eval_dir / f), f"evaluation/{table}")
    if (eval_dir / "breakdowns.json").exists():
        with tempfile.TemporaryDirectory() as td:
            png = plots.breakdown_plot(eval_dir / "breakdowns.json", Path(td) / f"breakdown_{table}.png",
                                       title=f"{m.get('model', '')} {table}")
            client.log_artifact(run_id, str(png), "plots")
    return metrics


def _log_eval_input(run_id: str, eval_dir: Path, table: str, m: dict, split_dir) -> None:
    """The evaluated events (session_id, position, target item) as the run's ``mlflow.data``
    input, context ``evaluation:<table>``; MLflow's digest identifies the table."""
    import mlflow
    import pyarrow.parquet as pq

    df = pq.read_table(eval_dir / "per_event.parquet",
                       columns=["session_id", "position", "target_item_id"]).to_pandas()
    src = str(Path(split_dir) / table) if split_dir else str(eval_dir)
    ds = mlflow.data.from_pandas(df, source=src, name=f"{table}-{m.get('test_digest', '')[:12]}")
    active = mlflow.active_run()
    with _noop() if active is not None and active.info.run_id == run_id else mlflow.start_run(run_id=run_id):
        mlflow.log_input(ds, context=f"evaluation:{table}")


def _metric(k, v, step: int = 0):
    import time

    from mlflow.entities import Metric

    return Metric(k, v, int(time.time() * 1000), step)


# --------------------------------------------------------------------------- registry

def register(model_name: str, model_uri: str, digest: str, tags: dict[str, str] | None = None) -> tuple[str, bool]:
    """Register ``model_uri`` unless a version with the same checkpoint digest exists.

    Returns (version, created)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    client = _client()
    try:
        client.get_registered_model(model_name)
    except MlflowException:
        try:
            client.create_registered_model(model_name, description="RNN session-based recommender (rnnrec pipeline)")
        except MlflowException:
            pass  # created concurrently
    for mv in client.search_model_versions(f"name = '{model_name}'"):
        if mv.tags.get(f"{TAG}ckpt_digest") == digest:
            return mv.version, False
    mv = mlflow.register_model(model_uri, model_name, tags={f"{TAG}ckpt_digest": digest, **(tags or {})})
    return mv.version, True


def champion(model_name: str):
    """The version the ``champion`` alias points to, or None."""
    from mlflow.exceptions import MlflowException

    try:
        return _client().get_model_version_by_alias(model_name, "champion")
    except MlflowException:
        return None


def download_checkpoint(model_uri: str, dest: str | os.PathLike) -> Path:
    """Download a logged model (``models:/...``) and return its checkpoint file."""
    import mlflow

    d = mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=str(dest))
    found = sorted(Path(d).rglob("*.pt"))
    if not found:
        raise FileNotFoundError(f"{model_uri} has no checkpoint artifact under {d}")
    return found[0]


def record_decision(model_name: str, version: str, decision: dict, move: bool) -> None:
    """Move ``champion`` to ``version`` when ``move``; either way the registry keeps why: the
    version's ``rnnrec_champion_decision`` tag and the model's ``rnnrec_last_decision``."""
    client = _client()
    text = f"{decision['action']}: {decision['reason']}"[:4900]
    if move:
        client.set_registered_model_alias(model_name, "champion", version)
        key = f"valid_{decision['metric']}" if decision.get("metric") else SELECT_METRIC
        client.set_model_version_tag(model_name, version, key, f"{decision['candidate_score']:.6f}")
    client.set_model_version_tag(model_name, version, f"{TAG}champion_decision", text)
    client.set_registered_model_tag(model_name, f"{TAG}last_decision", f"v{version} {text}"[:4900])


def log_comparison(parent_run_id: str, rows: list[dict], decisions: list[dict], out_dir,
                   select_key: str = SELECT_METRIC, failed: list[dict] | None = None) -> Path:
    """Comparison table (JSON + CSV) and bar chart on the parent run; also written to ``out_dir``.
    ``failed``: candidates of the run that failed (listed in ``comparison.json``)."""
    from evaluation import plots

    out_dir = Path(out_dir)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    (tmp / "comparison.json").write_text(json.dumps({"candidates": rows, "registry": decisions, "failed": failed or []}, indent=2,
                                                     sort_keys=True, default=str) + "\n")
    cols = ["label", "family", "fraction", select_key, "recall_at_20", "mrr_at_20", "precision_at_20",
            "recall_at_5", "mrr_at_5", "registered_version"]
    with open(tmp / "comparison.csv", "w") as f:
        f.write(",".join(cols) + "\n")
        for r in rows:
            f.write(",".join("" if r.get(c) is None else str(r.get(c)) for c in cols) + "\n")
    plots.comparison_bar(rows, tmp / "comparison.png", title="test Recall@20 / MRR@20 by candidate")
    from spark_jobs.contract import replace_dir

    replace_dir(tmp, out_dir)
    client = _client()
    client.log_artifacts(parent_run_id, str(out_dir), "comparison")
    from evaluation.selection import best_candidate

    best = best_candidate(rows, select_key) if rows else None  # the same rule that chose
    if best:
        client.log_metric(parent_run_id, f"best_{select_key}", float(best[select_key]))
        client.log_metric(parent_run_id, "best_recall_at_20", float(best.get("recall_at_20") or 0.0))
        client.set_tag(parent_run_id, f"{TAG}best_candidate", best["label"])
    return out_dir
