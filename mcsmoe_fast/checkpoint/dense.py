"""to_dense: a plain transformers model computing what a merged model computes (the dense export)."""
from __future__ import annotations

import torch
from torch import nn

from ..models import expert_weights_per_expert, moe_layers
from ..sections import COMPRESS_SECTION, MERGE_SECTION
from .format import merged_layers
from .standard import NO_CAPACITY, build_export, carry_generation_config, dropless


@torch.no_grad()
def to_dense(model: nn.Module) -> nn.Module:
    """A plain transformers model computing what `model` computes, each expert given its group's weights."""
    merged = merged_layers(model)
    dropped = [n for n, e in merged.items() if e.get("dropped")]
    if dropped:
        raise ValueError(f"export_dense: layers {dropped} have dropped experts (strategy='drop'); a plain "
                         "transformers checkpoint cannot mask router logits, save the merged format instead")
    config = model.config.__class__.from_dict(model.config.to_dict())
    for section in (MERGE_SECTION, COMPRESS_SECTION):  # every expert dense again: nothing merged or compressed
        if hasattr(config, section):
            delattr(config, section)
    if config.model_type == "switch_transformers" and dropless(model):
        config.expert_capacity = NO_CAPACITY  # every token reaches its expert, as in the model
    dense = build_export(model, config)
    ours, theirs = model.state_dict(), dense.state_dict()
    dense.load_state_dict({k: v for k, v in ours.items() if k in theirs}, strict=False)  # all but merged experts
    prefixes = tuple(f"{name}." for name in merged)
    missing = sorted(k for k in set(theirs) - set(ours) if not k.startswith(prefixes))
    if missing:
        raise ValueError(f"export_dense: the model has no weights for {missing[:5]}")
    ours_layers = {layer.name: layer for layer in moe_layers(model)}
    for layer in moe_layers(dense):
        if layer.name in merged:
            w_in, w_out, b_in, b_out = expert_weights_per_expert(ours_layers[layer.name], biases=True)
            if b_in is None and b_out is None:
                layer.set_expert_weights(w_in, w_out)
            else:
                layer.set_expert_weights(w_in, w_out, b_in=b_in, b_out=b_out)
    dense.tie_weights()
    carry_generation_config(model, dense)
    return dense.eval()
