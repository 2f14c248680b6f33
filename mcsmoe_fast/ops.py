"""The Python face of every native op: torch.ops.mcsmoe_fast.*, with fake (meta) implementations
so torch.compile can trace them. Plain-PyTorch references of the same ops are in reference.py."""
from __future__ import annotations

import torch

from ._ext import _C  # noqa: F401  (loading it registers the ops)

_lib = torch.ops.mcsmoe_fast


# --- linear assignment ---------------------------------------------------------------------------
def linear_assignment(cost: torch.Tensor, maximize: bool = False) -> torch.Tensor:
    """Optimal assignment of rows to columns for cost [n, m] or a batch [B, n, m] (n <= m).

    Returns int64 column indices [..., n]: row i takes column out[..., i]; the objective is optimal
    (equal to scipy.optimize.linear_sum_assignment's). float32 or float64, CPU or CUDA; duals are
    float64. Raises on n > m, non-finite entries or a wrong rank.
    """
    return _lib.linear_assignment(cost, maximize)


@torch.library.register_fake("mcsmoe_fast::linear_assignment")
def _linear_assignment_fake(cost: torch.Tensor, maximize: bool = False) -> torch.Tensor:
    torch._check(cost.dim() in (2, 3), lambda: f"cost must be [n, m] or [B, n, m], got rank {cost.dim()}")
    torch._check(cost.shape[-2] <= cost.shape[-1], lambda: "need n <= m (rows <= columns)")
    return cost.new_empty(cost.shape[:-1], dtype=torch.int64)


# --- grouped expert FFN over merged slots ---------------------------------------------------------
ACTIVATIONS = ("relu", "swiglu")


def moe_align(top_k_index: torch.Tensor, top_k_weights: torch.Tensor, expert_map: torch.Tensor, num_slots: int):
    """Routing alignment: (token, merged slot) pairs sorted by slot.

    top_k_index [T, k] int64 original expert ids (-1 = no expert), top_k_weights [T, k], expert_map [E]
    int64 (slot of each expert, in [0, num_slots)). Returns, all sized statically:
      sorted_token_ids [T*k] int64  token of each pair, grouped by slot, tokens ascending in a slot; -1 past the end
      slot_offsets [S+1] int64      slot s owns rows slot_offsets[s] .. slot_offsets[s+1]
      sorted_weights [T*k]          the token's summed routing weight on that slot (float64 if the weights
                                    are float64, else float32); 0 past the end
      token_rows [T, k] int64       rows of token t's pairs in ascending slot order, then -1
    A token whose top-k experts share one slot gets one pair carrying the summed weight.
    """
    return _lib.moe_align(top_k_index, top_k_weights, expert_map, num_slots)


@torch.library.register_fake("mcsmoe_fast::moe_align")
def _moe_align_fake(top_k_index, top_k_weights, expert_map, num_slots):
    torch._check(top_k_index.dim() == 2, lambda: "top_k_index must be [T, k]")
    torch._check(top_k_weights.shape == top_k_index.shape, lambda: "top_k_weights must have top_k_index's shape")
    n = top_k_index.shape[0] * top_k_index.shape[1]
    wdtype = torch.float64 if top_k_weights.dtype == torch.float64 else torch.float32
    return (
        top_k_index.new_empty((n,)),
        top_k_index.new_empty((num_slots + 1,)),
        top_k_weights.new_empty((n,), dtype=wdtype),
        top_k_index.new_empty(top_k_index.shape),
    )


def grouped_expert_ffn(
    hidden: torch.Tensor,
    w_in: torch.Tensor,
    w_out: torch.Tensor,
    expert_map: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    activation: str,
) -> torch.Tensor:
    """The whole expert FFN over S slots in one call (inference; no autograd).

    hidden [T, d]; w_in [S, F, d]; w_out [S, d, ff]; expert_map [E] int64; top_k_index [T, k] int64
    (-1 = no expert); top_k_weights [T, k]; activation "relu" (F = ff) or "swiglu" (F = 2*ff, gate rows
    then up rows, silu(gate) * up). out[t] = sum over the distinct slots s of token t of
    (t's summed weight on s) * w_out[s] @ act(w_in[s] @ hidden[t]). Equals reference.grouped_expert_ffn.
    """
    return _lib.grouped_expert_ffn(hidden, w_in, w_out, expert_map, top_k_index, top_k_weights, activation)


@torch.library.register_fake("mcsmoe_fast::grouped_expert_ffn")
def _grouped_expert_ffn_fake(hidden, w_in, w_out, expert_map, top_k_index, top_k_weights, activation):
    torch._check(activation in ACTIVATIONS, lambda: f"activation must be 'relu' or 'swiglu', got {activation!r}")
    torch._check(hidden.dim() == 2 and w_in.dim() == 3 and w_out.dim() == 3, lambda: "hidden [T, d], w_in [S, F, d], w_out [S, d, ff]")
    torch._check(w_in.dtype == hidden.dtype and w_out.dtype == hidden.dtype, lambda: "hidden, w_in, w_out: one dtype")
    torch._check(top_k_index.shape[0] == hidden.shape[0], lambda: "top_k_index must have one row per token")
    devices = {t.device for t in (hidden, w_in, w_out, expert_map, top_k_index, top_k_weights)}
    torch._check(len(devices) == 1, lambda: f"grouped_expert_ffn: all tensors must be on one device, got {devices}")
    return torch.empty_like(hidden, memory_format=torch.contiguous_format)


def _no_backward(ctx, grad):
    raise RuntimeError(
        "mcsmoe_fast.ops.grouped_expert_ffn is an inference op without a backward; use "
        "mcsmoe_fast.reference.grouped_expert_ffn for gradients (MoEExperts switches to it by itself "
        "when gradients are required)"
    )


torch.library.register_autograd("mcsmoe_fast::grouped_expert_ffn", _no_backward, setup_context=lambda ctx, inputs, output: None)
