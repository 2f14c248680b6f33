"""Block-scaled FP8: e4m3 weights [..., out, in] with one `weight_scale_inv` per block of 128 x 128
(DeepSeek-V3/V3.2, Kimi-K2, the Qwen3 FP8 releases), the scale grid [..., ceil(out/128), ceil(in/128)]
(the last block row and column may be ragged). A stored value q in block (i, j) means q * scale_inv[i, j].

Scales are float32 (V3-style: amax / 448, the largest e4m3 value) or ue8m0, powers of two (V3.1/V3.2
write them as float32 powers of two, DeepSeek-V4-style checkpoints as float8_e8m0fnu): the smallest
2^k with amax / 2^k <= 448, so that dividing by it is exact. A zero block gets the scale 1 (as
transformers' own quantizer does). Dequantization multiplies in float32 and rounds once to the working
dtype, as transformers' `Fp8Dequantize` does.
"""
from __future__ import annotations

import torch

from .._ext import _C
from .grid import cdiv, native_applies, pow2_exponent

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0
BLOCK = (128, 128)


def _check_block(block) -> None:
    """Raise ValueError unless block is two integers >= 1 (rows, cols)."""
    if not (isinstance(block, (tuple, list)) and len(block) == 2
            and all(isinstance(b, int) and not isinstance(b, bool) and b >= 1 for b in block)):
        raise ValueError(f"block: expected two integers >= 1 (rows, cols), got {block!r}")


def scale_grid(shape, block=BLOCK) -> tuple[int, ...]:
    """The shape of weight_scale_inv for a weight of `shape` [..., out, in]."""
    _check_block(block)
    *lead, rows, cols = shape
    return (*lead, cdiv(rows, block[0]), cdiv(cols, block[1]))


def _scales_fp32(scale_inv: torch.Tensor) -> torch.Tensor:
    if scale_inv.dtype == torch.uint8:  # raw e8m0 exponent bytes: 2^(byte - 127), and 255 = NaN as the format says
        return scale_inv.view(torch.float8_e8m0fnu).to(torch.float32)
    return scale_inv.to(torch.float32)


def _check(weight: torch.Tensor, scale_inv: torch.Tensor, block) -> None:
    if weight.dtype != E4M3:
        raise ValueError(f"weight: expected float8_e4m3fn values (block FP8), got {weight.dtype}")
    if weight.dim() < 2:
        raise ValueError(f"weight: expected [..., out, in], got shape {tuple(weight.shape)}")
    expected = scale_grid(weight.shape, block)
    if tuple(scale_inv.shape) != expected:
        raise ValueError(f"weight_scale_inv: expected shape {expected} for a weight of shape "
                         f"{tuple(weight.shape)} in blocks of {tuple(block)}, got {tuple(scale_inv.shape)}")


