"""One batch's forward through a decoder layer holds temporaries (attention scores, the experts' intermediates) that
scale with the batch's tokens; the streamed runs count them (memory.forward_bytes) and the streamed perplexity, whose
batch size is its own choice, runs fewer windows per forward under a budget (same perplexity)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import mcsmoe_fast.streaming.perplexity as streamed
from mcsmoe_fast.streaming.memory import token_forward_bytes
from mcsmoe_fast.streaming.prune import prune_checkpoint
from mcsmoe_fast.tiny import tiny_mixtral


def _windows(n, length, seed=0):
    return torch.randint(3, 100, (n, length), generator=torch.Generator().manual_seed(seed))


def test_under_a_budget_the_perplexity_runs_fewer_windows_a_forward(tmp_path, monkeypatch):
    tiny_mixtral().save_pretrained(tmp_path / "m")
    sizes, prepare = [], streamed.prepare_batches
    monkeypatch.setattr(streamed, "prepare_batches", lambda b, *a: sizes.append([len(x["input_ids"]) for x in b])
                        or prepare(b, *a))
    windows = _windows(20, 9)
    free = streamed.streamed_perplexity(tmp_path / "m", windows, progress=False)
    tight = streamed.streamed_perplexity(tmp_path / "m", windows, max_memory="1MB", progress=False)
    assert sizes[0] == [20] and max(sizes[1]) < 20 and sum(sizes[1]) == 20, sizes
    assert tight == pytest.approx(free, rel=1e-5)


def test_the_estimate_grows_with_the_window_and_the_experts_width():
    small = tiny_mixtral().config
    wide = tiny_mixtral(intermediate_size=4 * small.intermediate_size).config
    assert token_forward_bytes(wide, 9, torch.float32) > token_forward_bytes(small, 9, torch.float32)
    assert token_forward_bytes(small, 900, torch.float32) > token_forward_bytes(small, 9, torch.float32)
    assert token_forward_bytes(small, 9, torch.bfloat16) < token_forward_bytes(small, 9, torch.float32)


def test_a_prune_below_its_floor_says_so(tmp_path):
    tiny_mixtral(num_layers=2).save_pretrained(tmp_path / "m")
    batches = [{"input_ids": _windows(2, 7)}]
    with pytest.warns(UserWarning, match="max_memory 1000B is below what pruning one layer needs") as caught:
        prune_checkpoint(tmp_path / "m", tmp_path / "out", batches, num_experts=2, max_memory="1KB", progress=False)
    assert {w.filename for w in caught if "below what" in str(w.message)} == {__file__}  # the caller's line


_MEASURE = r"""
import json, sys, torch
from mcsmoe_fast.streaming.memory import rss_bytes
def peak():  # VmHWM starts anew at exec (ru_maxrss keeps the parent's peak across fork and exec)
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
from mcsmoe_fast.streaming.perplexity import streamed_perplexity
torch.set_num_threads(1)
small, big = sys.argv[1], sys.argv[2]
windows = torch.randint(3, 100, (64, 256), generator=torch.Generator().manual_seed(0))
streamed_perplexity(small, windows[:1, :8], max_memory="1KB", progress=False)  # lazy imports are not the run's
base = rss_bytes()
value = streamed_perplexity(big, windows, max_memory="100MB", progress=False)
print(json.dumps({"growth": peak() - base, "ppl": value}))
"""


def test_a_streamed_perplexity_keeps_its_budget(tmp_path):
    """4 layers of 26 MiB (Mixtral d 256, ff 1024, 8 experts, float32), 64 windows of 256 tokens, max_memory 100MB:
    the batch of 32 windows the call asks for held 332 MiB above the process's baseline (measured); now one forward
    takes what the budget leaves (65 MiB measured)."""
    tiny_mixtral(num_layers=1).save_pretrained(tmp_path / "small")
    tiny_mixtral(num_experts=8, hidden_size=256, intermediate_size=1024, num_layers=4).save_pretrained(tmp_path / "big")
    result = subprocess.run([sys.executable, "-c", _MEASURE, str(tmp_path / "small"), str(tmp_path / "big")],
                            capture_output=True, text=True, timeout=900, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stderr
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    assert measured["growth"] <= 1.25 * 100e6, (measured, result.stderr[-3000:])


def test_the_estimate_reads_what_it_can_of_other_configs():
    """Fields the families name otherwise (Switch's num_heads / d_ff, per-layer lists, a top-k under another name)
    are read; a field it cannot read falls back instead of stopping the run."""
    from types import SimpleNamespace

    base = dict(hidden_size=16, num_attention_heads=2, intermediate_size=64, num_experts_per_tok=2)
    plain = token_forward_bytes(SimpleNamespace(**base), 4, torch.float32)
    assert token_forward_bytes(SimpleNamespace(hidden_size=16, num_heads=2, d_ff=64, num_experts_per_tok=2), 4,
                               torch.float32) == plain
    assert token_forward_bytes(SimpleNamespace(**{**base, "num_attention_heads": [1, 2]}), 4, torch.float32) == plain
    assert token_forward_bytes(SimpleNamespace(**{**base, "num_experts_per_tok": None, "moe_topk": 2}), 4,
                               torch.float32) == plain
    odd = SimpleNamespace(**{**base, "intermediate_size": [[64, 32]], "num_attention_heads": "many"})
    assert token_forward_bytes(odd, 4, torch.float32) > 0
