"""Small exact helpers shared by the block formats."""
from __future__ import annotations

import torch


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def pow2_exponent(amax: torch.Tensor, top: float) -> torch.Tensor:
    """The smallest integer k with amax <= top * 2^k (int32), computed exactly: log2 gives a guess that is
    then corrected by comparing against the exact power of two (ldexp). 0 where amax is 0."""
    a = amax.to(torch.float64)
    k = torch.ceil(torch.log2(torch.where(a > 0, a, torch.ones_like(a)) / top)).to(torch.int32)
    one = torch.ones_like(a)
    k = torch.where(a > top * torch.ldexp(one, k), k + 1, k)
    k = torch.where(a <= top * torch.ldexp(one, k - 1), k - 1, k)
    return torch.where(a > 0, k, torch.zeros_like(k))


NATIVE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # what csrc/ops/dequant.cpp writes and quantize.cpp reads


def native_applies(t: torch.Tensor, *others: torch.Tensor) -> bool:
    """Whether the extension's CPU (de)quantization kernels take `t` (the float side: a dequantized output or a weight
    to quantize) with the `others` (the stored side)."""
    return t.dtype in NATIVE_DTYPES and all(x.device.type == "cpu" for x in (t, *others))
