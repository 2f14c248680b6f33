"""The Python face of every native op: torch.ops.mcsmoe_fast.*, with fake (meta) implementations
so torch.compile can trace them. Plain-PyTorch references of the same ops are in reference.py."""
from __future__ import annotations

import math

import torch

from ._ext import _C  # noqa: F401  (loading it registers the ops)

_lib = torch.ops.mcsmoe_fast


def _refuse_derivative_transforms(op: str, *tensors) -> None:
    """The fused ops have a backward for ordinary autograd only. Forward-mode AD (torch.func.jvp / jacfwd,
    torch.autograd.forward_ad) would drop the tangent silently (a zero derivative), and torch.func's grad
    transforms (grad, jacrev, vmap(grad)) fail naming an autograd.Function the user never wrote: both are
    refused by name. torch.vmap of the forward and torch.compile are unaffected."""
    if torch._C._functorch.maybe_current_level() is not None:  # inside torch.func: is any level a derivative?
        from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters

        derivative = (torch._C._functorch.TransformType.Grad, torch._C._functorch.TransformType.Jvp)
        if any(level.key() in derivative for level in retrieve_all_functorch_interpreters()):
            raise NotImplementedError(f"{op}: torch.func's grad / jvp transforms (grad, jacrev, jacfwd, jvp, "
                                      "hessian) are not supported by the fused op; use ordinary autograd "
                                      f"(.backward / torch.autograd.grad) or mcsmoe_fast.reference.{op}")
        return  # vmap alone: its tensors are batched (unpack_dual has no batching rule), and no tangent is there
    if torch.autograd.forward_ad._current_level >= 0 and any(
            t is not None and torch.autograd.forward_ad.unpack_dual(t).tangent is not None for t in tensors):
        raise NotImplementedError(f"{op}: forward-mode AD (a dual tensor) is not supported by the fused op; use "
                                  f"ordinary autograd or mcsmoe_fast.reference.{op}")


# --- linear assignment ---------------------------------------------------------------------------
def linear_assignment(cost: torch.Tensor, maximize: bool = False) -> torch.Tensor:
    """Optimal assignment of rows to columns for cost [n, m] or a batch [B, n, m].

    Returns int64 column indices [..., n]: row i takes column out[..., i], or none (-1) when n > m
    (then m rows get a column each). The objective is optimal, equal to
    scipy.optimize.linear_sum_assignment's, whose contract this keeps: any real dtype (bool and
    integers are solved as float64, float16/bfloat16 as float32; duals are float64), CPU or CUDA;
    +inf (-inf when maximizing) marks a forbidden pair. Raises ValueError on NaN, on -inf (+inf when
    maximizing), on a problem where every assignment uses a forbidden pair ("infeasible") and on a
    wrong rank; TypeError on a complex dtype.
    """
    return _lib.linear_assignment(cost, maximize)


@torch.library.register_fake("mcsmoe_fast::linear_assignment")
def _linear_assignment_fake(cost: torch.Tensor, maximize: bool = False) -> torch.Tensor:
    torch._check_value(cost.dim() in (2, 3), lambda: f"cost must be [n, m] or [B, n, m], got rank {cost.dim()}")
    return cost.new_empty(cost.shape[:-1], dtype=torch.int64)


