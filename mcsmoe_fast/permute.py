"""Expert permutation alignment (M-SMoE step 1): reorder each expert's hidden neurons to match a
reference expert, so that averaging experts averages corresponding neurons.

An expert's hidden neurons can be permuted without changing its function: rows of w_in (gate and up
rows together for SwiGLU) and the matching columns of w_out. Weight matching scores neuron a of the
reference against neuron b of the target by the dot products of everything attached to them,

    C[a, b] = <w_in_R[a], w_in_T[b]> (+ <up_R[a], up_T[b]>) + <w_out_R[:, a], w_out_T[:, b]>,

and solves one maximisation assignment per target expert, all experts of a layer in one batched
call of ops.linear_assignment.
"""
from __future__ import annotations

import operator

from collections.abc import Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from . import ops
from .activations import apply, is_gated
from .hooks import run_hooked
from .models import MoELayer, moe_layers, unwrap
from .models.dispatched import refuse_meta_experts

DEFAULT_MEMORY_BUDGET = 2 << 30  # bytes of cost matrices (and a cost_fn's declared temporaries) built at once
CPU_PROBLEMS_PER_THREAD = 4  # cost matrices per solver thread and chunk on the CPU


def _select(w: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """w[idx] along dim 0: a broadcast view for one repeated index, a view for a run of consecutive
    indices, a gathered copy otherwise (for a 32-expert layer the copies cost as much as a tenth of
    the cost GEMMs)."""
    if len(idx) > 0 and bool((idx == idx[0]).all()):
        return w[idx[0]].expand(len(idx), *w.shape[1:])
    if len(idx) > 0 and bool((idx.diff() == 1).all()):
        return w[int(idx[0]) : int(idx[0]) + len(idx)]
    return w[idx]


def _select_float(w: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """_select(w, idx) in float32, converting only the selected experts (one matrix for a repeated
    index): a chunk needs a few experts of the layer, not a float32 copy of all of them."""
    if len(idx) > 0 and bool((idx == idx[0]).all()):
        return w[idx[0]].float().expand(len(idx), *w.shape[1:])
    return _select(w, idx).float()


def _neuron_blocks(w_in: torch.Tensor, w_out: torch.Tensor, activation: str) -> list[tuple[torch.Tensor, bool]]:
    """[S, ff, *] blocks whose rows are attached to one hidden neuron each: (tensor, is_transposed).
    w_out's block is its transpose; it is kept as the untransposed tensor so that gathers copy
    contiguous rows and the GEMM reads it in its natural layout."""
    ff = w_out.shape[-1]
    rows = [w_in[:, :ff], w_in[:, ff:]] if is_gated(activation) else [w_in]
    return [(r, False) for r in rows] + [(w_out, True)]


def weight_matching_cost(w_in, w_out, targets: torch.Tensor, refs: torch.Tensor, activation: str,
                         out: torch.Tensor | None = None) -> torch.Tensor:
    """Cost [len(targets), ff, ff]: reference neurons (rows) against target neurons (columns), written
    into `out` when given (a float32 tensor of that shape)."""
    first = True
    for block, transposed in _neuron_blocks(w_in, w_out, activation):
        ref, target = _select_float(block, refs), _select_float(block, targets)
        ref, target = (ref.transpose(1, 2), target) if transposed else (ref, target.transpose(1, 2))
        out = torch.bmm(ref, target, out=out) if first else out.baddbmm_(ref, target)
        first = False
    return out


def apply_permutation(w_in: torch.Tensor, w_out: torch.Tensor, perm: torch.Tensor, activation: str):
    """Permuted copies: neuron a of expert s becomes old neuron perm[s, a]."""
    ff = w_out.shape[-1]
    index = torch.cat([perm, perm + ff], dim=1) if is_gated(activation) else perm
    new_in = torch.gather(w_in, 1, index.unsqueeze(-1).expand(-1, -1, w_in.shape[-1]))
    new_out = torch.gather(w_out, 2, perm.unsqueeze(1).expand(-1, w_out.shape[1], -1))
    return new_in, new_out


@torch.no_grad()
def apply_permutation_(w_in: torch.Tensor, w_out: torch.Tensor, perm: torch.Tensor, activation: str):
    """apply_permutation in place, one expert at a time (a single expert's copy as workspace instead
    of a second copy of the whole layer); experts whose permutation is the identity are not touched."""
    ff = w_out.shape[-1]
    identity = torch.arange(ff, device=perm.device)
    for s in range(perm.shape[0]):
        p = perm[s]
        if torch.equal(p, identity):
            continue
        rows = torch.cat([p, p + ff]) if is_gated(activation) else p
        w_in[s].copy_(w_in[s].index_select(0, rows))
        w_out[s].copy_(w_out[s].index_select(1, p))
    return w_in, w_out


def with_bias_column(w_in: torch.Tensor, b_in: torch.Tensor | None) -> torch.Tensor:
    """w_in [E, F, d] with b_in [E, F] appended as column d: a neuron's input bias then moves with its
    row under permutation, counts in weight matching, and is averaged like its weights when merging."""
    return w_in if b_in is None else torch.cat([w_in, b_in.to(w_in.dtype).unsqueeze(-1)], dim=-1)


def _check_references(refs: torch.Tensor, num_slots: int, name: str) -> None:
    if refs.shape != (num_slots,) or refs.min() < 0 or refs.max() >= num_slots:
        raise ValueError(f"{name}: reference must be an index or {num_slots} indices in [0, {num_slots}), got {refs.tolist()}")
    if not torch.equal(refs[refs], refs):
        raise ValueError(f"{name}: every reference expert must be its own reference (refs[refs] == refs), got {refs.tolist()}")


def match_permutations(
    w_in: torch.Tensor,
    w_out: torch.Tensor,
    refs: torch.Tensor,
    activation: str,
    cost_fn=None,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    name: str = "match_permutations",
) -> torch.Tensor:
    """Permutation [S, ff] aligning every expert s to expert refs[s] (identity for references).

    cost_fn(targets, refs) -> [t, ff, ff] scores (higher = more alike); weight matching by default.
    Cost matrices are built and solved in chunks of at most `memory_budget` bytes, counting with each
    cost matrix the float32 weights weight matching holds, or the bytes of temporaries cost_fn declares
    per problem (its `bytes_per_problem` attribute, if any). name (the layer's) prefixes the errors.
    """
    if isinstance(memory_budget, bool) or not isinstance(memory_budget, int) or memory_budget < 1:
        raise ValueError(f"{name}: memory_budget must be a whole number of bytes >= 1, got {memory_budget!r}")
    num_slots, ff = w_in.shape[0], w_out.shape[-1]
    refs = torch.as_tensor(refs, dtype=torch.int64, device=w_in.device)
    _check_references(refs, num_slots, name)
    perm = torch.arange(ff, device=w_in.device).repeat(num_slots, 1)
    targets = (refs != torch.arange(num_slots, device=refs.device)).nonzero().squeeze(-1)
    # weight matching holds a target's and its reference's weights in float32 (_select_float) per problem
    held = 8 * (w_in[0].numel() + w_out[0].numel()) if cost_fn is None else getattr(cost_fn, "bytes_per_problem", 0)
    per_chunk = max(1, memory_budget // (ff * ff * 4 + held))
    if w_in.device.type == "cpu":
        # a few problems per solver thread: the cost buffer is reused (a fresh 1.2 GB one cost 0.27 s of
        # page faults for a 32-expert layer) and the threads still share the work evenly
        per_chunk = min(per_chunk, CPU_PROBLEMS_PER_THREAD * torch.get_num_threads())
    num_chunks = -(-targets.numel() // per_chunk)
    chunk = -(-targets.numel() // num_chunks) if num_chunks else 1  # even chunks keep the solver threads busy
    buffer = None
    for start in range(0, targets.numel(), chunk):
        t = targets[start : start + chunk]
        if cost_fn is None:
            if buffer is None:
                buffer = torch.empty(chunk, ff, ff, device=w_in.device)
            cost = weight_matching_cost(w_in, w_out, t, refs[t], activation, out=buffer[: len(t)])
        else:
            cost = cost_fn(t, refs[t])
        _check_finite_cost(cost, t, refs, name)
        perm[t] = ops.linear_assignment(cost, maximize=True).to(perm.device)
    return perm


def _check_finite_cost(cost: torch.Tensor, targets: torch.Tensor, refs: torch.Tensor, name: str) -> None:
    finite = torch.isfinite(cost).flatten(1).all(1)
    if not bool(finite.all()):
        e = int(targets[~finite][0])
        raise ValueError(f"{name}: aligning expert {e} to expert {int(refs[e])} needs finite weights (and finite "
                         f"calibration activations when matching by activations): NaN or inf found")


def _as_index(value):
    """An integer given as a Python, NumPy or 0-d torch integer, as an int; anything else as it is."""
    if isinstance(value, torch.Tensor):
        integral = value.dim() == 0 and not value.is_floating_point() and not value.is_complex()
        return int(value) if integral and value.dtype != torch.bool else value
    return operator.index(value) if hasattr(value, "__index__") and not isinstance(value, bool) else value


def _resolve_references(reference, layers: list[MoELayer]) -> list[torch.Tensor]:
    reference = 0 if reference is None else _as_index(reference)
    if isinstance(reference, int):
        reference = [reference] * len(layers)
    try:
        count = None if isinstance(reference, str) else len(reference)
    except TypeError:  # a float, a 0-d float tensor
        count = None
    if count is None:
        raise ValueError(f"reference: expected an expert index or one entry per MoE layer, got {reference!r}")
    if count != len(layers):
        raise ValueError(f"reference: expected one entry per MoE layer ({len(layers)}), got {len(reference)}")
    out = []
    for layer, ref in zip(layers, reference):
        slots = layer.expert_weights()[0].shape[0]
        ref = _as_index(ref)
        if isinstance(ref, int):
            if not 0 <= ref < slots:
                raise ValueError(f"{layer.name}: reference expert {ref} out of range [0, {slots})")
            ref = [ref] * slots
        out.append(torch.as_tensor(ref, dtype=torch.int64))
    return out


@torch.no_grad()
def _layer_inputs(model: nn.Module, layers: list[MoELayer], batches: Iterable[dict], max_tokens: int) -> dict:
    """Up to max_tokens hidden states [N, d] entering each MoE layer (padding excluded: an encoder
    layer uses the batch's attention_mask, a decoder layer its decoder mask)."""
    store = {layer.name: [] for layer in layers}

    def receive(layer: MoELayer, x: torch.Tensor, mask: torch.Tensor | None) -> None:
        if mask is not None:
            if mask.shape != x.shape[:-1]:
                raise ValueError(f"{layer.name}: mask of shape {tuple(mask.shape)} does not match the hidden "
                                 f"states {tuple(x.shape[:-1])}")
            x = x[mask.to(x.device).bool()]
        store[layer.name].append(x.reshape(-1, x.shape[-1]).float())

    run_hooked(model, layers, batches, receive,
               stop=lambda: all(sum(t.shape[0] for t in v) >= max_tokens for v in store.values()))
    return {k: torch.cat(v)[:max_tokens] if v else None for k, v in store.items()}


def activation_matching_cost(x: torch.Tensor, w_in, activation: str, activation_args: dict | None = None):
    """cost_fn for match_permutations: Pearson correlation of hidden activations over tokens x [N, d]
    (w_in [S, F, d + 1] carries the input biases as its last column, see with_bias_column).

    Every calibration token that reaches the layer counts for every expert pair (the original code
    used only the tokens routed to either expert of the pair; all tokens give every pair the same,
    larger sample and one batched computation). Each distinct reference expert's activations are
    computed once per chunk; cost_fn.bytes_per_problem bounds the float32 weights and activations a
    target and its reference hold, for match_permutations to size its chunks."""
    if w_in.shape[-1] == x.shape[-1] + 1:
        x = torch.cat([x, x.new_ones(x.shape[0], 1)], dim=-1)

    def cost_fn(targets: torch.Tensor, refs: torch.Tensor) -> torch.Tensor:
        def standardized(idx):
            h = apply(torch.einsum("nd,sfd->snf", x, w_in[idx].float()), activation, **(activation_args or {}))
            h = h - h.mean(1, keepdim=True)
            return h / h.norm(dim=1, keepdim=True).clamp_min(1e-12)
        unique, inverse = refs.unique(return_inverse=True)
        return torch.bmm(_select(standardized(unique), inverse).transpose(1, 2), standardized(targets))
    # per expert: its weights [F, d] and pre-activations [N, F] in float32, and as much again for the
    # activations and their standardized copies; for the target and for its reference
    cost_fn.bytes_per_problem = 2 * 4 * (w_in.shape[1] * w_in.shape[2] + 2 * x.shape[0] * w_in.shape[1])
    return cost_fn


@torch.no_grad()
def align_experts(
    model: nn.Module,
    reference=None,
    strategy: str = "weight",
    batches: Iterable[dict] | None = None,
    max_tokens: int = 4096,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    progress: bool = True,
) -> dict[str, torch.Tensor]:
    """Permute every MoE layer's experts in place to match reference experts; the model computes
    the same function afterwards.

    reference: None (expert 0 of every layer), one index for all layers, or a per-layer list whose
    entries are an index or a list of E indices (expert s aligns to reference[l][s]; merging passes
    each expert's dominant expert). strategy: "weight" (weight matching) or "activation"
    (correlation of hidden activations on calibration `batches`, an iterable of model input dicts).
    Returns {layer name: permutation [E, ff]}; row s says which old neuron each new neuron was.
    """
    model = unwrap(model)
    if strategy not in ("weight", "activation"):
        raise ValueError(f"strategy must be 'weight' or 'activation', got {strategy!r}")
    if strategy == "activation" and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int)
                                     or max_tokens < 2):
        raise ValueError("max_tokens must be a whole number >= 2 (activation matching correlates tokens), "
                         f"got {max_tokens!r}")
    layers = moe_layers(model)
    refuse_meta_experts(layers, "align_experts")
    refs = _resolve_references(reference, layers)
    inputs = None
    if strategy == "activation":
        if batches is None:
            raise ValueError("strategy='activation' needs calibration `batches` (an iterable of model input dicts)")
        inputs = _layer_inputs(model, layers, batches, max_tokens)
    perms = {}
    for layer, ref in tqdm(list(zip(layers, refs)), desc="aligning experts", unit="layer", disable=not progress):
        w_in, w_out = layer.expert_weights()
        b_in = layer.expert_biases()[0]
        d = w_in.shape[-1]
        w_in = with_bias_column(w_in, b_in)
        ref = ref.to(w_in.device)
        cost_fn = None
        if strategy == "activation":
            x = inputs[layer.name]
            if x is None or x.shape[0] < 2:
                raise ValueError(f"{layer.name}: no calibration tokens reached this layer")
            cost_fn = activation_matching_cost(x.to(w_in.device), w_in, layer.activation, layer.activation_args)
        perm = match_permutations(w_in, w_out, ref, layer.activation, cost_fn, memory_budget, layer.name)
        new_in, new_out = apply_permutation(w_in, w_out, perm, layer.activation)
        if b_in is None:
            layer.set_expert_weights(new_in, new_out)
        else:
            layer.set_expert_weights(new_in[..., :d], new_out, b_in=new_in[..., d])
        perms[layer.name] = perm
    return perms
