"""Mixtral-style fused experts (transformers 5.x): experts.gate_up_proj [E, 2*ff, d] (gate rows then
up rows), experts.down_proj [E, d, ff], gate.weight [E, d], act(gate) * up with the config's hidden_act (SiLU: SwiGLU), softmax-then-top-k routing.
Qwen2/3-MoE, OLMoE and DeepSeek-V3 share this layout."""
from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F

from ..compressed import CompressedMoEExperts
from ..modules import MoEExperts
from .base import MoELayer, refuse_compressed, split_name


class MixtralLayer(MoELayer):
    def router_weight(self) -> torch.Tensor:
        return self.module.gate.weight

    def router_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, self.module.gate.weight)

    def expert_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        experts = self.module.experts
        if isinstance(experts, MoEExperts):
            return experts.w_in, experts.w_out
        if isinstance(experts, CompressedMoEExperts):
            return experts.dense_weights()
        return experts.gate_up_proj, experts.down_proj

    @torch.no_grad()
    def set_expert_weights(self, w_in: torch.Tensor, w_out: torch.Tensor) -> None:
        refuse_compressed(self, self.module.experts)
        cur_in, cur_out = self.expert_weights()
        cur_in.copy_(w_in)
        cur_out.copy_(w_out)

    def install_experts(self, experts: MoEExperts | CompressedMoEExperts) -> None:
        """Replace the block's experts module by the given expert slots (router unchanged)."""
        self.module.experts = experts


def is_mixtral_block(module: nn.Module) -> bool:
    return hasattr(module, "gate") and hasattr(module, "experts") and (
        hasattr(module.experts, "gate_up_proj") or isinstance(module.experts, (MoEExperts, CompressedMoEExperts))
    ) and hasattr(module.gate, "weight") and hasattr(module, "top_k")


def mixtral_layers(model: nn.Module) -> list[MixtralLayer]:
    from ..activations import from_config

    config = getattr(model, "config", None)
    activation = from_config(getattr(config, "hidden_act", "silu"), gated=True, where="mixtral")
    layers = []
    for name, module in model.named_modules():
        if is_mixtral_block(module):
            parent, attr = split_name(model, name)
            layers.append(
                MixtralLayer(name=name, module=module, parent=parent, attr=attr,
                             num_experts=module.gate.weight.shape[0], top_k=module.top_k, activation=activation)
            )
    return layers
