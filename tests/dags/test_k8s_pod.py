"""The Kubernetes training path renders a pod that gets a GPU, the data, MLflow and the interval.

No cluster: the DAG is parsed with ``RNNREC_K8S_TRAIN_IMAGE`` set, the mapped ``train`` task
is unmapped as the scheduler would for one candidate, its templates are rendered with a
run's context, and the provider builds the ``V1Pod`` it would submit (``dry_run``).

    .venv/bin/python -m pytest tests/dags/test_k8s_pod.py -q
"""
from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ENV = {"RNNREC_K8S_TRAIN_IMAGE": "registry.local/rnnrec-trainer:0.1.0", "MLFLOW_TRACKING_URI": "http://mlflow:5000",
       "RNNREC_DATA_DIR": "/data", "RNNREC_K8S_NAMESPACE": "recsys", "RNNREC_K8S_DATA_PVC": "rnnrec-data-claim",
       "RNNREC_K8S_MLFLOW_SECRET": "mlflow-credentials"}
ROOT_OF_RUN = "/data/pipeline/synthetic/20140404T000000Z_20140405T000000Z"


class _TI:
    """The few task-instance fields the templates and the pod labels read."""
    dag_id, task_id, map_index, try_number = "session_rec_pipeline", "train", 0, 1

    def xcom_pull(self, task_ids=None, **_):
        assert task_ids == "resolve", task_ids
        return {"root": ROOT_OF_RUN}


def _dag(monkeypatch, env: dict):
    from airflow.dag_processing.dagbag import DagBag

    for k in ("RNNREC_K8S_TRAIN_IMAGE", "RNNREC_K8S_MLFLOW_SECRET", "RNNREC_K8S_GPUS"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
    bag = DagBag(dag_folder=str(ROOT / "dags"))
    assert bag.import_errors == {}
    return bag.dags["session_rec_pipeline"]


def _pod(dag, task_id: str = "train"):
    mapped = dag.get_task(task_id)
    op = mapped.unmap({"op_kwargs": {"cfg": {"root": ROOT_OF_RUN}, "parent_run_id": "p",
                                     "spec": {"candidate": "gru4rec"}}})
    ti = _TI()
    ctx = {"ti": ti, "task_instance": ti, "dag": dag, "run_id": "scheduled__2014-04-05T00:00:00+00:00",
           "data_interval_start": dt.datetime(2014, 4, 4, tzinfo=dt.timezone.utc),
           "data_interval_end": dt.datetime(2014, 4, 5, tzinfo=dt.timezone.utc)}
    op.render_template_fields(ctx)
    return op, op.build_pod_request_obj(ctx, dry_run=True)


def test_training_pod_gets_gpu_data_volume_mlflow_and_interval(monkeypatch):
    dag = _dag(monkeypatch, ENV)
    # every training stage runs in a pod, in the gpu pool; evaluation (CUDA when present) in the pool too
    for tid in ("train", "train_recent", "train_dependent", "train_recent_dependent"):
        t = dag.get_task(tid)
        assert t.operator_class.__name__ == "_KubernetesDecoratedOperator", (tid, t.operator_class)
        assert t.pool == "gpu"
    assert {dag.get_task(t).pool for t in ("evaluate", "evaluate_recent", "evaluate_dependent",
                                             "evaluate_recent_dependent")} == {"gpu"}

    op, pod = _pod(dag)
    assert pod.metadata.namespace == "recsys"
    (c,) = [c for c in pod.spec.containers if c.name == "base"]
    assert c.image == ENV["RNNREC_K8S_TRAIN_IMAGE"]
    assert c.resources.limits["nvidia.com/gpu"] == "1"
    assert any(t.key == "nvidia.com/gpu" and t.operator == "Exists" for t in pod.spec.tolerations)
    # the shared data volume, mounted where the workers keep RNNREC_DATA_DIR (the task's paths are absolute)
    (vol,) = [v for v in pod.spec.volumes if v.persistent_volume_claim is not None]
    assert vol.persistent_volume_claim.claim_name == "rnnrec-data-claim"
    assert [(m.name, m.mount_path) for m in c.volume_mounts if m.name == vol.name] == [(vol.name, "/data")]
    env = {e.name: e.value for e in c.env}
    assert env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert env["RNNREC_DATA_DIR"] == "/data"
    # the interval's paths, rendered from this run's context and the resolve task's output
    assert env["RNNREC_INTERVAL_ROOT"] == ROOT_OF_RUN
    assert env["RNNREC_DATA_INTERVAL_START"] == "2014-04-04T00:00:00+00:00"
    assert env["RNNREC_DATA_INTERVAL_END"] == "2014-04-05T00:00:00+00:00"
    assert ROOT_OF_RUN.startswith(env["RNNREC_DATA_DIR"] + "/")
    # MLflow credentials from a Secret, never in the DAG
    assert [e.secret_ref.name for e in c.env_from if e.secret_ref] == ["mlflow-credentials"]
    assert op.retries == 2 and op.do_xcom_push
    # the fine-tuning stage gets the same pod
    _, pod2 = _pod(dag, "train_recent")
    assert pod2.spec.containers[0].resources.limits["nvidia.com/gpu"] == "1"


def test_without_image_training_runs_in_the_worker(monkeypatch):
    dag = _dag(monkeypatch, {})
    t = dag.get_task("train")
    assert t.operator_class.__name__ == "_PythonDecoratedOperator"
    assert t.pool == "gpu" and dag.get_task("evaluate").pool == "gpu"


@pytest.mark.parametrize("change, needle", [
    ({"MLFLOW_TRACKING_URI": ""}, "MLFLOW_TRACKING_URI"),
    ({"MLFLOW_TRACKING_URI": "sqlite:////data/mlflow/mlflow.db"}, "MLflow server"),
    ({"RNNREC_K8S_GPUS": "0"}, "RNNREC_K8S_GPUS"),
    ({"RNNREC_K8S_GPUS": "two"}, "RNNREC_K8S_GPUS"),
    ({"RNNREC_DATA_DIR": "data"}, "RNNREC_DATA_DIR"),
    ({"RNNREC_K8S_TRAIN_IMAGE": ""}, "RNNREC_K8S_TRAIN_IMAGE"),
])
def test_bad_settings_are_named(change, needle):
    from dags.k8s_pod import PodSpecError, train_pod_kwargs

    with pytest.raises(PodSpecError, match=needle):
        train_pod_kwargs({**ENV, **change})


def test_gpu_count_and_requests_follow_the_settings():
    from dags.k8s_pod import train_pod_kwargs

    kw = train_pod_kwargs({**ENV, "RNNREC_K8S_GPUS": "2", "RNNREC_K8S_CPU": "8", "RNNREC_K8S_MEMORY": "32Gi"})
    r = kw["container_resources"]
    assert r.limits == {"nvidia.com/gpu": "2", "memory": "32Gi"} and r.requests == {"cpu": "8", "memory": "32Gi"}
    assert "env_from" in kw and train_pod_kwargs({k: v for k, v in ENV.items()
                                                  if k != "RNNREC_K8S_MLFLOW_SECRET"})["env_from"] == []
