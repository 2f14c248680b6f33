"""The extension's CPU dequantization (csrc/ops/dequant.cpp, behind quant.dequantize_fp8 / dequantize_mxfp4 /
dequantize_mxfp4_into): bit for bit the plain-PyTorch path (native=False) on fresh random bytes, every byte value
(NaN codes, subnormals, the e8m0 extremes), ragged blocks and odd shapes, into float32, bfloat16 and float16, with
and without a transposed output; the plain path itself is checked against transformers' dequantization in
test_quant_formats.py. And clear errors for inputs the kernels cannot take."""
from __future__ import annotations

import pytest
import torch

from mcsmoe_fast._ext import _C
from mcsmoe_fast.quant import dequantize_fp8, dequantize_mxfp4
from mcsmoe_fast.quant.mxfp4 import dequantize_mxfp4_into
from native_helpers import record_calls

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _same(a: torch.Tensor, b: torch.Tensor) -> None:
    """Equal values, NaN where the other has NaN, and the sign of every zero."""
    assert a.dtype == b.dtype and a.shape == b.shape
    nan = torch.isnan(a)
    assert torch.equal(nan, torch.isnan(b))
    assert torch.equal(a[~nan], b[~nan]) and torch.equal(torch.signbit(a[~nan]), torch.signbit(b[~nan]))


def _bytes(shape, seed):
    return torch.randint(0, 256, shape, generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,block", [((3, 256, 384), (128, 128)), ((2, 130, 129), (128, 128)),
                                         ((5, 7), (4, 3)), ((1, 2, 3, 9, 20), (8, 16)), ((0, 4, 4), (2, 2))])
@pytest.mark.parametrize("scales", ["float", "e8m0", "tiny"])
def test_fp8_native_equals_plain_pytorch(dtype, shape, block, scales):
    weight = _bytes(shape, 1).view(torch.float8_e4m3fn)  # every code: NaN (0x7f, 0xff), subnormals, +-0
    grid = (*shape[:-2], -(-shape[-2] // block[0]), -(-shape[-1] // block[1]))
    g = torch.Generator().manual_seed(2)
    scale = {"float": lambda: torch.rand(grid, generator=g) * 0.01,
             "e8m0": lambda: torch.randint(100, 140, grid, generator=g, dtype=torch.uint8).view(torch.float8_e8m0fnu),
             "tiny": lambda: torch.full(grid, 2.0 ** -140)}[scales]()  # float32 subnormal products
    native = dequantize_fp8(weight, scale, dtype, block)
    _same(native, dequantize_fp8(weight, scale, dtype, block, native=False))
    if weight.numel():
        assert torch.isnan(native).any() and (native != 0).any()


def test_fp8_native_writes_into_a_non_contiguous_out():
    weight, scale = _bytes((2, 8, 6), 3).view(torch.float8_e4m3fn), torch.rand(2, 2, 2)
    out = torch.zeros(2, 6, 8).transpose(-1, -2)
    assert dequantize_fp8(weight, scale, block=(4, 3), out=out) is out
    _same(out, dequantize_fp8(weight, scale, block=(4, 3), native=False))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lead,rows,groups,cols", [((3,), 40, 3, 96), ((2,), 17, 2, 50), ((), 5, 1, 1),
                                                   ((2, 2), 3, 4, 127), ((1,), 0, 2, 64), ((2,), 4, 0, 0)])
def test_mxfp4_native_equals_plain_pytorch(dtype, lead, rows, groups, cols):
    blocks = _bytes((*lead, rows, groups, 16), 4)
    scales = _bytes((*lead, rows, groups), 5) % 255  # every exponent but 255 (NaN in the MX format: refused)
    native = dequantize_mxfp4(blocks, scales, dtype, cols=cols)
    _same(native, dequantize_mxfp4(blocks, scales, dtype, cols=cols, native=False))
    for native_flag in (True, False):
        out = torch.empty((*lead, cols, rows), dtype=dtype)
        assert dequantize_mxfp4_into(blocks, scales, out, transpose=True, native=native_flag) is out
        _same(out, native.transpose(-1, -2))


def test_mxfp4_one_row_and_a_non_contiguous_out():
    blocks, scales = _bytes((3, 16), 6), torch.full((3,), 127, dtype=torch.uint8)
    _same(dequantize_mxfp4(blocks, scales), dequantize_mxfp4(blocks, scales, native=False))
    blocks, scales = _bytes((2, 6, 2, 16), 7), _bytes((2, 6, 2), 8)
    out = torch.zeros(2, 64, 6).transpose(-1, -2)  # [2, 6, 64] seen through a transpose
    dequantize_mxfp4_into(blocks, scales, out)
    _same(out, dequantize_mxfp4(blocks, scales, native=False))


