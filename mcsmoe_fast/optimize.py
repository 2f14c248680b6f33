"""optimize(model): swap every Hugging Face MoE block's experts for the fused modules, in place."""
from __future__ import annotations

import warnings

from torch import nn

from .models import moe_layers
from .compressed import CompressedMoEExperts
from .modules import MoEExperts, SwitchMoE
from .plain_save import guard_plain_save


def optimize(model: nn.Module, dropless: bool = False) -> nn.Module:
    """Run every MoE layer of `model` through `ops.grouped_expert_ffn`; returns the same model.

    Unmerged layers get MoEExperts over their E experts (identity expert_map) sharing the fused
    weights where the family stores them fused (Mixtral: no copy), merged layers keep their slots, and
    compressed layers (compress_experts) keep their low-rank-plus-rows slots (ops.grouped_expert_ffn_slr).
    Switch blocks become SwitchMoE with HF's expert capacity unless `dropless=True`.
    Outputs equal the original model's (up to floating-point rounding of the GEMMs).
    """
    layers = moe_layers(model, allow_empty=True)
    if not layers:
        warnings.warn(f"optimize: this {model.config.model_type} model has no MoE layer; returned unchanged",
                      stacklevel=2)
        return model
    for layer in layers:
        experts = getattr(layer.module, "experts", None)
        if not isinstance(experts, (MoEExperts, CompressedMoEExperts)):
            w_in, w_out = layer.expert_weights()
            experts = MoEExperts(w_in.detach(), w_out.detach(), layer.expert_map(), layer.activation)
            experts.train(layer.module.training)
        layer.install_experts(experts)
        if isinstance(layer.parent, nn.Module) and isinstance(getattr(layer.parent, layer.attr), SwitchMoE):
            getattr(layer.parent, layer.attr).dropless = dropless
    return guard_plain_save(model)
