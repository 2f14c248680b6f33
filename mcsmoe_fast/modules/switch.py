"""The Switch Transformers block around expert slots (SwitchMoE): transformers' top-1 router, expert capacity
and expert dropout, over MoEExperts or compressed slots.

A SwitchMoE's state dict uses transformers' names (`experts.expert_{i}.wi.weight`, `.wo.weight`, one tensor
per expert, each its slot's weights) so that transformers and every saver that goes through state_dict()
(accelerate, FSDP, trainers) get a Switch checkpoint transformers loads as the model it computes; it loads
those names back (experts sharing a slot must agree). mcsmoe_fast's merged checkpoint format stores each
slot once under the slot names (`experts.w_in`, `w_out`, `expert_map`): see `slot_names()`.
"""
from __future__ import annotations

import contextlib
import contextvars

import torch
from torch import nn

from ..activations import apply as apply_activation
from .compressed import slr_linear
from .slots import MoEExperts


class SwitchMoE(nn.Module):
    """Replacement for transformers' SwitchTransformersSparseMLP: transformers' router module itself (the same
    object: its hooks, and its output, the dispatch mask with capacity applied, stay transformers'), MoEExperts slots.

    Expert capacity behaves exactly as in transformers (tokens past an expert's capacity within a
    sequence get no expert and pass through the residual only). `dropless=True` routes every token
    to its expert whatever the capacity (it changes the outputs of long sequences: not HF's model).
    Expert dropout is transformers' (`expert_dropout`, config.dropout_rate): in training mode with p > 0
    the experts run one after another as transformers runs them, with the dropout between each expert's
    activation and its wo, drawing the same masks for the same seed; otherwise (eval, p = 0) the fused op.
    The state dict uses transformers' names (module docstring).
    """

    def __init__(self, router: nn.Module, experts: MoEExperts, dropless: bool = False, expert_dropout: float = 0.0):
        super().__init__()
        self.router = router
        self.experts = experts
        self.expert_dropout = nn.Dropout(expert_dropout)
        self.dropless = dropless
        self.register_state_dict_post_hook(_state_dict_in_transformers_names)
        self.register_load_state_dict_pre_hook(_load_transformers_names)

    def extra_repr(self) -> str:
        return f"dropless={self.dropless}"

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        batch, seq, d = hidden_states.shape
        mask, probs, logits = self.router(hidden_states)  # one-hot [B, L, E] (capacity applied), [B, L, 1], logits
        if self.dropless:  # every token to its choice: the router's argmax, before capacity
            index = nn.functional.softmax(logits, dim=-1, dtype=self.router.dtype).to(hidden_states.dtype).argmax(-1)
        else:  # the mask's one expert; -1 where it has none (past its expert's capacity)
            chosen, index = mask.max(dim=-1)
            index = index.masked_fill(chosen == 0, -1)
        hidden, index, probs = hidden_states.reshape(-1, d), index.reshape(-1, 1), probs.reshape(-1, 1)
        if self.training and self.expert_dropout.p > 0:
            out = self._experts_with_dropout(hidden, index.squeeze(-1), probs)
        else:
            out = self.experts(hidden, index, probs)
        return out.reshape(batch, seq, d)

    def _experts_with_dropout(self, hidden: torch.Tensor, index: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        """transformers' expert loop (SwitchTransformersExperts): experts hit, in ascending order, each on its
        tokens in order: wo(dropout(act(wi x))) times the router probability, added into the output. Plain
        PyTorch, differentiable; each expert uses its slot's weights."""
        experts = self.experts
        layer_in, layer_out = slot_linears(experts)
        slot_of = experts.expert_map.tolist()
        out = torch.zeros_like(hidden)
        for e in torch.unique(index[index >= 0]).tolist():
            tokens = (index == e).nonzero().squeeze(-1)
            h = apply_activation(layer_in(slot_of[e], hidden[tokens]), experts.activation, **experts.activation_args)
            h = layer_out(slot_of[e], self.expert_dropout(h))
            out.index_add_(0, tokens, (h * probs[tokens]).to(hidden.dtype))
        return out


def slot_linears(experts: nn.Module):
    """(linear_in(s, x), linear_out(s, h)): slot s's two expert matrices (with their biases) applied to rows,
    differentiably, for MoEExperts and compressed slots (CompressedMoEExperts: the low-rank-plus-rows op)."""
    b_in, b_out = experts.b_in, experts.b_out
    if isinstance(experts, MoEExperts):
        return (lambda s, x: nn.functional.linear(x, experts.w_in[s], None if b_in is None else b_in[s]),
                lambda s, h: nn.functional.linear(h, experts.w_out[s], None if b_out is None else b_out[s]))

    def compressed(side: str, bias):
        U, V, S_rows, row_idx, offsets = experts.bank(side)
        starts = offsets.tolist()

        def linear(s: int, x: torch.Tensor) -> torch.Tensor:
            rows = slice(starts[s], starts[s + 1])
            b = None if bias is None else bias[s]
            return slr_linear(x, U[s], V[s], S_rows[rows], row_idx[rows], b)
        return linear

    return compressed("in", b_in), compressed("out", b_out)


# --- state dict: transformers' names --------------------------------------------------------------------
_SLOT_NAMES = contextvars.ContextVar("mcsmoe_fast_slot_names", default=False)


@contextlib.contextmanager
def slot_names():
    """Within this block, SwitchMoE state dicts (and load_state_dict) keep the slot names `experts.w_in`,
    `experts.w_out`, `experts.expert_map`, each slot stored once, aliasing the parameters: the form of
    mcsmoe_fast's merged checkpoints (checkpoint.py)."""
    token = _SLOT_NAMES.set(True)
    try:
        yield
    finally:
        _SLOT_NAMES.reset(token)


def _in_transformers_names(module: SwitchMoE) -> bool:
    experts = module.experts
    return (not _SLOT_NAMES.get() and isinstance(experts, MoEExperts) and experts.b_in is None
            and experts.b_out is None)


def _slot_of_each_expert(expert_map: torch.Tensor, num_slots: int) -> list[int] | None:
    """expert_map as a list; on the meta device (no values) the identity of an unmerged layer, else None."""
    if not expert_map.is_meta:
        return expert_map.tolist()
    return list(range(num_slots)) if num_slots == expert_map.numel() else None


def _expert_key(prefix: str, e: int, side: str) -> str:
    return f"{prefix}experts.expert_{e}.{side}.weight"


def _state_dict_in_transformers_names(module: SwitchMoE, state: dict, prefix: str, local_metadata) -> None:
    """Post-hook of SwitchMoE.state_dict: experts.w_in/w_out/expert_map -> one wi/wo weight per expert, each
    a copy of its slot (separate tensors: savers that drop tensors sharing a storage keep every expert;
    with keep_vars=True, views of the parameters)."""
    if not _in_transformers_names(module) or f"{prefix}experts.w_in" not in state:
        return
    w_in, w_out = state.pop(f"{prefix}experts.w_in"), state.pop(f"{prefix}experts.w_out")
    emap = state.pop(f"{prefix}experts.expert_map")
    live = isinstance(w_in, nn.Parameter)  # keep_vars=True
    slot_of = _slot_of_each_expert(emap, w_in.shape[0]) or [0] * emap.numel()  # merged on meta: shapes only
    for e, s in enumerate(slot_of):
        state[_expert_key(prefix, e, "wi")] = w_in[s] if live else w_in[s].clone()
        state[_expert_key(prefix, e, "wo")] = w_out[s] if live else w_out[s].clone()


def _load_transformers_names(module: SwitchMoE, state: dict, prefix: str, local_metadata, strict: bool,
                             missing_keys: list, unexpected_keys: list, error_msgs: list) -> None:
    """Pre-hook of SwitchMoE.load_state_dict: transformers' per-expert wi/wo weights -> experts.w_in/w_out
    (each slot from the experts that use it, which must be equal). Experts absent from `state` are missing
    keys and keep their slot's current weights."""
    if not _in_transformers_names(module):
        return
    experts = module.experts
    names = {side: [_expert_key(prefix, e, side) for e in range(experts.num_experts)] for side in ("wi", "wo")}
    if not any(n in state for side in names.values() for n in side):
        return
    emap = state.get(f"{prefix}experts.expert_map", experts.expert_map)
    slot_of = _slot_of_each_expert(emap, experts.num_slots)
    if slot_of is None:
        error_msgs.append(f"{prefix}experts: a merged layer on the meta device has no expert_map to load "
                          "transformers' per-expert weights with (load mcsmoe_fast's checkpoint with from_pretrained)")
        return
    banks = {}
    for side, bank in (("wi", "w_in"), ("wo", "w_out")):
        current, rows = getattr(experts, bank), []
        given = {e: state.pop(n) for e, n in enumerate(names[side]) if n in state}
        missing_keys.extend(n for e, n in enumerate(names[side]) if e not in given)
        if not given:  # this bank stays as it is (its experts are reported missing)
            banks[bank] = current.detach()
            continue
        for e, t in given.items():
            if tuple(t.shape) != tuple(current.shape[1:]):
                error_msgs.append(f"size mismatch for {names[side][e]}: copying a param with shape {tuple(t.shape)} "
                                  f"from checkpoint, the shape in current model is {tuple(current.shape[1:])}.")
                return
        like = next(iter(given.values()))
        for s in range(experts.num_slots):
            members = [e for e in range(experts.num_experts) if slot_of[e] == s and e in given]
            for e in members[1:]:
                if not torch.equal(given[e], given[members[0]]):
                    error_msgs.append(f"{names[side][members[0]]} and {names[side][e]}: experts {members[0]} and {e} "
                                      f"share slot {s} of this merged layer, but the state dict gives them different "
                                      "weights (load it into an unmerged model, or one merged the same way)")
                    return
            if members:
                rows.append(given[members[0]])
            elif current.is_meta:
                error_msgs.append(f"{prefix}experts: slot {s} has no weights in the state dict, nor on the meta device")
                return
            else:
                rows.append(current[s].detach().to(like.device, like.dtype))
        banks[bank] = torch.stack(rows)
    for bank, t in banks.items():
        state[f"{prefix}experts.{bank}"] = t
    if f"{prefix}experts.expert_map" not in state:  # transformers has none: the layer's own (values, not meta)
        state[f"{prefix}experts.expert_map"] = torch.tensor(slot_of, dtype=torch.int64, device=banks["w_in"].device)
