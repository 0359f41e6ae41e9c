# Airflow (api-server / scheduler / dag-processor / triggerer and the LocalExecutor's task
# processes): the official Airflow image of the locked version + Java 17 (Spark's driver) + gcc
# (GRU4Rec's optional C fast path, compiled on first use) + the project and its locked packages.
# Preprocessing runs as a Spark driver here (local[*], or the cluster via RNNREC_SPARK_CONN_ID),
# training on CPU here unless RNNREC_K8S_TRAIN_IMAGE sends it to a GPU pod.
#   docker build -f docker/airflow.Dockerfile -t rnnrec-airflow:0.1.0 .
# The versions below must equal requirements.lock (tests/docker/test_docker_config.py checks).
ARG AIRFLOW_VERSION=3.3.2
FROM apache/airflow:${AIRFLOW_VERSION}-python3.11
ARG AIRFLOW_VERSION=3.3.2
# a PyTorch wheel index for a CPU-only torch (a much smaller image); empty = the default index
ARG TORCH_INDEX_URL=""

USER root
RUN apt-get update \
    && apt-get install -y --no-install-recommends openjdk-17-jre-headless gcc libc6-dev procps \
    && rm -rf /var/lib/apt/lists/*
USER airflow
WORKDIR /opt/rnnrec
COPY --chown=airflow:root requirements.lock requirements.txt ./
# torch first (its own index when given), then the lock with Airflow held at the image's version;
# the Spark provider without its pyspark-client dependency, which would overwrite the locked pyspark
RUN pip install --no-cache-dir ${TORCH_INDEX_URL:+--index-url ${TORCH_INDEX_URL}} torch==2.13.0 \
    && pip install --no-cache-dir "apache-airflow==${AIRFLOW_VERSION}" -r requirements.lock \
    && pip install --no-cache-dir --no-deps apache-airflow-providers-apache-spark==6.3.4
COPY --chown=airflow:root dags dags
COPY --chown=airflow:root spark_jobs spark_jobs
COPY --chown=airflow:root training training
COPY --chown=airflow:root evaluation evaluation
COPY --chown=airflow:root expectations expectations
COPY --chown=airflow:root conf conf
ENV PYTHONPATH=/opt/rnnrec \
    AIRFLOW__CORE__DAGS_FOLDER=/opt/rnnrec/dags \
    AIRFLOW__CORE__LOAD_EXAMPLES=False \
    RNNREC_DATA_DIR=/data \
    RNNREC_NATIVE_CACHE=/home/airflow/.cache/rnnrec/native \
    MLFLOW_DISABLE_TELEMETRY=true \
    PYTHONUNBUFFERED=1
