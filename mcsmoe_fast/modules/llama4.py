"""The Llama-4 MoE block on the fused grouped expert FFN: a drop-in for transformers' Llama4TextMoe.

Llama-4's router (Llama4Router) picks the top-k experts of each token by logit and scores each with
sigmoid(logit); unlike the other families the score scales the expert's *input*, not its output:

    out[t] = shared_expert(x[t]) + sum over the k chosen experts e of FFN_e(score[t, e] * x[t])

transformers computes this by running all E experts on every token (a dense bmm, the unchosen ones on
zero rows). Here each (token, chosen expert) pair becomes one pre-scaled row routed to that expert's slot
with routing weight 1, so the fused op does E/k times less work. Rows are summed per token afterwards,
which stays right when two experts of a token share a merged slot (s1 x and s2 x are different inputs).

The experts are transformers' own Llama4TextExperts (unmerged: read as transposed views, so the state
dict keeps transformers' names), or our slots (MoEExperts, CompressedMoEExperts) after merging or
compressing. Router and shared expert are transformers' modules, kept as they are (their hooks and
output recorders too). The drop baseline masks the router in place (mask_router): dropped experts' logits
are -inf before its top-k, so it never picks them (one that only pads the top-k gets sigmoid(-inf) = 0).
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from .compressed import CompressedMoEExperts
from .slots import MoEExperts


class Llama4MoE(nn.Module):
    """forward(hidden_states [..., d]) -> (out [T, d], router_logits [T, E]), as Llama4TextMoe returns them."""

    def __init__(self, router: nn.Module, experts: nn.Module, shared_expert: nn.Module, activation: str):
        super().__init__()
        self.router = router
        self.experts = experts
        self.shared_expert = shared_expert
        self.activation = activation  # of transformers' experts (slots carry their own)
        self.top_k = router.top_k
        self.hidden_dim = router.weight.shape[1]
        self.num_experts = router.weight.shape[0]

    def extra_repr(self) -> str:
        return f"top_k={self.top_k}, activation={self.activation}"

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = hidden_states.reshape(-1, self.hidden_dim)
        scores, router_logits = self.router(hidden)  # scores [T, E]: sigmoid on the top-k, 0 elsewhere
        index = router_logits.topk(self.top_k, dim=1).indices  # the router's own choice (same call, same ties)
        routed = self.routed_experts(hidden, index, scores.gather(1, index))
        out = self.shared_expert(hidden)
        out.add_(routed)
        return out, router_logits

    def routed_experts(self, hidden: torch.Tensor, index: torch.Tensor, score: torch.Tensor) -> torch.Tensor:
        """sum_j FFN_{index[t, j]}(score[t, j] * hidden[t]) for hidden [T, d], index and score [T, k]."""
        tokens, k = index.shape
        rows = (hidden.unsqueeze(1) * score.unsqueeze(-1)).reshape(tokens * k, -1)  # transformers' product
        index = index.reshape(tokens * k, 1)
        ones = torch.ones_like(index, dtype=rows.dtype)
        out = self.run_experts(rows, index, ones)
        return out if k == 1 else out.view(tokens, k, -1).sum(dim=1)

    def run_experts(self, rows: torch.Tensor, index: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        experts = self.experts
        if isinstance(experts, (MoEExperts, CompressedMoEExperts)):
            return experts(rows, index, weights)
        # transformers' Llama4TextExperts: gate_up_proj [E, d, 2ff] and down_proj [E, ff, d] are the
        # canonical w_in [E, 2ff, d] and w_out [E, d, ff] transposed: strides to the GEMMs, no copy
        w_in, w_out = experts.gate_up_proj.transpose(1, 2), experts.down_proj.transpose(1, 2)
        emap = torch.arange(w_in.shape[0], device=w_in.device)
        return ops.grouped_expert_ffn(rows.to(w_in.dtype), w_in, w_out, emap, index, weights.to(w_in.dtype),
                                      self.activation)


@functools.cache
def masked_router_class() -> type:
    # a subclass, so that transformers' output recorders (router_logits) still match it; imported lazily
    from transformers.models.llama4.modeling_llama4 import Llama4Router

    class MaskedLlama4Router(Llama4Router):
        """Llama4Router with the logits of dropped experts (keep[e] == False) at -inf before its top-k; the
        same arithmetic otherwise. Returns (scores [T, E], masked logits [T, E])."""

        def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            router_logits = F.linear(hidden_states, self.weight).masked_fill(~self.keep, float("-inf"))
            top_value, top_index = torch.topk(router_logits, self.top_k, dim=1)
            scores = torch.full_like(router_logits, float("-inf")).scatter_(1, top_index, top_value)
            return torch.sigmoid(scores.float()).to(scores.dtype), router_logits

    return MaskedLlama4Router


def mask_router(router: nn.Module, keep: torch.Tensor) -> None:
    """Mask `router` (a Llama4Router) in place: its class becomes MaskedLlama4Router and a buffer `keep` [E]
    joins its weight (saved next to it as router.keep); the same module, so its hooks stay."""
    keep = torch.as_tensor(keep, dtype=torch.bool, device=router.weight.device)
    if not isinstance(router, masked_router_class()):
        router.__class__ = masked_router_class()
        router.register_buffer("keep", keep.clone())
    router.keep.copy_(keep)
