"""optimize(model): run every MoE layer through the fused ops, in place.

Families whose experts use transformers' `use_experts_implementation` contract keep their own modules,
parameter names and layout: their unmerged layers switch to the "mcsmoe_fast" experts implementation
(modules/experts_interface.py), so transformers' save_pretrained, from_pretrained, tensor-parallel plans and
set_experts_implementation keep working. Merged and compressed layers already are our slot modules.
Switch blocks (no experts contract) become SwitchMoE, which keeps transformers' state-dict names
(`experts.expert_{i}.wi.weight`, ...) and its expert dropout in training mode. A model on the meta device
is optimized without memory (the swapped modules are on meta, ready for load_state_dict(..., assign=True)).
"""
from __future__ import annotations

import warnings

from torch import nn

from .checkpoint.plain_save import guard_plain_save
from .models import moe_layers, unwrap
from .modules.experts_interface import NAME as EXPERTS_IMPLEMENTATION


def optimize(model: nn.Module, dropless: bool | None = None) -> nn.Module:
    """Run every MoE layer of `model` through `ops.grouped_expert_ffn`; returns the same model.

    Unmerged layers of the experts-contract families (Mixtral, Qwen-MoE, DeepSeek-V3, GPT-OSS, ...) use the
    "mcsmoe_fast" experts implementation on their own parameters; merged layers keep their slots and
    compressed layers (compress_experts) their low-rank-plus-rows slots (ops.grouped_expert_ffn_slr).
    Switch blocks become SwitchMoE (unmerged: MoEExperts over the E experts) with HF's expert capacity
    unless `dropless=True`; `dropless=None` (the default) keeps each block's own setting (a dropless checkpoint
    loaded by from_pretrained stays dropless); their state dict has transformers' keys, so transformers loads it
    as this model. Frozen experts stay frozen, matrix by matrix (Switch's wi and wo each become one parameter: a
    layer whose experts are frozen differently within one of them is refused by name before any layer changes).
    Experts offloaded by accelerate are refused by name (Switch), or brought in per call (Llama-4).
    Outputs equal the original model's (up to floating-point rounding of the GEMMs), in training mode too
    (Switch's expert dropout draws transformers' masks). Switch and Llama-4 blocks are replaced by new modules that
    keep transformers' router module (its hooks and its output) and take over the old block's hooks (their handles
    still remove them). Llama-4's experts module runs as in transformers (every expert on every token, no fused op)
    while it has hooks of its own, so that they see its input and output. A Switch block's experts become new
    slots: hooks registered on them, and an optimizer built before, hold the old ones (call optimize() first).
    `model` is the transformers model (or a part of it with the model's config, such as its base model
    `model.model` or a Switch stack); a part without one (a decoder layer, an MoE block) is refused by name.
    A torch.compile'd model is optimized in the module it compiles, and returned compiled.
    """
    given, model = model, unwrap(model)
    if getattr(getattr(model, "config", None), "model_type", None) is None:
        raise ValueError(f"optimize() takes the transformers model (a PreTrainedModel: the ...ForCausalLM, or its "
                         f"base model model.model), got {type(model).__name__}, which has no model config: pass the "
                         "model that holds it (its family and experts implementation are the model's)")
    if dropless is not None and not isinstance(dropless, bool):  # a string such as "no" would read as True
        raise ValueError(f"optimize: dropless must be True, False or None, got {dropless!r}")
    layers = moe_layers(model, allow_empty=True)
    if not layers:
        warnings.warn(f"optimize: this {model.config.model_type} model has no MoE layer; returned unchanged",
                      stacklevel=2)
        return given
    for layer in layers:  # its refusals (experts of one bank frozen differently) before any layer changes
        layer.stacked_requires_grad()
    ours = False
    for layer in layers:
        ours |= layer.optimize(dropless)
    if any(layer.experts_implementation for layer in layers):
        model.set_experts_implementation(EXPERTS_IMPLEMENTATION)
    if ours:
        guard_plain_save(model)
    return given
