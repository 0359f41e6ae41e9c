# CUDA trainer image for RNNREC_K8S_TRAIN_IMAGE (@task.kubernetes runs dags.pipeline_steps.train_one in it).
#   docker build -f docker/trainer.Dockerfile -t rnnrec-trainer .
FROM pytorch/pytorch:2.7.1-cuda12.6-cudnn9-runtime
WORKDIR /opt/rnnrec
COPY requirements.txt ./
# torch comes from the base image (CUDA build); the rest is what training/evaluation/MLflow need
RUN pip install --no-cache-dir "pyarrow==25.0.1" "pandas>=2.2,<3" "mlflow==3.17.2" pyyaml tqdm matplotlib psutil pynvml \
        "apache-airflow-task-sdk==1.3.2"
COPY training training
COPY evaluation evaluation
COPY spark_jobs/__init__.py spark_jobs/contract.py spark_jobs/
COPY expectations expectations
COPY dags dags
ENV PYTHONPATH=/opt/rnnrec RNNREC_DATA_DIR=/data MLFLOW_DISABLE_TELEMETRY=true
