"""MXFP4 (OCP microscaling, GPT-OSS's MoE experts): e2m1 values in blocks of 32 along the input dim,
each block sharing one e8m0 scale 2^(byte - 127). The byte 255 is NaN in the format (no scale: no quantizer
writes it), so reading one is refused as corrupt data.

GPT-OSS stores a bank W [E, out, in] as `<name>_blocks` [E, out, in/32, 16] uint8 (two e2m1 nibbles a
byte, the low nibble first) and `<name>_scales` [E, out, in/32] uint8; transformers dequantizes it
to [E, out, in] and transposes to the module's [E, in, out] (mxfp4.convert_moe_packed_tensors).
e2m1 codes: bit 3 the sign, then 0, 0.5, 1, 1.5, 2, 3, 4, 6.

Quantizing picks the smallest power of two 2^k with amax / 2^k <= 6 (no value saturates; triton_kernels'
downcast_to_mxfp in its default ROUND_UP mode, which transformers' Mxfp4Quantize calls) and rounds each
value to the nearest e2m1 value, ties to the even code; an all-zero block gets the scale 2^0. It is a
projection: quantizing dequantized values gives the same values, and the same bytes from then on (a
block whose largest code is 3 is re-encoded once with its codes doubled and its scale halved). A row
whose length is not a multiple of 32 is padded with zeros (dequantize_mxfp4(cols=...) drops them).
"""
from __future__ import annotations

import torch

from .._ext import _C
from .grid import cdiv, native_applies, pow2_exponent

BLOCK = 32
E2M1_MAX = 6.0
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
# midpoints between consecutive magnitudes (codes 0..7)
_MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32,
                     cols: int | None = None, native: bool = True) -> torch.Tensor:
    """[..., rows, G, 16] uint8 nibbles and [..., rows, G] uint8 exponents -> [..., rows, G*32] in
    `dtype` (first `cols` columns when given). No transpose: that is the caller's layout."""
    _check(blocks, scales)
    cols = blocks.shape[-2] * BLOCK if cols is None else cols
    out = torch.empty((*blocks.shape[:-2], cols), dtype=dtype, device=blocks.device)
    return dequantize_mxfp4_into(blocks, scales, out, native=native)


