"""The one view of an MoE layer that every step of the pipeline works on.

Switch Transformers (switch.py) and every transformers family whose experts follow the
`use_experts_implementation` contract (experts.py: Mixtral, Qwen2/3-MoE, OLMoE, DeepSeek-V3, GPT-OSS,
Qwen3-Next, ...) map their Hugging Face modules onto `MoELayer`. Expert weights always travel in one
canonical layout:

    w_in  [S, F, d]   F = ff for ungated experts, 2 * ff for gated ones (gate rows, then up rows)
    w_out [S, d, ff]
    b_in  [S, F], b_out [S, d]   optional biases (GPT-OSS)

where S is the number of stored expert slots: S = E for an original layer, S = G after merging, and
`expert_map` [E] names the slot each of the E original experts uses.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..modules import CompressedMoEExperts, MoEExperts


@dataclass
class MoELayer:
    """One MoE block of a model, seen through its family's adapter."""

    name: str  # dotted module path of the MoE block inside the model
    module: nn.Module  # the block itself (HF module or our drop-in replacement)
    parent: nn.Module  # the module that owns `module` as attribute `attr`
    attr: str
    num_experts: int
    top_k: int
    activation: str  # one of activations.ACTIVATIONS, read from the model
    activation_args: dict = field(default_factory=dict)  # alpha, limit of clamped_swiglu (GPT-OSS)

    # --- implemented per family -----------------------------------------------------------------
    def router_weight(self) -> torch.Tensor:
        """Router (gate) weight [E, d]. The router is never changed by merging."""
        raise NotImplementedError

    def router_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Router logits [T, E] for hidden states [T, d], exactly as the block computes them."""
        raise NotImplementedError

    def expert_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(w_in [S, F, d], w_out [S, d, ff]); copies for modular layouts, views for fused ones."""
        raise NotImplementedError

    def set_expert_weights(self, w_in: torch.Tensor, w_out: torch.Tensor) -> None:
        """Write weights of the same shape back into the block, in place."""
        raise NotImplementedError

    def slot_weights(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(w_in, w_out) when the block holds our slots (merged; compressed: reconstructed U V + S), None while it
        holds the family's own experts (each adapter reads those in its own layout)."""
        experts = getattr(self.module, "experts", None)
        if isinstance(experts, MoEExperts):
            return experts.w_in, experts.w_out
        if isinstance(experts, CompressedMoEExperts):
            return experts.dense_weights()
        return None

    def expert_biases(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(b_in [S, F], b_out [S, d]); each is None where the layer has no such bias (a family without expert
        biases gives (None, None))."""
        experts = getattr(self.module, "experts", None)
        return getattr(experts, "b_in", None), getattr(experts, "b_out", None)

    def route(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(router logits [T, E], chosen experts [T, k]) for hidden states [T, d], chosen as the block
        chooses them (families with their own selection rule override this)."""
        logits = self.router_logits(hidden)
        return logits, self.choose(logits, hidden.dtype)

    def choose(self, logits: torch.Tensor, input_dtype: torch.dtype) -> torch.Tensor:
        """The chosen experts [T, k] from router logits [T, E] (masked ones -inf) for a block whose input has
        `input_dtype`: the top-k logits (Switch: the argmax of its probabilities rounded to input_dtype)."""
        return logits.topk(self.top_k, dim=-1).indices

    def expert_input_scale(self, logits: torch.Tensor, top: torch.Tensor) -> torch.Tensor | None:
        """[T, k] factors by which the block scales each chosen expert's input (Llama-4's router score), from
        route()'s logits and choice; None where the experts see the hidden states as they are."""
        return None

    def expert_tensors(self) -> tuple[list[torch.Tensor], list[torch.Tensor]] | None:
        """The family's own tensors that optimize() stacks into MoEExperts' w_in and w_out (Switch: each expert's
        wi and wo weight); None where it stacks nothing (our slots already, or the family's experts module stays)."""
        return None

    def stacked_requires_grad(self) -> tuple[bool, bool] | None:
        """requires_grad of the w_in and w_out that optimize() stacks: each the flag of the tensors it stacks (frozen
        experts stay frozen, matrix by matrix); None where it stacks nothing. ValueError naming the layer when the
        experts of one bank disagree, which one stacked parameter cannot hold; optimize() asks every layer first."""
        tensors = self.expert_tensors()
        if tensors is None:
            return None
        flags = []
        for side, bank in zip(("w_in", "w_out"), tensors):
            frozen = [e for e, t in enumerate(bank) if not t.requires_grad]
            if 0 < len(frozen) < len(bank):
                raise ValueError(f"{self.name}: the {side} matrices of experts {frozen} are frozen and the others' "
                                 "not, but optimize() stacks them into one parameter: freeze all or none, then optimize")
            flags.append(bool(bank) and not frozen)
        return flags[0], flags[1]

    experts_implementation = False  # its experts run through transformers' experts interface (optimize)

    def optimize(self, dropless: bool | None = None) -> bool:
        """Run this layer through the fused op (optimize()): its experts as slots in the family's fast block
        (frozen experts stay frozen; never inference tensors made from normal weights). dropless: None keeps the
        block's own setting (a dropless checkpoint loaded by from_pretrained stays dropless). Returns whether the
        model now holds modules transformers' own save cannot write (our slots)."""
        experts = getattr(self.module, "experts", None)
        if not isinstance(experts, (MoEExperts, CompressedMoEExperts)):
            params = list(experts.parameters()) if experts is not None else []
            if any(p.is_meta for p in params) and any(getattr(m, "_hf_hook", None) is not None
                                                      for m in self.module.modules()):
                raise ValueError(f"{self.name}: its experts are offloaded by accelerate (weights on the meta device); "
                                 "optimize() needs them in memory: load the model without offloading these layers")
            flags = self.stacked_requires_grad()
            if flags is None:
                raise NotImplementedError(f"{type(self).__name__}: optimize() stacks its experts: name the tensors "
                                          "it stacks (expert_tensors)")
            with torch.inference_mode(False):
                w_in, w_out = self.expert_weights()
                experts = MoEExperts(w_in.detach(), w_out.detach(), self.expert_map(), self.activation)
            experts.w_in.requires_grad_(flags[0])
            experts.w_out.requires_grad_(flags[1])
            experts.train(self.module.training)
        keep = bool(getattr(self.module, "dropless", False))
        self.install_experts(experts)
        self.module.dropless = keep if dropless is None else dropless
        return True

    def check_maskable(self) -> None:
        """ValueError unless the drop baseline can mask this layer's router logits (families override)."""
        raise ValueError(f"{self.name}: the drop baseline cannot mask the router logits of {type(self.module).__name__} "
                         "(use strategy='frequency' or 'average')")

    def mask_router(self, keep: torch.Tensor) -> None:
        """Route as before but never to the experts with keep[e] == False (the drop baseline)."""
        self.check_maskable()

    def logit_mask(self) -> torch.Tensor | None:
        """The router's keep mask [E], or None when no expert is masked."""
        return None

    def router_rows(self) -> tuple[nn.Module, str]:
        """(the module holding the router's rows: weight [E, d] and any bias or correction bias [E], its
        state-dict prefix inside the block): what a standard checkpoint slices to M experts."""
        raise ValueError(f"{self.name}: {type(self.module).__name__} layers have no standard form yet")

    def stored_tensors(self):
        """ExpertTensors: the checkpoint names of this layer's experts and router (streaming reads by them)."""
        raise ValueError(f"{self.name}: {type(self.module).__name__} layers are not streamed; use the in-memory pipeline")

    def expert_map(self) -> torch.Tensor:
        """Slot of each original expert, int64 [E] (identity for an unmerged layer)."""
        experts = getattr(self.module, "experts", None)
        if experts is not None and hasattr(experts, "expert_map"):
            return experts.expert_map
        return torch.arange(self.num_experts, device=self.router_weight().device)

    # --- shared helpers --------------------------------------------------------------------------
    def hidden_activations(self, x: torch.Tensor, slots: torch.Tensor | int) -> torch.Tensor:
        """act(w_in[s] x + b_in[s]) of slot(s) `slots` for tokens x [N, d]: [N, ff] for one slot, [n, N, ff]
        for a tensor of n slots (computed in x's dtype)."""
        from ..activations import apply

        w_in, _ = self.expert_weights()
        b_in, _ = self.expert_biases()
        w = w_in.detach()[slots].to(x.dtype)
        h = x @ w.transpose(-1, -2)
        if b_in is not None:
            h = h + b_in.detach()[slots].to(x.dtype).unsqueeze(-2)
        return apply(h, self.activation, **self.activation_args)

    @property
    def intermediate_size(self) -> int:
        return self.expert_weights()[1].shape[-1]

    @property
    def hidden_size(self) -> int:
        return self.router_weight().shape[-1]

    def take_over_experts(self, experts: nn.Module) -> None:
        """install_experts for new slots that replace the block's experts (merge, compress): in the block's
        training mode, and trainable only if the experts they replace were (frozen experts stay frozen)."""
        old = getattr(self.module, "experts", None)
        params = list(old.parameters()) if isinstance(old, nn.Module) else []
        experts.requires_grad_(not params or any(p.requires_grad for p in params))
        self.install_experts(experts.train(self.module.training))

    def replace(self, new_module: nn.Module) -> None:
        """Swap the block for `new_module` in its parent; the new block takes the old one's forward and backward
        hooks (the same dicts, so the handles their owners hold still remove them)."""
        for name in BLOCK_HOOKS:
            setattr(new_module, name, getattr(self.module, name))
        setattr(self.parent, self.attr, new_module)
        self.module = new_module


BLOCK_HOOKS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks",
               "_forward_pre_hooks_with_kwargs", "_backward_hooks", "_backward_pre_hooks", "_is_full_backward_hook")


def refuse_compressed(layer: MoELayer, experts) -> None:
    """Dense weights cannot be written into compressed slots (their dense form is a reconstruction)."""
    if type(experts).__name__ == "CompressedMoEExperts":
        raise ValueError(f"layer {layer.name!r} is compressed: its experts cannot be rewritten as dense weights "
                         "(align and merge before compressing)")


def split_name(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    """(parent module, attribute) of the submodule at dotted path `name`."""
    parent_name, _, attr = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), attr


def select_layers(layers: list[MoELayer], which) -> list[MoELayer]:
    """`which`: None (every MoE layer) or an iterable of layer names and/or positions in moe_layers order."""
    if which is None:
        return layers
    if isinstance(which, (str, int)):
        which = [which]
    by_name = {layer.name: layer for layer in layers}
    chosen, unknown = [], []
    for w in which:
        if isinstance(w, int) and not isinstance(w, bool) and -len(layers) <= w < len(layers):
            chosen.append(layers[w])
        elif isinstance(w, str) and w in by_name:
            chosen.append(by_name[w])
        else:
            unknown.append(w)
    if unknown:
        raise ValueError(f"layers: unknown MoE layers {unknown}; the model has {list(by_name)} "
                         f"(names or positions 0..{len(layers) - 1})")
    names = {layer.name for layer in chosen}
    return [layer for layer in layers if layer.name in names]  # module order, no duplicates


def expert_weights_per_expert(layer: MoELayer, biases: bool = False) -> tuple[torch.Tensor, ...]:
    """(w_in [E, F, d], w_out [E, d, ff]), and with biases=True also (b_in [E, F] | None, b_out [E, d] | None):
    one entry per original expert, also for a merged layer."""
    tensors = [*layer.expert_weights()] + ([*layer.expert_biases()] if biases else [])
    tensors = [None if t is None else t.detach() for t in tensors]
    if tensors[0].shape[0] == layer.num_experts and torch.equal(layer.expert_map().cpu(),
                                                                torch.arange(layer.num_experts)):
        return tuple(tensors)
    emap = layer.expert_map().to(tensors[0].device)
    return tuple(None if t is None else t[emap] for t in tensors)
