# Two commands set everything up on a fresh machine: `make demo` and `make test`.
SHELL := /bin/bash
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
export SPARK_LOCAL_IP ?= 127.0.0.1
export MLFLOW_DISABLE_TELEMETRY ?= true
export PYTHONUNBUFFERED := 1
DATA_DIR ?= data
# `make demo` = the whole DAG at demo size (README: measured wall time). Override any of these.
DEMO_EVENTS ?= 80000
DEMO_DAYS ?= 6
DEMO_EPOCHS ?= 2
DEMO_FRACTIONS ?= 4
DEMO_FAMILIES ?= gru4rec,pop
DEMO_DIR := $(DATA_DIR)/demo
# `make demo-preprocess` (preprocessing + gates only) keeps its earlier, larger default
PREPROCESS_DEMO_EVENTS ?= 200000

.PHONY: venv demo demo-dag demo-preprocess test check-java clean mlflow-ui serve airflow bench-preprocess
MLFLOW_PORT ?= 5000
SERVE_PORT ?= 5001
SERVE_MODEL ?= synthetic-best
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

# The whole Airflow DAG once with `airflow dags test` (generate -> Spark preprocess -> gates ->
# train GRU4Rec + POP and fine-tune on the recent fraction -> evaluate -> MLflow registry),
# then the comparison table and the command that opens the MLflow UI.
demo: venv check-java
	$(BIN)/python -m dags.run_demo --data-dir $(DEMO_DIR) --events $(DEMO_EVENTS) --days $(DEMO_DAYS) \
	  --epochs $(DEMO_EPOCHS) --fractions $(DEMO_FRACTIONS) --families $(DEMO_FAMILIES)

demo-dag: demo

# Preprocessing only (generate -> Spark preprocess -> gates), no training / Airflow / MLflow.
demo-preprocess: venv check-java
	$(BIN)/python -m dags.preprocess_demo --events $(PREPROCESS_DEMO_EVENTS) --data-dir $(DATA_DIR)/demo-preprocess

# The demo's MLflow store (also what `make airflow` runs log to).
mlflow-ui: venv
	$(BIN)/mlflow ui --backend-store-uri sqlite:///$(abspath $(DEMO_DIR))/mlflow/mlflow.db --host 127.0.0.1 --port $(MLFLOW_PORT) --workers 1

# REST scoring server for a registered model of the demo store (POST /invocations; README).
# `models serve` starts `uvicorn` by name, so the venv's bin must be on PATH.
serve: venv
	PATH=$(abspath $(BIN)):$$PATH MLFLOW_TRACKING_URI=sqlite:///$(abspath $(DEMO_DIR))/mlflow/mlflow.db \
	  $(BIN)/mlflow models serve -m models:/$(SERVE_MODEL)@champion --env-manager local -h 127.0.0.1 -p $(SERVE_PORT)

airflow: venv check-java
	$(BIN)/python -m dags.run_demo --standalone --data-dir $(DEMO_DIR) --port $(AIRFLOW_PORT)

bench-preprocess: venv check-java
	$(BIN)/python -m benchmarks.preprocess_scale --sizes 1M,10M,31.7M

test: venv check-java
	$(BIN)/python -m pytest -q tests

clean:
	rm -rf $(DEMO_DIR) $(DATA_DIR)/demo-preprocess .pytest_cache tests/artifacts