def test_the_e2m1_table_and_the_e8m0_scale_by_hand():
    blocks = torch.tensor([[[0x10 * hi + lo for lo, hi in zip(range(0, 16, 2), range(1, 16, 2))] * 2]],
                          dtype=torch.uint8)  # [1, 1, 16]: codes 0..15 twice
    codes = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0] * 2
    for byte, factor in ((127, 1.0), (130, 8.0), (0, 2.0 ** -127)):
        got = dequantize_mxfp4(blocks, torch.tensor([[byte]], dtype=torch.uint8))[0]
        want = torch.tensor(codes) * torch.tensor(factor)
        _same(got, want)
    weight = torch.tensor([[0x00, 0x01, 0x08, 0x38, 0x7E, 0x7F, 0x80, 0xFE]], dtype=torch.uint8)
    got = dequantize_fp8(weight.view(torch.float8_e4m3fn), torch.tensor([[2.0]]), block=(1, 8))
    _same(got, torch.tensor([[0.0, 2.0 ** -9, 2.0 ** -6, 1.0, 448.0, float("nan"), -0.0, -448.0]]) * 2.0)


def test_the_kernels_refuse_what_they_cannot_take():
    w, s, out = torch.zeros(2, 4, 4, dtype=torch.uint8), torch.ones(2, 2, 2), torch.empty(2, 4, 4)
    with pytest.raises(ValueError, match="out must be float32, bfloat16 or float16"):
        _C.dequantize_fp8_into(w, s, 2, 2, out.double())
    with pytest.raises(ValueError, match=r"scale must be float32 \[2, 2, 2\]"):
        _C.dequantize_fp8_into(w, torch.ones(2, 2, 1), 2, 2, out)
    with pytest.raises(ValueError, match="block sizes must be positive"):
        _C.dequantize_fp8_into(w, s, 0, 2, out)
    with pytest.raises(ValueError, match="weight must be a contiguous CPU tensor"):
        _C.dequantize_fp8_into(w.transpose(1, 2), s, 2, 2, out)
    with pytest.raises(ValueError, match=r"out must be \[2, 4, 4\]"):
        _C.dequantize_fp8_into(w, s, 2, 2, torch.empty(2, 4, 3))
    b, e = torch.zeros(2, 3, 2, 16, dtype=torch.uint8), torch.zeros(2, 3, 2, dtype=torch.uint8)
    with pytest.raises(ValueError, match="hold 33..64 columns, out has 32"):
        _C.dequantize_mxfp4_into(b, e, False, torch.empty(2, 3, 32))
    with pytest.raises(ValueError, match=r"scales must be \[N, rows, G\]"):
        _C.dequantize_mxfp4_into(b, e[:, :2].contiguous(), False, torch.empty(2, 3, 64))
    with pytest.raises(ValueError, match=r"out must be \[N, cols, rows\]"):
        _C.dequantize_mxfp4_into(b, e, True, torch.empty(2, 3, 64))
    with pytest.raises(ValueError, match=r"out: expected \[\.\.\., rows, cols\] with 32 < cols <= 64"):
        dequantize_mxfp4_into(b, e, torch.empty(2, 3, 65))
    with pytest.raises(ValueError, match=r"out: expected \[\.\.\., cols, rows\]"):
        dequantize_mxfp4_into(b, e, torch.empty(2, 3, 64), transpose=True)


def test_native_chooses_the_kernel(monkeypatch):
    """native=True (the default) on the CPU goes through the extension, native=False never does; a CUDA tensor or a
    float64 output would take the PyTorch path (quant.grid.native_applies)."""
    import mcsmoe_fast.quant.fp8 as fp8
    import mcsmoe_fast.quant.mxfp4 as mxfp4
    from mcsmoe_fast.quant.grid import native_applies

    calls = record_calls(monkeypatch, fp8, mxfp4)
    w, s = _bytes((2, 4, 4), 9).view(torch.float8_e4m3fn), torch.rand(2, 1, 1)
    b, e = _bytes((2, 3, 1, 16), 10), _bytes((2, 3, 1), 11)
    for native in (False, True):
        dequantize_fp8(w, s, block=(4, 4), native=native)
        dequantize_mxfp4(b, e, native=native)
        dequantize_mxfp4_into(b, e, torch.empty(2, 32, 3), transpose=True, native=native)
    assert calls == ["dequantize_fp8_into", "dequantize_mxfp4_into", "dequantize_mxfp4_into"]
    calls.clear()
    dequantize_fp8(w, s, torch.float64, block=(4, 4))
    assert calls == [] and not native_applies(torch.empty(1, dtype=torch.float64))
    assert not native_applies(torch.empty(1, device="meta"), w) and native_applies(torch.empty(1, dtype=torch.half), w)
