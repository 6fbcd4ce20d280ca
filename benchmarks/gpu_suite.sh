#!/usr/bin/env bash
# The GPU suite in one call: tests/test_gpu.py, the ~1B GPT (bf16, SDPA; eager and compiled: tokens/s,
# MFU), the classic example against the plain loop (CUDA graphs), gpupar plan against the card,
# the fused sweep of 64 models.
# Writes suite.json and suite.md under --out (default runs/gpu-suite-<time>).
#   bash benchmarks/gpu_suite.sh                      # one H100/H200, at most ~8 minutes
#   bash benchmarks/gpu_suite.sh --device cpu --tiny  # CI, tiny sizes
# Each part runs in its own process under its own limit (gpu_suite.py PARTS).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
export PYTHONPATH="$(dirname "$here")${PYTHONPATH:+:$PYTHONPATH}"
exec timeout 600 "${PYTHON:-python3}" "$here/gpu_suite.py" "$@"