def linear_sum_assignment(cost, maximize: bool = False):
    """Drop-in for scipy.optimize.linear_sum_assignment: (row indices, column indices) of an optimal
    assignment of the matrix `cost`, rows ascending; min(n, m) pairs.

    A torch.Tensor (CPU or CUDA) gives int64 tensors on its device; anything else (a numpy array, a
    nested list) gives numpy int64 arrays. Errors as in scipy: ValueError for a wrong rank, invalid
    entries (NaN, -inf when minimizing, +inf when maximizing) or an infeasible matrix (+inf, or -inf
    when maximizing, marks a forbidden pair); TypeError for a dtype that does not cast safely to float64.
    """
    if isinstance(cost, torch.Tensor):
        if cost.dim() != 2:
            raise ValueError(f"expected a matrix (2-D tensor), got a {cost.dim()} tensor")
        return _rows_and_cols(linear_assignment(cost.detach(), maximize), cost.shape)
    import numpy as np

    array = np.asarray(cost)
    if array.ndim != 2:
        raise ValueError(f"expected a matrix (2-D array), got a {array.ndim} array")
    if not np.can_cast(array.dtype, np.float64, casting="safe"):
        raise TypeError(f"Cannot cast array data from {array.dtype!r} to dtype('float64') according to the rule 'safe'")
    if array.dtype not in (np.float32, np.float64):
        array = array.astype(np.float64)
    if not (array.flags.c_contiguous and array.flags.writeable and min(array.strides, default=0) >= 0):
        array = np.array(array, order="C")  # torch.from_numpy warns on read-only arrays, refuses negative strides
    cols = linear_assignment(torch.from_numpy(array), maximize)
    rows, cols = _rows_and_cols(cols, array.shape)
    return rows.numpy(), cols.numpy()


def _rows_and_cols(cols: torch.Tensor, shape) -> tuple[torch.Tensor, torch.Tensor]:
    """linear_assignment's columns per row of one [n, m] problem -> scipy's (rows, cols)."""
    if shape[0] <= shape[1]:
        return torch.arange(shape[0], device=cols.device), cols
    rows = torch.nonzero(cols >= 0).squeeze(1)
    return rows, cols[rows]


# --- grouped expert FFN over merged slots ---------------------------------------------------------
from .activations import ACTIVATIONS, ALPHA, CLAMPED_SWIGLU, CLAMPED_SWIGLU_INTERLEAVED, LIMIT  # noqa: E402


def moe_align(top_k_index: torch.Tensor, top_k_weights: torch.Tensor, expert_map: torch.Tensor, num_slots: int):
    """Routing alignment: (token, merged slot) pairs sorted by slot.

    top_k_index [T, k] int64 original expert ids (-1 = no expert), top_k_weights [T, k], expert_map [E]
    int64 (slot of each expert, in [0, num_slots)). Returns, all sized statically:
      sorted_token_ids [T*k] int64  token of each pair, grouped by slot, tokens ascending in a slot; -1 past the end
      slot_offsets [S+1] int64      slot s owns rows slot_offsets[s] .. slot_offsets[s+1]
      sorted_weights [T*k]          the token's summed routing weight on that slot (float64 if the weights
                                    are float64, else float32; on CUDA always summed in float32); 0 past the end
      token_rows [T, k] int64       rows of token t's pairs in ascending slot order, then -1
    A token whose top-k experts share one slot gets one pair carrying the summed weight.
    """
    return _lib.moe_align(top_k_index, top_k_weights, expert_map, num_slots)


@torch.library.register_fake("mcsmoe_fast::moe_align")
def _moe_align_fake(top_k_index, top_k_weights, expert_map, num_slots):
    torch._check(top_k_index.dim() == 2, lambda: "top_k_index must be [T, k]")
    _check_one_device("moe_align", top_k_index=top_k_index, top_k_weights=top_k_weights, expert_map=expert_map)
    torch._check(top_k_weights.shape == top_k_index.shape, lambda: "top_k_weights must have top_k_index's shape")
    n = top_k_index.shape[0] * top_k_index.shape[1]
    wdtype = torch.float64 if top_k_weights.dtype == torch.float64 else torch.float32
    return (
        top_k_index.new_empty((n,)),
        top_k_index.new_empty((num_slots + 1,)),
        top_k_weights.new_empty((n,), dtype=wdtype),
        top_k_index.new_empty(top_k_index.shape),
    )


