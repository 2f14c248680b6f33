"""The one view of an MoE layer that every step of the pipeline works on.

Each model family (switch.py, mixtral.py) maps its Hugging Face modules onto `MoELayer`. Expert weights
always travel in the fused layout of Mixtral-style models:

    w_in  [S, F, d]   F = ff for ReLU experts, 2 * ff for SwiGLU experts (gate rows, then up rows)
    w_out [S, d, ff]

where S is the number of stored expert slots: S = E for an original layer, S = G after merging, and
`expert_map` [E] names the slot each of the E original experts uses.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class MoELayer:
    """One MoE block of a model, seen through its family's adapter."""

    name: str  # dotted module path of the MoE block inside the model
    module: nn.Module  # the block itself (HF module or our drop-in replacement)
    parent: nn.Module  # the module that owns `module` as attribute `attr`
    attr: str
    num_experts: int
    top_k: int
    activation: str  # one of activations.ACTIVATIONS, read from the model's config

    # --- implemented per family -----------------------------------------------------------------
    def router_weight(self) -> torch.Tensor:
        """Router (gate) weight [E, d]. The router is never changed by merging."""
        raise NotImplementedError

    def router_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Router logits [T, E] for hidden states [T, d], exactly as the block computes them."""
        raise NotImplementedError

    def expert_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(w_in [S, F, d], w_out [S, d, ff]); copies for modular layouts, views for fused ones."""
        raise NotImplementedError

    def set_expert_weights(self, w_in: torch.Tensor, w_out: torch.Tensor) -> None:
        """Write weights of the same shape back into the block, in place."""
        raise NotImplementedError

    def expert_map(self) -> torch.Tensor:
        """Slot of each original expert, int64 [E] (identity for an unmerged layer)."""
        experts = getattr(self.module, "experts", None)
        if experts is not None and hasattr(experts, "expert_map"):
            return experts.expert_map
        return torch.arange(self.num_experts, device=self.router_weight().device)

    # --- shared helpers --------------------------------------------------------------------------
    @property
    def intermediate_size(self) -> int:
        return self.expert_weights()[1].shape[-1]

    @property
    def hidden_size(self) -> int:
        return self.router_weight().shape[-1]

    def replace(self, new_module: nn.Module) -> None:
        """Swap the block for `new_module` in its parent."""
        setattr(self.parent, self.attr, new_module)
        self.module = new_module


def refuse_compressed(layer: MoELayer, experts) -> None:
    """Dense weights cannot be written into compressed slots (their dense form is a reconstruction)."""
    if type(experts).__name__ == "CompressedMoEExperts":
        raise ValueError(f"layer {layer.name!r} is compressed: its experts cannot be rewritten as dense weights "
                         "(align and merge before compressing)")


def split_name(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    """(parent module, attribute) of the submodule at dotted path `name`."""
    parent_name, _, attr = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), attr
