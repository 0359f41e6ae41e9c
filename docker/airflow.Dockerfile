# Airflow (scheduler / api-server / dag-processor / triggerer) + Spark driver + CPU torch:
# runs every task of dags/session_rec_pipeline.py in-process.
#   docker build -f docker/airflow.Dockerfile -t rnnrec-airflow .
FROM python:3.11-slim
RUN apt-get update && apt-get install -y --no-install-recommends openjdk-17-jre-headless git procps \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/rnnrec
COPY requirements.txt requirements.lock ./
RUN pip install --no-cache-dir torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu \
    && pip install --no-cache-dir -r requirements.lock \
    && pip install --no-cache-dir apache-airflow-providers-apache-spark apache-airflow-providers-postgres
COPY . .
ENV PYTHONPATH=/opt/rnnrec AIRFLOW__CORE__DAGS_FOLDER=/opt/rnnrec/dags AIRFLOW__CORE__LOAD_EXAMPLES=False \
    RNNREC_DATA_DIR=/data SPARK_LOCAL_IP=127.0.0.1 MLFLOW_DISABLE_TELEMETRY=true
