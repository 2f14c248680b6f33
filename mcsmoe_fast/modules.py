"""Drop-in MoE modules: expert slots shared through an `expert_map`, and the Switch block around them.

Both run the fused op `ops.grouped_expert_ffn` (one call for the whole expert FFN, merged or not),
for inference and for training alike: its fused backward (`ops.grouped_expert_ffn_backward`) gives the
gradients of the input, both weight banks and the routing weights, so fine-tuning and KD recovery run
through the same op.
"""
from __future__ import annotations

import functools

import torch
from torch import nn

from . import ops
from .activations import check as check_activation, is_gated


class MoEExperts(nn.Module):
    """S stored expert slots (S = E unmerged, S = G merged) and the slot each original expert uses.

    forward(hidden [T, d], top_k_index [T, k], top_k_weights [T, k]) has the signature of
    transformers' fused experts modules (MixtralExperts & co), so it replaces them directly.
    A top_k_index entry of -1 means "no expert" (a token dropped by expert capacity).
    """

    def __init__(self, w_in: torch.Tensor, w_out: torch.Tensor, expert_map: torch.Tensor, activation: str,
                 b_in: torch.Tensor | None = None, b_out: torch.Tensor | None = None,
                 activation_args: dict | None = None):
        super().__init__()
        check_activation(activation)
        if w_in.dim() != 3 or w_out.dim() != 3 or w_in.shape[0] != w_out.shape[0]:
            raise ValueError(f"w_in [S, F, d] and w_out [S, d, ff] expected, got {tuple(w_in.shape)} and {tuple(w_out.shape)}")
        ff = w_out.shape[2]
        if w_in.shape[1] != (2 * ff if is_gated(activation) else ff) or w_in.shape[2] != w_out.shape[1]:
            raise ValueError(f"w_in {tuple(w_in.shape)} does not match w_out {tuple(w_out.shape)} for {activation}")
        for name, b, shape in (("b_in", b_in, w_in.shape[:2]), ("b_out", b_out, w_out.shape[:2])):
            if b is not None and tuple(b.shape) != tuple(shape):
                raise ValueError(f"{name} must be {list(shape)} for these weights, got {list(b.shape)}")
        expert_map = torch.as_tensor(expert_map, dtype=torch.int64, device=w_in.device)
        if expert_map.dim() != 1 or (expert_map.numel() and (expert_map.min() < 0 or expert_map.max() >= w_in.shape[0])):
            raise ValueError(f"expert_map must be 1-D with entries in [0, {w_in.shape[0]}), got {expert_map.tolist()}")
        self.activation = activation
        self.activation_args = dict(activation_args or {})
        self.w_in = nn.Parameter(w_in)
        self.w_out = nn.Parameter(w_out)
        self.b_in = None if b_in is None else nn.Parameter(b_in)
        self.b_out = None if b_out is None else nn.Parameter(b_out)
        self.register_buffer("expert_map", expert_map)

    @property
    def num_experts(self) -> int:
        return self.expert_map.numel()

    @property
    def num_slots(self) -> int:
        return self.w_in.shape[0]

    def extra_repr(self) -> str:
        s, f, d = self.w_in.shape
        biases = ", biases" if self.b_in is not None or self.b_out is not None else ""
        args = "".join(f", {k}={v}" for k, v in self.activation_args.items())
        return f"slots={s}, experts={self.num_experts}, d={d}, F={f}, activation={self.activation}{args}{biases}"

    def forward(self, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        return ops.grouped_expert_ffn(hidden, self.w_in, self.w_out, self.expert_map, top_k_index.long(),
                                      top_k_weights, self.activation, self.b_in, self.b_out, **self.activation_args)


def capacity_drop(expert_index: torch.Tensor, num_experts: int, capacity: int) -> torch.Tensor:
    """Top-1 choices [B, L] -> the same with -1 where a token is past its expert's capacity.

    Exactly transformers' rule: within each sequence, a token keeps its expert if it is among the
    first `capacity` tokens (in sequence order) that chose that expert. Skipped when no sequence is
    longer than the capacity (decode, short inputs), so the common case costs nothing.
    """
    if expert_index.shape[-1] <= capacity:
        return expert_index
    one_hot = nn.functional.one_hot(expert_index, num_experts).to(torch.int32)
    priority = one_hot.cumsum(dim=-2).gather(-1, expert_index.unsqueeze(-1)).squeeze(-1)
    return torch.where(priority <= capacity, expert_index, -1)


@functools.cache
def _fast_router_class():
    # Subclassing keeps transformers' output recorders (router_logits) attached; imported lazily
    # because loading transformers' Switch module takes seconds.
    from transformers.models.switch_transformers.modeling_switch_transformers import SwitchTransformersTop1Router

    class FastSwitchRouter(SwitchTransformersTop1Router):
        """transformers' top-1 router returning the chosen expert ids [B, L] (before capacity), the
        chosen probabilities [B, L, 1] and the logits; no one-hot dispatch mask. Same arithmetic."""

        def forward(self, hidden_states: torch.Tensor):
            self.input_dtype = hidden_states.dtype
            hidden_states = hidden_states.to(self.dtype)
            if self.training and self.jitter_noise > 0:
                hidden_states *= torch.empty_like(hidden_states).uniform_(1.0 - self.jitter_noise, 1.0 + self.jitter_noise)
            self.classifier = self.classifier.to(self.dtype)
            router_logits = self.classifier(hidden_states)
            router_probs = nn.functional.softmax(router_logits, dim=-1, dtype=self.dtype).to(self.input_dtype)
            expert_index = torch.argmax(router_probs, dim=-1)
            chosen_probs = router_probs.gather(-1, expert_index.unsqueeze(-1))
            return expert_index, chosen_probs, router_logits

    return FastSwitchRouter


_HOOK_DICTS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
               "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs")


