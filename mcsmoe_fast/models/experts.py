"""The generic adapter: every MoE block whose experts module follows transformers'
`use_experts_implementation` contract (experts_spec.py), found by structure: a block with an `experts`
child of that contract (or our slots that replaced one) and a router child (`gate` or `router`) with a
weight [E, d] whose forward returns (router_logits, top_k_weights, top_k_index).

This covers Mixtral, Qwen2-MoE and Qwen3-MoE, OLMoE, DeepSeek-V3, GPT-OSS, Qwen3-Next and Qwen3.5-MoE
in transformers 5. What differs between them stays in their own modules and is used as is:
  - routing: the family's router module picks the experts (softmax top-k, DeepSeek-V3's sigmoid scores
    with correction bias and group-limited top-k, GPT-OSS's biased logits), so routing statistics count
    exactly the experts the model uses;
  - shared experts (Qwen2-MoE's shared_expert and its gate, DeepSeek-V3's shared_experts) are siblings
    of `experts` and are never merged;
  - dense layers (DeepSeek-V3's first layers, Qwen's mlp_only_layers) have no such block and are left alone;
  - layout and activation come from the experts module's flags and gate (ExpertsSpec).
"""
from __future__ import annotations

import inspect

import torch
from torch import nn

from ..modules.compressed import CompressedMoEExperts
from ..modules import MoEExperts
from ..modules.masked_router import SOFTMAX_TOP_K_ROUTERS, MaskedTopKRouter, mask_top_k_router
from .base import MoELayer, refuse_compressed, split_name
from .registry import Family
from .stored_tensors import ExpertTensors
from ..modules.experts_spec import ExpertsSpec, follows_contract

ROUTER_NAMES = ("gate", "router")


class ExpertsLayer(MoELayer):
    """One block of a use_experts_implementation family."""

    @property
    def router(self) -> nn.Module:
        return router_of(self.module)

    def router_weight(self) -> torch.Tensor:
        return scoring_weight(self.router)[1]

    def router_outputs(self, hidden: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The router's (logits, top-k weights, top-k index, ...) for hidden [T, d], called as its block calls it:
        a router that takes more from the block (MiniMax-M2's and HY-V3's e_score_correction_bias, AFMoE's
        expert_bias) gets the block's tensors of those names, and the tokens as one [1, T, d] sequence (AFMoE's
        router reads three dimensions)."""
        router = self.router
        extra = _extra_router_inputs(router)
        if not extra:
            return router(hidden)
        return router(hidden.unsqueeze(0), *(getattr(self.module, n) for n in extra))

    def router_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.router_outputs(hidden)[0]

    def route(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.router_outputs(hidden)  # (logits, top-k weights, top-k index, ...): some routers return more
        return out[0], out[2].long()

    def _spec(self) -> ExpertsSpec | None:
        experts = self.module.experts
        return None if isinstance(experts, (MoEExperts, CompressedMoEExperts)) else ExpertsSpec.of(experts)

    def expert_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        if (slots := self.slot_weights()) is not None:
            return slots
        return self._spec().weights(self.module.experts)

    def expert_biases(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        spec = self._spec()
        return super().expert_biases() if spec is None else spec.biases(self.module.experts)

    @torch.no_grad()
    def set_expert_weights(self, w_in: torch.Tensor, w_out: torch.Tensor,
                           b_in: torch.Tensor | None = None, b_out: torch.Tensor | None = None) -> None:
        """Write canonical weights (and biases, where the layer has them) back into the block, in place."""
        experts = self.module.experts
        refuse_compressed(self, experts)
        spec = self._spec()
        if spec is not None:
            spec.write(experts, w_in, w_out, b_in, b_out)
            return
        experts.w_in.copy_(w_in)
        experts.w_out.copy_(w_out)
        for name, value in (("b_in", b_in), ("b_out", b_out)):
            if value is not None and getattr(experts, name, None) is not None:
                getattr(experts, name).copy_(value)

    def install_experts(self, experts: MoEExperts | CompressedMoEExperts) -> None:
        """Replace the block's experts module by the given expert slots (router unchanged)."""
        self.module.experts = experts

    experts_implementation = True

    def optimize(self, dropless: bool | None = None) -> bool:
        """Nothing to replace: the model's experts implementation is set to ours (optimize()); merged or
        compressed slots already run the fused op."""
        return isinstance(self.module.experts, (MoEExperts, CompressedMoEExperts))


    # --- the drop baseline: softmax top-k gates only (the others choose experts their own way) -------------
    def check_maskable(self) -> None:
        gate = getattr(self.module, "gate", None)
        if not isinstance(gate, MaskedTopKRouter) and type(gate).__name__ not in SOFTMAX_TOP_K_ROUTERS:
            raise ValueError(f"{self.name}: the drop baseline masks router logits of Switch's router and softmax "
                             f"top-k gates only ({', '.join(SOFTMAX_TOP_K_ROUTERS)}); {type(self.router).__name__} "
                             "routes differently (use strategy='frequency' or 'average')")

    def mask_router(self, keep: torch.Tensor) -> None:
        self.check_maskable()
        mask_top_k_router(self.module.gate, keep)

    def logit_mask(self) -> torch.Tensor | None:
        gate = getattr(self.module, "gate", None)
        return gate.keep if isinstance(gate, MaskedTopKRouter) else None

    def router_rows(self) -> tuple[nn.Module, str]:
        router = self.router
        if extra := _extra_router_inputs(router):
            raise ValueError(f"{self.name}: its router takes the block's {', '.join(extra)}, which the standard "
                             "format would have to slice with the router rows (not written yet)")
        return router, next(f"{n}." for n in ROUTER_NAMES if getattr(self.module, n, None) is router)

    def stored_tensors(self) -> ExpertTensors:
        """experts.gate_up_proj (or up_proj) and experts.down_proj, with *_bias where the family has biases, in
        the layout the experts module's flags give; router gate.weight or router.weight."""
        n, block = self.name, self.module
        spec = ExpertsSpec.of(block.experts)
        router = next(attr for attr, child in block.named_children() if child is router_of(block))
        weight = scoring_weight(router_of(block))[0]  # "weight", or a nested Linear's ("wg.weight")
        w_in = f"{n}.experts.{'gate_up_proj' if spec.gated else 'up_proj'}"
        return ExpertTensors((w_in,), (f"{n}.experts.down_proj",), f"{n}.{router}.{weight}", f"{n}.{router}.keep",
                             f"{w_in}_bias" if spec.has_bias else None,
                             f"{n}.experts.down_proj_bias" if spec.has_bias else None, spec)


