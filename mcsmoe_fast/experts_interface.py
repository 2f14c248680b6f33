"""mcsmoe_fast as a transformers experts implementation.

Importing mcsmoe_fast registers `"mcsmoe_fast"` in transformers' `ExpertsInterface`, so for every family
whose experts use `use_experts_implementation` (Mixtral, Qwen2/3-MoE, OLMoE, DeepSeek-V3, GPT-OSS,
Qwen3-Next, ...):

    model = AutoModelForCausalLM.from_pretrained(path, experts_implementation="mcsmoe_fast")
    model.set_experts_implementation("mcsmoe_fast")

run the fused grouped expert FFN (ops.grouped_expert_ffn) with no module swapping: parameter names,
layout and everything transformers does with the model stay as they are. An experts module that carries
an `expert_map` buffer [E] (slots shared by several experts) is honoured.

The op reads the family's parameters on every call: views of them for families stored gate rows then up
rows (transposed or not: strides to the GEMMs), and for interleaved gate/up (GPT-OSS) a gate-first copy of
the slots the call's tokens use, made for that call and dropped after it. No re-laid-out copy is kept
between calls: nothing could tell when it went stale (an in-place write through `.data`, as weight loaders
and patching tools do, leaves the version counter as it was, and inference tensors have none). The copy is
differentiable, so gradients reach the family's own parameters.
"""
from __future__ import annotations

import torch
from torch import nn

from . import ops
from .models.experts_spec import ExpertsSpec

NAME = "mcsmoe_fast"


def _expert_map(module: nn.Module, num_experts: int, device) -> torch.Tensor:
    emap = getattr(module, "expert_map", None)
    if isinstance(emap, torch.Tensor):
        return emap
    return torch.arange(num_experts, device=device)  # made per call: nothing kept on the module


def fused_arguments(module: nn.Module, spec: ExpertsSpec, top_k_index: torch.Tensor):
    """(w_in, w_out, b_in, b_out, expert_map) of ops.grouped_expert_ffn for this call. Where the layout needs a
    copy (spec.copies_weights), only the slots that `top_k_index` [T, k] uses are copied, and expert_map sends
    each expert to its slot's place among them (a decoding token touches k slots, not all S)."""
    bank = module.gate_up_proj if spec.gated else module.up_proj
    num_slots = bank.shape[0]
    emap = _expert_map(module, num_slots, bank.device)
    if not spec.copies_weights or torch.compiler.is_compiling():  # compiled: static shapes, every slot
        return (*spec.fused_tensors(module), emap)
    used = torch.unique(emap[top_k_index[top_k_index >= 0]])  # sorted
    if used.numel() == num_slots:
        return (*spec.fused_tensors(module), emap)
    if used.numel() == 0:  # no token has an expert: one slot keeps the op's arguments well formed
        used = emap.new_zeros(1)
    place = torch.zeros(num_slots, dtype=torch.int64, device=emap.device)
    place[used] = torch.arange(used.numel(), device=emap.device)
    return (*spec.fused_tensors(module, used), place[emap])


def mcsmoe_fast_experts_forward(self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                                top_k_weights: torch.Tensor) -> torch.Tensor:
    """The ExpertsInterface entry: `self` is the family's experts module."""
    if getattr(self, "_is_expert_parallel", False):
        raise NotImplementedError(f"{type(self).__name__}: the mcsmoe_fast experts implementation does not run "
                                  "expert-parallel shards; use grouped_mm for expert parallelism")
    spec = ExpertsSpec.of(self)
    top_k_index = top_k_index.long()
    w_in, w_out, b_in, b_out, emap = fused_arguments(self, spec, top_k_index)
    return ops.grouped_expert_ffn(hidden_states, w_in, w_out, emap, top_k_index, top_k_weights,
                                  spec.activation, b_in, b_out, **spec.activation_args)


def register() -> bool:
    """Register NAME in transformers' ExpertsInterface (idempotent); False when transformers has none."""
    try:
        from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
    except ImportError:
        return False
    ALL_EXPERTS_FUNCTIONS.register(NAME, mcsmoe_fast_experts_forward)
    return True
