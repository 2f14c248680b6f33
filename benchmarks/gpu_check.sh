#!/usr/bin/env bash
# One script for a machine with a GPU: build the extension with CUDA, run the CUDA tests, run the
# GPU benchmarks, print their tables. Meant to finish in under 8 minutes on one H100/H200.
# Usage (from the repo root): bash benchmarks/gpu_check.sh   [results also go to $OUT when set]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$(mktemp -d)}
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
status=0
step() { printf '\n=== %s (%ss)\n' "$1" "$SECONDS"; }

step "environment"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
$PY -c 'import torch, transformers; print("torch", torch.__version__, "cuda", torch.version.cuda, "gpu", torch.cuda.get_device_name(0), "transformers", transformers.__version__)'

step "build with CUDA (sm_90)"
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MCSMOE_FAST_CUDA=1 MAX_JOBS=${MAX_JOBS:-16}
$PY setup.py -q build_ext --inplace > "$OUT/build.log" 2>&1 || { tail -50 "$OUT/build.log"; echo "CUDA BUILD FAILED"; exit 1; }
$PY -c 'import mcsmoe_fast._C as c; assert c.cuda_enabled; print("cuda_enabled", c.cuda_enabled)' || exit 1

step "CUDA tests"
cuda_tests=$(ls tests/test_lap_cuda.py tests/test_grouped_ffn.py tests/test_grouped_ffn_backward.py \
  tests/test_routing_align.py tests/test_optimize.py tests/test_slr_cuda.py tests/test_streaming_device_map.py 2>/dev/null)
timeout 300 $PY -m pytest -q $cuda_tests -k "cuda or gpu" 2>&1 | tee "$OUT/cuda_tests.log" | tail -25
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

step "GPU benchmarks"
for bench in benchmarks/gpu_lap_bench.py benchmarks/gpu_moe_bench.py benchmarks/gpu_slr_bench.py; do
  [ -f "$bench" ] || { echo "missing $bench"; status=1; continue; }
  echo "--- $bench"
  timeout 180 $PY "$bench" 2>&1 | tee "$OUT/$(basename "$bench" .py).txt" || status=1
done
step "done (status $status)"
exit $status