def fast_switch_router(router: nn.Module) -> nn.Module:
    """A FastSwitchRouter sharing `router`'s classifier, settings and hooks (no copy of weights)."""
    cls = _fast_router_class()
    if isinstance(router, cls):
        return router
    fast = cls.__new__(cls)
    nn.Module.__init__(fast)
    fast.num_experts = router.num_experts
    fast.expert_capacity = router.expert_capacity
    fast.classifier = router.classifier
    fast.jitter_noise = router.jitter_noise
    fast.ignore_padding_tokens = router.ignore_padding_tokens
    fast.dtype = router.dtype
    fast.train(router.training)
    for name in _HOOK_DICTS:
        getattr(fast, name).update(getattr(router, name))
    return fast


class SwitchMoE(nn.Module):
    """Replacement for transformers' SwitchTransformersSparseMLP: its own router, MoEExperts slots.

    Expert capacity behaves exactly as in transformers (tokens past an expert's capacity within a
    sequence get no expert and pass through the residual only). `dropless=True` routes every token
    to its expert whatever the capacity (it changes the outputs of long sequences: not HF's model).
    Expert dropout is not applied (the module is for inference; in eval mode HF applies none either).
    """

    def __init__(self, router: nn.Module, experts: MoEExperts, dropless: bool = False):
        super().__init__()
        self.router = fast_switch_router(router)
        self.experts = experts
        self.dropless = dropless

    def extra_repr(self) -> str:
        return f"dropless={self.dropless}"

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        batch, seq, d = hidden_states.shape
        index, probs, _ = self.router(hidden_states)  # [B, L] top-1 expert, [B, L, 1] its probability
        if not self.dropless:
            index = capacity_drop(index, self.router.num_experts, self.router.expert_capacity)
        out = self.experts(hidden_states.reshape(-1, d), index.reshape(-1, 1), probs.reshape(-1, 1))
        return out.reshape(batch, seq, d)
