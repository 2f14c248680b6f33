"""The quantized formats against independent plain-PyTorch references written from the formats' definitions (not
from the package's own plain path): e4m3fn (bias 7, max 448, no infinities, NaN = S.1111.111), e8m0 (2^(byte-127),
255 = NaN) and e2m1 (OCP microscaling: S.EE.M, bias 1, codes 0, 0.5, 1, 1.5, 2, 3, 4, 6), block scales over ragged
grids; round-to-nearest-even, saturation, signed zeros, the extremes of the scale range, non-contiguous and
zero-size inputs, every output dtype; and the streamed merge of block-FP8 / MXFP4 sources against the in-memory
pipeline (dequantized, and written back in the source's precision)."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from mcsmoe_fast._ext import _C
from mcsmoe_fast.quant import dequantize_fp8, dequantize_mxfp4, quantize_fp8, quantize_mxfp4
from mcsmoe_fast.quant.mxfp4 import dequantize_mxfp4_into

E4M3, E8M0 = torch.float8_e4m3fn, torch.float8_e8m0fnu
OUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# --- the references (from the specs) ------------------------------------------------------------------
def _e4m3_value(byte: int) -> float:
    sign = -1.0 if byte & 0x80 else 1.0
    exponent, mantissa = (byte >> 3) & 0xF, byte & 7
    if exponent == 0xF and mantissa == 7:
        return float("nan")
    if exponent == 0:
        return sign * mantissa / 8 * 2.0 ** -6  # subnormal
    return sign * (1 + mantissa / 8) * 2.0 ** (exponent - 7)


E4M3_TABLE = torch.tensor([_e4m3_value(b) for b in range(256)], dtype=torch.float64)
E4M3_MAGNITUDES = E4M3_TABLE[:0x7F]  # codes 0x00..0x7e: 0 .. 448, ascending
E2M1_MAGNITUDES = torch.tensor([0, 0.5, 1, 1.5, 2, 3, 4, 6], dtype=torch.float64)


def _nearest_code(x: torch.Tensor, magnitudes: torch.Tensor, sign_bit: int) -> torch.Tensor:
    """Round-to-nearest, ties to the even code, saturating at the largest magnitude; the sign bit from x's sign bit
    (-0 keeps it); NaN -> all-ones magnitude (e4m3fn's NaN)."""
    x = x.double()
    a = x.abs().clamp(max=magnitudes[-1].item())
    hi = torch.searchsorted(magnitudes, a).clamp(max=len(magnitudes) - 1)
    lo = (hi - 1).clamp(min=0)
    d_lo, d_hi = (a - magnitudes[lo]).abs(), (magnitudes[hi] - a).abs()
    code = torch.where(d_lo < d_hi, lo, torch.where(d_hi < d_lo, hi, torch.where(lo % 2 == 0, lo, hi)))
    code = torch.where(torch.isnan(x), torch.full_like(code, sign_bit - 1), code)
    return (code + sign_bit * torch.signbit(x).long()).to(torch.uint8)


def ref_e4m3_encode(x: torch.Tensor) -> torch.Tensor:
    return _nearest_code(x, E4M3_MAGNITUDES, 0x80)


def ref_e2m1_encode(x: torch.Tensor) -> torch.Tensor:
    return _nearest_code(x, E2M1_MAGNITUDES, 8)


def ref_e8m0(byte: torch.Tensor) -> torch.Tensor:
    v = torch.pow(torch.tensor(2.0, dtype=torch.float64), byte.double() - 127)
    return torch.where(byte.long() == 255, torch.tensor(float("nan"), dtype=torch.float64), v)


def _expand(scale: torch.Tensor, block, rows: int, cols: int) -> torch.Tensor:
    return scale.repeat_interleave(block[0], -2)[..., :rows, :].repeat_interleave(block[1], -1)[..., :cols]


def ref_fp8_dequantize(q: torch.Tensor, scale64: torch.Tensor, block, dtype) -> torch.Tensor:
    """Exact product (float64 holds 4 x 24 bits), then one float32 rounding (transformers' Fp8Dequantize multiplies
    in float32), then the output dtype."""
    rows, cols = q.shape[-2:]
    values = E4M3_TABLE[q.contiguous().view(torch.uint8).long()]
    return (values * _expand(scale64, block, rows, cols)).float().to(dtype)


def _smallest_pow2_exponent(amax: torch.Tensor, top: float, lo: int = -200, hi: int = 200) -> torch.Tensor:
    """The smallest k with amax <= top * 2^k, by enumeration (exact in float64); 0 for amax 0."""
    ks = torch.arange(lo, hi, dtype=torch.float64)
    ok = amax.double().unsqueeze(-1) <= top * torch.pow(2.0, ks)
    k = ks[ok.double().argmax(-1)]
    return torch.where(amax > 0, k, torch.zeros_like(k)).long()


def _block_amax(w: torch.Tensor, block) -> torch.Tensor:
    rows, cols = w.shape[-2:]
    nr, nc = -(-rows // block[0]), -(-cols // block[1])
    a = torch.nn.functional.pad(w.abs().double(), (0, nc * block[1] - cols, 0, nr * block[0] - rows))
    return a.reshape(*w.shape[:-2], nr, block[0], nc, block[1]).amax(dim=(-3, -1))


def ref_fp8_quantize(w: torch.Tensor, block, scale_fmt: str):
    """(e4m3 bytes, float32 scales): scale amax / 448 (float32) or the smallest power of two 2^k with amax / 2^k <=
    448, 1 for a zero block; each value w / scale in float32, saturated to +-448, rounded to nearest even."""
    amax = _block_amax(w, block)
    if scale_fmt == "float":
        s = (amax.float() / 448).double()
    else:
        s = torch.pow(2.0, _smallest_pow2_exponent(amax, 448.0).double())
    s = torch.where(amax > 0, s, torch.ones_like(s)).float()
    rows, cols = w.shape[-2:]
    quotient = w.float() / _expand(s, block, rows, cols)
    return ref_e4m3_encode(quotient.clamp(-448, 448)), s


def ref_mxfp4_dequantize(blocks: torch.Tensor, scales: torch.Tensor, cols: int) -> torch.Tensor:
    signed = torch.cat([E2M1_MAGNITUDES, -E2M1_MAGNITUDES])
    low, high = signed[(blocks & 0xF).long()], signed[(blocks >> 4).long()]  # the low nibble is the first value
    values = torch.stack([low, high], -1).reshape(*blocks.shape[:-1], 32)
    values = values * torch.pow(2.0, scales.double() - 127).unsqueeze(-1)
    return values.reshape(*blocks.shape[:-2], -1)[..., :cols]


def ref_mxfp4_quantize(w: torch.Tensor):
    """Blocks of 32 along the last dim (zero-padded); scale 2^k, the smallest k with amax <= 6 * 2^k within the e8m0
    range (k in -127..127; 0 for a zero block); codes rounded to nearest, ties to even; two a byte, low first."""
    cols = w.shape[-1]
    groups = -(-cols // 32)
    x = torch.nn.functional.pad(w.double(), (0, groups * 32 - cols)).reshape(*w.shape[:-1], groups, 32)
    k = _smallest_pow2_exponent(x.abs().amax(-1), 6.0).clamp(-127, 127)
    codes = ref_e2m1_encode(x / torch.pow(2.0, k.double()).unsqueeze(-1)).reshape(*x.shape[:-1], 16, 2)
    return codes[..., 0] | (codes[..., 1] << 4), (k + 127).to(torch.uint8)


def _same(got: torch.Tensor, want: torch.Tensor) -> None:
    """Same dtype and shape, NaN where the other has NaN, equal values and the sign of every zero."""
    assert got.dtype == want.dtype and got.shape == want.shape, (got.dtype, want.dtype, got.shape, want.shape)
    nan = torch.isnan(want)
    assert torch.equal(torch.isnan(got), nan)
    assert torch.equal(got[~nan], want[~nan])
    assert torch.equal(torch.signbit(got[~nan]), torch.signbit(want[~nan]))


def _bytes(shape, seed) -> torch.Tensor:
    return torch.randint(0, 256, shape, generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


# --- the references themselves, on values the specs list --------------------------------------------
def test_the_references_agree_with_the_specs_tables():
    assert E4M3_TABLE[[0x00, 0x01, 0x07, 0x08, 0x38, 0x7E, 0x80, 0xFE]].tolist() == [
        0.0, 2.0 ** -9, 7 * 2.0 ** -9, 2.0 ** -6, 1.0, 448.0, -0.0, -448.0]
    assert torch.isnan(E4M3_TABLE[[0x7F, 0xFF]]).all() and torch.isfinite(E4M3_TABLE[:0x7F]).all()
    assert torch.signbit(E4M3_TABLE[0x80])
    assert ref_e8m0(torch.tensor([0, 127, 254])).tolist() == [2.0 ** -127, 1.0, 2.0 ** 127]
    assert torch.isnan(ref_e8m0(torch.tensor([255]))).all()
    # torch's own e4m3fn cast (RNE; saturation done before) agrees with the reference encoder on every midpoint
    mids = (E4M3_MAGNITUDES[1:] + E4M3_MAGNITUDES[:-1]) / 2
    x = torch.cat([mids, -mids, E4M3_MAGNITUDES, -E4M3_MAGNITUDES]).float()
    assert torch.equal(ref_e4m3_encode(x), x.to(E4M3).view(torch.uint8))


# --- block-FP8 dequantization ------------------------------------------------------------------------
@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("dtype", OUT_DTYPES + (torch.float64,))
def test_fp8_every_byte_decodes_as_e4m3fn(dtype, native):
    """All 256 codes (subnormals, -0, NaN 0x7f / 0xff, +-448), each row with another float32 scale."""
    q = torch.arange(256, dtype=torch.uint8).repeat(6, 1)
    scale = torch.tensor([[1.0], [2.0 ** -9], [3.0e-3], [1.7e4], [2.0 ** -140], [0.1]])  # one scale per row
    got = dequantize_fp8(q.view(E4M3), scale, dtype, block=(1, 256), native=native)
    want = ref_fp8_dequantize(q, scale.double(), (1, 256), dtype)
    _same(got, want)
    assert torch.isnan(got[:, [0x7F, 0xFF]]).all() and torch.signbit(got[:, 0x80]).all()


@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("shape,block", [((2, 130, 257), (128, 128)), ((129, 1), (128, 128)), ((3, 2, 7, 9), (4, 2)),
                                         ((1, 300), (1, 128))])
def test_fp8_ragged_blocks_against_the_reference(shape, block, native):
    """The last block row and column are ragged: each value takes the scale of the block it lies in."""
    q = _bytes(shape, 1).view(E4M3)
    grid = (*shape[:-2], -(-shape[-2] // block[0]), -(-shape[-1] // block[1]))
    scale = torch.rand(grid, generator=torch.Generator().manual_seed(2)) * 0.05 + 1e-4
    for dtype in OUT_DTYPES:
        _same(dequantize_fp8(q, scale, dtype, block, native=native), ref_fp8_dequantize(q, scale.double(), block, dtype))


@pytest.mark.parametrize("native", [True, False])
def test_fp8_non_contiguous_weight_scale_and_out(native):
    q = _bytes((2, 40, 30), 3)
    scale = torch.rand(2, 3, 2, generator=torch.Generator().manual_seed(4)) + 0.01
    q_nc = q.transpose(-1, -2).contiguous().transpose(-1, -2).view(E4M3)  # same values, column-major storage
    s_nc = scale.transpose(-1, -2).contiguous().transpose(-1, -2)
    assert not q_nc.is_contiguous() and not s_nc.is_contiguous()
    want = ref_fp8_dequantize(q, scale.double(), (16, 16), torch.bfloat16)
    _same(dequantize_fp8(q_nc, s_nc, torch.bfloat16, (16, 16), native=native), want)
    out = torch.full((2, 30, 40), 7.0, dtype=torch.bfloat16).transpose(-1, -2)
    assert dequantize_fp8(q_nc, s_nc, block=(16, 16), out=out, native=native) is out
    _same(out, want)


@pytest.mark.parametrize("native", [True, False])
def test_fp8_e8m0_scales_at_the_extremes(native):
    """ue8m0 exponent bytes (float8_e8m0fnu): 0 (2^-127), 1, 127, 254 (2^127, products past float32 -> inf) and 255
    (NaN: every value of the block NaN)."""
    exps = torch.tensor([[0, 1], [127, 254], [255, 130]], dtype=torch.uint8)
    q = _bytes((3, 2 * 256), 5)
    q[:, :256] = torch.arange(256, dtype=torch.uint8)
    for dtype in OUT_DTYPES:
        got = dequantize_fp8(q.view(E4M3), exps.view(E8M0), dtype, block=(1, 256), native=native)
        _same(got, ref_fp8_dequantize(q, ref_e8m0(exps), (1, 256), dtype))
    got = dequantize_fp8(q.view(E4M3), exps.view(E8M0), block=(1, 256), native=native)
    assert torch.isnan(got[2, :256]).all() and torch.isinf(got[1, 256:]).any()


def test_fp8_zero_size_weights_dequantize_to_empty():
    for shape, grid in (((0, 128), (0, 1)), ((128, 0), (1, 0)), ((0, 0), (0, 0)), ((0, 3, 5), (0, 1, 1))):
        for native in (True, False):
            d = dequantize_fp8(torch.empty(shape, dtype=E4M3), torch.ones(grid), torch.bfloat16, native=native)
            assert d.shape == shape and d.dtype == torch.bfloat16
    q, s = quantize_fp8(torch.empty(0, 256, 130))
    assert q.shape == (0, 256, 130) and s.shape == (0, 2, 2)


# --- block-FP8 quantization --------------------------------------------------------------------------
@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("scale_fmt", ["float", "ue8m0"])
@pytest.mark.parametrize("dtype", OUT_DTYPES)
def test_fp8_quantize_equals_an_independent_block_quantizer(dtype, scale_fmt, native):
    g = torch.Generator().manual_seed(6)
    w = (torch.randn(2, 37, 45, generator=g) * torch.logspace(-6, 3, 45)).to(dtype)  # blocks of different ranges
    w[0, :8, :16] = 0  # a zero block (scale 1)
    w[1, 0, :3] = torch.tensor([0.0, -0.0, 1e-7])
    w[1, 8:16, 16:32] = 448 * 2.0 ** -5  # a block whose amax is exactly 448 * 2^k: scale 2^k, top code 448
    for block in ((8, 16), (128, 128)):
        q, s = quantize_fp8(w, block, scale_fmt, native=native)
        rq, rs = ref_fp8_quantize(w, block, scale_fmt)
        assert torch.equal(s, rs)
        assert torch.equal(q.view(torch.uint8), rq)
    q, s = quantize_fp8(w, (8, 16), scale_fmt, native=native)
    assert s[0, 0, 0] == 1 and s[1, 1, 1] == 2.0 ** -5 and q[1, 9, 16].view(torch.uint8) == 0x7E
    assert q[1, 0, 1].view(torch.uint8) == 0x80  # -0 keeps its sign


@pytest.mark.parametrize("native", [True, False])
def test_fp8_rounding_is_to_nearest_even_with_signed_zeros(native):
    """Every midpoint between neighbouring e4m3 values (both signs) in one block whose amax is 448 (scale 1): the
    tie goes to the even code; just off a midpoint goes to the nearer value."""
    mids = ((E4M3_MAGNITUDES[1:] + E4M3_MAGNITUDES[:-1]) / 2).float()
    off = torch.cat([mids * (1 + 2.0 ** -20), mids * (1 - 2.0 ** -20)])
    row = torch.cat([torch.tensor([448.0, 0.0, -0.0]), mids, -mids, off, -off])
    q, s = quantize_fp8(row[None], (1, row.numel()), native=native)
    assert s.item() == 1.0
    codes = q.view(torch.uint8)[0]
    assert torch.equal(codes, ref_e4m3_encode(row))
    n = mids.numel()
    assert (codes[3 : 3 + n] % 2 == 0).all()  # ties: even codes
    assert codes[1] == 0x00 and codes[2] == 0x80


def test_fp8_kernel_saturates_at_448_and_keeps_nan():
    """quantize_fp8_into with a given scale: quotients past +-448 (including +-inf) saturate to +-448 (0x7e / 0xfe,
    never the NaN code), NaN stays NaN; between 448 and 464 (where an unsaturated cast also rounds to 448) too."""
    x = torch.tensor([[[449.0, 463.9, 464.0, 500.0, 1e30, float("inf"), -449.0, -1e30, -float("inf"), float("nan"),
                        447.0, -0.0]]])
    out = torch.empty(x.shape, dtype=torch.uint8)
    _C.quantize_fp8_into(x, torch.ones(1, 1, 1), 1, x.shape[-1], out)
    assert out[0, 0].tolist()[:9] == [0x7E] * 6 + [0xFE] * 3
    assert out[0, 0, 9] & 0x7F == 0x7F and out[0, 0, 10] == ref_e4m3_encode(torch.tensor([447.0]))[0]
    assert out[0, 0, 11] == 0x80
    want = ref_e4m3_encode(x.clamp(-448, 448))
    assert torch.equal(out & 0x7F, want & 0x7F) and torch.equal(out[..., :9], want[..., :9])


@pytest.mark.parametrize("scale_fmt", ["float", "ue8m0"])
def test_fp8_round_trip_error_is_at_most_half_a_step(scale_fmt):
    """|dequantize(quantize(w)) - w| <= half the e4m3 spacing at |w / scale| (2^(e-4) for normals, 2^-10 in the
    subnormal range), times the block's scale."""
    g = torch.Generator().manual_seed(7)
    w = torch.randn(3, 70, 90, generator=g) * torch.logspace(-4, 2, 90)
    q, s = quantize_fp8(w, (32, 32), scale_fmt)
    d = dequantize_fp8(q, s, block=(32, 32))
    full = _expand(s, (32, 32), 70, 90)
    m = (w / full).abs().clamp(max=448)
    spacing = torch.where(m < 2.0 ** -6, torch.full_like(m, 2.0 ** -9), torch.pow(2.0, torch.floor(torch.log2(m)) - 3))
    assert ((d - w).abs() <= spacing / 2 * full * (1 + 1e-6)).all()


# --- MXFP4 dequantization ----------------------------------------------------------------------------
@pytest.mark.parametrize("native", [True, False])
def test_mxfp4_every_code_in_both_nibbles_and_every_finite_scale(native):
    """Every byte value at every byte position of a block (so every code as the low and as the high nibble), the
    scales 0 (2^-127), 254 (2^127: 4 and 6 overflow float32 to inf) and the rest at random."""
    allb = torch.arange(256, dtype=torch.uint8)
    blocks = torch.stack([allb.roll(16 * i) for i in range(16)]).reshape(16, 16, 16)  # [rows, G, 16]
    scales = _bytes((16, 16), 8) % 255
    scales[0, 0], scales[1, 1], scales[2, 2], scales[3, 3] = 0, 254, 127, 1
    for cols in (512, 481):
        want = ref_mxfp4_dequantize(blocks, scales, cols)
        for dtype in OUT_DTYPES + (torch.float64,):
            _same(dequantize_mxfp4(blocks, scales, dtype, cols=cols, native=native), want.float().to(dtype))
            out = torch.empty(cols, 16, dtype=dtype)
            _same(dequantize_mxfp4_into(blocks, scales, out, transpose=True, native=native), want.float().to(dtype).T)
    got = dequantize_mxfp4(blocks, scales, native=native)
    assert torch.isinf(got[1, 32:64]).any() and (got[0, :32].abs() <= 6 * 2.0 ** -127).all()
    one = torch.zeros(1, 16, dtype=torch.uint8)
    one[0, 0], one[0, 15] = 0x71, 0x9F  # low nibble 1 (0.5) first, then 7 (6.0); last byte: 15 (-6), then 9 (-0.5)
    d = dequantize_mxfp4(one, torch.tensor([128], dtype=torch.uint8), native=native)
    assert d[:2].tolist() == [1.0, 12.0] and d[30:].tolist() == [-12.0, -1.0]


@pytest.mark.parametrize("native", [True, False])
def test_mxfp4_non_contiguous_blocks_and_scales(native):
    blocks, scales = _bytes((3, 5, 2, 16), 9), _bytes((3, 5, 2), 10) % 255
    b_nc = blocks.permute(1, 0, 2, 3).contiguous().permute(1, 0, 2, 3)
    s_nc = scales.permute(1, 0, 2).contiguous().permute(1, 0, 2)
    assert not b_nc.is_contiguous() and not s_nc.is_contiguous()
    want = ref_mxfp4_dequantize(blocks, scales, 50).float().to(torch.bfloat16)
    _same(dequantize_mxfp4(b_nc, s_nc, torch.bfloat16, cols=50, native=native), want)


def test_mxfp4_zero_size():
    for shape in ((0, 64), (4, 0), (3, 0, 32), (0,)):
        blocks, scales = quantize_mxfp4(torch.empty(shape))
        groups = -(-shape[-1] // 32)
        assert blocks.shape == (*shape[:-1], groups, 16) and scales.shape == (*shape[:-1], groups)
        for native in (True, False):
            d = dequantize_mxfp4(blocks, scales, torch.bfloat16, cols=shape[-1], native=native)
            assert d.shape == shape and d.dtype == torch.bfloat16


# --- MXFP4 quantization ------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_mxfp4_quantize_equals_an_independent_quantizer(dtype):
    g = torch.Generator().manual_seed(11)
    w = (torch.randn(3, 7, 77, generator=g) * torch.logspace(-3, 3, 77)).to(dtype)
    w[0, 0, :32] = 0  # a zero block: scale 2^0, all codes 0
    w[0, 1, :32] = torch.linspace(-6, 6, 32)  # amax exactly 6: scale 2^0
    w[0, 2, 32:64] = torch.linspace(-6, 6, 32) * 2.0 ** -3  # amax exactly 6 * 2^-3
    w[1, 0, :4] = torch.tensor([0.0, -0.0, 1e-3, -1e-3])
    blocks, scales = quantize_mxfp4(w)
    rb, rs = ref_mxfp4_quantize(w)
    assert torch.equal(scales, rs) and torch.equal(blocks, rb)
    assert scales[0, 0, 0] == 127 and scales[0, 1, 0] == 127 and scales[0, 2, 1] == 124
    assert (blocks[0, 0, 0] == 0).all() and blocks[1, 0, 0, 0] == 0x80  # -0 keeps its sign in the high nibble


def test_mxfp4_rounding_ties_to_even_codes_and_the_scale_range():
    mids = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0]
    row = [6.0] + mids + [-m for m in mids] + [m * (1 + 2.0 ** -12) for m in mids] + [m * (1 - 2.0 ** -12) for m in mids]
    row += [0.0, -0.0, 0.1]
    w = torch.tensor([row])
    blocks, scales = quantize_mxfp4(w)
    rb, rs = ref_mxfp4_quantize(w)
    assert torch.equal(blocks, rb) and torch.equal(scales, rs) and scales.tolist() == [[127]]
    codes = torch.stack([blocks & 0xF, blocks >> 4], -1).flatten()
    assert codes[1:8].tolist() == [0, 2, 2, 4, 4, 6, 6]  # ties: the even code
    # the scale range: amax below 6 * 2^-127 takes the smallest scale (byte 0), values round to the e2m1 grid of it
    for amax in (1e-40, 6 * 2.0 ** -127, 6.5 * 2.0 ** -127, 3.0e38):
        w = torch.tensor([[amax, -amax / 3, amax / 7] + [0.0] * 29])
        blocks, scales = quantize_mxfp4(w)
        rb, rs = ref_mxfp4_quantize(w)
        assert torch.equal(blocks, rb) and torch.equal(scales, rs), amax
    assert quantize_mxfp4(torch.tensor([[1e-40] * 32]))[1].item() == 0


@pytest.mark.parametrize("cols", [32, 45, 96])
def test_mxfp4_round_trip_is_within_half_a_step_and_a_projection(cols):
    g = torch.Generator().manual_seed(12)
    w = torch.randn(4, 9, cols, generator=g) * torch.logspace(-2, 2, cols)
    blocks, scales = quantize_mxfp4(w)
    d = dequantize_mxfp4(blocks, scales, cols=cols)
    unit = torch.pow(2.0, scales.double() - 127).repeat_interleave(32, -1)[..., :cols]
    m = w.double().abs() / unit
    half_step = torch.where(m < 2, 0.25, torch.where(m < 4, 0.5, 1.0))
    assert (m <= 6).all() and ((d.double() - w.double()).abs() <= half_step * unit).all()
    assert torch.equal(dequantize_mxfp4(*quantize_mxfp4(d), cols=cols), d)


# --- bad input ----------------------------------------------------------------------------------------
def test_bad_shapes_and_dtypes_are_named():
    q = torch.zeros(200, 300, dtype=E4M3)
    with pytest.raises(ValueError, match=r"weight_scale_inv: expected shape \(2, 3\)"):
        dequantize_fp8(q, torch.ones(1, 2))  # floor instead of ceil: the ragged edge blocks forgotten
    with pytest.raises(ValueError, match=r"weight_scale_inv: expected shape \(2, 3\)"):
        dequantize_fp8(q, torch.ones(3, 2))  # the grid transposed
    with pytest.raises(ValueError, match=r"weight: expected \[\.\.\., out, in\]"):
        dequantize_fp8(torch.zeros(8, dtype=E4M3), torch.ones(1))
    with pytest.raises(ValueError, match=r"out: expected shape \(200, 300\)"):
        dequantize_fp8(q, torch.ones(2, 3), out=torch.empty(300, 200))
    with pytest.raises(ValueError, match=r"w: expected \[\.\.\., out, in\]"):
        quantize_fp8(torch.ones(8))
    with pytest.raises(ValueError, match="expected uint8"):
        dequantize_mxfp4(torch.zeros(2, 16, dtype=torch.int8), torch.zeros(2, dtype=torch.uint8))
    with pytest.raises(ValueError, match="expected uint8"):
        dequantize_mxfp4(torch.zeros(2, 16, dtype=torch.uint8), torch.zeros(2, dtype=E8M0))
    with pytest.raises(ValueError, match="do not match"):
        dequantize_mxfp4(torch.zeros(2, 3, 8, dtype=torch.uint8), torch.zeros(2, 3, dtype=torch.uint8))  # 8: not 16
    with pytest.raises(ValueError, match=r"out: expected \[\.\.\., rows, cols\] with 0 < cols <= 32"):
        dequantize_mxfp4(torch.zeros(2, 1, 16, dtype=torch.uint8), torch.zeros(2, 1, dtype=torch.uint8), cols=33)


# --- the streamed merge of quantized sources against the in-memory pipeline ---------------------------
FP8 = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}
MXFP4 = {"quant_method": "mxfp4"}


def _tensors(directory) -> dict[str, torch.Tensor]:
    out = {}
    for path in sorted(directory.glob("*.safetensors")):
        out.update(load_file(str(path)))
    return out


@pytest.fixture(scope="module")
def quantized_sources(tmp_path_factory):
    """A ragged block-FP8 Mixtral (d 160, ff 96; ue8m0 exponent-byte scales, sharded) and an MXFP4 GPT-OSS."""
    from mcsmoe_fast.streaming.quantized import quantize_checkpoint
    from mcsmoe_fast.tiny import tiny_mixtral, tiny_moe

    root = tmp_path_factory.mktemp("quantized-sources")
    tiny_mixtral(num_experts=4, hidden_size=160, intermediate_size=96, num_layers=2, seed=5).save_pretrained(root / "m")
    quantize_checkpoint(root / "m", root / "fp8", dict(FP8, scale_fmt="ue8m0"), scale_dtype=E8M0, max_shard_size=60_000)
    tiny_moe("gpt_oss", num_experts=4, hidden_size=64, intermediate_size=64, num_layers=2, seed=4).save_pretrained(root / "g")
    quantize_checkpoint(root / "g", root / "mxfp4", MXFP4)
    return root


@pytest.fixture(scope="module")
def calibration_batches():
    from mcsmoe_fast.tiny import tiny_mixtral
    from merge_helpers import calibration

    return calibration(tiny_mixtral(num_layers=1), seed=3, batches=2, batch=2, length=7)


@pytest.mark.parametrize("source", ["fp8", "mxfp4"])
def test_streamed_merge_of_a_quantized_source_equals_the_in_memory_merge(quantized_sources, calibration_batches, tmp_path,
                                                                         source):
    """Dequantized output: the streamed merge is the in-memory merge of open_model's dequantized load (bf16 both).
    Kept in the source's precision: the streamed checkpoint has the bytes of the in-memory merge rewritten by
    requantize_merged (two independent writers of the same rule), and loads to the same logits."""
    from mcsmoe_fast import from_pretrained
    from mcsmoe_fast.streaming.requantize_merged import requantize_merged
    from merge_helpers import forward
    from streaming_helpers import NUM_GROUPS, assert_same_checkpoint, in_memory, quiet_merge

    src = quantized_sources / source
    expected = in_memory(src, tmp_path / "memory", calibration_batches, globally=False)
    plain = quiet_merge(src, tmp_path / "plain", calibration_batches, NUM_GROUPS, globally=False, keep_quantization=False,
                        max_shard_size="30KB")
    assert_same_checkpoint(expected, plain.path, calibration_batches)
    kept = quiet_merge(src, tmp_path / "kept", calibration_batches, NUM_GROUPS, globally=False, max_shard_size="30KB")
    requantize_merged(expected, src)
    a, b = _tensors(expected), _tensors(kept.path)
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert torch.equal(a[name].view(torch.uint8) if a[name].dtype.itemsize == 1 else a[name],
                           b[name].view(torch.uint8) if b[name].dtype.itemsize == 1 else b[name]), name
    banks = [n for n in b if n.endswith(("experts.w_in", "experts.w_in_blocks"))]
    assert len(banks) == 2 and all(b[n].dtype in (E4M3, torch.uint8) for n in banks)
    if source == "fp8":
        assert b[banks[0] + "_scale_inv"].dtype == E8M0  # the source's scale dtype kept
    config = json.loads((kept.path / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == source
    ma, mb = from_pretrained(expected), from_pretrained(kept.path)
    for x in calibration_batches:
        assert torch.equal(forward(ma, x), forward(mb, x))
