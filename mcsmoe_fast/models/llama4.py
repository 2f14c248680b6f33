"""Llama-4 text MoE (transformers 5.x `llama4_text`, Llama4ForCausalLM).

A Llama4TextMoe block holds
  - experts: Llama4TextExperts, gate_up_proj [E, d, 2ff] (gate columns, then up columns) and down_proj
    [E, ff, d]: the canonical w_in [E, 2ff, d] and w_out [E, d, ff] transposed; act(gate) * up with the
    config's hidden_act (SwiGLU for every released model);
  - router: Llama4Router, an nn.Linear [E, d] returning (scores [T, E], logits [T, E]): top-k by logit,
    score = sigmoid(logit) on the chosen experts and 0 elsewhere. The score scales the expert's input;
  - shared_expert: a dense gated MLP every token passes, never merged.
Only the layers in config.moe_layers (every interleave_moe_layer_step-th) have such a block; the others
are dense MLPs and are left alone.

The block that replaces Llama4TextMoe (Llama4MoE): Llama-4's router (Llama4Router) picks the top-k experts of each token by logit and scores each with
sigmoid(logit); unlike the other families the score scales the expert's *input*, not its output:

    out[t] = shared_expert(x[t]) + sum over the k chosen experts e of FFN_e(score[t, e] * x[t])

transformers computes this by running all E experts on every token (a dense bmm, the unchosen ones on
zero rows). Here each (token, chosen expert) pair becomes one pre-scaled row routed to that expert's slot
with routing weight 1, so the fused op does E/k times less work. Rows are summed per token afterwards,
which stays right when two experts of a token share a merged slot (s1 x and s2 x are different inputs).

The experts are transformers' own Llama4TextExperts (unmerged: read as transposed views, so the state
dict keeps transformers' names), or our slots (MoEExperts, CompressedMoEExperts) after merging or
compressing. Router and shared expert are transformers' modules, kept as they are (their hooks and
output recorders too); the replaced block's hooks move to Llama4MoE (MoELayer.replace), and transformers'
experts module, while it has hooks of its own, runs as transformers runs it (every expert on every token),
so that its hooks see its input and output. The drop baseline masks the router in place (mask_router):
dropped experts' logits are -inf before its top-k, so it never picks them (one that only pads the top-k
gets sigmoid(-inf) = 0).
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..modules import CompressedMoEExperts, MoEExperts
from ..modules.experts_spec import ExpertsSpec
from .base import MoELayer, refuse_compressed, split_name
from .dispatched import onloaded
from .registry import Family
from .stored_tensors import ExpertTensors

BLOCK_CLASS = "Llama4TextMoe"
MODEL_TYPES = ("llama4_text",)  # the multimodal `llama4` holds the same blocks, but is untested here


class Llama4MoE(nn.Module):
    """forward(hidden_states [..., d]) -> (out [T, d], router_logits [T, E]), as Llama4TextMoe returns them."""

    def __init__(self, router: nn.Module, experts: nn.Module, shared_expert: nn.Module, activation: str):
        super().__init__()
        self.router = router
        self.experts = experts
        self.shared_expert = shared_expert
        self.activation = activation  # of transformers' experts (slots carry their own)
        self.hidden_dim = router.weight.shape[1]
        self.num_experts = router.weight.shape[0]
        # as on transformers' block: an attribute its forward does not read; the routing follows router.top_k
        self.top_k = router.top_k

    def extra_repr(self) -> str:
        return f"top_k={self.top_k}, activation={self.activation}"

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = hidden_states.reshape(-1, self.hidden_dim)
        scores, router_logits = self.router(hidden)  # scores [T, E]: sigmoid on the top-k, 0 elsewhere
        if hooked(self.experts):  # transformers' computation, so that the hooks see its experts' input and output
            routed_in = hidden.repeat(scores.shape[1], 1) * scores.transpose(0, 1).reshape(-1, 1)
            routed = self.experts(routed_in).reshape(scores.shape[1], -1, self.hidden_dim).sum(dim=0)
        else:
            index = router_logits.topk(self.router.top_k, dim=1).indices  # the router's own choice (same call, same ties)
            routed = self.routed_experts(hidden, index, scores.gather(1, index))
        out = self.shared_expert(hidden)
        out.add_(routed)
        return out, router_logits

    def routed_experts(self, hidden: torch.Tensor, index: torch.Tensor, score: torch.Tensor) -> torch.Tensor:
        """sum_j FFN_{index[t, j]}(score[t, j] * hidden[t]) for hidden [T, d], index and score [T, k]."""
        tokens, k = index.shape
        rows = (hidden.unsqueeze(1) * score.unsqueeze(-1)).reshape(tokens * k, -1)  # transformers' product
        index = index.reshape(tokens * k, 1)
        ones = torch.ones_like(index, dtype=rows.dtype)
        out = self.run_experts(rows, index, ones)
        return out if k == 1 else out.view(tokens, k, -1).sum(dim=1)

    def run_experts(self, rows: torch.Tensor, index: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        experts = self.experts
        if isinstance(experts, (MoEExperts, CompressedMoEExperts)):
            return experts(rows, index, weights)
        # transformers' Llama4TextExperts: gate_up_proj [E, d, 2ff] and down_proj [E, ff, d] are the
        # canonical w_in [E, 2ff, d] and w_out [E, d, ff] transposed: strides to the GEMMs, no copy
        with onloaded(experts):  # accelerate-offloaded experts: in for this call, as their own forward does
            w_in, w_out = experts.gate_up_proj.transpose(1, 2), experts.down_proj.transpose(1, 2)
            emap = torch.arange(w_in.shape[0], device=w_in.device)
            return ops.grouped_expert_ffn(rows.to(w_in.dtype), w_in, w_out, emap, index, weights.to(w_in.dtype),
                                          self.activation)


def hooked(experts: nn.Module) -> bool:
    """Whether `experts` is transformers' Llama4TextExperts with hooks of its own: their owner expects them to run
    on its forward (every expert on every token, the unchosen ones on zero rows; our slots run their own forward)."""
    return not isinstance(experts, (MoEExperts, CompressedMoEExperts)) and any(
        getattr(experts, name) for name in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks",
                                            "_backward_pre_hooks"))


@functools.cache
def masked_router_class() -> type:
    # a subclass, so that transformers' output recorders (router_logits) still match it; imported lazily
    from transformers.models.llama4.modeling_llama4 import Llama4Router

    class MaskedLlama4Router(Llama4Router):
        """Llama4Router with the logits of dropped experts (keep[e] == False) at -inf before its top-k; the
        same arithmetic otherwise. Returns (scores [T, E], masked logits [T, E])."""

        def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            router_logits = F.linear(hidden_states, self.weight).masked_fill(~self.keep, float("-inf"))
            top_value, top_index = torch.topk(router_logits, self.top_k, dim=1)
            scores = torch.full_like(router_logits, float("-inf")).scatter_(1, top_index, top_value)
            return torch.sigmoid(scores.float()).to(scores.dtype), router_logits

        def __reduce_ex__(self, protocol):
            # a class made at run time, which pickle cannot find by name: rebuilt by new_masked_router
            return new_masked_router, (), self.__getstate__()

    return MaskedLlama4Router


def new_masked_router() -> nn.Module:
    """An empty MaskedLlama4Router for pickle to fill in (torch.save / pickle of a drop-baseline model)."""
    cls = masked_router_class()
    return cls.__new__(cls)


def mask_router(router: nn.Module, keep: torch.Tensor) -> None:
    """Mask `router` (a Llama4Router) in place: its class becomes MaskedLlama4Router and a buffer `keep` [E]
    joins its weight (saved next to it as router.keep); the same module, so its hooks stay. It pickles through
    new_masked_router (the class is made at run time)."""
    keep = torch.as_tensor(keep, dtype=torch.bool, device=router.weight.device)
    if not isinstance(router, masked_router_class()):
        router.__class__ = masked_router_class()
        router.register_buffer("keep", keep.clone())
    router.keep.copy_(keep)


class Llama4Layer(MoELayer):
    """One Llama-4 MoE block (transformers' Llama4TextMoe, or our Llama4MoE that replaced it)."""

    def router_weight(self) -> torch.Tensor:
        return self.module.router.weight

    def router_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Llama4Router's logits (an unbiased nn.Linear; MaskedLlama4Router: dropped experts' at -inf), from the
        router module itself, so that its hooks run (accelerate's onload it when the model is dispatched)."""
        return self.module.router(hidden.to(self.router_weight().dtype))[1]

    def route(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Llama4Router's choice: torch.topk of the logits along the experts."""
        logits = self.router_logits(hidden)
        return logits, torch.topk(logits, self.top_k, dim=1).indices

    def expert_input_scale(self, logits: torch.Tensor, top: torch.Tensor) -> torch.Tensor:
        """sigmoid(logit) of each chosen expert: Llama4Router's score, which scales the expert's input."""
        return torch.sigmoid(logits.gather(1, top))

    def expert_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        if (slots := self.slot_weights()) is not None:
            return slots
        experts = self.module.experts
        return experts.gate_up_proj.transpose(1, 2), experts.down_proj.transpose(1, 2)  # views

    @torch.no_grad()
    def set_expert_weights(self, w_in: torch.Tensor, w_out: torch.Tensor) -> None:
        experts = self.module.experts
        refuse_compressed(self, experts)
        if isinstance(experts, MoEExperts):
            experts.w_in.copy_(w_in)
            experts.w_out.copy_(w_out)
            return
        experts.gate_up_proj.copy_(w_in.transpose(1, 2))
        experts.down_proj.copy_(w_out.transpose(1, 2))

    def install_experts(self, experts: MoEExperts | CompressedMoEExperts) -> None:
        """Run the block on the given expert slots (router and shared expert unchanged): the block becomes
        a Llama4MoE, which keeps Llama-4's input scaling."""
        if isinstance(self.module, Llama4MoE):
            self.module.experts = experts
        else:
            block = Llama4MoE(self.module.router, experts, self.module.shared_expert, self.activation)
            self.replace(block.train(self.module.training))

    def install_fast_block(self) -> None:
        """Replace transformers' block by a Llama4MoE on its own experts module (transformers' parameters and
        state-dict names): the fused op on the chosen experts only, same outputs. The expert parameters are laid
        out again in the canonical order, in place (canonical_strides): same objects, shapes and values."""
        canonical_strides(self.module.experts)
        if not isinstance(self.module, Llama4MoE):
            block = Llama4MoE(self.module.router, self.module.experts, self.module.shared_expert, self.activation)
            self.replace(block.train(self.module.training))

    def optimize(self, dropless: bool | None = None) -> bool:
        """Unmerged: our block on transformers' own experts (install_fast_block; transformers' names, so its
        save still works). Merged or compressed: the block already runs our slots."""
        if isinstance(getattr(self.module, "experts", None), (MoEExperts, CompressedMoEExperts)):
            return True
        self.install_fast_block()
        return False

    def stored_tensors(self) -> ExpertTensors:
        """experts.gate_up_proj [E, d, 2ff] (gate columns, then up columns) and experts.down_proj [E, ff, d]: the
        canonical banks transposed; router router.weight."""
        n = self.name
        return ExpertTensors((f"{n}.experts.gate_up_proj",), (f"{n}.experts.down_proj",), f"{n}.router.weight",
                             f"{n}.router.keep", spec=ExpertsSpec(self.activation, transposed=True))

    def router_rows(self) -> tuple[nn.Module, str]:
        return self.module.router, "router."

    # --- the drop baseline: the router's logits masked before its top-k --------------------------------------
    def check_maskable(self) -> None:
        return None

    def mask_router(self, keep: torch.Tensor) -> None:
        mask_router(self.module.router, keep)

    def logit_mask(self) -> torch.Tensor | None:
        router = self.module.router
        return router.keep if isinstance(router, masked_router_class()) else None


@torch.no_grad()
def canonical_strides(experts: nn.Module) -> None:
    """Give gate_up_proj [E, d, 2ff] and down_proj [E, ff, d] the memory order of the canonical w_in [E, 2ff, d]
    and w_out [E, d, ff]: each stays the same Parameter with the same shape and values, now a transposed view of
    a canonical tensor, so the fused op reads each expert's rows contiguously (benchmarks/bench_llama4.py, T = 128:
    the whole block 1.2x faster than on the hub's order, whose small-M GEMMs read strided weights). One already in that
    order, or on the meta device, is left alone; nothing is cached, so an edit of the parameter is always seen."""
    for name in ("gate_up_proj", "down_proj"):
        p = getattr(experts, name, None)
        if isinstance(p, torch.Tensor) and not p.is_meta and not p.transpose(1, 2).is_contiguous():
            with torch.inference_mode(p.is_inference()):  # new data of the parameter's own kind, whatever the mode
                p.data = p.data.transpose(1, 2).contiguous().transpose(1, 2)


def is_llama4_block(module: nn.Module) -> bool:
    return type(module).__name__ == BLOCK_CLASS or isinstance(module, Llama4MoE)


def _check_block(name: str, block: nn.Module) -> None:
    """ValueError unless the block has Llama-4's parts in Llama-4's layout (a checkpoint of another shape
    is refused before any work, not read wrongly)."""
    router, experts = getattr(block, "router", None), getattr(block, "experts", None)
    if "Llama4Router" not in {c.__name__ for c in type(router).__mro__} or not isinstance(getattr(router, "weight", None), torch.Tensor) \
            or getattr(router, "bias", None) is not None or not isinstance(getattr(router, "top_k", None), int):
        raise ValueError(f"{name}: a Llama-4 MoE block needs transformers' Llama4Router (an unbiased Linear [E, d] "
                         f"with top_k), found {type(router).__name__}")
    if not isinstance(getattr(block, "shared_expert", None), nn.Module):
        raise ValueError(f"{name}: a Llama-4 MoE block needs its shared_expert")
    if isinstance(experts, (MoEExperts, CompressedMoEExperts)):
        return
    e, d = router.weight.shape
    up, down = getattr(experts, "gate_up_proj", None), getattr(experts, "down_proj", None)
    if not isinstance(up, torch.Tensor) or not isinstance(down, torch.Tensor) or up.dim() != 3 \
            or tuple(up.shape[:2]) != (e, d) or up.shape[2] % 2 or tuple(down.shape) != (e, up.shape[2] // 2, d):
        raise ValueError(f"{name}: Llama-4 experts must be gate_up_proj [E, d, 2ff] and down_proj [E, ff, d] with "
                         f"E, d = {e}, {d} (the router's); found {type(experts).__name__} with gate_up_proj "
                         f"{None if up is None else list(up.shape)}, down_proj {None if down is None else list(down.shape)}")


def _activation(model: nn.Module, block: nn.Module) -> str:
    from ..activations import from_config

    if isinstance(block, Llama4MoE):
        return block.activation
    config = getattr(model, "config", None)
    config = getattr(config, "text_config", None) or config  # llama4 (multimodal): the text part's
    return from_config(getattr(config, "hidden_act", "silu"), gated=True, where="llama4_text")


def llama4_layers(model: nn.Module) -> list[Llama4Layer]:
    """Every Llama-4 MoE block of `model`, in module order (the dense layers between them are left alone)."""
    layers = []
    for name, module in model.named_modules():
        if not is_llama4_block(module):
            continue
        _check_block(name, module)
        experts = module.experts
        activation = experts.activation if isinstance(experts, (MoEExperts, CompressedMoEExperts)) \
            else _activation(model, module)
        parent, attr = split_name(model, name)
        layers.append(Llama4Layer(name=name, module=module, parent=parent, attr=attr,
                                  num_experts=module.router.weight.shape[0], top_k=module.router.top_k,
                                  activation=activation))
    return layers


FAMILIES = (Family("llama4", MODEL_TYPES, llama4_layers, streaming="dispatch"),)  # streamed through its own forward
