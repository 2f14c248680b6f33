"""Reading and writing quantized checkpoints: the extension's one-pass CPU dequantization (csrc/ops/dequant.cpp) and
block-FP8 quantization (csrc/ops/quantize.cpp) against the plain-PyTorch path (native=False, the anchor: widen,
multiply by the block scales, cast; the MXFP4 codes looked up, ldexp'd, then transposed; block amax, divide, clamp,
cast), in the same run, bit-for-bit equal outputs checked before timing.

Shapes: DeepSeek-V3's routed experts (block-FP8, 4 experts of [2048, 7168] e4m3 with 128 x 128 scales) and GPT-OSS's
(MXFP4, 4 experts of [5760, 2880] read transposed into the module's [2880, 5760]: `gate_up_proj`), into bfloat16 (the
working dtype) and float32; the FP8 quantization of the same DeepSeek-V3 bank from bfloat16.

Run:  python -m pytest benchmarks/bench_quant_kernels.py --benchmark-only   (about a minute on 2 cores, idle machine)
extra_info: params_per_s (dequantized values a second).
"""
from __future__ import annotations

import pytest
import torch

from mcsmoe_fast.quant import dequantize_fp8, quantize_fp8
from mcsmoe_fast.quant.mxfp4 import dequantize_mxfp4_into

EXPERTS = 4
FP8_SHAPE = (EXPERTS, 2048, 7168)
MXFP4_SHAPE = (EXPERTS, 5760, 2880)  # [E, out, in] as stored: blocks [E, out, in / 32, 16]


def _fp8():
    g = torch.Generator().manual_seed(0)
    weight = torch.randint(0, 256, FP8_SHAPE, generator=g, dtype=torch.uint8)
    weight[(weight & 0x7F) == 0x7F] = 0  # no NaN codes: real weights have none
    scale = torch.rand(EXPERTS, FP8_SHAPE[1] // 128, FP8_SHAPE[2] // 128, generator=g) * 1e-3
    return weight.view(torch.float8_e4m3fn), scale


def _mxfp4():
    g = torch.Generator().manual_seed(1)
    e, rows, cols = MXFP4_SHAPE
    blocks = torch.randint(0, 256, (e, rows, cols // 32, 16), generator=g, dtype=torch.uint8)
    scales = torch.randint(115, 130, (e, rows, cols // 32), generator=g, dtype=torch.uint8)
    return blocks, scales


CANDIDATES = [("plain_pytorch", False), ("native", True)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("name,native", CANDIDATES, ids=[c[0] for c in CANDIDATES])
def test_fp8_block_dequantize(benchmark, name, native, dtype):
    weight, scale = _fp8()
    out = torch.empty(FP8_SHAPE, dtype=dtype)
    reference = dequantize_fp8(weight, scale, dtype, native=False)
    assert torch.equal(dequantize_fp8(weight, scale, dtype, out=out, native=native), reference)
    benchmark.group = f"fp8 dequantize {'x'.join(map(str, FP8_SHAPE))} -> {str(dtype).removeprefix('torch.')}"
    benchmark.pedantic(dequantize_fp8, args=(weight, scale, dtype), kwargs=dict(out=out, native=native),
                       rounds=5, warmup_rounds=1)
    benchmark.extra_info["anchor"] = not native
    if benchmark.stats is not None:  # None under --benchmark-disable
        benchmark.extra_info["params_per_s"] = f"{weight.numel() / benchmark.stats.stats.median / 1e6:.0f}M"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("name,native", CANDIDATES, ids=[c[0] for c in CANDIDATES])
def test_mxfp4_dequantize_transposed(benchmark, name, native, dtype):
    blocks, scales = _mxfp4()
    e, rows, cols = MXFP4_SHAPE
    out = torch.empty(e, cols, rows, dtype=dtype)

    def read():  # as QuantizedFiles.read_into reads a GPT-OSS bank: one expert at a time, transposed
        for k in range(e):
            dequantize_mxfp4_into(blocks[k], scales[k], out[k], transpose=True, native=native)
        return out

    reference = torch.empty_like(out)
    for k in range(e):
        dequantize_mxfp4_into(blocks[k], scales[k], reference[k], transpose=True, native=False)
    assert torch.equal(read(), reference)
    benchmark.group = f"mxfp4 dequantize {'x'.join(map(str, MXFP4_SHAPE))}^T -> {str(dtype).removeprefix('torch.')}"
    benchmark.pedantic(read, rounds=5, warmup_rounds=1)
    benchmark.extra_info["anchor"] = not native
    if benchmark.stats is not None:  # None under --benchmark-disable
        benchmark.extra_info["params_per_s"] = f"{e * rows * cols / benchmark.stats.stats.median / 1e6:.0f}M"


@pytest.mark.parametrize("name,native", CANDIDATES, ids=[c[0] for c in CANDIDATES])
def test_fp8_block_quantize(benchmark, name, native):
    weight, scale = _fp8()
    w = dequantize_fp8(weight, scale, torch.bfloat16)  # a bf16 bank with FP8-like block structure
    q, s = quantize_fp8(w, native=native)
    reference = quantize_fp8(w, native=False)
    assert torch.equal(q.view(torch.uint8), reference[0].view(torch.uint8)) and torch.equal(s, reference[1])
    benchmark.group = f"fp8 quantize {'x'.join(map(str, FP8_SHAPE))} bfloat16 -> e4m3"
    benchmark.pedantic(quantize_fp8, args=(w,), kwargs=dict(native=native), rounds=5, warmup_rounds=1)
    benchmark.extra_info["anchor"] = not native
    if benchmark.stats is not None:  # None under --benchmark-disable
        benchmark.extra_info["params_per_s"] = f"{w.numel() / benchmark.stats.stats.median / 1e6:.0f}M"
