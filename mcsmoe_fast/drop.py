"""The `drop` baseline of merging: prune the non-dominant experts by masking their router logits to
-inf before top-k, so the router never picks them (the pruning baselines of the MC-SMoE paper).

Routers it can mask: Switch's classifier, and the softmax top-k gates of Mixtral, Qwen2-MoE, Qwen3-MoE and
OLMoE (the other families choose experts their own way: sigmoid groups, biased logits). The router's
weight keeps its name in the state dict (`...classifier.weight` for Switch, `...gate.weight` for the
others); the mask is one more buffer `keep` [E] (bool) next to it, so masked
checkpoints save and load like any other (checkpoint/load.py reinstalls the masks from its JSON section).
"""
from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F

from .models import MoELayer, SwitchLayer


def _mask(logits: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    return logits.masked_fill(~keep, float("-inf"))


class MaskedLinear(nn.Module):
    """Switch's router.classifier with dropped experts' logits at -inf (the router itself is unchanged)."""

    def __init__(self, linear: nn.Linear, keep: torch.Tensor):
        super().__init__()
        self.weight = linear.weight
        self.bias = linear.bias
        self.register_buffer("keep", torch.as_tensor(keep, dtype=torch.bool, device=linear.weight.device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _mask(F.linear(x, self.weight, self.bias), self.keep)


# softmax over every expert in float32, top-k of the probabilities, optionally renormalised: the gates
# (transformers 5.x) whose choice the mask changes only by never picking a dropped expert
SOFTMAX_TOP_K_ROUTERS = ("MixtralTopKRouter", "Qwen2MoeTopKRouter", "Qwen3MoeTopKRouter", "OlmoeTopKRouter")


class MaskedTopKRouter(nn.Module):
    """A softmax top-k gate (SOFTMAX_TOP_K_ROUTERS) with dropped experts' logits at -inf: softmax, top-k,
    renormalised when the gate renormalises (Mixtral always, the others per norm_topk_prob), the top-k
    weights cast back to the logits' dtype where the gate does (all but Mixtral).

    When fewer than top_k experts are kept, the extra picks get weight 0 and so contribute nothing."""

    def __init__(self, gate: nn.Module, keep: torch.Tensor):
        super().__init__()
        self.weight = gate.weight
        self.top_k = gate.top_k
        self.num_experts = gate.weight.shape[0]
        self.hidden_dim = gate.weight.shape[1]
        self.norm_topk_prob = bool(getattr(gate, "norm_topk_prob", True))
        self.cast_scores = type(gate).__name__ != "MixtralTopKRouter"
        self.register_buffer("keep", torch.as_tensor(keep, dtype=torch.bool, device=gate.weight.device))

    def forward(self, hidden_states: torch.Tensor):
        hidden_states = hidden_states.reshape(-1, self.hidden_dim)
        router_logits = _mask(F.linear(hidden_states, self.weight), self.keep)
        probs = torch.softmax(router_logits.float(), dim=-1)
        top_value, top_index = torch.topk(probs, self.top_k, dim=-1)
        if self.norm_topk_prob:
            top_value = top_value / top_value.sum(dim=-1, keepdim=True)
        if self.cast_scores:
            top_value = top_value.to(router_logits.dtype)
        return router_logits, top_value, top_index


def check_maskable(layer: MoELayer) -> None:
    """ValueError unless the drop baseline can mask this layer's router logits (Switch and Mixtral routers)."""
    if isinstance(layer, SwitchLayer):
        return
    block = layer.module
    gate = getattr(block, "gate", None)
    if not isinstance(gate, MaskedTopKRouter) and type(gate).__name__ not in SOFTMAX_TOP_K_ROUTERS:
        raise ValueError(f"{layer.name}: the drop baseline masks router logits of Switch's router and softmax top-k "
                         f"gates only ({', '.join(SOFTMAX_TOP_K_ROUTERS)}); "
                         f"{type(gate or getattr(block, 'router', None)).__name__} "
                         "routes differently (use strategy='frequency' or 'average')")


def install_logit_mask(layer: MoELayer, keep) -> None:
    """Mask the router logits of the experts with keep[e] == False in this layer (at least one kept)."""
    keep = torch.as_tensor(keep, dtype=torch.bool)
    if keep.shape != (layer.num_experts,) or not keep.any():
        raise ValueError(f"{layer.name}: keep must be [{layer.num_experts}] booleans with at least one True, "
                         f"got {keep.tolist()}")
    block = layer.module
    if isinstance(layer, SwitchLayer):  # Switch: the router calls its classifier
        router = block.router
        inner = router.classifier
        router.classifier = MaskedLinear(inner, keep) if not isinstance(inner, MaskedLinear) else inner
        router.classifier.keep.copy_(keep)
    else:
        check_maskable(layer)
        gate = block.gate
        block.gate = MaskedTopKRouter(gate, keep) if not isinstance(gate, MaskedTopKRouter) else gate
        block.gate.keep.copy_(keep)


def logit_mask(layer: MoELayer) -> torch.Tensor | None:
    """The layer's keep mask [E], or None when no expert is masked."""
    block = layer.module
    owner = block.router.classifier if isinstance(layer, SwitchLayer) else getattr(block, "gate", None)
    return owner.keep if isinstance(owner, (MaskedLinear, MaskedTopKRouter)) else None