def dequantize_fp8(weight: torch.Tensor, scale_inv: torch.Tensor, dtype: torch.dtype = torch.float32,
                   block=BLOCK, out: torch.Tensor | None = None, native: bool = True) -> torch.Tensor:
    """weight (e4m3 [..., out, in]) times its block scales, in `dtype` (into `out` when given: same shape).
    native: on the CPU into float32 / bfloat16 / float16, the extension's one-pass kernel (_C.dequantize_fp8_into,
    csrc/ops/dequant.cpp; the same values bit for bit); False, or any other case: plain PyTorch, one leading slice
    (expert) at a time so the float32 temporary stays one matrix."""
    _check_block(block)
    _check(weight, scale_inv, block)
    if out is None:
        out = torch.empty(weight.shape, dtype=dtype, device=weight.device)
    elif tuple(out.shape) != tuple(weight.shape):
        raise ValueError(f"out: expected shape {tuple(weight.shape)}, got {tuple(out.shape)}")
    rows, cols = weight.shape[-2:]
    if out.numel() == 0:
        return out
    if native and native_applies(out, weight, scale_inv):
        target = out if out.is_contiguous() else torch.empty(out.shape, dtype=out.dtype)
        _C.dequantize_fp8_into(weight.contiguous().view(torch.uint8).reshape(-1, rows, cols),
                               _scales_fp32(scale_inv).contiguous().reshape(-1, *scale_inv.shape[-2:]),
                               block[0], block[1], target.view(-1, rows, cols))
        return out if target is out else out.copy_(target)
    w2, s2, o2 = weight.reshape(-1, rows, cols), scale_inv.reshape(-1, *scale_inv.shape[-2:]), out.view(-1, rows, cols)
    for k in range(w2.shape[0]):
        if rows % block[0] == 0 and cols % block[1] == 0:  # whole blocks: scale a blocked view in place
            v = torch.empty((rows, cols), dtype=torch.float32, device=out.device).copy_(w2[k]).view(
                rows // block[0], block[0], cols // block[1], block[1])
            o2[k].copy_(v.mul_(_scales_fp32(s2[k]).view(rows // block[0], 1, cols // block[1], 1)).view(rows, cols))
            continue
        s = _scales_fp32(s2[k]).repeat_interleave(block[0], 0)[:rows].repeat_interleave(block[1], 1)[:, :cols]
        o2[k].copy_(torch.mul(w2[k].to(torch.float32), s))
    return out


def block_amax(w: torch.Tensor, block=BLOCK) -> torch.Tensor:
    """max |w| per block of the last two dims (ragged edge blocks included), float32."""
    rows, cols = w.shape[-2:]
    nr, nc = cdiv(rows, block[0]), cdiv(cols, block[1])
    a = w.abs().to(torch.float32)
    a = torch.nn.functional.pad(a, (0, nc * block[1] - cols, 0, nr * block[0] - rows))
    return a.reshape(*w.shape[:-2], nr, block[0], nc, block[1]).amax(dim=(-3, -1))


def fp8_scales(amax: torch.Tensor, scale_fmt: str = "float") -> torch.Tensor:
    """weight_scale_inv (float32) per block from its amax: amax / 448, or the smallest power of two
    2^k >= amax / 448 (ue8m0); 1 for an all-zero block. Never 0 for a block that is not (a float32 amax under
    448 * 2^-149 would give 0, and its zeros would read back as 0 / 0 = NaN): float scales are at least 2^-149, and
    ue8m0 exponents stay within e8m0's range [-127, 127] (below 2^-127 the values round on 2^-127's grid)."""
    if scale_fmt not in ("float", "ue8m0"):
        raise ValueError(f"scale_fmt: expected 'float' or 'ue8m0', got {scale_fmt!r}")
    if scale_fmt == "float":
        s = (amax / E4M3_MAX).clamp_min(2.0**-149)
    else:
        s = torch.ldexp(torch.ones(amax.shape, dtype=torch.float32), pow2_exponent(amax, E4M3_MAX).clamp_(-127, 127))
    return torch.where(amax > 0, s, torch.ones_like(s))


def _scales(amax: torch.Tensor, scale_fmt: str, w: torch.Tensor, block) -> torch.Tensor:
    """fp8_scales of a block amax grid of w, refusing a block whose amax is NaN or inf (found in w by position)."""
    if not torch.isfinite(amax).all():
        at = tuple(torch.nonzero(~torch.isfinite(w.to(torch.float32)))[0].tolist())
        where = (*at[:-2], at[-2] // block[0], at[-1] // block[1])
        raise ValueError(f"w: NaN or inf{'' if w.dtype.itemsize <= 4 else ' (as float32)'} at {at} (block {where}), "
                         "which block FP8 cannot store (e4m3fn has no inf, and a NaN would set its block's scale): "
                         "replace it before quantizing")
    return fp8_scales(amax, scale_fmt)


def quantize_fp8(w: torch.Tensor, block=BLOCK, scale_fmt: str = "float",
                 scale_dtype: torch.dtype = torch.float32, native: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3 weight, weight_scale_inv) of w [..., out, in]: each block divided by its scale (amax / 448,
    or a power of two for ue8m0), saturated to +-448 and rounded to nearest even. scale_dtype:
    float32, or float8_e8m0fnu (ue8m0 only) for checkpoints that store the exponent bytes. A NaN or inf in w
    (in float32, where the scales are computed) is refused with its position (ValueError), as block (two integers
    >= 1) is when it is not one.
    native: a float32 / bfloat16 / float16 w on the CPU goes through the extension (_C.fp8_block_amax_into,
    _C.quantize_fp8_into, csrc/ops/quantize.cpp; the same bytes); False, or any other case: plain PyTorch."""
    _check_block(block)
    if w.dim() < 2:
        raise ValueError(f"w: expected [..., out, in], got shape {tuple(w.shape)}")
    if scale_dtype not in (torch.float32, getattr(torch, "float8_e8m0fnu", None)):
        raise ValueError(f"scale_dtype: expected torch.float32 or torch.float8_e8m0fnu, got {scale_dtype}")
    if scale_dtype != torch.float32 and scale_fmt != "ue8m0":
        raise ValueError("scale_dtype float8_e8m0fnu holds powers of two only: use scale_fmt='ue8m0'")
    rows, cols = w.shape[-2:]
    q = torch.empty(w.shape, dtype=E4M3, device=w.device)
    if w.numel() == 0:  # nothing to scale: a grid of ones (reshape(-1, rows, cols) is ambiguous when empty)
        return q, torch.ones(scale_grid(w.shape, block), dtype=torch.float32, device=w.device).to(scale_dtype)
    if native and native_applies(w):
        w3 = w.contiguous().reshape(-1, rows, cols)
        amax = torch.empty((w3.shape[0], cdiv(rows, block[0]), cdiv(cols, block[1])), dtype=torch.float32)
        scales = _scales(_C.fp8_block_amax_into(w3, block[0], block[1], amax), scale_fmt, w, block)
        _C.quantize_fp8_into(w3, scales, block[0], block[1], q.view(torch.uint8).view(-1, rows, cols))
        return q, scales.reshape(scale_grid(w.shape, block)).to(scale_dtype)
    w2, q2 = w.reshape(-1, rows, cols), q.view(-1, rows, cols)
    scales = torch.empty((w2.shape[0], cdiv(rows, block[0]), cdiv(cols, block[1])), dtype=torch.float32, device=w.device)
    for k in range(w2.shape[0]):
        if rows % block[0] == 0 and cols % block[1] == 0:  # whole blocks: a fresh float32 copy, divided in place
            nr, nc = rows // block[0], cols // block[1]
            v = torch.empty((rows, cols), dtype=torch.float32, device=w.device).copy_(w2[k]).view(nr, block[0], nc, block[1])
            s = _scales(v.abs().amax(dim=(1, 3)), scale_fmt, w, block)
            scales[k] = s
            q2[k].copy_(v.div_(s.view(nr, 1, nc, 1)).clamp_(-E4M3_MAX, E4M3_MAX).view(rows, cols))
            continue
        s = _scales(block_amax(w2[k], block), scale_fmt, w, block)
        scales[k] = s
        full = s.repeat_interleave(block[0], 0)[:rows].repeat_interleave(block[1], 1)[:, :cols]
        q2[k].copy_(torch.div(w2[k].to(torch.float32), full).clamp_(-E4M3_MAX, E4M3_MAX))
    return q, scales.reshape(scale_grid(w.shape, block)).to(scale_dtype)
