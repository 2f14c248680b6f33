"""benchmarks/cpu_goals.py's arithmetic on made-up medians: each goal's ratio (best anchor over ours), its
ceiling (best anchor over the floor), the verdicts, the median and range over several runs, and that every
benchmark a goal reads is one the script runs."""
import importlib.util
import re
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture(scope="module")
def goals():
    spec = importlib.util.spec_from_file_location("cpu_goals", BENCH / "cpu_goals.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def row(lines, goal):
    return next(line for line in lines if line.startswith(goal))


def numbers(line):
    return [float(v) for v in re.findall(r"(\d+\.\d+)x", line)]


def test_ratio_ceiling_and_verdicts_of_one_run(goals):
    plain, linear_ours, floor = (goals.LINEAR.format(c) for c in ("plain", "ours", "gemm_floor"))
    dense = goals.LINEAR.format("dense")
    medians = {dense: 12.0, plain: 2.6, linear_ours: 2.0, floor: 2.2}
    lines = goals.table([medians], True)
    assert lines[1].split() == ["goal", "ratio", "bar", "ceiling", "result"]
    vs_dense = row(lines, "compressed linear 768->3072 T512 fp32 vs dense F.linear")
    assert numbers(vs_dense) == [6.0, 5.5, pytest.approx(5.45, abs=0.01)] and vs_dense.endswith("  met")
    vs_plain = row(lines, "compressed linear 768->3072 T512 fp32 vs plain composition")
    assert numbers(vs_plain) == [1.3, 1.25, pytest.approx(1.18, abs=0.01)] and vs_plain.endswith("  met")
    medians[linear_ours] = 2.5  # 1.04x: not met, and the ceiling 1.18x is below the bar
    vs_plain = row(goals.table([medians], True), "compressed linear 768->3072 T512 fp32 vs plain composition")
    assert vs_plain.endswith("NOT met (the bar is above this CPU's ceiling)")
    medians[floor] = 1.5  # ceiling 1.73x: attainable, so no excuse is printed
    vs_plain = row(goals.table([medians], True), "compressed linear 768->3072 T512 fp32 vs plain composition")
    assert vs_plain.endswith("  NOT met")
    block = row(lines, "merged block d512 ff1792 8->4 T512 fp32 vs grouped_mm")
    assert "not run" in block, "a goal whose medians are missing says so"


def test_the_best_anchor_and_the_bf16_mark(goals):
    eager, grouped, ours = (goals.SMALL.format("bf16", c) for c in ("eager", "grouped_mm", "mcsmoe_fast"))
    medians = {eager: 9.0, grouped: 6.0, ours: 3.0}
    goal = "merged block bf16 vs best transformers bf16"
    assert numbers(row(goals.table([medians], True), goal))[0] == 2.0, "the faster anchor (grouped_mm) counts"
    assert row(goals.table([medians], True), goal).endswith("  met")
    assert "no native bf16 here" in row(goals.table([medians], False), goal)


def test_several_runs_give_the_median_ratio_and_the_range(goals):
    gm, ours, floor = (goals.SMALL.format("fp32", c) for c in ("grouped_mm", "mcsmoe_fast", "dense_gemm_floor"))
    runs = [{gm: 10.0, ours: 10 / r, floor: 10 / c} for r, c in ((1.2, 1.3), (1.9, 2.0), (1.3, 1.4))]
    lines = goals.table(runs, True)
    assert lines[0].endswith("; 3 runs")
    block = row(lines, "merged block d512 ff1792 8->4 T512 fp32 vs grouped_mm")
    assert numbers(block)[:3] == [1.3, 1.5, 1.4], block  # median ratio, bar, median ceiling (not the mean)
    assert block.endswith("NOT met (the bar is above this CPU's ceiling); runs 1.20-1.90x"), block


def test_every_benchmark_a_goal_reads_is_run(goals):
    run = {node.split("::")[1] for node in goals.node_ids()}
    for goal, _, anchors, ours, _, *floor in goals.GOALS:
        for name in (*anchors, ours, *floor):
            assert name in run, f"{goal}: {name} is not among the benchmarks cpu_goals.py runs"


@pytest.mark.parametrize("argv,expected", [(["-q"], (1, ["-q"])), (["--runs", "4", "-x"], (4, ["-x"]))])
def test_runs_option(goals, argv, expected):
    assert goals.split_runs(argv) == expected


def test_runs_below_one_are_refused(goals):
    with pytest.raises(SystemExit, match="--runs must be >= 1, got 0"):
        goals.split_runs(["--runs", "0"])
