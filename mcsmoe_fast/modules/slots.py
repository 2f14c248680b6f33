"""Dense expert slots: S stored experts (S = E unmerged, S = G merged) shared through an `expert_map`.

They run the fused op `ops.grouped_expert_ffn` (one call for the whole expert FFN, merged or not) for
inference and training alike: its fused backward (`ops.grouped_expert_ffn_backward`) gives the gradients of
the input, both weight banks and the routing weights, so fine-tuning and KD recovery run through the same op.
"""
from __future__ import annotations

import torch
from torch import nn

from .. import ops
from ..activations import check as check_activation, is_gated


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
        expert_map = torch.as_tensor(expert_map, dtype=torch.int64)
        if expert_map.dim() != 1:
            raise ValueError(f"expert_map must be 1-D, got shape {tuple(expert_map.shape)}")
        checkable = not expert_map.is_meta and expert_map.numel() > 0
        if checkable and (expert_map.min() < 0 or expert_map.max() >= w_in.shape[0]):
            raise ValueError(f"expert_map must be 1-D with entries in [0, {w_in.shape[0]}), got {expert_map.tolist()}")
        expert_map = expert_map.to(w_in.device)  # on the meta device (a model built without memory) no values to check
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
