# Spark standalone master / worker from the locked pyspark (its bundled Spark distribution), on the
# same Python minor version as the driver in the Airflow image: PySpark refuses executors whose
# Python differs from the driver's. Executors need no project code: the preprocessing job uses
# DataFrame expressions only (README "Running on a cluster").
#   docker build -f docker/spark.Dockerfile -t rnnrec-spark:0.1.0 .
# The versions below must equal requirements.lock (tests/docker/test_docker_config.py checks).
FROM python:3.11-slim-bookworm
RUN apt-get update && apt-get install -y --no-install-recommends openjdk-17-jre-headless procps \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --create-home --uid 50000 --gid 0 spark
COPY requirements.lock /tmp/requirements.lock
RUN pip install --no-cache-dir -c /tmp/requirements.lock pyspark pyarrow pandas && rm /tmp/requirements.lock \
    && mkdir -p /opt/spark-work && chown spark:root /opt/spark-work
USER spark
ENV SPARK_WORKER_DIR=/opt/spark-work SPARK_NO_DAEMONIZE=1 PYTHONUNBUFFERED=1
# spark-class is on PATH (pyspark installs it): master / worker are chosen by the compose command
EXPOSE 7077 8080 8081
