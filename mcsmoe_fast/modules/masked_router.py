"""Routers with dropped experts: the router logits of masked experts set to -inf before the choice, so the
router never picks them (the `drop` baseline of merging, drop.py). The router's weight keeps its name in the
state dict (`...classifier.weight` for Switch, `...gate.weight` for the others); the mask is one more buffer
`keep` [E] (bool) next to it. The masked gates' classes are made at run time; they pickle (torch.save of the
model) through new_masked_router, which makes the class again from the gate's own."""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn


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

    Mixed into the gate in place (mask_top_k_router): the gate stays the same module, with its weight, its hooks
    and its own class among its bases, so transformers' output recorders still record its router logits (the
    aux loss of output_router_logits=True counts every layer). When fewer than top_k experts are kept, the extra
    picks get weight 0 and so contribute nothing."""

    keep: torch.Tensor
    cast_scores: bool = True
    gate_class: type  # the gate's own class (set on each masked class)

    def __reduce_ex__(self, protocol):
        # the masked class is made at run time, so pickle cannot find it by name: rebuild it from the gate's class
        return new_masked_router, (self.gate_class,), self.__getstate__()

    def forward(self, hidden_states: torch.Tensor):
        hidden_states = hidden_states.reshape(-1, self.weight.shape[1])
        router_logits = _mask(F.linear(hidden_states, self.weight), self.keep)
        probs = torch.softmax(router_logits.float(), dim=-1)
        top_value, top_index = torch.topk(probs, self.top_k, dim=-1)
        if getattr(self, "norm_topk_prob", True):
            top_value = top_value / top_value.sum(dim=-1, keepdim=True)
        if self.cast_scores:
            top_value = top_value.to(router_logits.dtype)
        return router_logits, top_value, top_index


@functools.cache
def _masked_class(gate_class: type) -> type:
    return type(f"Masked{gate_class.__name__}", (MaskedTopKRouter, gate_class),
                {"cast_scores": gate_class.__name__ != "MixtralTopKRouter", "gate_class": gate_class})


def new_masked_router(gate_class: type) -> MaskedTopKRouter:
    """An empty masked `gate_class` gate for pickle to fill in (torch.save / pickle of a drop-baseline model)."""
    cls = _masked_class(gate_class)
    return cls.__new__(cls)


def mask_top_k_router(gate: nn.Module, keep) -> nn.Module:
    """Mask the softmax top-k `gate` in place (a second call replaces the mask): its class becomes a subclass of
    MaskedTopKRouter and of its own class, and a bool buffer `keep` [E] joins its weight (saved as gate.keep)."""
    keep = torch.as_tensor(keep, device=gate.weight.device).to(torch.bool)
    if not isinstance(gate, MaskedTopKRouter):
        gate.__class__ = _masked_class(type(gate))
        gate.register_buffer("keep", keep.clone())
    gate.keep.copy_(keep)
    return gate
