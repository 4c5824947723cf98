#!/usr/bin/env bash
# The prepared GPU check (see bench/gpu.py): JPEG 2000 decode throughput (CPU full / CPU reduced / nvImageCodec)
# and training-epoch time with GPU utilisation for params/gpu.yaml. Run from the repository root:
#   bash bench/gpu.sh                  # GPU node: full preset, params/gpu.yaml, 3 epochs (installs the venv first)
#   bash bench/gpu.sh --tiny RECIPE    # CPU: a tiny recipe, 1 epoch (what tests/test_bench.py runs)
set -euo pipefail
cd "$(dirname "$0")/.."
export YOLO_OFFLINE=1 MPLBACKEND=Agg
PY=${PYTHON:-.venv/bin/python}
if [[ "${1:-}" != "--tiny" ]]; then
  make install >/dev/null
  # nvImageCodec is an optional extra (CUDA wheels, GPU only): tried, never required
  if "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    "$PY" -m pip install -q nvidia-nvimgcodec-cu12 2>/dev/null || echo "nvidia-nvimgcodec-cu12 not installable: CPU decode only"
  fi
fi
exec "$PY" bench/gpu.py "$@"