# the device types with autocast, decided once: dynamo before torch 2.12 cannot trace torch.amp.is_autocast_available
# (torch.compile(fullgraph=True) of every fused op failed), a constant set traces everywhere
AUTOCAST_TYPES = frozenset(t for t in ("cpu", "cuda", "xpu", "mps", "hpu", "mtia", "xla", "ipu", "privateuseone")
                           if torch.amp.is_autocast_available(t))


def autocasting(device_type: str) -> bool:
    """Whether torch.autocast is on for `device_type` (a type without autocast, e.g. meta: off)."""
    return device_type in AUTOCAST_TYPES and torch.is_autocast_enabled(device_type)


def grouped_expert_ffn(
    hidden: torch.Tensor,
    w_in: torch.Tensor,
    w_out: torch.Tensor,
    expert_map: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    activation: str,
    b_in: torch.Tensor | None = None,
    b_out: torch.Tensor | None = None,
    alpha: float = ALPHA,
    limit: float = LIMIT,
) -> torch.Tensor:
    """The whole expert FFN over S slots in one call; differentiable in hidden, w_in, w_out, top_k_weights,
    b_in and b_out (the backward is the fused op grouped_expert_ffn_backward).

    hidden [T, d]; w_in [S, F, d]; w_out [S, d, ff]; expert_map [E] int64; top_k_index [T, k] int64
    (-1 = no expert); top_k_weights [T, k]; activation one of activations.ACTIVATIONS: ungated "relu",
    "relu2" (squared ReLU), "gelu", "gelu_tanh", "silu" (F = ff), or gated "reglu", "geglu", "geglu_tanh", "swiglu" (F = 2*ff, gate
    rows then up rows, act(gate) * up), or GPT-OSS's "clamped_swiglu" (F = 2*ff, same layout;
    (clamp(up, -limit, limit) + 1) * g * sigmoid(alpha * g) with g = min(gate, limit); alpha and limit are
    ignored by the other activations), or "clamped_swiglu_interleaved": the same on gate and up rows interleaved
    (gate0, up0, gate1, ...: GPT-OSS's stored order), on the CPU only (forward and backward; CUDA and the
    compressed op refuse it). Optional expert biases b_in [S, F] and b_out [S, d] (the weights'
    dtype and device; either may be given alone). out[t] = sum over the distinct slots s of token t of
    (t's summed weight on s) * FFN_s(hidden[t]), FFN_s(x) = act(w_in[s] @ x + b_in[s]) @ w_out[s]^T + b_out[s].
    Equals reference.grouped_expert_ffn.

    When autograd records it on the CPU, the forward keeps the routed rows' pre-activations (T k rows of F, as
    autograd keeps eager's intermediates) and the backward reads them instead of recomputing them (one GEMM
    of the backward's five saved); elsewhere, and when nothing needs a gradient, nothing is kept.

    The op has no autocast rule (its inner GEMMs would be autocast while its operands stay in the weights'
    dtype): under torch.autocast it runs with autocast off, hidden and top_k_weights in the weights' dtype, and
    returns hidden's dtype, with or without gradients (as the compressed slots do, modules/compressed.py).
    """
    _refuse_derivative_transforms("grouped_expert_ffn", hidden, w_in, w_out, top_k_weights, b_in, b_out)
    if autocasting(hidden.device.type):
        with torch.autocast(hidden.device.type, enabled=False):
            dtype = w_in.dtype
            return grouped_expert_ffn(hidden.to(dtype), w_in, w_out, expert_map, top_k_index, top_k_weights.to(dtype),
                                      activation, b_in, b_out, alpha, limit).to(hidden.dtype)
    args = (hidden, w_in, w_out, expert_map, top_k_index, top_k_weights, activation, b_in, b_out, alpha, limit)
    if hidden.device.type == "cpu" and torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (hidden, w_in, w_out, top_k_weights, b_in, b_out)):
        return _lib.grouped_expert_ffn_keep_h(*args)[0]
    return _lib.grouped_expert_ffn(*args)


