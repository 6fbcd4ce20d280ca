#!/usr/bin/env bash
# The GPU suite of issue 15 in one call: GPU-marked tests, classic example vs the plain loop
# (CUDA graphs), the ~1B GPT (bf16, SDPA, compile: tokens/s, MFU), the fused sweep of 64
# models, DDP and FSDP at world 1 over NCCL, peak memory vs the memory report.
# Writes suite.json and suite.md under --out (default runs/gpu-suite-<time>).
#   bash benchmarks/gpu_suite.sh                      # one H100/H200, at most ~8 minutes
#   bash benchmarks/gpu_suite.sh --device cpu --tiny  # CI, tiny sizes
# NOT YET RUN ON A GPU.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
export PYTHONPATH="$(dirname "$here")${PYTHONPATH:+:$PYTHONPATH}"
exec timeout 480 python "$here/gpu_suite.py" "$@"
