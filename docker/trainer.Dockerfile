# The CUDA trainer: torch 2.13.0 (the default Linux wheel, built with CUDA; the host needs only the
# NVIDIA driver and container toolkit) + the project, as a non-root user. Its entry point is the
# one trainer: `python -m training.train --model M --data SPLIT_DIR --out RUN_DIR [--set k=v ...]`.
# It is also the image of the DAG's Kubernetes training pods (RNNREC_K8S_TRAIN_IMAGE;
# dags/k8s_pod.py), which run dags.pipeline_steps.train_one in it.
#   docker build -f docker/trainer.Dockerfile -t rnnrec-trainer:0.1.0 .
#   docker run --gpus all -v rnnrec-data:/data rnnrec-trainer:0.1.0 --list
# The versions below must equal requirements.lock (tests/docker/test_docker_config.py checks).
FROM python:3.11-slim-bookworm
RUN apt-get update && apt-get install -y --no-install-recommends procps && rm -rf /var/lib/apt/lists/* \
    && useradd --create-home --uid 50000 --gid 0 rnnrec
WORKDIR /opt/rnnrec
COPY --chown=rnnrec:root requirements.lock ./
# training, evaluation and MLflow logging need these (no Spark, no Airflow server); the task SDK
# is what a @task.kubernetes pod imports (AirflowFailException); versions held to the lock
RUN pip install --no-cache-dir torch==2.13.0 \
    && pip install --no-cache-dir -c requirements.lock mlflow pyarrow pandas pyyaml tqdm matplotlib psutil \
        psycopg2-binary apache-airflow-task-sdk \
    && pip install --no-cache-dir nvidia-ml-py==13.615.71
COPY --chown=rnnrec:root training training
COPY --chown=rnnrec:root evaluation evaluation
COPY --chown=rnnrec:root spark_jobs spark_jobs
COPY --chown=rnnrec:root expectations expectations
COPY --chown=rnnrec:root dags dags
USER rnnrec
ENV PYTHONPATH=/opt/rnnrec RNNREC_DATA_DIR=/data MLFLOW_DISABLE_TELEMETRY=true PYTHONUNBUFFERED=1
ENTRYPOINT ["python", "-m", "training.train"]
CMD ["--list"]
