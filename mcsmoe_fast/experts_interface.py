"""mcsmoe_fast as a transformers experts implementation.

Importing mcsmoe_fast registers `"mcsmoe_fast"` in transformers' `ExpertsInterface`, so for every family
whose experts use `use_experts_implementation` (Mixtral, Qwen2/3-MoE, OLMoE, DeepSeek-V3, GPT-OSS,
Qwen3-Next, ...):

    model = AutoModelForCausalLM.from_pretrained(path, experts_implementation="mcsmoe_fast")
    model.set_experts_implementation("mcsmoe_fast")

run the fused grouped expert FFN (ops.grouped_expert_ffn) with no module swapping: parameter names,
layout and everything transformers does with the model stay as they are. An experts module that carries
an `expert_map` buffer [E] (slots shared by several experts) is honoured.

Families stored in our canonical layout (gate rows then up rows, [E, F, d]) are read in place. For a
transposed or interleaved layout (GPT-OSS) the canonical weights are a copy, kept on the module and
rebuilt when a parameter changes (its version counter); under autograd the copy is made differentiably
on every call instead, so gradients reach the family's own parameters.
"""
from __future__ import annotations

import torch
from torch import nn

from . import ops
from .models.experts_spec import ExpertsSpec

NAME = "mcsmoe_fast"


def _params(module: nn.Module, spec: ExpertsSpec) -> list[torch.Tensor]:
    names = ["gate_up_proj" if spec.gated else "up_proj", "down_proj"]
    if spec.has_bias:
        names += ["gate_up_proj_bias" if spec.gated else "up_proj_bias", "down_proj_bias"]
    return [getattr(module, n) for n in names]


def canonical_tensors(module: nn.Module, spec: ExpertsSpec):
    """(w_in, w_out, b_in, b_out) in the canonical layout for the fused op."""
    in_place = spec.concatenated or not spec.gated
    if in_place or torch.is_grad_enabled() and any(p.requires_grad for p in _params(module, spec)):
        return (*spec.weights(module), *spec.biases(module))
    key = tuple((p.data_ptr(), p._version, p.dtype, p.device) for p in _params(module, spec))
    cached = module.__dict__.get("_mcsmoe_canonical")
    if cached is None or cached[0] != key:
        with torch.no_grad():
            tensors = tuple(None if t is None else t.contiguous() for t in (*spec.weights(module), *spec.biases(module)))
        cached = (key, tensors)
        module.__dict__["_mcsmoe_canonical"] = cached  # not a buffer: no state_dict entry
    return cached[1]


def _expert_map(module: nn.Module, num_experts: int, device) -> torch.Tensor:
    emap = getattr(module, "expert_map", None)
    if isinstance(emap, torch.Tensor):
        return emap
    cached = module.__dict__.get("_mcsmoe_identity")
    if cached is None or cached.numel() != num_experts or cached.device != device:
        cached = torch.arange(num_experts, device=device)
        module.__dict__["_mcsmoe_identity"] = cached
    return cached


def mcsmoe_fast_experts_forward(self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                                top_k_weights: torch.Tensor) -> torch.Tensor:
    """The ExpertsInterface entry: `self` is the family's experts module."""
    if getattr(self, "_is_expert_parallel", False):
        raise NotImplementedError(f"{type(self).__name__}: the mcsmoe_fast experts implementation does not run "
                                  "expert-parallel shards; use grouped_mm for expert parallelism")
    spec = ExpertsSpec.of(self)
    w_in, w_out, b_in, b_out = canonical_tensors(self, spec)
    emap = _expert_map(self, w_in.shape[0], w_in.device)
    return ops.grouped_expert_ffn(hidden_states, w_in, w_out, emap, top_k_index.long(), top_k_weights,
                                  spec.activation, b_in, b_out, **spec.activation_args)


def register() -> bool:
    """Register NAME in transformers' ExpertsInterface (idempotent); False when transformers has none."""
    try:
        from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
    except ImportError:
        return False
    ALL_EXPERTS_FUNCTIONS.register(NAME, mcsmoe_fast_experts_forward)
    return True
