"""The registry of model families: what mcsmoe_fast knows about each, in one entry.

A family owns its `model_type`s, the discovery of its MoE blocks (a function returning its adapter's
MoELayers; the adapter class owns the rest: weights in the canonical layout, routing, router masking for the
drop baseline, block replacement, stored tensor names), its head class and how streaming runs it. Families
on transformers' experts contract need no entry of their own: the last entry finds them by structure.

A new family: an adapter module in models/ (an MoELayer subclass and its discovery function), one entry
here, a builder in tiny.py, its tests, and its row in the README table.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from .base import MoELayer
from .experts import experts_layers
from .llama4 import MODEL_TYPES, llama4_layers
from .switch import switch_layers


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]  # config.model_type values it owns; () for the structural fallback
    find_layers: Callable[[nn.Module], list[MoELayer]]  # every MoE block, in module order
    seq2seq: bool = False  # loaded with AutoModelForSeq2SeqLM (else AutoModelForCausalLM)
    # streaming: "layers" (the layer-by-layer forward runs its decoder layers), "dispatch" (only the model's
    # own forward runs it, through accelerate's device maps), None (not streamed: in-memory pipeline only)
    streaming: str | None = None


FAMILIES: tuple[Family, ...] = (
    Family("switch_transformers", ("switch_transformers",), switch_layers, seq2seq=True, streaming="dispatch"),
    Family("decoder experts contract", ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "gpt_oss"),
           experts_layers, streaming="layers"),
    Family("hybrid-attention experts contract", ("qwen3_next", "qwen3_5_moe_text"), experts_layers,
           streaming="dispatch"),
    Family("llama4", MODEL_TYPES, llama4_layers),  # own layout and block (models/llama4.py); not streamed
    Family("experts contract", (), experts_layers),  # any other family on the contract, found by structure
)


def family_of(model_type: str | None) -> Family:
    """The family that owns `model_type` (the structural fallback for any other)."""
    return next((f for f in FAMILIES if model_type in f.model_types), FAMILIES[-1])


def tested_model_types() -> tuple[str, ...]:
    return tuple(t for f in FAMILIES for t in f.model_types)
