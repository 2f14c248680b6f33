"""Compressed expert slots (MC-SMoE's "then compress"): every slot's w_in and w_out is a low-rank
product plus a few kept rows, W ~= U V + S with S zero outside `row_idx`.

A bank holds one expert matrix of every slot:

    U [S, out, r]   V [S, r, in]   S_rows [K, in]   row_idx [K] int64   row_offsets [S + 1] int64

where slot s owns the kept rows row_offsets[s] .. row_offsets[s+1] (counts differ per slot: pruning
uses one global threshold). Expert biases (GPT-OSS: b_in [S, F], b_out [S, d]) stay dense beside the
banks, and clamped SwiGLU keeps its alpha and limit (activation_args), as in MoEExperts. While pruning
is in progress (see compress.CompressionPruner) every row is still stored and a `keep` mask [K] says
which rows count; `finalize()` drops the others for good.
"""
from __future__ import annotations

import torch
from torch import nn

from .. import ops
from ..activations import apply as apply_activation, check as check_activation, is_gated

BANK_FIELDS = ("U", "V", "S_rows", "row_idx", "row_offsets")


class CompressedMoEExperts(nn.Module):
    """Drop-in for MoEExperts whose slots are compressed: forward(hidden [T, d], top_k_index [T, k],
    top_k_weights [T, k]) runs ops.grouped_expert_ffn_slr (one fused call); with gradients required it
    runs ops.sparse_lowrank_linear per slot instead (same function, differentiable in U, V, S_rows). Under
    torch.autocast both run in the slots' dtype and return the caller's (autocasting). The banks' shapes are
    checked at construction."""

    def __init__(self, w_in: list[torch.Tensor], w_out: list[torch.Tensor], expert_map: torch.Tensor, activation: str,
                 b_in: torch.Tensor | None = None, b_out: torch.Tensor | None = None,
                 activation_args: dict | None = None):
        super().__init__()
        check_activation(activation)
        _check_banks(w_in, w_out, activation)
        for side, bank in (("in", w_in), ("out", w_out)):
            U, V, S_rows, row_idx, offsets = bank
            self.register_parameter(f"{side}_U", nn.Parameter(U))
            self.register_parameter(f"{side}_V", nn.Parameter(V))
            self.register_parameter(f"{side}_S_rows", nn.Parameter(S_rows))
            self.register_buffer(f"{side}_row_idx", torch.as_tensor(row_idx, dtype=torch.int64))
            self.register_buffer(f"{side}_row_offsets", torch.as_tensor(offsets, dtype=torch.int64))
            self.register_buffer(f"{side}_keep", None, persistent=False)  # set_keep() while pruning
        self.register_buffer("expert_map", torch.as_tensor(expert_map, dtype=torch.int64, device=w_in[0].device))
        self.activation = activation
        self.activation_args = dict(activation_args or {})
        # expert biases (GPT-OSS) stay dense: one row per slot, next to the compressed matrices
        slots, rows_in, rows_out = w_in[0].shape[0], w_in[0].shape[1], w_out[0].shape[1]
        for name, b, shape in (("b_in", b_in, (slots, rows_in)), ("b_out", b_out, (slots, rows_out))):
            if b is not None and tuple(b.shape) != shape:
                raise ValueError(f"{name} must be {list(shape)} for these banks, got {list(b.shape)}")
        self.b_in = None if b_in is None else nn.Parameter(b_in)
        self.b_out = None if b_out is None else nn.Parameter(b_out)
        if self.expert_map.numel() and (self.expert_map.min() < 0 or self.expert_map.max() >= self.num_slots):
            raise ValueError(f"expert_map must have entries in [0, {self.num_slots}), got {self.expert_map.tolist()}")

    # --- views -------------------------------------------------------------------------------------
    @property
    def num_experts(self) -> int:
        return self.expert_map.numel()

    @property
    def num_slots(self) -> int:
        return self.in_U.shape[0]

    @property
    def pruning(self) -> bool:
        """True until finalize(): rows are masked, not yet removed."""
        return self.in_keep is not None

    def bank(self, side: str) -> list[torch.Tensor]:
        """[U, V, S_rows, row_idx, row_offsets] of side "in" or "out", masked rows left out."""
        U, V, S_rows, row_idx, offsets = (getattr(self, f"{side}_{f}") for f in BANK_FIELDS)
        keep = getattr(self, f"{side}_keep")
        if keep is None:
            return [U, V, S_rows, row_idx, offsets]
        kept = keep.nonzero().squeeze(-1)
        per_slot = torch.zeros(self.num_slots + 1, dtype=torch.int64, device=offsets.device)
        slot_of_row = torch.searchsorted(offsets[1:], torch.arange(keep.numel(), device=offsets.device), right=True)
        per_slot[1:] = torch.bincount(slot_of_row[kept], minlength=self.num_slots).cumsum(0)
        return [U, V, S_rows.index_select(0, kept), row_idx.index_select(0, kept), per_slot]

    def dense_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(w_in [S, F, d], w_out [S, d, ff]) reconstructed: U V + S per slot."""
        with torch.no_grad():
            return _dense(self.bank("in")), _dense(self.bank("out"))

    def extra_repr(self) -> str:
        s, f, r_in = self.in_U.shape
        args = "".join(f", {k}={v}" for k, v in self.activation_args.items())
        biases = ", biases" if self.b_in is not None or self.b_out is not None else ""
        return (f"slots={s}, experts={self.num_experts}, d={self.in_V.shape[2]}, F={f}, rank_in={r_in}, "
                f"rank_out={self.out_U.shape[2]}, kept_rows_in={self.bank('in')[2].shape[0]}, "
                f"kept_rows_out={self.bank('out')[2].shape[0]}, activation={self.activation}{args}{biases}")

    # --- pruning -----------------------------------------------------------------------------------
    @torch.no_grad()
    def set_keep(self, keep_in: torch.Tensor, keep_out: torch.Tensor) -> None:
        """Mask rows (bool [K] per side); masked rows are zeroed and get no gradient from then on."""
        for side, keep in (("in", keep_in), ("out", keep_out)):
            rows = getattr(self, f"{side}_S_rows")
            keep = keep.to(device=rows.device, dtype=torch.bool)
            if keep.shape != rows.shape[:1]:
                raise ValueError(f"keep_{side} must be [{rows.shape[0]}], got {tuple(keep.shape)}")
            rows[~keep] = 0
            setattr(self, f"{side}_keep", keep)

    @torch.no_grad()
    def finalize(self) -> None:
        """Drop the masked rows for good: S_rows, row_idx and row_offsets keep only the kept rows."""
        for side in ("in", "out"):
            _, _, S_rows, row_idx, offsets = self.bank(side)
            old = getattr(self, f"{side}_S_rows")
            setattr(self, f"{side}_S_rows", nn.Parameter(S_rows.contiguous(), requires_grad=old.requires_grad))
            setattr(self, f"{side}_row_idx", row_idx.contiguous())
            setattr(self, f"{side}_row_offsets", offsets)
            setattr(self, f"{side}_keep", None)

    # --- forward -----------------------------------------------------------------------------------
    def forward(self, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        top_k_index = top_k_index.long()  # any integer index, as MoEExperts takes it
        if autocasting(hidden):  # in the slots' dtype, autocast off (autocasting); the caller's dtype back
            with torch.autocast(hidden.device.type, enabled=False):
                dtype = self.in_U.dtype
                return self.forward(hidden.to(dtype), top_k_index, top_k_weights.to(dtype)).to(hidden.dtype)
        w_in, w_out = self.bank("in"), self.bank("out")
        params = (self.in_U, self.in_V, self.in_S_rows, self.out_U, self.out_V, self.out_S_rows,
                  *(b for b in (self.b_in, self.b_out) if b is not None))
        needs_grad = torch.is_grad_enabled() and (
            hidden.requires_grad or top_k_weights.requires_grad or any(p.requires_grad for p in params)
        )
        if needs_grad:
            return _grouped_slr_autograd(hidden, w_in, w_out, self.expert_map, top_k_index, top_k_weights,
                                         self.activation, self.b_in, self.b_out, self.activation_args)
        return ops.grouped_expert_ffn_slr(hidden, w_in, w_out, self.expert_map, top_k_index, top_k_weights,
                                          self.activation, self.b_in, self.b_out, **self.activation_args)


def _check_banks(w_in, w_out, activation: str) -> None:
    """ValueError unless the shapes of w_in and w_out make banks of one layer's S slots (module docstring): w_in's
    rows F = 2 ff (gated) or ff, w_out's rows d = w_in's inputs, w_out's inputs ff. Values are not read (a
    checkpoint's loader builds the module from placeholders first)."""
    dims = {}
    for name, bank in (("w_in", w_in), ("w_out", w_out)):
        if len(bank) != len(BANK_FIELDS):
            raise ValueError(f"{name} must be the bank [{', '.join(BANK_FIELDS)}], got {len(bank)} tensors")
        U, V, S_rows, row_idx, offsets = (torch.as_tensor(t) for t in bank)
        if not (U.dim() == 3 and V.dim() == 3 and tuple(V.shape[:2]) == (U.shape[0], U.shape[2]) and S_rows.dim() == 2
                and S_rows.shape[1] == V.shape[2] and tuple(row_idx.shape) == (S_rows.shape[0],)
                and tuple(offsets.shape) == (U.shape[0] + 1,)):
            got = ", ".join(f"{f} {list(torch.as_tensor(t).shape)}" for f, t in zip(BANK_FIELDS, bank))
            raise ValueError(f"{name}: U [S, out, r], V [S, r, in], S_rows [K, in], row_idx [K] and row_offsets "
                             f"[S + 1] expected, got {got}")
        dims[name] = (U.shape[0], U.shape[1], V.shape[2])  # S, out, in
    (s_in, f, d), (s_out, d_out, ff) = dims["w_in"], dims["w_out"]
    if s_in != s_out:
        raise ValueError(f"w_in has {s_in} slots but w_out has {s_out}: both banks hold the same slots")
    want = (2 * ff, "2 ff") if is_gated(activation) else (ff, "ff")
    if f != want[0] or d_out != d:
        raise ValueError(f"w_in [S, F, d] = {list(dims['w_in'])} does not match w_out [S, d, ff] = "
                         f"{list(dims['w_out'])} for {activation}: F must be {want[0]} ({want[1]}) and both banks' d "
                         "the same")


