"""Issue 22's CPU goals measured in one run, on whichever CPU this is, printed as a table with the CPU line.

Run:  python benchmarks/cpu_goals.py [--runs N]   (about a minute per run; on a quiet machine: the medians are
      only worth that). On a shared VM one run's ratios swing by 30% and more: --runs 5 repeats the session and
      prints each goal's median ratio over the runs, with their range.

Runs the pytest-benchmark cases the goals name (bench_slr.py, bench_moe.py, bench_train_step.py) in one pytest
session, reads their medians from its JSON report and prints each goal as a ratio of medians from this run
against its bar. The bf16 goals are meant for CPUs with native bf16 (AMX, AVX-512 BF16); elsewhere they are
printed and marked as such. Anything extra goes to pytest (e.g. `-x`).

The fp32 goals also print a ceiling: the anchor's median over a floor's, where the floor runs the FLOPs our op
runs as bare library GEMMs (bench_slr's gemm_floor: no kept-row add; bench_moe's dense_gemm_floor: as many
rows through one slot's weights, no routing, gather or combine). An op that does its arithmetic at this CPU's
GEMM speed reaches about the ceiling and no more; a bar above it cannot be met on this CPU by any schedule of
the same arithmetic.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))

from cpu_info import cpu_line, native_bf16  # noqa: E402

CASES = [  # (test pattern, the cases it runs)
    ("bench_slr.py::test_linear[fp32-768to3072-T512-{}]", ("dense", "plain", "ours", "gemm_floor")),
    ("bench_moe.py::test_mixtral_small_block[{}]", ("fp32-T512-grouped_mm", "fp32-T512-mcsmoe_fast",
                                                    "fp32-T512-dense_gemm_floor", "bf16-T512-eager",
                                                    "bf16-T512-grouped_mm", "bf16-T512-mcsmoe_fast")),
    ("bench_slr.py::test_mixtral_layer[bf16-T128-{}]", ("merged_dense", "compressed")),
    ("bench_train_step.py::test_train_step[bf16-T128-{}]", ("grouped_mm", "mcsmoe_fast_G4", "mcsmoe_fast_G8")),
]
LINEAR, SMALL = "test_linear[fp32-768to3072-T512-{}]", "test_mixtral_small_block[{}-T512-{}]"
LINEAR_FLOOR, SMALL_FLOOR = LINEAR.format("gemm_floor"), SMALL.format("fp32", "dense_gemm_floor")
# (goal, a bf16 goal?, anchors, ours, bar[, floor]): the ratio is the best (lowest median) anchor over our median;
# the ceiling, the best anchor over the floor's median: the floor runs our FLOPs as plain library GEMMs, so no
# implementation of the same arithmetic gets much past that ratio on this CPU
GOALS = [
    ("compressed linear 768->3072 T512 fp32 vs dense F.linear", False, [LINEAR.format("dense")],
     LINEAR.format("ours"), 5.5, LINEAR_FLOOR),
    ("compressed linear 768->3072 T512 fp32 vs plain composition", False, [LINEAR.format("plain")],
     LINEAR.format("ours"), 1.25, LINEAR_FLOOR),
    ("merged block d512 ff1792 8->4 T512 fp32 vs grouped_mm", False, [SMALL.format("fp32", "grouped_mm")],
     SMALL.format("fp32", "mcsmoe_fast"), 1.5, SMALL_FLOOR),
    ("merged block bf16 vs best transformers bf16", True,
     [SMALL.format("bf16", "eager"), SMALL.format("bf16", "grouped_mm")], SMALL.format("bf16", "mcsmoe_fast"), 1.5),
    ("merged block bf16 vs our fp32", True, [SMALL.format("fp32", "mcsmoe_fast")], SMALL.format("bf16", "mcsmoe_fast"),
     2.0),
    ("compressed Mixtral layer bf16 T128 vs our merged-dense bf16", True, ["test_mixtral_layer[bf16-T128-merged_dense]"],
     "test_mixtral_layer[bf16-T128-compressed]", 2.0),
    ("KD step bf16 T128, merged G4, vs grouped_mm bf16", True, ["test_train_step[bf16-T128-grouped_mm]"],
     "test_train_step[bf16-T128-mcsmoe_fast_G4]", 1.5),
    ("KD step bf16 T128, unmerged G8, vs grouped_mm bf16", True, ["test_train_step[bf16-T128-grouped_mm]"],
     "test_train_step[bf16-T128-mcsmoe_fast_G8]", 1.5),
]


def node_ids() -> list[str]:
    return [str(HERE / pattern.format(case)) for pattern, cases in CASES for case in cases]


def ratios(runs: list[dict[str, float]], anchors: list[str], over: str) -> list[float]:
    """Per run that has them, the best (lowest median) anchor over `over`'s median."""
    found = []
    for medians in runs:
        best = min((medians[n] for n in anchors if n in medians), default=None)
        if best is not None and over in medians:
            found.append(best / medians[over])
    return found


def table(runs: list[dict[str, float]], bf16_native: bool) -> list[str]:
    """Each goal's ratio (the median over the runs, with their range when more than one) against its bar."""
    lines = [cpu_line() + (f"; {len(runs)} runs" if len(runs) > 1 else ""),
             f"{'goal':<62} {'ratio':>7} {'bar':>5} {'ceiling':>7}  result"]
    for goal, bf16, anchors, ours, bar, *floor in GOALS:
        found = ratios(runs, anchors, ours)
        if not found:
            lines.append(f"{goal:<62} {'-':>7} {bar:>5} {'-':>7}  not run (skipped on this CPU or failed)")
            continue
        ratio, ceilings = statistics.median(found), ratios(runs, anchors, floor[0]) if floor else []
        ceiling = statistics.median(ceilings) if ceilings else None
        verdict = "met" if ratio >= bar else "NOT met"
        if ratio < bar and ceiling is not None and ceiling < bar:
            verdict += " (the bar is above this CPU's ceiling)"
        if len(found) > 1:
            verdict += f"; runs {min(found):.2f}-{max(found):.2f}x"
        if bf16 and not bf16_native:
            verdict += " (no native bf16 here: the goal is for AMX / AVX-512 BF16 CPUs)"
        shown = f"{ceiling:6.2f}x" if ceiling is not None else f"{'-':>7}"
        lines.append(f"{goal:<62} {ratio:6.2f}x {bar:>4}x {shown}  {verdict}")
    return lines


def split_runs(argv: list[str]) -> tuple[int, list[str]]:
    """(--runs N, the rest for pytest)."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--runs", type=int, default=1)
    known, rest = parser.parse_known_args(argv)
    if known.runs < 1:
        raise SystemExit(f"--runs must be >= 1, got {known.runs}")
    return known.runs, rest


def main(argv: list[str]) -> int:
    count, argv = split_runs(argv)
    runs, rc = [], 0
    for _ in range(count):
        with tempfile.TemporaryDirectory() as tmp:
            report = Path(tmp) / "bench.json"
            cmd = [sys.executable, "-m", "pytest", *node_ids(), "--benchmark-only", f"--benchmark-json={report}", *argv]
            rc = subprocess.call(cmd, cwd=HERE.parent) or rc
            if not report.is_file():
                print(f"pytest wrote no benchmark report (exit status {rc})", file=sys.stderr)
                return rc or 1
            data = json.loads(report.read_text())
        runs.append({b["name"]: b["stats"]["median"] for b in data["benchmarks"]})
    print("\n".join(table(runs, native_bf16())))
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
