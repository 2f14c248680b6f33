"""The `drop` baseline of merging: prune the non-dominant experts by masking their router logits to
-inf before top-k, so the router never picks them (the pruning baselines of the MC-SMoE paper).

Routers it can mask: Switch's classifier, Llama-4's sigmoid top-k router, and the softmax top-k gates of
Mixtral, Qwen2-MoE, Qwen3-MoE and OLMoE (the other families choose experts their own way: sigmoid groups, biased logits); each family's
adapter masks its own router (modules/masked_router.py), so masked checkpoints save and load like any
other (checkpoint/load.py reinstalls the masks from its JSON section).
"""
from __future__ import annotations

import torch

from .models import MoELayer


def check_maskable(layer: MoELayer) -> None:
    """ValueError unless the drop baseline can mask this layer's router logits (each family's adapter says)."""
    layer.check_maskable()


def install_logit_mask(layer: MoELayer, keep) -> None:
    """Mask the router logits of the experts with keep[e] == False in this layer (at least one kept)."""
    keep = torch.as_tensor(keep, dtype=torch.bool)
    if keep.shape != (layer.num_experts,) or not keep.any():
        raise ValueError(f"{layer.name}: keep must be [{layer.num_experts}] booleans with at least one True, "
                         f"got {keep.tolist()}")
    layer.mask_router(keep)


def logit_mask(layer: MoELayer) -> torch.Tensor | None:
    """The layer's keep mask [E], or None when no expert is masked."""
    return layer.logit_mask()
