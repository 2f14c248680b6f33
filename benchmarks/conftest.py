"""Shared benchmark reporting: every benchmark group holds one anchor (extra_info["anchor"] = True)
and the candidates measured in the same run; the summary prints each candidate as a ratio against
its group's anchor (anchor median / candidate median: > 1 means faster than the anchor). A benchmark
whose test failed (its output check included) is left out of the summary and of --benchmark-json: a
wrong result never shows as a speed-up."""
from __future__ import annotations

import sys
from collections import defaultdict
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from cpu_info import cpu_line  # noqa: E402


def pytest_report_header(config):
    return cpu_line()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    report = (yield).get_result()
    fixture = getattr(item, "funcargs", {}).get("benchmark")
    if report.failed and fixture is not None:
        fixture.has_error = True  # pytest-benchmark then leaves its timing out of its table and its JSON


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    session = getattr(config, "_benchmarksession", None)
    if session is None or not session.benchmarks:
        return
    groups = defaultdict(list)
    for bench in session.benchmarks:
        if bench and not bench.has_error:
            groups[bench.group].append(bench)
    lines = []
    for group, benches in groups.items():
        anchors = [b for b in benches if b.extra_info.get("anchor")]
        if not anchors:
            continue
        anchor = anchors[0]
        for b in benches:
            if b is anchor:
                continue
            ratio = anchor.stats.median / b.stats.median
            extra = "".join(f"  {k}={v}" for k, v in b.extra_info.items() if k != "anchor")
            lines.append(f"{group:<42} {b.name:<48} {ratio:7.2f}x vs {anchor.name}{extra}")
    if lines:
        terminalreporter.write_sep("=", "speed-up against the anchor of each group (median times, same run)")
        terminalreporter.write_line(cpu_line())
        for line in lines:
            terminalreporter.write_line(line)
