"""The expert activations the fused ops know, and how each model family's config names them.

Ungated experts compute w_out @ act(w_in @ x) with F = ff rows in w_in; gated experts (Mixtral-style)
compute w_out @ (act(gate) * up) with w_in = [gate rows; up rows], F = 2 * ff. A family whose
configured activation is not listed here is refused with an error naming it, never run with another.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

UNGATED = ("relu", "gelu", "gelu_tanh", "silu")
GATED = {"reglu": "relu", "geglu": "gelu", "geglu_tanh": "gelu_tanh", "swiglu": "silu"}  # name -> act(gate)
ACTIVATIONS = UNGATED + tuple(GATED)

# transformers' ACT2FN names -> our element-wise function (same function: exact or to rounding)
HF_NAMES = {
    "relu": "relu", "gelu": "gelu", "gelu_python": "gelu",
    "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu_python_tanh": "gelu_tanh",
    "silu": "silu", "swish": "silu",
}


def is_gated(activation: str) -> bool:
    check(activation)
    return activation in GATED


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
    return next(name for name, base in GATED.items() if base == fn)


def elementwise(x: torch.Tensor, fn: str) -> torch.Tensor:
    if fn == "relu":
        return F.relu(x)
    if fn == "gelu":
        return F.gelu(x)
    if fn == "gelu_tanh":
        return F.gelu(x, approximate="tanh")
    return F.silu(x)


def apply(h: torch.Tensor, activation: str) -> torch.Tensor:
    """The expert activation on h [..., F]: act(h), or act(gate) * up for gated activations."""
    check(activation)
    if activation in GATED:
        gate, up = h.chunk(2, dim=-1)
        return elementwise(gate, GATED[activation]) * up
    return elementwise(h, activation)
