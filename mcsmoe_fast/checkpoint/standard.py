"""to_standard: a merged (or compressed) model as the family's own transformers model with M experts.

The exact (aliased) format keeps all E router rows and an `expert_map`; only this package loads it.
The standard format is the family's own checkpoint with M experts per MoE layer and M router rows,
the config's expert count updated (num_local_experts / num_experts / n_routed_experts; a multimodal
model's in its text config, the model's own class built), every other
tensor as it is (attention, norms, dense layers, shared experts), the experts written through the
family's adapter in its own layout: vanilla transformers, vLLM and SGLang load it unmodified.

What cannot be expressed is refused before any work (standard_plan.py), and the router of a merged
expert is its group's dominant expert's row or a fitted row (standard_router.py; "fitted" is the default
when calibration batches are given, measured in docs/standard_format.md). Compressed experts are written
out densely (U V + S), so a compressed model's standard checkpoint is as large as the merged one's.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from ..models import moe_layers, unwrap
from ..sections import COMPRESS_SECTION, MERGE_SECTION
from .format import model_dtype
from ..models.config_fields import expert_count_fields
from .standard_plan import LayerPlan, experts_config, plan_standard
from .standard_router import check_router, router_inputs, router_state

STANDARD_SECTION = "mcsmoe_standard"  # config.json: the router choice and each standard expert's group


def standard_config(model: nn.Module, plans: dict[str, LayerPlan], router: str, expert_capacity: int | None):
    """The model's config with the expert count M (and, for Switch, the expert capacity) of the standard form."""
    config = model.config.__class__.from_dict(model.config.to_dict())
    for section in (MERGE_SECTION, COMPRESS_SECTION):
        if hasattr(config, section):
            delattr(config, section)
    num_experts = next(iter(plans.values())).num_experts
    counted = experts_config(config)  # a multimodal model's text config
    for field in expert_count_fields(counted):
        setattr(counted, field, num_experts)
    if config.model_type == "switch_transformers":
        config.expert_capacity = switch_capacity(config.expert_capacity, plans, expert_capacity, dropless(model))
    elif expert_capacity is not None:
        raise ValueError(f"expert_capacity is Switch's setting; a {config.model_type} model has no expert capacity: "
                         "drop it")
    setattr(config, STANDARD_SECTION, {"router": router, "layers": {
        name: {"groups": p.groups, "router_rows": p.rows} for name, p in plans.items()}})
    return config


# A Switch expert capacity that never binds: transformers' router keeps a token while its priority <= capacity.
NO_CAPACITY = 2**31 - 1


def dropless(model: nn.Module) -> bool:
    """Whether the model routes every token to its expert whatever the capacity (optimize(dropless=True))."""
    return any(getattr(layer.module, "dropless", False) for layer in moe_layers(model))


def switch_capacity(capacity: int, plans: dict[str, LayerPlan], override: int | None, no_drops: bool = False) -> int:
    """Family rule (Switch): expert capacity counts tokens per expert and sequence. A merged expert takes
    the tokens of all its group's members, each of which had `capacity` in the aliased form, so its
    capacity is scaled by the largest group; a dropped layer's kept expert takes only its own tokens (the
    others' logits are masked), so it keeps `capacity`; a dropless model drops nothing, so neither may its
    standard form (NO_CAPACITY). `override` sets it instead."""
    if override is not None:
        if not isinstance(override, int) or override < 1:
            raise ValueError(f"expert_capacity must be a positive int, got {override!r}")
        return override
    if no_drops:
        return NO_CAPACITY
    return capacity * max(1 if p.dropped else len(g) for p in plans.values() for g in p.groups)


def export_class(model: nn.Module, config):
    """The class an export builds from `config`: a multimodal model's own (its config's text part holds the
    experts; the family's head class would be its text model alone, under other tensor names), else the
    family's head class (models/hub.py: model_class_for)."""
    from ..models.hub import model_class_for

    if experts_config(config) is not config:
        return type(model)
    return model_class_for(config)


def build_export(model: nn.Module, config) -> nn.Module:
    """An uninitialised model of export_class(model, config), in the model's dtype, the tensors transformers keeps
    in float32 for that dtype (models/hub.py: float32_kept, e.g. GPT-OSS's norms in float16) in float32, as the
    loaded model and the streamed writers hold them."""
    from transformers.initialization import no_init_weights

    from ..models.hub import keep_float32_

    dtype = getattr(torch, model_dtype(model))
    with no_init_weights():
        cls = export_class(model, config)
        build = cls.from_config if hasattr(cls, "from_config") else cls._from_config
        export = build(config, dtype=dtype)
    keep_float32_(export, dtype)
    return export