def autocasting(x: torch.Tensor) -> bool:
    """Whether torch.autocast is on for x's device. The compressed ops have no autocast rule (their inner GEMMs
    would be autocast while their operands stay in the slots' dtype), so under autocast the compressed slots run
    with it turned off, in the slots' own dtype (forward and backward), and hand back the caller's dtype."""
    return ops.autocasting(x.device.type)


def slr_linear(x, U, V, S_rows, row_idx, bias=None) -> torch.Tensor:
    """ops.sparse_lowrank_linear, also under torch.autocast: then in U's dtype with autocast off, the result in
    x's dtype (autocasting)."""
    if not autocasting(x):
        return ops.sparse_lowrank_linear(x, U, V, S_rows, row_idx, bias)
    with torch.autocast(x.device.type, enabled=False):
        return ops.sparse_lowrank_linear(x.to(U.dtype), U, V, S_rows, row_idx, bias).to(x.dtype)


def _dense(bank) -> torch.Tensor:
    """A bank [U [S, out, r], V [S, r, in], S_rows [K, in], row_idx [K], row_offsets [S+1]] as weights [S, out, in]."""
    U, V, S_rows, row_idx, offsets = bank
    W = U @ V
    slot_of_row = torch.repeat_interleave(torch.arange(U.shape[0], device=U.device), offsets.diff())
    return W.index_put_((slot_of_row, row_idx), S_rows.to(W.dtype), accumulate=True)


