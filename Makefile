# twinv2: set-up, main job, tests. `make run` and `make test` are the two commands in README.md.
SHELL := /bin/bash
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export GX_ANALYTICS_ENABLED := False
export MLFLOW_ENABLE_TELEMETRY := false
export DO_NOT_TRACK := 1

.PHONY: setup run test test-fast bench airflow mlflow clean-data

setup: $(STAMP)

# Re-installs only when pyproject.toml or constraints.txt changed: quick and idempotent otherwise.
$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check -c constraints.txt -e '.[dev]'
	$(BIN)/python -m pip check
	@touch $(STAMP)

run: setup
	$(BIN)/python -m pipelines.main_job

test: setup
	$(BIN)/python -m pytest -q

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

bench: setup
	for b in generate ingest validate cluster models learn_presence; do $(BIN)/python -m bench.bench_$$b || exit 1; done

bench-gpu:                  # issue 29: bench_train (+ bench_score) on CUDA when present, one JSON; < 8 min on one GPU
	bash bench/bench_gpu.sh

airflow: setup
	$(BIN)/python -m pipelines.services airflow

mlflow: setup
	$(BIN)/python -m pipelines.services mlflow

# The champion over HTTP on 127.0.0.1:$(SERVE_PORT): `mlflow models serve` needs the venv's uvicorn on PATH
# (else "uvicorn: not found"), hence the venv's bin first. Store: $MLFLOW_TRACKING_URI, else mlflow/mlflow.db.
SERVE_PORT ?= 5001
.PHONY: serve
serve: setup
	PATH="$(abspath $(BIN)):$$PATH" MLFLOW_TRACKING_URI="$${MLFLOW_TRACKING_URI:-sqlite:///$(CURDIR)/mlflow/mlflow.db}" \
	  $(BIN)/mlflow models serve -m models:/twinv2@champion --env-manager local --host 127.0.0.1 --port $(SERVE_PORT)

.PHONY: airflow-celery airflow-celery-stop
# The CeleryExecutor set-up (pipelines/celery_services.py, README "From make run to Celery workers"): Redis and
# PostgreSQL (Debian's packages, installed when missing), api-server, scheduler, dag-processor and two Celery
# workers, all on 127.0.0.1, state in airflow_home/celery/. Ctrl-C or `make airflow-celery-stop` stops it all.
airflow-celery: setup
	bash deploy/celery-packages.sh
	$(BIN)/python -m pipelines.celery_services start

airflow-celery-stop: setup
	$(BIN)/python -m pipelines.celery_services stop
