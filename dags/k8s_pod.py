"""The training pod of the DAG's Kubernetes path (``RNNREC_K8S_TRAIN_IMAGE`` set).

``session_rec_pipeline`` passes :func:`train_pod_kwargs` to ``@task.kubernetes``
(provider ``apache-airflow-providers-cncf-kubernetes``), so each training task
runs ``dags.pipeline_steps.train_one`` in a pod of the CUDA trainer image
(``docker/trainer.Dockerfile``) that has:

- ``nvidia.com/gpu`` in its limits (one GPU per training task; the ``gpu`` pool
  caps how many run at once) and a toleration for GPU-tainted nodes;
- the shared data volume (a PersistentVolumeClaim) mounted at the same path as
  ``RNNREC_DATA_DIR`` in the Airflow workers, because the task's arguments hold
  absolute paths under it (processed splits in, model folders out);
- ``MLFLOW_TRACKING_URI`` (and, from a Secret, ``MLFLOW_TRACKING_USERNAME`` /
  ``MLFLOW_TRACKING_PASSWORD`` for an MLflow server with basic auth), so the pod
  logs to the same server as every other task;
- the interval's paths as variables (``RNNREC_INTERVAL_ROOT``, its data interval),
  rendered by Airflow from the ``resolve`` task's output at run time.

Settings (environment of the scheduler / dag-processor; read when the DAG is parsed):

| variable | default | meaning |
|---|---|---|
| ``RNNREC_K8S_TRAIN_IMAGE`` | (unset: train in the worker) | trainer image |
| ``RNNREC_K8S_NAMESPACE`` | ``default`` | namespace of the pods |
| ``RNNREC_K8S_DATA_PVC`` | ``rnnrec-data`` | claim of the shared data volume |
| ``RNNREC_DATA_DIR`` | ``/data`` | where it is mounted (the same path as in the workers) |
| ``RNNREC_K8S_GPUS`` | ``1`` | GPUs per training pod |
| ``RNNREC_K8S_CPU`` / ``RNNREC_K8S_MEMORY`` | ``4`` / ``16Gi`` | requests (memory is also the limit) |
| ``RNNREC_K8S_MLFLOW_SECRET`` | (none) | Secret with ``MLFLOW_TRACKING_USERNAME`` / ``_PASSWORD`` |
| ``MLFLOW_TRACKING_URI`` | (must be set) | the MLflow server the pods log to |

Imports of the Kubernetes client happen inside :func:`train_pod_kwargs`, which the DAG
calls only when the image is set (nothing heavy at parse time otherwise).
"""
from __future__ import annotations

import os
from collections.abc import Mapping

#: The pod's volume name for the shared data claim.
DATA_VOLUME = "rnnrec-data"
#: Interval variables, rendered by Airflow when the task runs (the pod itself has no Airflow context).
INTERVAL_ENV = {
    "RNNREC_INTERVAL_ROOT": "{{ ti.xcom_pull(task_ids='resolve')['root'] }}",
    "RNNREC_DATA_INTERVAL_START": "{{ data_interval_start.isoformat() if data_interval_start else '' }}",
    "RNNREC_DATA_INTERVAL_END": "{{ data_interval_end.isoformat() if data_interval_end else '' }}",
    "RNNREC_DAG_RUN_ID": "{{ run_id }}",
}


class PodSpecError(ValueError):
    """A Kubernetes setting is missing or malformed (named in the message)."""


def train_pod_kwargs(environ: Mapping[str, str] | None = None) -> dict:
    """Keyword arguments for ``@task.kubernetes`` of the training task, from ``environ``.

    Raises :class:`PodSpecError` naming the variable when the image or the tracking URI
    is missing, or the GPU count is not a positive integer: a pod without them would
    train on nobody's GPU or log to a SQLite file on the shared volume.
    """
    from kubernetes.client import models as k8s

    env = os.environ if environ is None else environ
    image = env.get("RNNREC_K8S_TRAIN_IMAGE", "")
    if not image:
        raise PodSpecError("RNNREC_K8S_TRAIN_IMAGE is not set: no image to run training in")
    tracking = env.get("MLFLOW_TRACKING_URI", "")
    if not tracking or tracking.startswith(("sqlite:", "file:")) or "://" not in tracking:
        raise PodSpecError(f"MLFLOW_TRACKING_URI = {tracking!r}: training pods need an MLflow server they can "
                           "reach (http(s)://...), not a local store")
    try:
        gpus = int(env.get("RNNREC_K8S_GPUS", "1"))
    except ValueError:
        gpus = 0
    if gpus < 1:
        raise PodSpecError(f"RNNREC_K8S_GPUS = {env.get('RNNREC_K8S_GPUS')!r}: a positive integer")
    data_dir = env.get("RNNREC_DATA_DIR") or "/data"
    if not os.path.isabs(data_dir):
        raise PodSpecError(f"RNNREC_DATA_DIR = {data_dir!r}: an absolute path (the pod mounts the volume there)")
    memory = env.get("RNNREC_K8S_MEMORY", "16Gi")
    env_vars = {"MLFLOW_TRACKING_URI": tracking, "RNNREC_DATA_DIR": data_dir, "MLFLOW_DISABLE_TELEMETRY": "true",
                "PYTHONUNBUFFERED": "1", **INTERVAL_ENV}
    env_from = []
    if env.get("RNNREC_K8S_MLFLOW_SECRET"):
        env_from.append(k8s.V1EnvFromSource(secret_ref=k8s.V1SecretEnvSource(name=env["RNNREC_K8S_MLFLOW_SECRET"])))
    return {
        "image": image,
        "namespace": env.get("RNNREC_K8S_NAMESPACE", "default"),
        "name": "rnnrec-train",
        "container_resources": k8s.V1ResourceRequirements(
            requests={"cpu": env.get("RNNREC_K8S_CPU", "4"), "memory": memory},
            limits={"nvidia.com/gpu": str(gpus), "memory": memory}),
        "tolerations": [k8s.V1Toleration(key="nvidia.com/gpu", operator="Exists", effect="NoSchedule")],
        "volumes": [k8s.V1Volume(name=DATA_VOLUME, persistent_volume_claim=k8s.V1PersistentVolumeClaimVolumeSource(
            claim_name=env.get("RNNREC_K8S_DATA_PVC", "rnnrec-data")))],
        "volume_mounts": [k8s.V1VolumeMount(name=DATA_VOLUME, mount_path=data_dir)],
        "env_vars": env_vars,
        "env_from": env_from,
        "labels": {"app.kubernetes.io/part-of": "rnnrec", "rnnrec/task": "train"},
        "do_xcom_push": True,
        "get_logs": True,
        "on_finish_action": "delete_succeeded_pod",
    }