def _grouped_slr_autograd(hidden, w_in, w_out, expert_map, top_k_index, top_k_weights, activation, b_in=None,
                          b_out=None, activation_args=None):
    """The grouped FFN over compressed slots for training: slot by slot through the differentiable linear op,
    each token running each distinct slot of its top-k once with its summed routing weight on that slot."""
    off_in, off_out = w_in[4].tolist(), w_out[4].tolist()
    num_slots = w_in[0].shape[0]
    valid = top_k_index >= 0
    slots = expert_map[top_k_index.clamp(min=0)].masked_fill(~valid, 0)
    weight = torch.zeros(hidden.shape[0], num_slots, dtype=top_k_weights.dtype, device=hidden.device)
    weight = weight.scatter_add(1, slots, top_k_weights * valid)  # [T, S], differentiable in the routing weights
    hit = torch.zeros_like(weight, dtype=torch.bool)
    hit[valid.nonzero()[:, 0], slots[valid]] = True  # token t runs slot s
    out = torch.zeros_like(hidden)
    for s in hit.any(0).nonzero().flatten().tolist():
        tokens = hit[:, s].nonzero().flatten()
        a, b = off_in[s], off_in[s + 1]
        h = ops.sparse_lowrank_linear(hidden[tokens], w_in[0][s], w_in[1][s], w_in[2][a:b], w_in[3][a:b],
                                      None if b_in is None else b_in[s])
        h = apply_activation(h, activation, **(activation_args or {}))
        a, b = off_out[s], off_out[s + 1]
        h = ops.sparse_lowrank_linear(h, w_out[0][s], w_out[1][s], w_out[2][a:b], w_out[3][a:b],
                                      None if b_out is None else b_out[s])
        out = out.index_add(0, tokens, h * weight[tokens, s, None].to(hidden.dtype))
    return out
