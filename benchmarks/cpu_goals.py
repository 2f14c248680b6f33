"""Issue 22's CPU goals measured in one run, on whichever CPU this is, printed as a table with the CPU line.

Run:  python benchmarks/cpu_goals.py        (minutes; on a quiet machine: the medians are only worth that)

Runs the pytest-benchmark cases the goals name (bench_slr.py, bench_moe.py, bench_train_step.py) in one pytest
session, reads their medians from its JSON report and prints each goal as a ratio of medians from this run
against its bar. The bf16 goals are meant for CPUs with native bf16 (AMX, AVX-512 BF16); elsewhere they are
printed and marked as such. Anything extra goes to pytest (e.g. `-x`).
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))

from cpu_info import cpu_line, native_bf16  # noqa: E402

CASES = [  # (test pattern, the cases it runs)
    ("bench_slr.py::test_linear[fp32-768to3072-T512-{}]", ("dense", "plain", "ours")),
    ("bench_moe.py::test_mixtral_small_block[{}]", ("fp32-T512-grouped_mm", "fp32-T512-mcsmoe_fast", "bf16-T512-eager",
                                                    "bf16-T512-grouped_mm", "bf16-T512-mcsmoe_fast")),
    ("bench_slr.py::test_mixtral_layer[bf16-T128-{}]", ("merged_dense", "compressed")),
    ("bench_train_step.py::test_train_step[bf16-T128-{}]", ("grouped_mm", "mcsmoe_fast_G4", "mcsmoe_fast_G8")),
]
LINEAR, SMALL = "test_linear[fp32-768to3072-T512-{}]", "test_mixtral_small_block[{}-T512-{}]"
# (goal, a bf16 goal?, anchors, ours, bar): the ratio is the best (lowest median) anchor over our median
GOALS = [
    ("compressed linear 768->3072 T512 fp32 vs dense F.linear", False, [LINEAR.format("dense")],
     LINEAR.format("ours"), 5.5),
    ("compressed linear 768->3072 T512 fp32 vs plain composition", False, [LINEAR.format("plain")],
     LINEAR.format("ours"), 1.25),
    ("merged block d512 ff1792 8->4 T512 fp32 vs grouped_mm", False, [SMALL.format("fp32", "grouped_mm")],
     SMALL.format("fp32", "mcsmoe_fast"), 1.5),
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


def table(medians: dict[str, float], bf16_native: bool) -> list[str]:
    lines = [cpu_line(), f"{'goal':<62} {'ratio':>7} {'bar':>5}  result"]
    for goal, bf16, anchors, ours, bar in GOALS:
        a, o = min((medians[n] for n in anchors if n in medians), default=None), medians.get(ours)
        if a is None or o is None:
            lines.append(f"{goal:<62} {'-':>7} {bar:>5}  not run (skipped on this CPU or failed)")
            continue
        ratio = a / o
        verdict = "met" if ratio >= bar else "NOT met"
        if bf16 and not bf16_native:
            verdict += " (no native bf16 here: the goal is for AMX / AVX-512 BF16 CPUs)"
        lines.append(f"{goal:<62} {ratio:6.2f}x {bar:>4}x  {verdict}")
    return lines


def main(argv: list[str]) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "bench.json"
        cmd = [sys.executable, "-m", "pytest", *node_ids(), "--benchmark-only", f"--benchmark-json={report}", *argv]
        rc = subprocess.call(cmd, cwd=HERE.parent)
        if not report.is_file():
            print(f"pytest wrote no benchmark report (exit status {rc})", file=sys.stderr)
            return rc or 1
        data = json.loads(report.read_text())
    medians = {b["name"]: b["stats"]["median"] for b in data["benchmarks"]}
    print("\n".join(table(medians, native_bf16())))
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
