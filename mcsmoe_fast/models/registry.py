"""The registry of model families: what mcsmoe_fast knows about each, in one entry that its adapter declares.

A family owns its `model_type`s, the discovery of its MoE blocks (a function returning its adapter's
MoELayers; the adapter class owns the rest: weights in the canonical layout, routing, router masking for the
drop baseline, block replacement, stored tensor names), its head class and how streaming runs it. Families
on transformers' experts contract need no entry of their own: the structural fallback finds them.

Each adapter module of this package declares its families at module level (`FAMILIES = (Family(...), ...)`);
`families()` imports every module of the package once and collects them, so a new family is its adapter
module (the MoELayer subclass, its discovery function, its Family), a builder in tiny.py, its tests, and its
row in the README table: nothing here changes.
"""
from __future__ import annotations

import functools
import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from .base import MoELayer


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]  # config.model_type values it owns; () for the structural fallback
    find_layers: Callable[[nn.Module], list[MoELayer]]  # every MoE block, in module order
    seq2seq: bool = False  # loaded with AutoModelForSeq2SeqLM (else AutoModelForCausalLM)
    # streaming: "layers" (the layer-by-layer forward runs its decoder layers), "dispatch" (only the model's
    # own forward runs it, through accelerate's device maps), None (not streamed: in-memory pipeline only)
    streaming: str | None = None


@functools.cache
def families() -> tuple[Family, ...]:
    """Every family the adapter modules declare (modules in name order, each module's in its own order),
    the structural fallback (the one family without model types) last. Collected on first use: the adapter
    modules import this one for `Family`."""
    declared = []
    for info in sorted(pkgutil.iter_modules(_package_path()), key=lambda m: m.name):
        module = importlib.import_module(f"{__package__}.{info.name}")
        declared.extend(getattr(module, "FAMILIES", ()))
    owners: dict[str, str] = {}
    for family in declared:
        for model_type in family.model_types:
            if model_type in owners:
                raise RuntimeError(f"model type {model_type!r} is claimed by two families: {owners[model_type]!r} "
                                   f"and {family.name!r}")
            owners[model_type] = family.name
    fallbacks = [f for f in declared if not f.model_types]
    if len(fallbacks) != 1:
        raise RuntimeError(f"expected one structural fallback family (no model types), found {len(fallbacks)}")
    return tuple(f for f in declared if f.model_types) + tuple(fallbacks)


def _package_path() -> list[str]:
    return list(importlib.import_module(__package__).__path__)


def family_of(model_type: str | None) -> Family:
    """The family that owns `model_type` (the structural fallback for any other)."""
    found = families()
    return next((f for f in found if model_type in f.model_types), found[-1])


def tested_model_types() -> tuple[str, ...]:
    return tuple(t for f in families() for t in f.model_types)
