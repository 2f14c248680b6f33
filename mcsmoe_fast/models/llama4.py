"""Llama-4 text MoE (transformers 5.x `llama4_text`, Llama4ForCausalLM).

A Llama4TextMoe block holds
  - experts: Llama4TextExperts, gate_up_proj [E, d, 2ff] (gate columns, then up columns) and down_proj
    [E, ff, d]: the canonical w_in [E, 2ff, d] and w_out [E, d, ff] transposed; act(gate) * up with the
    config's hidden_act (SwiGLU for every released model);
  - router: Llama4Router, an nn.Linear [E, d] returning (scores [T, E], logits [T, E]): top-k by logit,
    score = sigmoid(logit) on the chosen experts and 0 elsewhere. The score scales the expert's input;
  - shared_expert: a dense gated MLP every token passes, never merged.
Only the layers in config.moe_layers (every interleave_moe_layer_step-th) have such a block; the others
are dense MLPs and are left alone. Merged and compressed experts run in our block (modules/llama4.py).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..modules import CompressedMoEExperts, MoEExperts
from ..modules.llama4 import Llama4MoE, mask_router, masked_router_class
from .base import MoELayer, refuse_compressed, split_name

BLOCK_CLASS = "Llama4TextMoe"
MODEL_TYPES = ("llama4_text",)  # the multimodal `llama4` holds the same blocks, but is untested here


class Llama4Layer(MoELayer):
    """One Llama-4 MoE block (transformers' Llama4TextMoe, or our Llama4MoE that replaced it)."""

    def router_weight(self) -> torch.Tensor:
        return self.module.router.weight

    def router_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Llama4Router's logits (an unbiased nn.Linear), dropped experts' at -inf."""
        weight, keep = self.router_weight(), self.logit_mask()
        logits = F.linear(hidden.to(weight.dtype), weight)
        return logits if keep is None else logits.masked_fill(~keep, float("-inf"))

    def route(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Llama4Router's choice: torch.topk of the logits along the experts."""
        logits = self.router_logits(hidden)
        return logits, torch.topk(logits, self.top_k, dim=1).indices

    def expert_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        if (slots := self.slot_weights()) is not None:
            return slots
        experts = self.module.experts
        return experts.gate_up_proj.transpose(1, 2), experts.down_proj.transpose(1, 2)  # views

    @torch.no_grad()
    def set_expert_weights(self, w_in: torch.Tensor, w_out: torch.Tensor) -> None:
        experts = self.module.experts
        refuse_compressed(self, experts)
        if isinstance(experts, MoEExperts):
            experts.w_in.copy_(w_in)
            experts.w_out.copy_(w_out)
            return
        experts.gate_up_proj.copy_(w_in.transpose(1, 2))
        experts.down_proj.copy_(w_out.transpose(1, 2))

    def install_experts(self, experts: MoEExperts | CompressedMoEExperts) -> None:
        """Run the block on the given expert slots (router and shared expert unchanged): the block becomes
        a Llama4MoE, which keeps Llama-4's input scaling."""
        if isinstance(self.module, Llama4MoE):
            self.module.experts = experts
        else:
            block = Llama4MoE(self.module.router, experts, self.module.shared_expert, self.activation)
            self.replace(block.train(self.module.training))

    def install_fast_block(self) -> None:
        """Replace transformers' block by a Llama4MoE on its own experts module (no copy, transformers'
        state-dict names): the fused op on the chosen experts only, same outputs."""
        if not isinstance(self.module, Llama4MoE):
            block = Llama4MoE(self.module.router, self.module.experts, self.module.shared_expert, self.activation)
            self.replace(block.train(self.module.training))

    def optimize(self, dropless: bool = False) -> bool:
        """Unmerged: our block on transformers' own experts (install_fast_block; transformers' names, so its
        save still works). Merged or compressed: the block already runs our slots."""
        if isinstance(getattr(self.module, "experts", None), (MoEExperts, CompressedMoEExperts)):
            return True
        self.install_fast_block()
        return False

    # --- the drop baseline: the router's logits masked before its top-k --------------------------------------
    def check_maskable(self) -> None:
        return None

    def mask_router(self, keep: torch.Tensor) -> None:
        mask_router(self.module.router, keep)

    def logit_mask(self) -> torch.Tensor | None:
        router = self.module.router
        return router.keep if isinstance(router, masked_router_class()) else None


def is_llama4_block(module: nn.Module) -> bool:
    return type(module).__name__ == BLOCK_CLASS or isinstance(module, Llama4MoE)


def _check_block(name: str, block: nn.Module) -> None:
    """ValueError unless the block has Llama-4's parts in Llama-4's layout (a checkpoint of another shape
    is refused before any work, not read wrongly)."""
    router, experts = getattr(block, "router", None), getattr(block, "experts", None)
    if "Llama4Router" not in {c.__name__ for c in type(router).__mro__} or not isinstance(getattr(router, "weight", None), torch.Tensor) \
            or getattr(router, "bias", None) is not None or not isinstance(getattr(router, "top_k", None), int):
        raise ValueError(f"{name}: a Llama-4 MoE block needs transformers' Llama4Router (an unbiased Linear [E, d] "
                         f"with top_k), found {type(router).__name__}")
    if not isinstance(getattr(block, "shared_expert", None), nn.Module):
        raise ValueError(f"{name}: a Llama-4 MoE block needs its shared_expert")
    if isinstance(experts, (MoEExperts, CompressedMoEExperts)):
        return
    e, d = router.weight.shape
    up, down = getattr(experts, "gate_up_proj", None), getattr(experts, "down_proj", None)
    if not isinstance(up, torch.Tensor) or not isinstance(down, torch.Tensor) or up.dim() != 3 \
            or tuple(up.shape[:2]) != (e, d) or up.shape[2] % 2 or tuple(down.shape) != (e, up.shape[2] // 2, d):
        raise ValueError(f"{name}: Llama-4 experts must be gate_up_proj [E, d, 2ff] and down_proj [E, ff, d] with "
                         f"E, d = {e}, {d} (the router's); found {type(experts).__name__} with gate_up_proj "
                         f"{None if up is None else list(up.shape)}, down_proj {None if down is None else list(down.shape)}")


def _activation(model: nn.Module, block: nn.Module) -> str:
    from ..activations import from_config

    if isinstance(block, Llama4MoE):
        return block.activation
    config = getattr(model, "config", None)
    config = getattr(config, "text_config", None) or config  # llama4 (multimodal): the text part's
    return from_config(getattr(config, "hidden_act", "silu"), gated=True, where="llama4_text")


def llama4_layers(model: nn.Module) -> list[Llama4Layer]:
    """Every Llama-4 MoE block of `model`, in module order (the dense layers between them are left alone)."""
    layers = []
    for name, module in model.named_modules():
        if not is_llama4_block(module):
            continue
        _check_block(name, module)
        experts = module.experts
        activation = experts.activation if isinstance(experts, (MoEExperts, CompressedMoEExperts)) \
            else _activation(model, module)
        parent, attr = split_name(model, name)
        layers.append(Llama4Layer(name=name, module=module, parent=parent, attr=attr,
                                  num_experts=module.router.weight.shape[0], top_k=module.router.top_k,
                                  activation=activation))
    return layers