def _check_one_device(op, **tensors):
    """Every tensor given (by its argument name) on one device, else an error naming one that is elsewhere: a meta
    tensor when real ones are given too. Fake kernels run for any meta tensor among the arguments, so a mix of meta
    and real tensors is caught here, not in the kernels."""
    first, where = next(((n, t.device) for n, t in tensors.items() if t.device.type != "meta"), (None, None))
    if first is None:
        return
    name, device = next(((n, t.device) for n, t in tensors.items() if t.device != where), (None, None))
    torch._check(name is None, lambda: f"{op}: all tensors must be on one device, got {name} on {device} and {first} "
                                       f"on {where}; move {name} to {where}")


def _check_activation(activation, alpha, limit, op, known=ACTIVATIONS):
    torch._check_value(activation in known, lambda: f"{op}: unknown activation {activation!r}; expected one of {known}")
    if activation in (CLAMPED_SWIGLU, CLAMPED_SWIGLU_INTERLEAVED):
        torch._check_value(math.isfinite(limit) and limit >= 0, lambda: f"{op}: clamped_swiglu needs a finite limit >= 0, got {limit}")
        torch._check_value(math.isfinite(alpha), lambda: f"{op}: clamped_swiglu needs a finite alpha, got {alpha}")


@torch.library.register_fake("mcsmoe_fast::grouped_expert_ffn")
def _grouped_expert_ffn_fake(hidden, w_in, w_out, expert_map, top_k_index, top_k_weights, activation, b_in=None,
                             b_out=None, alpha=ALPHA, limit=LIMIT):
    op = "grouped_expert_ffn"
    _check_activation(activation, alpha, limit, op, ACTIVATIONS + (CLAMPED_SWIGLU_INTERLEAVED,))
    torch._check(hidden.dim() == 2 and w_in.dim() == 3 and w_out.dim() == 3, lambda: "hidden [T, d], w_in [S, F, d], w_out [S, d, ff]")
    torch._check(w_in.dtype == hidden.dtype and w_out.dtype == hidden.dtype, lambda: "hidden, w_in, w_out: one dtype")
    torch._check(top_k_index.shape[0] == hidden.shape[0], lambda: "top_k_index must have one row per token")
    tensors = dict(hidden=hidden, w_in=w_in, w_out=w_out, expert_map=expert_map, top_k_index=top_k_index,
                   top_k_weights=top_k_weights)
    for name, bias, cols in (("b_in", b_in, w_in.shape[1]), ("b_out", b_out, w_out.shape[1])):
        if bias is None:
            continue
        want = (w_in.shape[0], cols)
        torch._check(bias.dim() == 2 and tuple(bias.shape) == want,
                     lambda: f"{op}: {name} must be {'[S, F]' if name == 'b_in' else '[S, d]'} = [{want[0]}, {want[1]}] "
                             f"(one row per slot), got shape {list(bias.shape)}")
        torch._check(bias.dtype == w_in.dtype, lambda: f"{op}: {name} must have the weights' dtype {w_in.dtype}, got {bias.dtype}")
        tensors[name] = bias
    _check_one_device(op, **tensors)
    return torch.empty_like(hidden, memory_format=torch.contiguous_format)


@torch.library.register_fake("mcsmoe_fast::grouped_expert_ffn_keep_h")
def _grouped_expert_ffn_keep_h_fake(hidden, w_in, w_out, expert_map, top_k_index, top_k_weights, activation,
                                    b_in=None, b_out=None, alpha=ALPHA, limit=LIMIT):
    out = _grouped_expert_ffn_fake(hidden, w_in, w_out, expert_map, top_k_index, top_k_weights, activation, b_in,
                                   b_out, alpha, limit)
    return out, hidden.new_empty((top_k_index.numel(), w_in.shape[1]))


