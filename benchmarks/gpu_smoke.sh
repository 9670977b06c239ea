#!/usr/bin/env bash
# GPU smoke benchmark (benchmarks/gpu_smoke.py): install aidkd if needed, then GFL R101 -> R50 at 1333x800 bf16,
# student alone / KD / KD + AID, one minute each (under 8 minutes in all). Run from the repository root:
#   benchmarks/gpu_smoke.sh                 # on a GPU machine; results in benchmarks/results/gpu_smoke_gpu.*
#   benchmarks/gpu_smoke.sh --cpu --tiny    # the same code path on a CPU in seconds
# PYTHON picks the interpreter (default: .venv/bin/python if present, else python3).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
if ! "$PYTHON" -c "import aidkd" 2>/dev/null; then
    if [ -d src/aidkd ]; then
        export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"   # the checkout's sources
    fi
    if ! "$PYTHON" -c "import aidkd" 2>/dev/null; then
        "$PYTHON" -m pip install -q -e . -c constraints.txt
    fi
fi
"$PYTHON" -c "import torch, aidkd; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(),
      torch.cuda.get_device_name() if torch.cuda.is_available() else '')"
exec "$PYTHON" benchmarks/gpu_smoke.py "$@"
