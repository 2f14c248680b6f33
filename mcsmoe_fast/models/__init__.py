"""Model adapters: a uniform `MoELayer` view of every MoE block, found through the registry of families
(registry.py: each adapter module declares its own). Switch Transformers has its own adapter (switch.py:
its experts are a ModuleDict of MLPs), Llama-4 too (llama4.py); the
families on transformers' `use_experts_implementation` experts contract are found by structure through the
generic adapter (experts.py).
"""
from __future__ import annotations

from torch import nn

from .base import MoELayer, expert_weights_per_expert, select_layers
from .experts import ExpertsLayer
from .registry import Family, families, family_of, tested_model_types
from .stored_tensors import ExpertTensors
from .switch import SwitchLayer


def _is_moe_family(model: nn.Module) -> bool:
    """transformers' own test for a model class whose experts use the contract (it reads the modeling source)."""
    check = getattr(type(model), "_can_set_experts_implementation", None)
    try:
        return bool(check()) if check is not None else False
    except Exception:  # a model class transformers cannot inspect
        return False


def unwrap(model: nn.Module) -> nn.Module:
    """The module a torch.compile'd model compiles (OptimizedModule._orig_mod: its names carry no `_orig_mod.`
    prefix), or `model` itself. The steps and saves work on it; the compiled wrapper runs the same modules."""
    inner = getattr(model, "_orig_mod", None)
    return inner if isinstance(inner, nn.Module) else model


def moe_layers(model: nn.Module, allow_empty: bool = False) -> list[MoELayer]:
    """Every MoE layer of a supported model (a torch.compile'd one: of the module it compiles), in module order
    (an error when there is none, unless allow_empty and the model is of an MoE family)."""
    model = unwrap(model)
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    family = family_of(model_type)
    layers = family.find_layers(model)
    if layers:
        return layers
    if not family.model_types and not _is_moe_family(model):
        raise ValueError(
            f"no MoE layer mcsmoe_fast can handle in this {model_type!r} model: supported are Switch Transformers "
            "and transformers MoE families whose experts use `use_experts_implementation` "
            f"(tested: {', '.join(tested_model_types())})"
        )
    if not allow_empty:
        raise ValueError(f"no MoE layer found in this {model_type} model: {type(model).__name__} holds no experts "
                         "module (every layer dense as configured, or a part of a multimodal model without experts: "
                         "load its text model)")
    return []


__all__ = ["MoELayer", "select_layers", "expert_weights_per_expert", "SwitchLayer", "ExpertsLayer", "moe_layers",
           "unwrap", "Family", "families", "family_of", "ExpertTensors"]