def grouped_expert_ffn_backward(grad_out, hidden, w_in, w_out, expert_map, top_k_index, top_k_weights, activation,
                                output_mask=(True,) * 6, b_in=None, b_out=None, alpha=ALPHA, limit=LIMIT, h_rows=None):
    """Gradients of grouped_expert_ffn for grad_out [T, d]: (grad_hidden [T, d], grad_w_in [S, F, d],
    grad_w_out [S, d, ff], grad_top_k_weights [T, k] in top_k_weights' dtype, grad_b_in [S, F], grad_b_out
    [S, d]). output_mask (six bools, in that order) says which to compute; the others come back as empty
    tensors [0], and so do the gradients of biases not given. A mask of four bools (the op before biases)
    computes no bias gradients and returns the first four. Recomputes the expert hidden layer's pre-activations,
    or on the CPU reads them from h_rows, the second output of grouped_expert_ffn_keep_h on the same inputs
    (torch.ops.mcsmoe_fast; [T k, F]). Entry (t, j) of the weights' gradient is <grad_out[t], FFN_s(hidden[t])>
    (b_out[s] included) for the slot s of expert top_k_index[t, j], 0 where it is -1: every entry of a token
    mapping to one slot gets the same value, as the forward sums their weights."""
    mask = list(output_mask)
    if len(mask) not in (4, 6):
        raise ValueError(f"grouped_expert_ffn_backward: output_mask must hold four or six bools, got {len(mask)}")
    grads = _lib.grouped_expert_ffn_backward(grad_out, hidden, w_in, w_out, expert_map, top_k_index, top_k_weights,
                                             activation, mask + [False] * (6 - len(mask)), b_in, b_out, alpha, limit,
                                             h_rows)
    return grads[:len(mask)]


@torch.library.register_fake("mcsmoe_fast::grouped_expert_ffn_backward")
def _grouped_expert_ffn_backward_fake(grad_out, hidden, w_in, w_out, expert_map, top_k_index, top_k_weights,
                                      activation, output_mask, b_in=None, b_out=None, alpha=ALPHA, limit=LIMIT,
                                      h_rows=None):
    _grouped_expert_ffn_fake(hidden, w_in, w_out, expert_map, top_k_index, top_k_weights, activation, b_in, b_out,
                             alpha, limit)
    torch._check(grad_out.shape == hidden.shape and grad_out.dtype == hidden.dtype and grad_out.device == hidden.device,
                 lambda: "grouped_expert_ffn_backward: grad_out must have hidden's shape, dtype and device")
    torch._check(len(output_mask) == 6, lambda: "grouped_expert_ffn_backward: output_mask must hold six bools")
    if h_rows is not None:
        _check_one_device("grouped_expert_ffn_backward", hidden=hidden, h_rows=h_rows)

    def grad(need, like, layout=torch.contiguous_format):
        return torch.empty_like(like, memory_format=layout) if need else hidden.new_empty((0,)) if like is None else like.new_empty((0,))
    # on the CPU the weights' gradients come in the weights' own layouts (a transposed bank's: see SlotGrads)
    weights = torch.preserve_format if hidden.device.type == "cpu" else torch.contiguous_format
    return (grad(output_mask[0], hidden), grad(output_mask[1], w_in, weights), grad(output_mask[2], w_out, weights),
            grad(output_mask[3], top_k_weights), grad(output_mask[4] and b_in is not None, b_in),
            grad(output_mask[5] and b_out is not None, b_out))


def _ffn_setup_context(ctx, inputs, output):
    # torch fills in the arguments the dispatcher dropped at their defaults: inputs always has all eleven
    hidden, w_in, w_out, expert_map, top_k_index, top_k_weights, activation, b_in, b_out, alpha, limit = inputs
    h_rows = output[1] if isinstance(output, tuple) else None  # grouped_expert_ffn_keep_h's pre-activations
    if h_rows is not None:
        ctx.mark_non_differentiable(h_rows)
    ctx.save_for_backward(hidden, w_in, w_out, expert_map, top_k_index, top_k_weights, b_in, b_out, h_rows)
    ctx.activation, ctx.alpha, ctx.limit = activation, alpha, limit


