#!/usr/bin/env bash
# Run scripts/gpu_check.py on a CUDA machine without network, from a copy of this repository.
#
# The packages the GPU image lacks travel as wheels: build them here with `make gpu-bundle`
# (-> .gpu-wheels/, ~18 MiB), carry that folder along, then on the GPU machine:
#
#     bash scripts/gpu_run.sh --out "$OUT"          # extra arguments go to gpu_check.py
#
# (device tool: command `bash scripts/gpu_run.sh --out "$OUT"`, carry [".gpu-wheels"], timeout_s 600;
# the table comes back in $OUT/gpu_check.md and .json). The wheels are installed with
# `pip install --no-index --no-deps --target` into $GRADS_SITE, which goes first on PYTHONPATH
# together with the repository (grads is not installed, only imported from here).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WHEELS=${GRADS_WHEELS:-.gpu-wheels}
# The folder name ends in site-packages: dill (datasets' fingerprints) pickles modules found anywhere
# else by value instead of by reference.
SITE=${GRADS_SITE:-/tmp/grads/site-packages}
if ! compgen -G "$WHEELS/*.whl" >/dev/null; then
  echo "no wheels in $WHEELS/: run 'make gpu-bundle' here and carry the folder" >&2
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
