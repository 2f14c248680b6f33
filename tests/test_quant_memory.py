"""The streamed merge's memory plan counts what a quantized source adds to one layer (streaming/memory.py
requantization_bytes): the float32 temporary of one dequantized matrix, the ErrorProbe's calibration samples and
the error report's float32 copies (one merged slot and its re-quantized values at a time for the exact format, the
whole re-quantized banks twice for the standard format). The arithmetic, not timings: numbers worked out by hand
from the tiny model's config."""
from __future__ import annotations

import pytest
import torch

import mcsmoe_fast.streaming.pipeline as pipeline
from mcsmoe_fast.streaming import merge_checkpoint
from mcsmoe_fast.streaming.memory import plan_memory, requantization_bytes
from mcsmoe_fast.streaming.quantized import PROBE_TOKENS, quantize_checkpoint
from mcsmoe_fast.tiny import tiny_mixtral
from merge_helpers import calibration
from test_quantized_merge import FP8

E, D, FF, TOP_K = 4, 128, 96, 2
BANK = E * (2 * FF * D + D * FF)  # one layer's gate_up_proj [E, 2ff, d] + down_proj [E, d, ff]
SLOT = BANK // E
MATRIX = 2 * FF * D  # the largest matrix: one expert's gate_up rows
SAMPLE = PROBE_TOKENS * (D * 2 + 16 * TOP_K)  # bf16 hidden states, int64 index and float weights per token


def test_requantization_bytes_arithmetic():
    assert requantization_bytes(10, 80, 6, 100, None) == 4 * 6
    assert requantization_bytes(10, 80, 6, 100, "exact") == 4 * 6 + 100 + 2 * 4 * 10
    assert requantization_bytes(10, 80, 6, 100, "standard") == 4 * 6 + 100 + 2 * 4 * 80
    with pytest.raises(ValueError, match="report: expected None, 'exact' or 'standard', got 'dense'"):
        requantization_bytes(10, 80, 6, 100, "dense")


def test_the_plan_reserves_them_before_the_hidden_states():
    """The floor grows by the reserved bytes, so hidden states that would fit beside a plain layer go to a file."""
    plain = plan_memory(10**9, 10**8, 10**6, 5 * 10**8, 10**7)
    quantized = plan_memory(10**9, 10**8, 10**6, 5 * 10**8, 10**7, quantized_bytes=3 * 10**8)
    assert quantized.layer_floor == plain.layer_floor + 3 * 10**8 == 2 * 10**8 + quantized.matching_bytes + 3 * 10**8
    assert not plain.offload and quantized.offload
    assert plan_memory(None, 10**8, 10**6, 1, quantized_bytes=7).quantized_bytes == 7


@pytest.fixture(scope="module")
def fp8(tmp_path_factory):
    root = tmp_path_factory.mktemp("quant-memory")
    tiny_mixtral(num_experts=E, hidden_size=D, intermediate_size=FF).save_pretrained(root / "plain")
    quantize_checkpoint(root / "plain", root / "fp8", FP8)
    return root, calibration(tiny_mixtral(num_layers=1), seed=3, batches=2, batch=2, length=6)


@pytest.mark.parametrize("options, expected", [
    (dict(globally=False), 4 * MATRIX + SAMPLE + 2 * 4 * SLOT),  # merged in the statistics pass: one layer's samples
    (dict(globally=True), 4 * MATRIX + 2 * SAMPLE + 2 * 4 * SLOT),  # two passes: both layers' samples held
    (dict(format="standard"), 4 * MATRIX + SAMPLE + 2 * 4 * BANK),
    (dict(globally=False, keep_quantization=False), 4 * MATRIX),  # dequantized output: reading only
])
def test_merge_checkpoint_plans_with_them(fp8, tmp_path, monkeypatch, options, expected):
    root, batches = fp8
    seen = []
    plan = pipeline.plan_memory
    monkeypatch.setattr(pipeline, "plan_memory", lambda *a, **k: seen.append(a[5]) or plan(*a, **k))
    merge_checkpoint(root / "fp8", tmp_path / "out", batches, 2, progress=False, max_memory="1GB", **options)
    assert seen == [expected]
    seen.clear()
    merge_checkpoint(root / "plain", tmp_path / "plain-out", batches, 2, progress=False, max_memory="1GB", **options)
    assert seen == [0]  # a plain source adds nothing



def test_a_budget_fixes_glibcs_mmap_threshold(monkeypatch):
    """Keeping a budget sets glibc's mmap threshold to 1 MiB (freed large temporaries unmapped at once, not carved
    from the heap after glibc's dynamic threshold has grown past them); no budget leaves malloc alone."""
    import mcsmoe_fast.streaming.memory as memory

    calls = []

    class FakeLibc:
        def mallopt(self, param, value):
            calls.append((param, value))
            return 1

    monkeypatch.setattr(memory, "_libc", FakeLibc())
    plan_memory(None, 10**6, 10**3, 10**3)
    assert calls == []
    plan_memory("1GB", 10**6, 10**3, 10**3)
    assert calls == [(-3, 1 << 20)]  # M_MMAP_THRESHOLD
    monkeypatch.setattr(memory, "_libc", False)  # not glibc: nothing to set
    assert memory.fix_mmap_threshold() is False
