# Two commands set everything up on a fresh machine: `make demo` and `make test`.
SHELL := /bin/bash
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
export SPARK_LOCAL_IP ?= 127.0.0.1
export MLFLOW_DISABLE_TELEMETRY ?= true
export PYTHONUNBUFFERED := 1
DEMO_EVENTS ?= 200000
DATA_DIR ?= data

.PHONY: venv demo demo-dag test check-java clean mlflow-ui airflow bench-preprocess
MLFLOW_PORT ?= 5000
AIRFLOW_PORT ?= 8080

$(BIN)/.installed: requirements.lock requirements.txt
	@command -v $(PY) >/dev/null || { echo "$(PY) not found: install Python 3.11 (e.g. apt-get install python3.11 python3.11-venv)"; exit 1; }
	@test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q -U pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -r requirements.lock
	$(BIN)/pip check
	@touch $@

venv: $(BIN)/.installed

check-java:
	@command -v java >/dev/null || { echo "Spark needs Java 17+: none found. Debian/Ubuntu: sudo apt-get install -y openjdk-17-jre-headless"; exit 1; }
	@v=$$(java -version 2>&1 | sed -n 's/.*version "\([0-9]*\).*/\1/p' | head -1); \
	  [ "$${v:-0}" -ge 17 ] || { echo "Spark needs Java 17+, found $$v. Debian/Ubuntu: sudo apt-get install -y openjdk-17-jre-headless"; exit 1; }

demo: venv check-java
	$(BIN)/python -m spark_jobs.demo --events $(DEMO_EVENTS) --data-dir $(DATA_DIR)/demo

# The whole Airflow DAG once (generate -> preprocess -> gates -> train -> evaluate -> MLflow registry).
demo-dag: venv check-java
	$(BIN)/python -m dags.run_demo --data-dir $(DATA_DIR)/demo-dag --events $(DEMO_EVENTS)

mlflow-ui: venv
	$(BIN)/mlflow ui --backend-store-uri sqlite:///$(abspath $(DATA_DIR))/demo-dag/mlflow/mlflow.db --host 127.0.0.1 --port $(MLFLOW_PORT) --workers 1

airflow: venv check-java
	$(BIN)/python -m dags.run_demo --standalone --data-dir $(DATA_DIR)/demo-dag --port $(AIRFLOW_PORT)

bench-preprocess: venv check-java
	$(BIN)/python -m benchmarks.preprocess_scale --sizes 1M,10M,31.7M

test: venv check-java
	$(BIN)/python -m pytest -q tests

clean:
	rm -rf $(DATA_DIR)/demo .pytest_cache
