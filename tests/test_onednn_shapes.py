"""oneDNN keeps what it builds for every distinct product shape (a primitive, ~0.5 MB) in its cache, up to 1024 of
them; routed experts see another row count on almost every call. linear_nt sends at most MCSMOE_ONEDNN_SHAPES
distinct shapes (default 32) through oneDNN and the rest through at::mm, so a process's memory stays bounded.

Each case runs in a fresh process: the cap is read once per process."""
import json
import os
import subprocess
import sys

import pytest
import torch

_SCRIPT = r"""
import json, torch
from mcsmoe_fast import ops

def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20

torch.manual_seed(0)
d, ff = 512, 1792
w_in, w_out = torch.randn(1, ff, d) / d**0.5, torch.randn(1, d, ff) / ff**0.5
expert_map = torch.zeros(1, dtype=torch.long)

def run(t):  # every token on the one expert: products of t rows
    x = torch.randn(t, d)
    out = ops.grouped_expert_ffn(x, w_in, w_out, expert_map, torch.zeros(t, 1, dtype=torch.long),
                                 torch.ones(t, 1), "relu")
    ref = torch.relu(x @ w_in[0].T) @ w_out[0].T
    return (out - ref).abs().max().item() / ref.abs().max().item()

run(40)  # oneDNN's one-off set-up is not counted
start = rss_mb()
errors = [run(t) for t in range(41, 241)]  # 200 row counts, 400 product shapes
print(json.dumps({"growth_mb": rss_mb() - start, "max_error": max(errors)}))
"""


def _run(cap):
    env = dict(os.environ, MCSMOE_GEMM="onednn", MCSMOE_AUTOTUNE="0", OMP_NUM_THREADS="1")
    env.pop("MCSMOE_ONEDNN_SHAPES", None)
    if cap is not None:
        env["MCSMOE_ONEDNN_SHAPES"] = cap
    result = subprocess.run([sys.executable, "-c", _SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    return result


def _measure(cap):
    result = _run(cap)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_distinct_row_counts_do_not_grow_memory_without_bound():
    default = _measure(None)
    uncapped = _measure("100000")
    # both compute the product; at::mm past the cap rounds as MKL does
    assert default["max_error"] < 1e-5 and uncapped["max_error"] < 1e-5
    # the control shows what the cap prevents: every new shape keeps ~0.5 MB (measured 220 MB for these 400)
    assert uncapped["growth_mb"] > 100, uncapped
    assert default["growth_mb"] < 50, default  # at most 32 shapes' worth, ~18 MB


def test_a_cap_of_zero_never_runs_onednn():
    none = _measure("0")
    assert none["max_error"] < 1e-5
    assert none["growth_mb"] < 30, none


@pytest.mark.parametrize("value", ["many", "-1", "3.5"])
def test_a_bad_cap_is_refused_naming_the_variable(value):
    result = _run(value)
    assert result.returncode != 0
    assert f"MCSMOE_ONEDNN_SHAPES={value} is not a count" in result.stderr


_ORDER = r"""
import sys, torch
from mcsmoe_fast import ops
torch.use_deterministic_algorithms(sys.argv[1] == "deterministic")  # turns timing off as MCSMOE_AUTOTUNE=0 does
dtype = torch.bfloat16 if sys.argv[1] == "fp32_pin" else torch.float32
torch.manual_seed(0)
d, ff = 512, 1792
w_in, w_out = (torch.randn(1, ff, d) / d**0.5).to(dtype), (torch.randn(1, d, ff) / ff**0.5).to(dtype)
def run(t):
    x = torch.randn(t, d, generator=torch.Generator().manual_seed(t)).to(dtype)
    return ops.grouped_expert_ffn(x, w_in, w_out, torch.zeros(1, dtype=torch.long), torch.zeros(t, 1, dtype=torch.long),
                                  torch.ones(t, 1), "relu")
outs = [run(int(t)) for t in sys.argv[2:-1]]
torch.save(outs[-1], sys.argv[-1])
"""


@pytest.mark.parametrize("mode", ["autotune_off", "deterministic", "fp32_pin"])
def test_without_timing_a_product_rounds_alike_whatever_ran_before(mode, tmp_path):
    """A resumed run is a new process that has seen other shapes first; without timing (or with a pin other than
    onednn: here bf16 pinned to the fp32 GEMM), the backend of a product must not depend on them (cap 1: the first
    shape would take oneDNN's only place)."""
    env = dict(os.environ, MCSMOE_ONEDNN_SHAPES="1", OMP_NUM_THREADS="1")
    env.pop("MCSMOE_GEMM", None)
    env["MCSMOE_AUTOTUNE"] = "1" if mode == "deterministic" else "0"
    if mode == "fp32_pin":
        env["MCSMOE_GEMM"] = "fp32"
    outs = []
    for order in (["300", "257"], ["257"]):
        path = str(tmp_path / ("-".join(order) + ".pt"))
        subprocess.run([sys.executable, "-c", _ORDER, mode, *order, path], env=env, check=True, timeout=600)
        outs.append(torch.load(path))
    assert torch.equal(outs[0], outs[1])
