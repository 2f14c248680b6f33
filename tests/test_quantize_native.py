"""The extension's CPU block-FP8 quantization (csrc/ops/quantize.cpp, behind quant.quantize_fp8): the same bytes and
scales as the plain-PyTorch path (native=False) on fresh random weights in float32, bfloat16 and float16, ragged
blocks, zero blocks, values at and past the e4m3 range, NaN and inf, both scale formats; the plain path itself is
checked against transformers' quantizer in test_quant_formats.py. And clear errors for inputs the kernels cannot
take."""
from __future__ import annotations

import pytest
import torch

from mcsmoe_fast._ext import _C
from mcsmoe_fast.quant import dequantize_fp8, quantize_fp8
from native_helpers import record_calls


def _weights(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * torch.logspace(-4, 2, shape[-1]).view(*(1,) * (len(shape) - 1), -1)
    if w.numel() > 40:
        flat = w.view(-1)
        flat[3], flat[7], flat[11] = 0.0, -0.0, 1e-30  # signed zeros, an underflow
        w.view(*w.shape[:-2], -1)[..., :8] = 0.0  # the first rows' first columns: a zero block where blocks are small
    return w.to(dtype)


def _same(a, b):
    (qa, sa), (qb, sb) = a, b
    assert qa.dtype == qb.dtype and sa.dtype == sb.dtype and qa.shape == qb.shape and sa.shape == sb.shape
    assert torch.equal(qa.view(torch.uint8), qb.view(torch.uint8))
    assert torch.equal(sa.view(torch.uint8) if sa.dtype.itemsize == 1 else sa, sb.view(torch.uint8) if sb.dtype.itemsize == 1 else sb)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape,block", [((3, 256, 384), (128, 128)), ((2, 130, 129), (128, 128)), ((5, 7), (4, 3)),
                                         ((1, 2, 3, 9, 20), (8, 16))])
@pytest.mark.parametrize("scale_fmt,scale_dtype", [("float", torch.float32), ("ue8m0", torch.float32),
                                                   ("ue8m0", torch.float8_e8m0fnu)])
def test_native_quantize_equals_plain_pytorch(dtype, shape, block, scale_fmt, scale_dtype):
    w = _weights(shape, dtype, 1)
    native = quantize_fp8(w, block, scale_fmt, scale_dtype)
    _same(native, quantize_fp8(w, block, scale_fmt, scale_dtype, native=False))
    q, s = native
    assert (q.view(torch.uint8) != 0).any()
    back = dequantize_fp8(q, s, torch.float32, block)  # the round trip stays within one e4m3 step of w
    assert (back - w.float()).abs().max() <= w.float().abs().max() * 2.0 ** -3


def test_nan_inf_and_values_past_the_range():
    w = torch.randn(2, 16, 16)
    w[0, 0, 0], w[0, 5, 9], w[1, 3, 3], w[1, 8, 8] = float("nan"), float("inf"), -float("inf"), 1e30
    for scale in ("float", "ue8m0"):
        for native in (True, False):  # a block holding NaN or inf is refused (tests/test_ops_quant_fidelity2.py)
            with pytest.raises(ValueError, match=r"NaN or inf at \(0, 0, 0\)"):
                quantize_fp8(w, (8, 8), scale, native=native)
        finite = torch.where(w.isfinite(), w, torch.tensor(1e30))
        _same(quantize_fp8(finite, (8, 8), scale), quantize_fp8(finite, (8, 8), scale, native=False))
    scale = torch.full((2, 2, 2), 1e-3)  # the quotient saturates at +-448, NaN stays NaN
    q = torch.empty(2, 16, 16, dtype=torch.uint8)
    _C.quantize_fp8_into(w.contiguous(), scale, 8, 8, q)
    expected = torch.div(w, 1e-3).clamp(-448, 448).to(torch.float8_e4m3fn).view(torch.uint8)
    assert torch.equal(q, expected)
    amax = _C.fp8_block_amax_into(w, 8, 8, torch.empty(2, 2, 2))
    want = w.abs().view(2, 2, 8, 2, 8).amax(dim=(2, 4))
    assert torch.equal(torch.isnan(amax), torch.isnan(want)) and torch.equal(amax[~amax.isnan()], want[~want.isnan()])


def test_native_chooses_the_kernel(monkeypatch):
    import mcsmoe_fast.quant.fp8 as fp8

    calls = record_calls(monkeypatch, fp8)
    w = torch.randn(2, 8, 8)
    quantize_fp8(w, (4, 4), native=False)
    quantize_fp8(w.double(), (4, 4))  # float64: the PyTorch path
    quantize_fp8(torch.empty(0, 8, 8), (4, 4))  # nothing to quantize
    assert calls == []
    quantize_fp8(w, (4, 4))
    assert calls == ["fp8_block_amax_into", "quantize_fp8_into"]


def test_the_kernels_refuse_what_they_cannot_take():
    w, s = torch.zeros(2, 4, 4), torch.ones(2, 2, 2)
    with pytest.raises(ValueError, match="w must be float32, bfloat16 or float16"):
        _C.fp8_block_amax_into(w.double(), 2, 2, torch.empty(2, 2, 2))
    with pytest.raises(ValueError, match=r"w must be a contiguous CPU tensor \[N, rows, cols\]"):
        _C.fp8_block_amax_into(w.transpose(1, 2), 2, 2, torch.empty(2, 2, 2))
    with pytest.raises(ValueError, match=r"out must be a contiguous CPU float32 tensor \[2, 2, 2\]"):
        _C.fp8_block_amax_into(w, 2, 2, torch.empty(2, 2, 1))
    with pytest.raises(ValueError, match="block sizes must be positive"):
        _C.quantize_fp8_into(w, s, 2, 0, torch.empty(2, 4, 4, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"scale must be a contiguous CPU float32 tensor \[2, 2, 2\]"):
        _C.quantize_fp8_into(w, s.double(), 2, 2, torch.empty(2, 4, 4, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"out must be contiguous CPU uint8"):
        _C.quantize_fp8_into(w, s, 2, 2, torch.empty(2, 4, 4))
