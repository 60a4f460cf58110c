#!/usr/bin/env bash
# One prepared GPU check (issue 29), `make bench-gpu`: < 8 minutes on one GPU.
# Uses whatever torch is importable (no CUDA build can be downloaded on the offline GPU machine): the venv's
# python if present, else python3; installs the repository into that environment (no dependencies, offline) if
# `twinv2` is not importable; reports clearly when CUDA is missing (the JSON says cuda_available false and the
# benchmark then runs on the CPU). Runs bench.bench_train (and bench.bench_score when present) and writes ONE JSON.
#   env: BENCH_GPU_DEVICE (cuda|cpu|auto, default auto), BENCH_GPU_DATA (a clustered world; default: build the
#        default world, seed 7), BENCH_GPU_OUT (default bench/results/bench_gpu.json), BENCH_GPU_QUICK=1 (tiny, CI)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
if ! "$PY" -c "import twinv2" 2>/dev/null; then
  echo "bench-gpu: twinv2 not importable with $PY; installing the repository (no deps, offline)" >&2
  "$PY" -m pip install --no-deps --no-build-isolation -e . >&2 || echo "bench-gpu: install failed; running from the tree" >&2
fi
"$PY" - <<'PYEOF' >&2
import torch
print(f"bench-gpu: torch {torch.__version__}, torch.version.cuda={torch.version.cuda}, "
      f"cuda available: {torch.cuda.is_available()}"
      + (f" ({torch.cuda.get_device_name(0)})" if torch.cuda.is_available() else
         " -- NO CUDA: this torch build or machine has no usable GPU; the figures below are CPU figures"))
PYEOF
exec env PYTHONPATH=. "$PY" -m bench.bench_gpu
