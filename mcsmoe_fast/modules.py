"""Drop-in MoE modules: expert slots shared through an `expert_map`, and the Switch block around them."""
from __future__ import annotations

import torch
from torch import nn

from . import reference


class MoEExperts(nn.Module):
    """S stored expert slots (S = E unmerged, S = G merged) and the slot each original expert uses.

    forward(hidden [T, d], top_k_index [T, k], top_k_weights [T, k]) has the signature of
    transformers' fused experts modules (MixtralExperts & co), so it replaces them directly.
    A top_k_index entry of -1 means "no expert" (a token dropped by expert capacity).
    """

    def __init__(self, w_in: torch.Tensor, w_out: torch.Tensor, expert_map: torch.Tensor, activation: str):
        super().__init__()
        if activation not in ("relu", "swiglu"):
            raise ValueError(f"activation must be 'relu' or 'swiglu', got {activation!r}")
        if w_in.dim() != 3 or w_out.dim() != 3 or w_in.shape[0] != w_out.shape[0]:
            raise ValueError(f"w_in [S, F, d] and w_out [S, d, ff] expected, got {tuple(w_in.shape)} and {tuple(w_out.shape)}")
        ff = w_out.shape[2]
        if w_in.shape[1] != (2 * ff if activation == "swiglu" else ff) or w_in.shape[2] != w_out.shape[1]:
            raise ValueError(f"w_in {tuple(w_in.shape)} does not match w_out {tuple(w_out.shape)} for {activation}")
        expert_map = torch.as_tensor(expert_map, dtype=torch.int64, device=w_in.device)
        if expert_map.dim() != 1 or (expert_map.numel() and (expert_map.min() < 0 or expert_map.max() >= w_in.shape[0])):
            raise ValueError(f"expert_map must be 1-D with entries in [0, {w_in.shape[0]}), got {expert_map.tolist()}")
        self.activation = activation
        self.w_in = nn.Parameter(w_in)
        self.w_out = nn.Parameter(w_out)
        self.register_buffer("expert_map", expert_map)

    @property
    def num_experts(self) -> int:
        return self.expert_map.numel()

    @property
    def num_slots(self) -> int:
        return self.w_in.shape[0]

    def extra_repr(self) -> str:
        s, f, d = self.w_in.shape
        return f"slots={s}, experts={self.num_experts}, d={d}, F={f}, activation={self.activation}"

    def forward(self, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        return reference.grouped_expert_ffn(
            hidden, self.w_in, self.w_out, self.expert_map, top_k_index, top_k_weights, self.activation
        )


class SwitchMoE(nn.Module):
    """Replacement for transformers' SwitchTransformersSparseMLP: its own router, MoEExperts slots.

    Expert capacity behaves exactly as in transformers (tokens past an expert's capacity within a
    sequence get no expert and pass through the residual only); `dropless=True` routes every token.
    """

    def __init__(self, router: nn.Module, experts: MoEExperts, dropless: bool = False):
        super().__init__()
        self.router = router
        self.experts = experts
        self.dropless = dropless

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        batch, seq, d = hidden_states.shape
        dispatch, probs, logits = self.router(hidden_states)  # one-hot [B, L, E] after capacity, probs [B, L, 1]
        if self.dropless:
            index = logits.argmax(-1)
        else:
            index = torch.where(dispatch.any(-1), dispatch.argmax(-1), -1)
        out = self.experts(hidden_states.reshape(-1, d), index.reshape(-1, 1), probs.reshape(-1, 1))
        return out.reshape(batch, seq, d)
