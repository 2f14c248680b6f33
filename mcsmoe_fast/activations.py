"""The expert activations the fused ops know, and how each model family's config names them.

Ungated experts compute w_out @ act(w_in @ x) with F = ff rows in w_in; gated experts (Mixtral-style)
compute w_out @ (act(gate) * up) with w_in = [gate rows; up rows], F = 2 * ff. GPT-OSS's clamped SwiGLU
is gated too (same layout) but not act(gate) * up: with g = min(gate, limit) and u = clamp(up, -limit,
limit) it is (u + 1) * g * sigmoid(alpha * g); alpha and limit come from the model (1.702 and 7.0 in
GPT-OSS) and are ignored by the other activations. A family whose configured activation is not listed
here is refused with an error naming it, never run with another.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

UNGATED = ("relu", "relu2", "gelu", "gelu_tanh", "silu")  # relu2: squared ReLU relu(x)^2 (Nemotron-H)
GATED = {"reglu": "relu", "geglu": "gelu", "geglu_tanh": "gelu_tanh", "swiglu": "silu"}  # name -> act(gate)
CLAMPED_SWIGLU = "clamped_swiglu"  # GPT-OSS: gated, but its own formula (clamped_swiglu below)
ACTIVATIONS = UNGATED + tuple(GATED) + (CLAMPED_SWIGLU,)
# clamped_swiglu on GPT-OSS's stored order, gate and up interleaved (gate0, up0, gate1, ...): what the experts
# implementation runs on GPT-OSS's own banks; ops.grouped_expert_ffn on the CPU only (forward and backward; its
# CUDA kernels and the compressed op refuse it), so it is not one of ACTIVATIONS
CLAMPED_SWIGLU_INTERLEAVED = "clamped_swiglu_interleaved"
ALPHA, LIMIT = 1.702, 7.0  # clamped_swiglu's defaults: GPT-OSS's

# transformers' ACT2FN names -> our element-wise function (same function: exact or to rounding)
HF_NAMES = {
    "relu": "relu", "gelu": "gelu", "gelu_python": "gelu",
    "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu_python_tanh": "gelu_tanh",
    "silu": "silu", "swish": "silu", "relu2": "relu2",
}


def is_gated(activation: str) -> bool:
    check(activation)
    return activation in GATED or activation == CLAMPED_SWIGLU


def check(activation: str) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown expert activation {activation!r}; supported: {', '.join(ACTIVATIONS)}")


def from_config(hf_name: str, gated: bool, where: str) -> str:
    """Our activation for transformers' activation name `hf_name` (gated or not); `where` names the model
    family for the error."""
    fn = HF_NAMES.get(hf_name)
    if fn is None:
        raise ValueError(f"{where}: expert activation {hf_name!r} is not supported by mcsmoe_fast's fused ops "
                         f"(supported: {', '.join(sorted(HF_NAMES))})")
    if not gated:
        return fn
    name = next((name for name, base in GATED.items() if base == fn), None)
    if name is None:
        raise ValueError(f"{where}: gated expert activation {hf_name!r} ({hf_name}(gate) * up) is not supported by "
                         f"mcsmoe_fast's fused ops (gated: {', '.join(sorted(h for h, f in HF_NAMES.items() if f in GATED.values()))})")
    return name


def elementwise(x: torch.Tensor, fn: str) -> torch.Tensor:
    if fn == "relu":
        return F.relu(x)
    if fn == "relu2":
        return F.relu(x).square()
    if fn == "gelu":
        return F.gelu(x)
    if fn == "gelu_tanh":
        return F.gelu(x, approximate="tanh")
    return F.silu(x)


def clamped_swiglu(gate: torch.Tensor, up: torch.Tensor, alpha: float = ALPHA, limit: float = LIMIT) -> torch.Tensor:
    """GPT-OSS's gated activation, as transformers' GptOssExperts computes it (autograd through torch's clamp:
    the gradient passes where min <= x <= max)."""
    gate = gate.clamp(min=None, max=limit)
    up = up.clamp(min=-limit, max=limit)
    return (up + 1) * (gate * torch.sigmoid(gate * alpha))


def apply(h: torch.Tensor, activation: str, alpha: float = ALPHA, limit: float = LIMIT) -> torch.Tensor:
    """The expert activation on h [..., F]: act(h), or act(gate) * up for gated activations (gate columns,
    then up columns), or clamped_swiglu(gate, up, alpha, limit) (CLAMPED_SWIGLU_INTERLEAVED: gate and up
    columns interleaved)."""
    if activation == CLAMPED_SWIGLU_INTERLEAVED:
        return clamped_swiglu(h[..., 0::2], h[..., 1::2], alpha, limit)
    check(activation)
    if activation == CLAMPED_SWIGLU:
        gate, up = h.chunk(2, dim=-1)
        return clamped_swiglu(gate, up, alpha, limit)
    if activation in GATED:
        gate, up = h.chunk(2, dim=-1)
        return elementwise(gate, GATED[activation]) * up
    return elementwise(h, activation)
