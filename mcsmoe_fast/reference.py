"""Plain-PyTorch references of every op: the ground truth the tests compare against."""
from __future__ import annotations

import numpy as np
import torch


# --- linear assignment ---------------------------------------------------------------------------
def linear_assignment(cost: torch.Tensor, maximize: bool = False) -> torch.Tensor:
    """scipy.optimize.linear_sum_assignment per problem; cost [n, m] or [B, n, m]. Columns per row,
    -1 for the rows left without one (n > m). Raises scipy's ValueError on invalid or infeasible costs."""
    from scipy.optimize import linear_sum_assignment

    batched = cost.dim() == 3
    costs = cost if batched else cost.unsqueeze(0)
    out = torch.full(costs.shape[:2], -1, dtype=torch.int64)
    for b, c in enumerate(costs.detach().cpu().double().numpy()):
        rows, cols = linear_sum_assignment(c, maximize=maximize)
        out[b, torch.from_numpy(rows.astype(np.int64))] = torch.from_numpy(cols.astype(np.int64))
    out = out.to(cost.device)
    return out if batched else out[0]


def assignment_objective(cost: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Sum of the chosen entries per problem, in float64 (rows with column -1 choose nothing)."""
    if cost.shape[-1] == 0:
        return torch.zeros(cols.shape[:-1], dtype=torch.float64, device=cost.device)
    taken = cols >= 0
    chosen = cost.double().gather(-1, cols.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return torch.where(taken, chosen, torch.zeros((), dtype=torch.float64, device=chosen.device)).sum(-1)


# --- expert FFN over merged slots ----------------------------------------------------------------
def expert_activation(h: torch.Tensor, activation: str, alpha: float = 1.702, limit: float = 7.0) -> torch.Tensor:
    """act(h), or act(gate) * up for gated activations, or GPT-OSS's clamped SwiGLU (see activations.py)."""
    from .activations import apply

    return apply(h, activation, alpha, limit)


def grouped_expert_ffn(
    hidden: torch.Tensor,  # [T, d]
    w_in: torch.Tensor,  # [S, F, d]
    w_out: torch.Tensor,  # [S, d, ff]
    expert_map: torch.Tensor,  # [E] int64, slot of each original expert
    top_k_index: torch.Tensor,  # [T, k] int64, original expert ids; -1 = no expert (dropped token)
    top_k_weights: torch.Tensor,  # [T, k]
    activation: str,
    b_in: torch.Tensor | None = None,  # [S, F]
    b_out: torch.Tensor | None = None,  # [S, d]
    alpha: float = 1.702,  # clamped_swiglu's parameters
    limit: float = 7.0,
) -> torch.Tensor:
    """out[t] = sum over distinct slots s hit by token t of (sum of t's weights on s) * FFN_s(x_t), with
    FFN_s(x) = act(x W_in[s]^T + b_in[s]) W_out[s]^T + b_out[s] (the biases inside the routing weight, as
    transformers' experts add them)."""
    def slot_ffn(s, x):
        h = x @ w_in[s].T
        if b_in is not None:
            h = h + b_in[s]
        y = expert_activation(h, activation, alpha, limit) @ w_out[s].T
        return y if b_out is None else y + b_out[s]
    return grouped_over_slots(hidden, w_in.shape[0], expert_map, top_k_index, top_k_weights, slot_ffn)


def grouped_over_slots(hidden, num_slots, expert_map, top_k_index, top_k_weights, slot_ffn):
    """The grouped expert FFN with slot s computed by slot_ffn(s, x_rows): each token runs every distinct
    slot its top-k experts map to once, weighted by its summed routing weights on that slot. Plain
    PyTorch, differentiable through slot_ffn."""
    out = torch.zeros_like(hidden)
    valid = top_k_index >= 0
    slots = torch.where(valid, expert_map[top_k_index.clamp(min=0)], -1)
    for s in range(num_slots):
        hit = slots == s
        tokens = hit.any(-1).nonzero().squeeze(-1)
        if tokens.numel() == 0:
            continue
        weight = torch.where(hit, top_k_weights, 0).sum(-1)[tokens]  # a dropped entry's weight is never read
        out.index_add_(0, tokens, slot_ffn(s, hidden[tokens]) * weight[:, None].to(hidden.dtype))
    return out


def moe_align(top_k_index: torch.Tensor, top_k_weights: torch.Tensor, expert_map: torch.Tensor, num_slots: int):
    """(sorted_token_ids [T*k], slot_offsets [S+1], sorted_weights [T*k], token_rows [T, k]): see ops.moe_align."""
    T, k = top_k_index.shape
    wdtype = torch.float64 if top_k_weights.dtype == torch.float64 else torch.float32
    valid = top_k_index >= 0
    slots = torch.where(valid, expert_map[top_k_index.clamp(min=0)], -1)
    tokens, weights, counts = [], [], []
    for s in range(num_slots):
        hit = slots == s
        t_s = hit.any(-1).nonzero().squeeze(-1)
        tokens.append(t_s)
        weights.append(torch.where(hit, top_k_weights.to(wdtype), 0).sum(-1)[t_s])
        counts.append(t_s.numel())
    pairs = sum(counts)
    sorted_tokens = torch.full((T * k,), -1, dtype=torch.int64, device=top_k_index.device)
    sorted_weights = torch.zeros(T * k, dtype=wdtype, device=top_k_index.device)
    sorted_tokens[:pairs] = torch.cat(tokens)
    sorted_weights[:pairs] = torch.cat(weights)
    offsets = torch.zeros(num_slots + 1, dtype=torch.int64)
    offsets[1:] = torch.tensor(counts, dtype=torch.int64).cumsum(0)
    token_rows = torch.full((T, k), -1, dtype=torch.int64)
    filled = [0] * T
    for row, t in enumerate(sorted_tokens[:pairs].tolist()):
        token_rows[t, filled[t]] = row
        filled[t] += 1
    return sorted_tokens, offsets.to(top_k_index.device), sorted_weights, token_rows.to(top_k_index.device)


# --- sparse-plus-low-rank (compressed) experts -----------------------------------------------------
def slr_dense(U: torch.Tensor, V: torch.Tensor, S_rows: torch.Tensor, row_idx: torch.Tensor) -> torch.Tensor:
    """W = U V + S [out, in], with S zero outside the rows row_idx (which hold S_rows)."""
    return (U @ V).index_add(0, row_idx, S_rows)


def sparse_lowrank_linear(x, U, V, S_rows, row_idx, bias=None):
    """x (U V + S)^T + bias through the reconstructed dense W."""
    y = x @ slr_dense(U, V, S_rows, row_idx).T
    return y if bias is None else y + bias


def slr_bank_dense(bank) -> torch.Tensor:
    """A bank of compressed slots [U [S, out, r], V [S, r, in], S_rows [K, in], row_idx [K], row_offsets [S+1]]
    as dense weights [S, out, in]."""
    U, V, S_rows, row_idx, offsets = bank
    off = offsets.tolist()
    return torch.stack([slr_dense(U[s], V[s], S_rows[off[s]:off[s + 1]], row_idx[off[s]:off[s + 1]])
                        for s in range(U.shape[0])])


def grouped_expert_ffn_slr(hidden, w_in, w_out, expert_map, top_k_index, top_k_weights, activation,
                           b_in=None, b_out=None, alpha: float = 1.702, limit: float = 7.0):
    """The grouped expert FFN over compressed slots, through their reconstructed dense weights."""
    return grouped_expert_ffn(hidden, slr_bank_dense(w_in), slr_bank_dense(w_out), expert_map, top_k_index,
                              top_k_weights, activation, b_in, b_out, alpha=alpha, limit=limit)
