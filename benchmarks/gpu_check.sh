#!/usr/bin/env bash
# One script for a machine with a GPU: build the extension with CUDA, run the CUDA tests, run the
# GPU benchmarks, print their tables. Meant to finish in under 8 minutes on one H100/H200.
# Usage (from the repo root): bash benchmarks/gpu_check.sh   [results also go to $OUT when set]
set -uo pipefail
cd "$(dirname "$0")/.."
# the tree built in place is what every step imports (the device machine has no installed mcsmoe_fast, and
# `python3 benchmarks/x.py` puts benchmarks/, not the root, on sys.path)
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT=${OUT:-$(mktemp -d)}
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
status=0
step() { printf '\n=== %s (%ss)\n' "$1" "$SECONDS"; }
# the whole script stays within BUDGET seconds (a device call may run 600 s): each step's timeout is its own limit
# or what is left, whichever is less, so a slow step cannot keep the later ones from running at all
BUDGET=${BUDGET:-570}
within() { local left=$(( BUDGET - SECONDS )); (( left < 10 )) && left=10; echo $(( left < $1 ? left : $1 )); }

step "environment"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
# no visible GPU: stop here (every CUDA test would be skipped and the step would pass without running one)
$PY -c 'import torch; assert torch.cuda.is_available(), "torch sees no GPU: the CUDA tests would all be skipped"' || exit 1
# transformers older than the package's floor (mcsmoe_fast/_requirements.py; the device image had 5.17): install the
# wheels carried in $WHEELS (prepare them here: pip download --no-deps transformers==5.24.0 -d .wheels; carry .wheels)
floor_ok() { $PY -c "exec(open('mcsmoe_fast/_requirements.py').read()); check_transformers()"; }
if ! floor_ok 2>/dev/null; then
  WHEELS=${WHEELS:-.wheels} SITE=$(mktemp -d)
  ls "$WHEELS"/*.whl > /dev/null 2>&1 && $PY -m pip install -q --no-deps --no-index --target "$SITE" "$WHEELS"/*.whl
  export PYTHONPATH="$PWD:$SITE${PYTHONPATH#"$PWD"}"
  floor_ok || { echo "carry a newer transformers: pip download --no-deps transformers==5.24.0 -d .wheels"; exit 1; }
fi
$PY -c 'import torch, transformers; print("torch", torch.__version__, "cuda", torch.version.cuda, "gpu", torch.cuda.get_device_name(0), "transformers", transformers.__version__)'

step "build with CUDA (sm_90)"
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MCSMOE_FAST_CUDA=1 MAX_JOBS=${MAX_JOBS:-16}
$PY setup.py -q build_ext --inplace > "$OUT/build.log" 2>&1 || { tail -50 "$OUT/build.log"; echo "CUDA BUILD FAILED"; exit 1; }
# every op the extension registers (TORCH_LIBRARY in csrc/bindings.cpp) must have a CUDA kernel, but those made for
# the CPU alone (the same set as .ci/run's: grouped_expert_ffn_keep_h keeps the CPU backward's pre-activations)
$PY - <<'PY' || exit 1
import torch
import mcsmoe_fast._C as c
assert c.cuda_enabled, "the CUDA build reports cuda_enabled = False"
CPU_ONLY = {"mcsmoe_fast::grouped_expert_ffn_keep_h"}
ops = sorted(name for name in torch._C._dispatch_get_all_op_names() if name.startswith("mcsmoe_fast::"))
assert ops, "the extension registers no mcsmoe_fast ops"
missing = [name for name in ops if name not in CPU_ONLY and not torch._C._dispatch_has_kernel_for_dispatch_key(name, "CUDA")]
assert not missing, f"no CUDA kernel for {missing}"
print("cuda_enabled", c.cuda_enabled, "; CUDA kernels for", ", ".join(o for o in ops if o not in CPU_ONLY))
PY

step "CUDA tests"
# the test files -k "cuda or gpu" selects from: named for CUDA or the GPU, or holding tests that are
cuda_tests=$( (ls tests/test_*cuda*.py tests/test_*gpu*.py 2>/dev/null;
  grep -l -E "def test[[:alnum:]_]*(cuda|gpu)" tests/test_*.py) | sort -u)
echo "$cuda_tests" | tr '\n' ' '; echo
timeout "$(within 300)" $PY -m pytest -q $cuda_tests -k "cuda or gpu" 2>&1 | tee "$OUT/cuda_tests.log" | tail -25
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

step "GPU benchmarks"
for bench in benchmarks/gpu_*_bench.py; do
  [ -f "$bench" ] || { echo "no benchmarks/gpu_*_bench.py"; status=1; continue; }
  echo "--- $bench"
  timeout "$(within 180)" $PY "$bench" 2>&1 | tee "$OUT/$(basename "$bench" .py).txt" || status=1
done
step "vLLM serves a standard checkpoint (only when vllm is installed)"
if $PY -c "import vllm" 2>/dev/null; then
  # a Mixtral-style model (head_dim 64 for vLLM's attention kernels) merged 8 -> 4 experts, saved with
  # format="standard", generated from by vLLM on token ids; its greedy tokens compared with transformers'
  timeout "$(within 300)" $PY - <<'PY' 2>&1 | tee "$OUT/vllm_standard.txt" | tail -8
import tempfile, torch, mcsmoe_fast as mf
from pathlib import Path
from mcsmoe_fast.tiny import tiny_mixtral
from vllm import LLM, SamplingParams
from transformers import AutoModelForCausalLM
tmp = Path(tempfile.mkdtemp())
model = tiny_mixtral(hidden_size=256, intermediate_size=512)
batches = [{"input_ids": torch.randint(3, 128, (4, 32), generator=torch.Generator().manual_seed(i))} for i in range(2)]
mf.merge_experts(model, mf.collect_routing_stats(model, batches, progress=False), 4, globally=False, progress=False)
out = mf.save_pretrained(model, tmp / "standard", format="standard", batches=batches)
prompt = [5, 17, 42, 99, 3, 64, 127, 8]
llm = LLM(model=str(out), skip_tokenizer_init=True, dtype="float32", enforce_eager=True, gpu_memory_utilization=0.3)
got = llm.generate([{"prompt_token_ids": prompt}], SamplingParams(max_tokens=8, temperature=0, detokenize=False))
theirs = list(got[0].outputs[0].token_ids)
hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).cuda()
ours = hf.generate(torch.tensor([prompt]).cuda(), max_new_tokens=8, do_sample=False)[0, len(prompt):].tolist()
print("vLLM greedy:", theirs, "\ntransformers greedy:", ours, "\nsame tokens:", theirs == ours)
assert len(theirs) == 8
PY
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
else
  echo "vllm is not installed: skipped (docs/standard_format.md gives the serve commands)"
fi
step "done (status $status)"
exit $status
