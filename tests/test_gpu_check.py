"""benchmarks/gpu_check.sh, the one script a GPU session runs: without a visible GPU it stops at once with the
reason, instead of building, skipping every CUDA test and passing; every step imports the tree it built (the
device machine has no installed mcsmoe_fast), so the benchmarks started as `python3 benchmarks/x.py` find it."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="a GPU is visible: gpu_check.sh runs for real")
def test_gpu_check_stops_without_a_gpu(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable}
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh")], env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "torch sees no GPU: the CUDA tests would all be skipped" in done.stderr
    assert "build with CUDA" not in done.stdout  # nothing built


def test_gpu_check_puts_the_built_tree_first_on_the_import_path(tmp_path):
    """The script's own header (up to the first step) leaves the repository root first on PYTHONPATH."""
    script = (ROOT / "benchmarks" / "gpu_check.sh").read_text()
    header = script.split("\nstep ", 1)[0]
    done = subprocess.run(["bash", "-c", header.replace('cd "$(dirname "$0")/.."', f'cd "{ROOT}"')
                           + '\necho "PYTHONPATH=$PYTHONPATH"'],
                          env={**os.environ, "PYTHONPATH": "/elsewhere", "OUT": str(tmp_path)},
                          capture_output=True, text=True, timeout=60)
    assert f"PYTHONPATH={ROOT}:/elsewhere" in done.stdout, done.stdout + done.stderr
