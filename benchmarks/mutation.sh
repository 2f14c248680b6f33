#!/usr/bin/env bash
# Mutation testing of the algorithm files with mutmut (3.x): mutmut changes one operator, constant or
# argument at a time ("a mutant") and reruns the tests that reach the changed function; a mutant that no
# test fails "survived": a behaviour no test checks. Not part of CI (it reruns tests hundreds of times).
#
# Run (from anywhere, in the venv that has the package installed with its built extension):
#     pip install mutmut                                # once
#     bash benchmarks/mutation.sh                       # all of them
#     bash benchmarks/mutation.sh drop grouping         # some: drop grouping merge calibrate permute compress pruner train
#                                                       #   prune ream quant checkpoint (quant, checkpoint: every file of
#                                                       #   that directory; checkpoint/standard_plan: one of them)
# A name is a file mcsmoe_fast/<name>.py or a directory mcsmoe_fast/<name>/ (every .py in it, e.g. train); one file
# of a directory runs alone as <dir>/<file> (train/loop: mcsmoe_fast/train/loop.py against train's tests), so a
# large directory can be run, and finished, a file at a time.
# Tested with mutmut 3.8.1 (libcst 1.9.0). On a shared machine: JOBS=1 nice -n 19 bash benchmarks/mutation.sh ...
# Settings (environment): PYTHON (default: python), JOBS (parallel test workers, default 2),
#     WORK (work directory, default a fresh one under /tmp; kept, so `cd $WORK/<file> && python -m mutmut browse`,
#     `python -m mutmut show NAME` or a rerun of a few mutants, `python -m mutmut run NAME`, work afterwards).
#
# What it does: copies the working tree (tracked and untracked, not ignored files) and the built extension
# into WORK, so the repository is never touched; writes mutmut's config there (setup.cfg); runs mutmut on
# the chosen files with the test files that exercise them; prints the per-file summary and the diff of every
# surviving mutant (also saved to WORK/survivors-<file>.txt). benchmarks/MUTATION.md lists the survivors of
# the last recorded run and why each one is harmless, or the test that now kills it.
#
# mutmut does not mutate decorated functions: in the copy of the mutated files, `@torch.no_grad()` (or
# `@edits_model`) on a function or a method is rewritten as `name = torch.no_grad()(name)` after it, at the same
# indentation (same behaviour), so merge_experts, align_experts, collect_routing_stats, compress_experts, the
# pruner's step and perplexity are mutated too. Properties (@property) and other decorators stay unmutated.
#
# Interrupted? `cd $WORK/<name> && python -m mutmut run --max-children $JOBS` continues where it stopped (results
# are kept per mutant). Changing the test selection in setup.cfg makes mutmut forget every earlier result.
#
# How long (2 cores, JOBS=2, measured with the suite of this commit): drop.py 128 mutants in 3.5 min
# (7 min with other work on the machine); grouping.py 452 mutants in 14 min (21 min loaded). Each run starts by
# running the selected test files once (~1-2 min) to learn which test reaches which function; after that
# only those tests run for each mutant, stopping at the first failure. merge.py, calibrate.py and permute.py
# are not measured yet: their tests run models, so expect longer (plan an hour or more for all five).
# With JOBS=1 under nice 19 on 2 cores busy with other work: pruner.py 202 mutants in 12 min, compress.py
# 418 in about 95 min, train/ 1053 in several hours (see benchmarks/MUTATION.md).
set -euo pipefail
{  # the whole script is read before it runs: editing this file during a run cannot change the run
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-python}
JOBS=${JOBS:-2}
WORK=${WORK:-$(mktemp -d /tmp/mcsmoe-mutation.XXXXXX)}
FILES=("$@")
[ ${#FILES[@]} -gt 0 ] || FILES=(drop grouping merge calibrate permute compress pruner train prune ream quant checkpoint)

sources_for() {  # mutmut's only_mutate patterns: the file mcsmoe_fast/<name>.py or every file in mcsmoe_fast/<name>/
  if [ -f "$ROOT/mcsmoe_fast/$1.py" ]; then echo "mcsmoe_fast/$1.py"
  elif [ -d "$ROOT/mcsmoe_fast/$1" ]; then (cd "$ROOT" && ls mcsmoe_fast/"$1"/*.py)
  else echo "no mcsmoe_fast/$1.py or mcsmoe_fast/$1/" >&2; exit 2; fi
}

tests_for() {  # the test files that exercise each algorithm file (a file of a directory: the directory's)
  case "${1%%/*}" in
    drop) echo "tests/test_drop.py tests/test_merge.py tests/test_calibrate.py tests/test_checkpoint.py" ;;
    grouping) echo "tests/test_grouping.py tests/test_merge.py" ;;
    merge) echo "tests/test_merge.py tests/test_cli_options.py tests/test_checkpoint.py tests/test_ream.py" ;;
    calibrate) echo "tests/test_calibrate.py tests/test_merge.py tests/test_compress.py tests/test_compress_importance.py tests/test_reap.py" ;;
    permute) echo "tests/test_permute.py tests/test_merge.py" ;;
    compress) echo "tests/test_compress.py tests/test_compress_importance.py tests/test_slr.py" ;;
    pruner) echo "tests/test_pruner_schedule.py tests/test_train.py tests/test_train_pruned_resume.py" ;;
    train) echo "tests/test_train.py tests/test_pruner_schedule.py tests/test_train_pruned_resume.py tests/test_cli_train.py" ;;
    prune) echo "tests/test_reap.py tests/test_methods_reference.py tests/test_methods_edge_cases.py tests/test_degenerate_stats.py tests/test_quant_prune.py" ;;
    ream) echo "tests/test_ream.py tests/test_methods_reference.py tests/test_methods_edge_cases.py tests/test_degenerate_stats.py" ;;
    quant) echo "tests/test_quant_formats.py tests/test_quant_formats_spec.py tests/test_quant_edge_values.py tests/test_dequant.py tests/test_quantize_native.py tests/test_quant_prune.py tests/test_quantized_merge.py tests/test_quant_standard.py tests/test_quant_layer_report.py tests/test_quant_permute_compress.py tests/test_quant_cli.py tests/test_quant_interop.py tests/test_ops_quant_fidelity2.py" ;;
    checkpoint) echo "tests/test_checkpoint.py tests/test_streaming_standard.py tests/test_standard_export.py tests/test_standard_export_fidelity.py tests/test_standard_export_matches.py tests/test_vllm_layout.py tests/test_export_keeps_behaviour.py tests/test_cli_standard.py tests/test_masked_router_logits.py" ;;
    *) echo "unknown file '$1': choose from drop grouping merge calibrate permute compress pruner train prune ream quant checkpoint" >&2; exit 2 ;;
  esac
}

"$PYTHON" -c "import mutmut" 2>/dev/null || { echo "mutmut is not installed: $PYTHON -m pip install mutmut" >&2; exit 2; }
SO=$(ls "$ROOT"/mcsmoe_fast/_C*.so 2>/dev/null | head -1) || true
[ -n "$SO" ] || { echo "no built extension in $ROOT/mcsmoe_fast (pip install --no-build-isolation -e .)" >&2; exit 2; }
echo "work directory: $WORK"

for name in "${FILES[@]}"; do
  tests=$(tests_for "$name")
  [ ! -f "$ROOT/tests/test_mutants_${name%%/*}.py" ] || tests="$tests tests/test_mutants_${name%%/*}.py"  # tests written to kill survivors
  label=${name//\//-}  # train/loop -> train-loop
  dir="$WORK/$label"
  rm -rf "$dir" && mkdir -p "$dir"
  (cd "$ROOT" && git ls-files -z --cached --others --exclude-standard -- mcsmoe_fast tests pyproject.toml \
     | xargs -0 -I{} sh -c 'test -f "{}" && cp --parents "{}" "$0"' "$dir")
  cp "$SO" "$dir/mcsmoe_fast/"
  sources=$(sources_for "$name")
  "$PYTHON" - "$dir" $sources <<'PY'
import ast, pathlib, sys
root = pathlib.Path(sys.argv[1])
for rel in sys.argv[2:]:
    path = root / rel
    lines = path.read_text().splitlines(keepends=True)
    edits = []  # (decorator line, last line of the function, indentation, name), 1-based
    for node in ast.walk(ast.parse("".join(lines))):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and len(node.decorator_list) == 1:
            dec = node.decorator_list[0]
            call = ast.unparse(dec)
            if call in ("torch.no_grad()", "edits_model") and lines[dec.lineno - 1].strip() == "@" + call:
                edits.append((dec.lineno, node.end_lineno, " " * node.col_offset, node.name, call))
    for dec_line, end_line, indent, fn, call in sorted(edits, reverse=True):
        lines.insert(end_line, f"{indent}{fn} = {call}({fn})\n")
        del lines[dec_line - 1]
    if edits:
        path.write_text("".join(lines))
PY
  {
    echo "[mutmut]"
    echo "source_paths=mcsmoe_fast"
    echo "only_mutate="
    for f in $sources; do echo "    $f"; done
    echo "pytest_add_cli_args_test_selection="
    for t in $tests; do echo "    $t"; done
    echo "pytest_add_cli_args=-p no:cacheprovider"
    echo "process_isolation=forkserver"  # torch is not fork-safe once its thread pools run
    echo "use_git_change_detection=false"
  } > "$dir/setup.cfg"
  echo "=== $(echo $sources) against: $tests"
  start=$SECONDS
  (cd "$dir" && OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 "$PYTHON" -m mutmut run --max-children "$JOBS" > run.log 2>&1) || {
    tail -40 "$dir/run.log"; echo "mutmut run failed for $name (log: $dir/run.log)" >&2; exit 1; }
  (cd "$dir" && "$PYTHON" -m mutmut results --all true > results.txt 2>&1 || true)
  survived=$(grep -c ": survived" "$dir/results.txt" || true)
  total=$(grep -c ": " "$dir/results.txt" || true)
  echo "$name: $total mutants, $survived survived, $((SECONDS - start)) s"
  grep -v ": killed" "$dir/results.txt" | sed 's/^/  /' || true
  grep ": survived\|: no tests" "$dir/results.txt" > "$dir/survivors.lst" || true
  "$PYTHON" - "$dir" > "$WORK/survivors-$label.txt" <<'PY'
import ast, difflib, pathlib, re, sys  # each listed mutant's diff against its original function (mutmut show, fast)
root, sources = pathlib.Path(sys.argv[1]), {}
for line in open(root / "survivors.lst"):
    name, status = (part.strip() for part in line.rsplit(":", 1))
    module, function = re.match(r"(.*)\.(x.*__mutmut_\d+)$", name).groups()
    path = root / "mutants" / (module.replace(".", "/") + ".py")
    if path not in sources:
        text = path.read_text()
        lines = text.splitlines()
        sources[path] = {node.name: "\n".join(lines[node.lineno - 1:node.end_lineno]) for node in ast.walk(ast.parse(text))
                         if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))}
    functions = sources[path]
    original = re.sub(r"_\d+$", "_orig", function)
    before = functions[original].splitlines()
    after = functions[function].replace(function, original, 1).splitlines()
    diff = [l for l in difflib.unified_diff(before, after, lineterm="", n=0) if l[:1] in "+-" and l[:3] not in ("---", "+++")]
    print(f"# {name}: {status}\n" + "\n".join(diff))
PY
done
echo "survivors' diffs: $WORK/survivors-*.txt"
exit
}