def carry_generation_config(model: nn.Module, new: nn.Module) -> None:
    """`new` generates as `model` does: its generation config (eos ids, sampling defaults, max_new_tokens), not
    the one from_config derives from config.json."""
    if getattr(model, "generation_config", None) is not None and hasattr(new, "generation_config"):
        new.generation_config = copy.deepcopy(model.generation_config)


def copy_shared_tensors(model: nn.Module, standard: nn.Module, skip: tuple[str, ...]) -> None:
    """Every tensor of `standard` outside the MoE layers' routers and experts, copied from `model`."""
    ours, theirs = model.state_dict(), standard.state_dict()
    wanted = [k for k in theirs if not k.startswith(skip)]
    missing = [k for k in wanted if k not in ours or ours[k].shape != theirs[k].shape]
    if missing:
        raise ValueError(f"format='standard': the model has no weights of the right shape for {missing[:5]}")
    standard.load_state_dict({k: ours[k] for k in wanted}, strict=False)


@torch.no_grad()
def to_standard(model: nn.Module, router: str | None = None, batches=None, expert_capacity: int | None = None,
                max_tokens: int = 65536) -> nn.Module:
    """The family's own transformers model (eval mode) with M experts and M router rows per MoE layer.

    router: "fitted" (rows fitted on `batches` so each merged expert's routing probability matches its
      group's summed probability; the default when batches are given, the better one measured) or
      "dominant" (the row of each group's dominant expert; the default without batches).
    batches: calibration input dicts (as for collect_routing_stats), needed by router="fitted";
      max_tokens per layer are used. A merged layer no token reaches is refused (refuse_unreached).
    expert_capacity: Switch only: the standard model's expert capacity (default: switch_capacity: the original
      capacity times the largest group, since one merged expert now takes all its members' tokens; a dropless
      model's: one that never binds).
    Raises ValueError, before any work, for what a standard checkpoint cannot express (standard_plan.py).
    """
    model = unwrap(model)
    router = router or ("fitted" if batches is not None else "dominant")
    check_router(router, batches)
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise ValueError(f"max_tokens must be an int >= 1 (calibration tokens per layer), got {max_tokens!r}")
    plans = plan_standard(model)
    config = standard_config(model, plans, router, expert_capacity)
    layers = moe_layers(model)
    hidden = router_inputs(model, layers, batches, max_tokens) if router == "fitted" else {}
    if router == "fitted":
        refuse_unreached(layers, plans, hidden)
    standard = build_export(model, config)
    new_layers = {layer.name: layer for layer in moe_layers(standard)}
    if set(new_layers) != set(plans):
        raise ValueError(f"format='standard': the standard model's MoE layers {sorted(new_layers)} are not the "
                         f"model's {sorted(plans)}")
    skip = tuple(p for layer in new_layers.values()
                 for p in (f"{layer.name}.experts.", f"{layer.name}.{layer.router_rows()[1]}"))
    copy_shared_tensors(model, standard, skip)
    for layer in layers:
        plan, new = plans[layer.name], new_layers[layer.name]
        new.router_rows()[0].load_state_dict(router_state(layer, layer.router_rows()[0], plan, hidden.get(layer.name)))
        write_experts(layer, new, plan)
    standard.tie_weights()
    carry_generation_config(model, standard)
    return standard.eval()


def refuse_unreached(layers, plans: dict[str, LayerPlan], hidden: dict[str, torch.Tensor]) -> None:
    """router="fitted" fits each merged layer's rows on the tokens that reached it: a layer without any (empty
    batches, or an iterator another pass used up) is refused rather than given its dominant rows under the name of
    fitted ones (all-padding batches too). Layers merged with strategy='drop' keep their dominant rows anyway."""
    for layer in layers:
        if (layer.name not in hidden or hidden[layer.name].shape[0] == 0) and not plans[layer.name].dropped:
            raise ValueError(f"router='fitted': no calibration token reached layer {layer.name} (empty or used-up "
                             "batches: an iterator serves one pass only); pass the calibration batches as a list, "
                             "or router='dominant'")


def write_experts(layer, new, plan: LayerPlan) -> None:
    """The layer's merged slots, in the plan's order, into the standard block through its adapter."""
    slots = torch.tensor(plan.slots, dtype=torch.long)
    w_in, w_out = (w.detach()[slots.to(w.device)] for w in layer.expert_weights())
    b_in, b_out = (None if b is None else b.detach()[slots.to(b.device)] for b in layer.expert_biases())
    biases = {} if b_in is None and b_out is None else dict(b_in=b_in, b_out=b_out)  # families with expert biases
    new.set_expert_weights(w_in, w_out, **biases)