def dequantize_mxfp4_into(blocks: torch.Tensor, scales: torch.Tensor, out: torch.Tensor, transpose: bool = False,
                          native: bool = True) -> torch.Tensor:
    """blocks [..., rows, G, 16] and scales [..., rows, G] dequantized into out [..., rows, cols] (transpose: out is
    [..., cols, rows], the layout GPT-OSS's banks are read in), (G - 1) * 32 < cols <= G * 32; returns out.
    native: on the CPU into float32 / bfloat16 / float16, the extension's one-pass kernel (_C.dequantize_mxfp4_into,
    csrc/ops/dequant.cpp; the same values bit for bit); False, or any other case: plain PyTorch. A scale byte 255
    (NaN in the format) is refused with its position (ValueError)."""
    _check(blocks, scales)
    if scales.numel() and scales.max() == 255:
        at = tuple(torch.nonzero(scales == 255)[0].tolist())
        raise ValueError(f"scales: e8m0 byte 255 at {at}, NaN in the MXFP4 format (no quantizer writes it): the "
                         "checkpoint's data is corrupt; re-download or re-export it")
    *lead, groups, _ = blocks.shape
    rows = lead[-1] if lead else 1
    if transpose:
        cols = out.shape[-2] if out.dim() >= 2 else -1
        fits = blocks.dim() >= 3 and out.dim() == len(lead) + 1 and tuple(out.shape[:-2]) == tuple(lead[:-1]) \
            and out.shape[-1] == rows
    else:
        cols = out.shape[-1] if out.dim() else -1
        fits = out.dim() == len(lead) + 1 and tuple(out.shape[:-1]) == tuple(lead)
    if not fits or not (groups - 1) * BLOCK < cols <= groups * BLOCK:
        layout = "[..., cols, rows]" if transpose else "[..., rows, cols]"
        raise ValueError(f"out: expected {layout} with {(groups - 1) * BLOCK} < cols <= {groups * BLOCK} for blocks "
                         f"{tuple(blocks.shape)}, got {tuple(out.shape)}")
    if out.numel() == 0:
        return out
    if native and native_applies(out, blocks, scales):
        target = out if out.is_contiguous() else torch.empty(out.shape, dtype=out.dtype)
        _C.dequantize_mxfp4_into(blocks.contiguous().reshape(-1, rows, groups, BLOCK // 2),
                                 scales.contiguous().reshape(-1, rows, groups), transpose,
                                 target.view(-1, *target.shape[-2:]) if target.dim() >= 2 else target.view(1, 1, -1))
        return out if target is out else out.copy_(target)
    lut = torch.tensor(E2M1_VALUES, dtype=torch.float32, device=blocks.device)
    values = torch.stack([lut[(blocks & 0x0F).long()], lut[(blocks >> 4).long()]], dim=-1)  # [..., G, 16, 2]
    values = torch.ldexp(values.reshape(*lead, groups, BLOCK), (scales.to(torch.int32) - 127).unsqueeze(-1))
    values = values.reshape(*lead, groups * BLOCK)[..., :cols]
    return out.copy_(values.transpose(-1, -2) if transpose else values)


def _check(blocks: torch.Tensor, scales: torch.Tensor) -> None:
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise ValueError(f"blocks and scales: expected uint8, got {blocks.dtype} and {scales.dtype}")
    if blocks.dim() < 2 or blocks.shape[-1] != BLOCK // 2 or tuple(blocks.shape[:-1]) != tuple(scales.shape):
        raise ValueError(f"blocks [..., G, 16] and scales [..., G] do not match: {tuple(blocks.shape)} and "
                         f"{tuple(scales.shape)}")


def e2m1_codes(x: torch.Tensor) -> torch.Tensor:
    """Nearest e2m1 code (uint8 0..15) of each value of x (already divided by its scale; saturates at 6),
    ties to the even code; the sign bit follows x's sign bit (-0 stays -0)."""
    mags = x.abs().to(torch.float32).clamp_(max=E2M1_MAX).contiguous()
    mids = torch.tensor(_MIDPOINTS, dtype=torch.float32, device=x.device)
    code = torch.bucketize(mags, mids)  # at a midpoint: the lower code
    tie = (mags == mids[code.clamp(max=len(_MIDPOINTS) - 1)]) & (code % 2 == 1)
    code = code + tie.to(code.dtype)
    return (code + 8 * torch.signbit(x).to(code.dtype)).to(torch.uint8)


def quantize_mxfp4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(blocks [..., rows, G, 16] uint8, scales [..., rows, G] uint8) of w [..., rows, cols], G = ceil(cols/32)."""
    if w.dim() < 1:
        raise ValueError("w: expected at least one dim (the one packed in blocks of 32)")
    if w.numel() and not torch.isfinite(w).all():
        at = tuple(torch.nonzero(~torch.isfinite(w))[0].tolist())
        raise ValueError(f"w: NaN or inf at {at}, which MXFP4 cannot store (e2m1 has neither)")
    cols = w.shape[-1]
    groups = cdiv(cols, BLOCK)
    x = torch.nn.functional.pad(w.to(torch.float32), (0, groups * BLOCK - cols)).reshape(*w.shape[:-1], groups, BLOCK)
    k = pow2_exponent(x.abs().amax(dim=-1), E2M1_MAX).clamp_(-127, 127)
    codes = e2m1_codes(torch.ldexp(x, -k.unsqueeze(-1)))
    pairs = codes.reshape(*codes.shape[:-1], BLOCK // 2, 2)
    blocks = pairs[..., 0] | (pairs[..., 1] << 4)
    return blocks, (k + 127).to(torch.uint8)