def scoring_weight(router: nn.Module) -> tuple[str, torch.Tensor] | tuple[None, None]:
    """(name, weight [rows, d]) of the one Linear map that scores the block's input: the router's own `weight`,
    or the weight of the one nn.Linear inside it (HunYuan's gate.wg, AFMoE's router.gate, LongCat's
    router.classifier, Ergo's gate.linear); (None, None) when there is no such single map (an MLP router)."""
    weight = getattr(router, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.dim() == 2:
        return "weight", weight
    linears = [(name, m) for name, m in router.named_modules() if isinstance(m, nn.Linear)]
    if len(linears) == 1:
        return f"{linears[0][0]}.weight", linears[0][1].weight
    return None, None


def router_of(block: nn.Module) -> nn.Module | None:
    """The block's router child (`gate` or `router`) that scores the input with one Linear map."""
    for name in ROUTER_NAMES:
        router = getattr(block, name, None)
        if isinstance(router, nn.Module) and scoring_weight(router)[1] is not None:
            return router
    return None


def experts_count(experts: nn.Module) -> int:
    """E, from the experts module itself (a router may score more rows than there are experts)."""
    if isinstance(experts, (MoEExperts, CompressedMoEExperts)):
        return int(experts.expert_map.numel())
    return int((experts.gate_up_proj if experts.has_gate else experts.up_proj).shape[0])


def _extra_router_inputs(router: nn.Module) -> list[str]:
    """Parameters of the router's forward beyond the hidden states (a correction bias, token ids, a state
    carried across layers): the block passes them, mcsmoe_fast's calls would not."""
    try:
        params = list(inspect.signature(router.forward).parameters.values())[1:]
    except (TypeError, ValueError):
        return []
    return [p.name for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


def check_router(name: str, block: nn.Module) -> nn.Module:
    """The block's router, or ValueError naming why mcsmoe_fast cannot route as the block does."""
    experts = block.experts
    where = f"{name or type(block).__name__} ({type(block).__name__})"
    candidates = [(n, getattr(block, n)) for n in ROUTER_NAMES if isinstance(getattr(block, n, None), nn.Module)]
    if not candidates:
        raise ValueError(f"{where}: its experts ({type(experts).__name__}) have no router beside them (no child "
                         f"{' or '.join(repr(n) for n in ROUTER_NAMES)}): the family routes elsewhere (e.g. in the "
                         "decoder layer, on a tensor the block never receives), which mcsmoe_fast cannot observe")
    attr, router = candidates[0]
    cls = type(router).__name__
    attention = [n for n in ("self_attn", "attention", "attn") if isinstance(getattr(block, n, None), nn.Module)]
    if attention:
        raise ValueError(f"{where}: the router {attr} ({cls}) lives in the decoder layer (beside {attention[0]}) and "
                         "routes a tensor of the layer's own forward (not the layer's input), which mcsmoe_fast's "
                         "hooks never see")
    if scoring_weight(router)[1] is None:
        linears = sum(isinstance(m, nn.Linear) for m in router.modules())
        raise ValueError(f"{where}: router {attr} ({cls}) is not one Linear map scoring the block's input "
                         f"({linears} Linear layers inside it: an MLP router), which merging and the router-logit "
                         "statistics need")
    rows, e = scoring_weight(router)[1].shape[0], experts_count(experts)
    if rows != e:
        raise ValueError(f"{where}: router {attr} ({cls}) scores {rows} rows for {e} experts (extra rows for "
                         "shared or zero/identity experts), which merging and the statistics cannot map to experts")
    linear = scoring_weight(router)[0].rsplit(".", 1)[0] if "." in scoring_weight(router)[0] else ""
    own = {f"{linear}.weight".lstrip("."), f"{linear}.bias".lstrip(".")}
    # a correction bias only moves the choice, which the router's own forward makes (DeepSeek-V3, ERNIE, Laguna)
    others = [n for n, _ in router.named_parameters() if n not in own and not n.endswith("correction_bias")]
    if others:
        raise ValueError(f"{where}: router {attr} ({cls}) scales or normalises beyond its Linear map (parameters "
                         f"{', '.join(others)}), which merging and the router-logit statistics do not model")
    # inputs the block passes besides the hidden states: its own tensors of those names are passed the same way
    # (ExpertsLayer.router_outputs); anything else (DeepSeek-V4's token ids) cannot be
    extra = [n for n in _extra_router_inputs(router) if not isinstance(getattr(block, n, None), torch.Tensor)]
    if extra:
        raise ValueError(f"{where}: router {attr} ({cls}) takes more than the hidden states ({', '.join(extra)}, "
                         "passed in by the block), so mcsmoe_fast's statistics cannot call it as the block does")
    return router


def is_experts_block(module: nn.Module) -> bool:
    """A block with an experts child on the contract (or our slots that replaced one); its router is checked
    by check_router."""
    experts = getattr(module, "experts", None)
    if not isinstance(experts, nn.Module):
        return False
    return isinstance(experts, (MoEExperts, CompressedMoEExperts)) or follows_contract(experts)


def _top_k(block: nn.Module, router: nn.Module) -> int:
    for owner in (router, block):
        for attr in ("top_k", "num_experts_per_tok"):
            if isinstance(getattr(owner, attr, None), int):
                return getattr(owner, attr)
    raise ValueError(f"{type(block).__name__}: cannot tell how many experts a token uses (no top_k on its router)")


def experts_layers(model: nn.Module) -> list[ExpertsLayer]:
    """Every block of `model` whose experts follow the contract, in module order."""
    layers = []
    for name, module in model.named_modules():
        if not is_experts_block(module):
            continue
        router, experts = check_router(name, module), module.experts
        if isinstance(experts, (MoEExperts, CompressedMoEExperts)):
            activation, args = experts.activation, dict(getattr(experts, "activation_args", {}))
        else:
            spec = ExpertsSpec.of(experts)
            activation, args = spec.activation, dict(spec.activation_args)
        parent, attr = split_name(model, name)
        layers.append(ExpertsLayer(name=name, module=module, parent=parent, attr=attr,
                                   num_experts=experts_count(experts), top_k=_top_k(module, router),
                                   activation=activation, activation_args=args))
    return layers


FAMILIES = (
    Family("decoder experts contract", ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "gpt_oss"),
           experts_layers, streaming="layers"),
    Family("hybrid-attention experts contract", ("qwen3_next", "qwen3_5_moe_text"), experts_layers,
           streaming="dispatch"),
    Family("experts contract", (), experts_layers),  # any other family on the contract, found by structure
)