def _ffn_backward(ctx, grad, grad_h_rows=None):
    if torch.is_grad_enabled():  # backward(create_graph=True): the fused backward has no derivative of its own
        raise NotImplementedError("grouped_expert_ffn: double backward (create_graph=True, e.g. a gradient penalty) "
                                  "is not supported by the fused op; use mcsmoe_fast.reference.grouped_expert_ffn")
    hidden, w_in, w_out, expert_map, top_k_index, top_k_weights, b_in, b_out, h_rows = ctx.saved_tensors
    # needs_input_grad covers only the arguments passed: trailing ones left at their defaults are dropped
    n = len(ctx.needs_input_grad)
    need = tuple(ctx.needs_input_grad) + (False,) * (11 - n)
    mask = [need[0], need[1], need[2], need[5], need[7] and b_in is not None, need[8] and b_out is not None]
    if not any(mask):
        return (None,) * n
    grads = _lib.grouped_expert_ffn_backward(grad.to(hidden.dtype), hidden, w_in, w_out, expert_map, top_k_index,
                                             top_k_weights, ctx.activation, mask, b_in, b_out, ctx.alpha, ctx.limit,
                                             h_rows)
    g = [t if m else None for t, m in zip(grads, mask)]
    return (g[0], g[1], g[2], None, None, g[3], None, g[4], g[5], None, None)[:n]


torch.library.register_autograd("mcsmoe_fast::grouped_expert_ffn", _ffn_backward, setup_context=_ffn_setup_context)
torch.library.register_autograd("mcsmoe_fast::grouped_expert_ffn_keep_h", _ffn_backward,
                                setup_context=_ffn_setup_context)


def _no_backward(ctx, grad):
    raise RuntimeError(
        "mcsmoe_fast.ops.grouped_expert_ffn_slr is an inference op without a backward; use "
        "mcsmoe_fast.reference.grouped_expert_ffn_slr for gradients"
    )


# --- sparse-plus-low-rank linear (compressed experts) ---------------------------------------------
def sparse_lowrank_linear(x, U, V, S_rows, row_idx, bias=None):
    """y = x (U V + S)^T + bias without forming W: S is zero except the rows `row_idx` (held in S_rows).

    x [..., in]; U [out, r]; V [r, in]; S_rows [K, in]; row_idx [K] int64, distinct rows in [0, out);
    bias [out] or None. Computes (x V^T) U^T and adds x S_rows^T into the kept output columns: no
    [out, in] weight and no temporary larger than [T, r] and [T, K] besides the output. CPU (float32,
    float64, bfloat16, float16) and CUDA (float32, float16, bfloat16). Differentiable in x, U, V,
    S_rows and bias. Equals reference.sparse_lowrank_linear.
    """
    _refuse_derivative_transforms("sparse_lowrank_linear", x, U, V, S_rows, bias)
    return _lib.sparse_lowrank_linear(x, U, V, S_rows, row_idx, bias)


@torch.library.register_fake("mcsmoe_fast::sparse_lowrank_linear")
def _sparse_lowrank_linear_fake(x, U, V, S_rows, row_idx, bias=None):
    # The checks the CPU and CUDA kernels make that need no data (row_idx values need data). Tensors on
    # the meta device land here too, so a device mismatch must be caught here, not only in the kernels.
    torch._check(x.dim() >= 1 and U.dim() == 2 and V.dim() == 2 and S_rows.dim() == 2,
                 lambda: "sparse_lowrank_linear: x [..., in], U [out, r], V [r, in], S_rows [K, in]")
    torch._check(V.shape[0] == U.shape[1] and V.shape[1] == x.shape[-1] and S_rows.shape[1] == x.shape[-1],
                 lambda: "sparse_lowrank_linear: U, V, S_rows and x disagree on r or in")
    torch._check(row_idx.dim() == 1 and row_idx.dtype == torch.int64 and row_idx.shape[0] == S_rows.shape[0],
                 lambda: "sparse_lowrank_linear: row_idx must be an int64 tensor [K]")
    torch._check(x.dtype.is_floating_point and U.dtype == x.dtype and V.dtype == x.dtype and S_rows.dtype == x.dtype,
                 lambda: "sparse_lowrank_linear: x, U, V and S_rows must have one floating dtype")
    tensors = dict(x=x, U=U, V=V, S_rows=S_rows, row_idx=row_idx) | ({} if bias is None else dict(bias=bias))
    _check_one_device("sparse_lowrank_linear", **tensors)
    if bias is not None:
        torch._check(bias.dim() == 1 and bias.shape[0] == U.shape[0] and bias.dtype == x.dtype,
                     lambda: f"sparse_lowrank_linear: bias must be [out] = [{U.shape[0]}] of x's dtype")
    return x.new_empty((*x.shape[:-1], U.shape[0]))


