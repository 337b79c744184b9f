# The README's two commands: `make run` (set up, then serve classifications) and `make test` (set up, then test).
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export PIP_DISABLE_PIP_VERSION_CHECK=1

.PHONY: setup run test lint test-fast test-docker proto bench clean

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	@# CPU onnxruntime here; a venv made when we installed onnxruntime-gpu must lose both (they share one folder)
	if $(BIN)/pip show -q onnxruntime-gpu 2>/dev/null; then $(BIN)/pip uninstall -y -q onnxruntime-gpu onnxruntime; fi
	$(BIN)/pip install -q -e '.[train,dev]'
	touch $(STAMP)

setup: $(STAMP)

## Regenerate cxr/generated from proto/ (committed; tests fail when it is stale)
proto: $(STAMP)
	$(BIN)/python scripts/gen_proto.py

## Train a demo model (on ../shared/data/cxr-raw when present, else on generated phantoms) and serve it
run: $(STAMP)
	$(BIN)/python -m cxr demo-stack

test: $(STAMP) lint
	$(BIN)/python -m pytest tests

## ruff, configured in pyproject.toml
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test-fast: $(STAMP)
	$(BIN)/python -m pytest tests -m "not slow and not docker"

## The deployment tests alone (compose stack for real, needs an engine: eval "$(../shared/tools/docker-local.sh)")
test-docker: $(STAMP)
	$(BIN)/python -m pytest tests/deploy

bench: $(STAMP)
	$(BIN)/python bench/inference_throughput.py
	$(BIN)/python bench/gateway_throughput.py
	$(BIN)/python bench/decode.py

clean:
	rm -rf $(VENV) runs model_repository demo .pytest_cache
