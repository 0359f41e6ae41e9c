# MLflow tracking server: Postgres backend store, artifacts served from a volume (--serve-artifacts),
# the basic-auth app on (docker/mlflow/basic_auth.ini; the admin from MLFLOW_AUTH_ADMIN_USERNAME /
# MLFLOW_AUTH_ADMIN_PASSWORD in .env), as a non-root user. Command line: docker/compose.yaml.
#   docker build -f docker/mlflow.Dockerfile -t rnnrec-mlflow:0.1.0 .
# The versions below must equal requirements.lock (tests/docker/test_docker_config.py checks).
FROM python:3.11-slim-bookworm
RUN useradd --create-home --uid 50000 --gid 0 mlflow \
    && mkdir -p /mlflow/artifacts /mlflow/auth && chown -R mlflow:root /mlflow
COPY requirements.lock /tmp/requirements.lock
RUN pip install --no-cache-dir -c /tmp/requirements.lock mlflow psycopg2-binary Flask-WTF && rm /tmp/requirements.lock
COPY --chown=mlflow:root docker/mlflow/basic_auth.ini /etc/mlflow/basic_auth.ini
USER mlflow
WORKDIR /mlflow
ENV MLFLOW_AUTH_CONFIG_PATH=/etc/mlflow/basic_auth.ini MLFLOW_DISABLE_TELEMETRY=true PYTHONUNBUFFERED=1
EXPOSE 5000
