"""Model adapters: a uniform `MoELayer` view of every MoE block, one file per model family."""
from __future__ import annotations

from torch import nn

from .base import MoELayer
from .mixtral import MixtralLayer, mixtral_layers
from .switch import SwitchLayer, switch_layers

FAMILIES = {
    "switch_transformers": switch_layers,
    "mixtral": mixtral_layers,
}


def moe_layers(model: nn.Module, allow_empty: bool = False) -> list[MoELayer]:
    """Every MoE layer of a supported model, in module order (an error when there is none, unless
    allow_empty)."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in FAMILIES:
        raise ValueError(
            f"unsupported model type {model_type!r}; supported: {', '.join(sorted(FAMILIES))}"
        )
    layers = FAMILIES[model_type](model)
    if not layers and not allow_empty:
        raise ValueError(f"no MoE layer found in this {model_type} model (are its sparse layers configured?)")
    return layers


__all__ = ["MoELayer", "SwitchLayer", "MixtralLayer", "moe_layers", "FAMILIES"]