def _slr_setup_context(ctx, inputs, output):
    x, U, V, S_rows, row_idx, bias = inputs
    ctx.save_for_backward(x, U, V, S_rows, row_idx)
    ctx.has_bias = bias is not None


def _slr_backward(ctx, grad):
    x, U, V, S_rows, row_idx = ctx.saved_tensors
    # The dispatcher drops a bias left at its default (None): then there are five inputs, not six.
    need = ctx.needs_input_grad
    need_x, need_u, need_v, need_s = need[:4]
    need_b = len(need) > 5 and need[5] and ctx.has_bias
    x2 = x.reshape(x.shape[:-1].numel(), x.shape[-1])  # not reshape(-1, in): in may be 0
    g = grad.reshape(x2.shape[0], U.shape[0])
    gz = g @ U  # [T, r]
    gs = g.index_select(1, row_idx)  # [T, K]: the gradient reaching the kept rows
    gx = (gz @ V + gs @ S_rows).reshape(x.shape) if need_x else None
    gU = g.T @ (x2 @ V.T) if need_u else None
    gV = gz.T @ x2 if need_v else None
    gS = gs.T @ x2 if need_s else None
    gb = g.sum(0) if need_b else None
    return (gx, gU, gV, gS, None, gb)[:len(need)]


torch.library.register_autograd("mcsmoe_fast::sparse_lowrank_linear", _slr_backward, setup_context=_slr_setup_context)


def grouped_expert_ffn_slr(hidden, w_in, w_out, expert_map, top_k_index, top_k_weights, activation,
                           b_in=None, b_out=None, alpha: float = ALPHA, limit: float = LIMIT):
    """grouped_expert_ffn over compressed slots (inference; no autograd): every slot's w_in and w_out are
    sparse-plus-low-rank, given as banks [U [S, out, r], V [S, r, in], S_rows [K, in], row_idx [K] int64,
    row_offsets [S+1] int64]; slot s owns the kept rows row_offsets[s] .. row_offsets[s+1] (row indices
    distinct within a slot). Shapes otherwise as in grouped_expert_ffn (w_in: out = F, in = d; w_out:
    out = d, in = ff); b_in [S, F], b_out [S, d] (optional expert biases), alpha and limit as there
    (GPT-OSS's). Equals reference.grouped_expert_ffn_slr (the dense reconstruction)."""
    _refuse_derivative_transforms("grouped_expert_ffn_slr", hidden, *w_in, *w_out, top_k_weights, b_in, b_out)
    return _lib.grouped_expert_ffn_slr(hidden, list(w_in), list(w_out), expert_map, top_k_index, top_k_weights,
                                       activation, b_in, b_out, alpha, limit)


