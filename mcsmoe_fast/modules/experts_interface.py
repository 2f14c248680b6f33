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
rows (transposed or not: strides to the GEMMs). Interleaved gate/up (GPT-OSS) runs the fused op on the stored
banks too on the CPU (its activation reads gate and up where they are stored: "clamped_swiglu_interleaved",
forward and backward), and a composed path on them on other devices (interleaved_forward). No re-laid-out
copy is kept between calls: nothing could tell when it went stale (an in-place write through `.data`, as
weight loaders and patching tools do, leaves the version counter as it was, and inference tensors have none).
"""
from __future__ import annotations

import torch
from torch import nn

from .. import activations, ops
from ..activations import CLAMPED_SWIGLU, CLAMPED_SWIGLU_INTERLEAVED
from .experts_spec import ExpertsSpec

NAME = "mcsmoe_fast"


def _expert_map(module: nn.Module, num_experts: int, device) -> torch.Tensor:
    emap = getattr(module, "expert_map", None)
    if isinstance(emap, torch.Tensor):
        return emap
    return torch.arange(num_experts, device=device)  # made per call: nothing kept on the module


def interleaved_forward(module: nn.Module, spec: ExpertsSpec, hidden: torch.Tensor, top_k_index: torch.Tensor,
                        top_k_weights: torch.Tensor) -> torch.Tensor:
    """Interleaved gate/up (GPT-OSS), read where it is stored: per used slot one GEMM on its stored bank,
    the activation on the output's gate and up columns (the [n, 2F] activations are reordered, never the
    weights), one GEMM out, the routing weight, and a sum per token: for devices other than the CPU, whose
    fused kernels read gate-first rows and would need a copy of the banks on every call (the CPU's fused op
    reads them as stored: stored_interleaved_forward). Plain torch ops, so gradients reach the module's own
    parameters."""
    w1, w2 = (module.gate_up_proj, module.down_proj)
    emap = _expert_map(module, w1.shape[0], w1.device)
    flat = top_k_index.reshape(-1)
    valid = flat >= 0
    slots = torch.where(valid, emap[flat.clamp_min(0)], -1)
    order = torch.argsort(slots, stable=True)
    counts = torch.bincount(slots[valid], minlength=w1.shape[0]).tolist()
    weights = top_k_weights.reshape(-1)
    out = torch.zeros_like(hidden)
    start = int((~valid).sum())
    for s, n in enumerate(counts):
        if n == 0:
            continue
        pairs = order[start:start + n]
        start += n
        tokens = pairs // top_k_index.shape[1]
        x = hidden[tokens].to(w1.dtype)
        h = x @ w1[s] if spec.transposed else x @ w1[s].T
        if spec.has_bias:
            h = h + module.gate_up_proj_bias[s]
        a = activations.apply(torch.cat([h[:, 0::2], h[:, 1::2]], dim=-1), spec.activation, **spec.activation_args)
        y = a @ w2[s] if spec.transposed else a @ w2[s].T
        if spec.has_bias:
            y = y + module.down_proj_bias[s]
        out.index_add_(0, tokens, (y * weights[pairs, None]).to(out.dtype))
    return out


def mcsmoe_fast_experts_forward(self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                                top_k_weights: torch.Tensor) -> torch.Tensor:
    """The ExpertsInterface entry: `self` is the family's experts module."""
    if getattr(self, "_is_expert_parallel", False):
        raise NotImplementedError(f"{type(self).__name__}: the mcsmoe_fast experts implementation does not run "
                                  "expert-parallel shards; use grouped_mm for expert parallelism")
    spec = ExpertsSpec.of(self)
    top_k_index = top_k_index.long()
    if spec.copies_weights and _fused_on_stored_banks(spec, hidden_states):
        return stored_interleaved_forward(self, spec, hidden_states, top_k_index, top_k_weights)
    if spec.copies_weights and not torch.compiler.is_compiling():  # compiled: the fused op on a traced copy
        return interleaved_forward(self, spec, hidden_states, top_k_index, top_k_weights)
    w_in, w_out, b_in, b_out = spec.fused_tensors(self)
    emap = _expert_map(self, w_in.shape[0], w_in.device)
    return ops.grouped_expert_ffn(hidden_states, w_in, w_out, emap, top_k_index, top_k_weights,
                                  spec.activation, b_in, b_out, **spec.activation_args)


def _fused_on_stored_banks(spec: ExpertsSpec, hidden: torch.Tensor) -> bool:
    """Whether the fused op runs on interleaved banks as stored: clamped SwiGLU (the interleaved activation it
    knows), on the CPU (its CUDA kernels read gate-first rows), eager (compiled: the traced copy below)."""
    return spec.activation == CLAMPED_SWIGLU and hidden.device.type == "cpu" and not torch.compiler.is_compiling()


def stored_interleaved_forward(module: nn.Module, spec: ExpertsSpec, hidden: torch.Tensor, top_k_index: torch.Tensor,
                               top_k_weights: torch.Tensor) -> torch.Tensor:
    """The fused op on GPT-OSS's banks where they are stored (views: transposed banks are strides to its GEMMs),
    its activation reading the interleaved gate and up columns: no copy of any weight. Differentiable: the
    gradients reach the module's own parameters through the views."""
    w_in, w_out = module.gate_up_proj, module.down_proj
    if spec.transposed:
        w_in, w_out = w_in.transpose(1, 2), w_out.transpose(1, 2)
    b_in, b_out = (module.gate_up_proj_bias, module.down_proj_bias) if spec.has_bias else (None, None)
    emap = _expert_map(module, w_in.shape[0], w_in.device)
    return ops.grouped_expert_ffn(hidden, w_in, w_out, emap, top_k_index, top_k_weights, CLAMPED_SWIGLU_INTERLEAVED,
                                  b_in, b_out, **spec.activation_args)


def register() -> bool:
    """Register NAME in transformers' ExpertsInterface (idempotent); False when transformers has none."""
    try:
        from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
    except ImportError:
        return False
    ALL_EXPERTS_FUNCTIONS.register(NAME, mcsmoe_fast_experts_forward)
    return True
