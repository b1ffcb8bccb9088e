#!/usr/bin/env bash
# Run the CUDA checks (scripts/gpu_check.py) on an offline GPU node, from a copy of this repository.
#
# On a machine with network, build the wheels the node lacks (scripts/gpu_bundle.py):
#
#     make gpu-bundle                                  # -> .gpu-wheels/ (~18 MiB for a typical CUDA image)
#     make gpu-bundle GPU_PRESENT=node-freeze.txt      # exact: the node's `pip list --format=freeze`
#
# carry the repository with .gpu-wheels/ to the node, then there:
#
#     bash scripts/gpu_run.sh --out results/gpu        # extra arguments go to gpu_check.py
#
# The wheels are installed without network (`pip install --no-index --no-deps --target`) into
# $GRADS_SITE, which goes first on PYTHONPATH together with the repository (grads itself is imported
# from the checkout, not installed). The table lands in <out>/gpu_check.md and gpu_check.json,
# rewritten after every row. Knobs: PYTHON (the node's interpreter), GRADS_WHEELS (the carried
# folder), GRADS_SITE (the install target), GRADS_CHECK_TIMEOUT (seconds, default 560), MAX_JOBS.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WHEELS=${GRADS_WHEELS:-.gpu-wheels}
# The folder name ends in site-packages: dill (datasets' fingerprints) pickles modules found anywhere
# else by value instead of by reference.
SITE=${GRADS_SITE:-/tmp/grads/site-packages}
if ! compgen -G "$WHEELS/*.whl" >/dev/null; then
  echo "no wheels in $WHEELS/: build them with 'make gpu-bundle' on a machine with network and carry the folder here" >&2
  exit 2
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target "$SITE" "$WHEELS"/*.whl
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
# DS_ACCELERATOR=cuda overrides a `cpu` left over from a CPU shell; MAX_JOBS speeds DeepSpeed's JIT.
export DS_ACCELERATOR=cuda HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false \
  WANDB_MODE=disabled PYTHONUNBUFFERED=1 MAX_JOBS="${MAX_JOBS:-16}"
# The check keeps itself under its --budget-s (450 s); the timeout only guards against a hang,
# and the table written so far stays in --out.
exec timeout "${GRADS_CHECK_TIMEOUT:-560}" "$PY" scripts/gpu_check.py "$@"