@torch.library.register_fake("mcsmoe_fast::grouped_expert_ffn_slr")
def _grouped_expert_ffn_slr_fake(hidden, w_in, w_out, expert_map, top_k_index, top_k_weights, activation,
                                 b_in=None, b_out=None, alpha=ALPHA, limit=LIMIT):
    op = "grouped_expert_ffn_slr"
    _check_activation(activation, alpha, limit, op)
    torch._check(len(w_in) == 5 and len(w_out) == 5, lambda: f"{op}: w_in, w_out: [U, V, S_rows, row_idx, row_offsets]")
    torch._check(hidden.dim() == 2 and top_k_index.dim() == 2 and top_k_index.shape[0] == hidden.shape[0],
                 lambda: f"{op}: hidden [T, d], top_k_index [T, k]")
    for name, bank in (("w_in", w_in), ("w_out", w_out)):
        U, V, S_rows, row_idx, offsets = bank
        torch._check(U.dim() == 3 and V.dim() == 3 and S_rows.dim() == 2, lambda: f"{op}: {name} U [S, out, r], V [S, r, in], S_rows [K, in]")
        torch._check(U.dtype == hidden.dtype and V.dtype == hidden.dtype and S_rows.dtype == hidden.dtype,
                     lambda: f"{op}: {name} U, V and S_rows must have hidden's dtype {hidden.dtype}")
        torch._check(row_idx.dtype == torch.int64 and offsets.dtype == torch.int64, lambda: f"{op}: {name} row_idx and row_offsets must be int64")
        torch._check(offsets.dim() == 1 and offsets.shape[0] == U.shape[0] + 1, lambda: f"{op}: {name} row_offsets must be [S + 1]")
    S, F, d = w_in[0].shape[0], w_in[0].shape[1], hidden.shape[1]
    for name, bias, cols in (("b_in", b_in, F), ("b_out", b_out, d)):
        if bias is not None:
            torch._check(bias.dim() == 2 and bias.shape[0] == S and bias.shape[1] == cols and bias.dtype == hidden.dtype,
                         lambda: f"{op}: {name} must be [S, {'F' if name == 'b_in' else 'd'}] of hidden's dtype")
    parts = ("U", "V", "S_rows", "row_idx", "row_offsets")
    banks = {f"{bank} {part}": t for bank, ts in (("w_in", w_in), ("w_out", w_out)) for part, t in zip(parts, ts)}
    biases = {name: b for name, b in (("b_in", b_in), ("b_out", b_out)) if b is not None}
    _check_one_device(op, hidden=hidden, **banks, expert_map=expert_map, top_k_index=top_k_index,
                      top_k_weights=top_k_weights, **biases)
    return torch.empty_like(hidden, memory_format=torch.contiguous_format)


torch.library.register_autograd("mcsmoe_fast::grouped_expert_ffn_slr", _no_backward, setup_context=lambda ctx, inputs, output: None)


# --- choices by measurement (csrc/ops/autotune.h) -------------------------------------------------------
def autotune_decisions() -> dict[str, tuple[str, list[str]]]:
    """The choices the CPU ops make by measurement: {decision: (the environment variable that pins it,
    its candidates' labels)}. A pin takes a label or an index (MCSMOE_SLOT_PARALLEL=1 = "parallel");
    MCSMOE_AUTOTUNE=0 or torch.use_deterministic_algorithms(True) turns timing off (every decision takes its
    fixed default, so reruns and resumed runs are bit-identical)."""
    return {name: (env, list(labels)) for name, env, labels in _C.autotune_decisions()}


def autotune_choices() -> list[dict]:
    """What the running process has measured: one dict per (decision, shape class) with `decision`,
    `shape`, `winner` (a candidate's label, or None while still measuring) and `median_ms` ({label: median
    of its timed runs in ms}, candidates not run or not available on this CPU left out)."""
    labels = autotune_decisions()
    rows = []
    for name, shape, winner, ms in _C.autotune_snapshot():
        names = labels[name][1]
        rows.append(dict(decision=name, shape=shape, winner=winner or None,
                         median_ms={names[i]: t for i, t in enumerate(ms) if t >= 0}))
    return rows


def autotune_reset() -> None:
    """Forget every measurement: the next calls of each shape class time their candidates again."""
    _C.autotune_reset()
