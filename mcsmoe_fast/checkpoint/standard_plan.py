"""What a standard checkpoint of a merged model will hold, decided (and refused) before any work.

A standard checkpoint is the family's own transformers checkpoint with M experts per MoE layer and M
router rows: standard expert i is merged slot `slots[i]`, its router row is that of `rows[i]` (an
original expert: its group's dominant expert, or the start of a fitted row), and `groups[i]` are the
original experts whose routing it takes over. What such a checkpoint cannot express is refused here,
with the reason: slot counts that differ per layer (the config has one expert count), top_k > M, a
model still being pruned, a router tensor whose experts run along a dimension it cannot slice, and the
family rules below. A multimodal model's expert count and routing are its text config's (experts_config).

Family rules (the router rows each adapter names with `router_rows()`, the config's fields in
models/config_fields.py):
  - DeepSeek-V3's group-limited routing (`n_group`, `topk_group`): routing group j of the standard
    model is the j-th block of M / n_group experts, so every merged group must lie inside one routing
    group of the original, every routing group must keep the same number of merged experts (at least 2:
    a group is scored by its top-2), and the standard experts are ordered routing group by routing group.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..drop import logit_mask
from ..models import MoELayer, moe_layers
from ..models.config_fields import expert_count_fields, routing_groups
from ..modules import CompressedMoEExperts
from ..sections import MERGE_SECTION

@dataclass
class LayerPlan:
    """One MoE layer of the standard checkpoint (lists of length M, in the standard experts' order)."""

    name: str
    slots: list[int]  # the merged slot each standard expert is
    rows: list[int]  # the original expert whose router row it gets (its group's dominant expert)
    groups: list[list[int]]  # the original experts whose routing it takes over (its group)
    dropped: bool = False  # drop strategy: only `rows` are routed to; their rows reproduce the routing exactly

    @property
    def num_experts(self) -> int:
        return len(self.slots)


# --- the plan -------------------------------------------------------------------------------------
def recorded_dominant(model: nn.Module, layer: MoELayer, expert_map: list[int]) -> list[int] | None:
    """The dominant expert of each slot as the last merge of this layer recorded it (config.mcsmoe_merge),
    None when no record matches the layer's expert_map."""
    section = getattr(model.config, MERGE_SECTION, None) or {}
    for merge in reversed(section.get("merges", [])):
        entry = merge.get("layers", {}).get(layer.name)
        if entry is not None:
            return list(entry["dominant"]) if entry.get("expert_map") == expert_map else None
    return None


def check_standard_layer(layer: MoELayer) -> None:
    """The families whose layers a standard checkpoint is written for: their adapters name the router rows to
    slice (router_rows) and write M experts, and every router tensor has its experts along a dimension
    expert_dim knows."""
    try:
        module, prefix = layer.router_rows()
    except ValueError as e:
        raise ValueError(f"format='standard': {e}; save format='exact'") from None
    for key, t in module.state_dict().items():
        expert_dim(f"{layer.name}.{prefix}{key} ({type(module).__name__})", t, layer.num_experts)


def expert_dim(key: str, t, num_experts: int) -> int | None:
    """The dimension of router tensor `t` that runs over the E experts, sliced with the router rows: the first
    ([E, ...]: weight, bias, DeepSeek-V3's e_score_correction_bias), or the second of a [1, E] tensor (ERNIE-4.5's
    moe_statics.e_score_correction_bias); None for a tensor without one, copied as it is. E entries along any
    other dimension are refused, with a ValueError naming `key`."""
    if t.dim() >= 1 and t.shape[0] == num_experts:
        return 0
    if t.dim() == 2 and t.shape[0] == 1 and t.shape[1] == num_experts:
        return 1
    if num_experts in t.shape:
        raise ValueError(f"format='standard': router tensor {key} {tuple(t.shape)} has its {num_experts} experts "
                         "along a dimension the standard format cannot slice; save format='exact'")
    return None


def plan_layer(model: nn.Module, layer: MoELayer) -> LayerPlan:
    check_standard_layer(layer)
    experts = getattr(layer.module, "experts", None)
    if isinstance(experts, CompressedMoEExperts) and experts.pruning:
        raise ValueError(f"format='standard': layer {layer.name!r} is still being pruned: call "
                         "CompressionPruner.finalize() (or finalize() on its experts) first")
    expert_map = [int(s) for s in layer.expert_map().tolist()]
    num_slots = max(expert_map) + 1
    groups = [[e for e, s in enumerate(expert_map) if s == slot] for slot in range(num_slots)]
    if any(not g for g in groups):
        raise ValueError(f"format='standard': layer {layer.name!r} has slots no expert uses")
    keep = logit_mask(layer)
    if keep is not None:  # drop strategy: the kept expert of each slot is the only one routed to
        kept = [[e for e in g if bool(keep[e])] for g in groups]
        if any(len(k) != 1 for k in kept):
            raise ValueError(f"format='standard': layer {layer.name!r} masks router logits with kept experts "
                             f"{[k for k in kept]} per slot; exactly one per slot can become a standard expert")
        return LayerPlan(layer.name, list(range(num_slots)), [k[0] for k in kept], groups, dropped=True)
    dominant = recorded_dominant(model, layer, expert_map) or [g[0] for g in groups]
    return LayerPlan(layer.name, list(range(num_slots)), dominant, groups)


def order_by_routing_group(plan: LayerPlan, num_experts: int, n_group: int, topk_group: int, top_k: int) -> LayerPlan:
    """DeepSeek-V3's group-limited routing: the standard experts ordered routing group by routing group."""
    size = num_experts // n_group
    where = []
    for members in plan.groups:
        owners = sorted({e // size for e in members})
        if len(owners) > 1:
            raise ValueError(f"format='standard': layer {plan.name!r} merges experts {members} across routing groups "
                             f"{owners} (n_group={n_group}, {size} experts each); group-limited routing needs every "
                             "merged group inside one routing group: merge within routing groups "
                             "(merge_experts(..., within_routing_groups=True), --within-routing-groups), or save format='exact'")
        where.append(owners[0])
    check_routing_group_counts(plan.name, [where.count(j) for j in range(n_group)], topk_group, top_k)
    order = sorted(range(plan.num_experts), key=lambda i: (where[i], i))
    return LayerPlan(plan.name, [plan.slots[i] for i in order], [plan.rows[i] for i in order],
                     [plan.groups[i] for i in order], plan.dropped)


def check_routing_group_counts(name: str, per_group: list[int], topk_group: int, top_k: int) -> None:
    """DeepSeek-V3's group-limited routing over the standard experts: the same number of merged experts in every
    routing group (`per_group`), at least 2 (a group is scored by its top-2), and top_k of them within topk_group
    routing groups."""
    if len(set(per_group)) > 1 or per_group[0] < 2:
        raise ValueError(f"format='standard': layer {name!r} keeps {per_group} merged experts in its {len(per_group)} "
                         "routing groups; group-limited routing needs the same number in every routing group, at "
                         f"least 2 (a group is scored by its top-2 experts): merge to a multiple of {len(per_group)} "
                         f"experts, at least {2 * len(per_group)}, or save format='exact'")
    if top_k > topk_group * per_group[0]:
        raise ValueError(f"format='standard': layer {name!r}: top_k={top_k} exceeds topk_group={topk_group} x "
                         f"{per_group[0]} experts per routing group: merge to more experts, or save format='exact'")


def check_expert_counts(config, layers, counts: dict[str, int]) -> None:
    """What the config's one expert count needs, checked on the counts alone (the streamed merge checks it
    before any work): the same count M in every MoE layer, top_k <= M, and with group-limited routing
    (n_group) E and M split evenly into the routing groups, with as many merged experts in each as
    check_routing_group_counts needs. `layers`: MoELayer views (name, num_experts, top_k)."""
    if len(set(counts.values())) > 1:
        raise ValueError(f"format='standard': the layers keep different numbers of experts {counts}, but the "
                         f"{config.model_type} config has one expert count; merge every layer to the same count "
                         "(merge_experts(..., globally=False), --no-globally) or save format='exact'")
    n_group = routing_groups(config)
    for layer in layers:
        count = counts[layer.name]
        if layer.top_k > count:
            raise ValueError(f"format='standard': layer {layer.name!r} routes each token to top_k={layer.top_k} "
                             f"experts but keeps only {count}; merge to at least {layer.top_k} experts")
        if n_group > 1 and (layer.num_experts % n_group or count % n_group):
            raise ValueError(f"format='standard': layer {layer.name!r}: {count} experts do not split "
                             f"into n_group={n_group} routing groups")
        if n_group > 1:
            check_routing_group_counts(layer.name, [count // n_group] * n_group, picked_routing_groups(config),
                                       layer.top_k)


def picked_routing_groups(config) -> int:
    """How many routing groups a group-limited router picks per token (DeepSeek-V3's topk_group; all by default)."""
    return int(getattr(config, "topk_group", None) or routing_groups(config))


def ordered_plan(config, layer, plan: LayerPlan) -> LayerPlan:
    """The plan in the standard experts' order: routing group by routing group for group-limited routers
    (refused when a merged group crosses routing groups), as it is otherwise."""
    n_group = routing_groups(config)
    if n_group <= 1:
        return plan
    return order_by_routing_group(plan, layer.num_experts, n_group, picked_routing_groups(config), layer.top_k)


def plan_from_grouping(config, layer, grouping, dropped: bool) -> LayerPlan:
    """The standard plan of a layer merged with `grouping` (a LayerGrouping; the streamed merge, which has no
    merged model to read): slot g is group g, its router row its dominant expert's (with strategy='drop' the one
    kept expert), as plan_layer reads them from a merged model. Ordered by ordered_plan."""
    groups = [[e for e, s in enumerate(grouping.expert_map) if s == slot] for slot in range(grouping.num_groups)]
    if any(not g for g in groups):
        raise ValueError(f"format='standard': layer {layer.name!r} has slots no expert uses")
    plan = LayerPlan(layer.name, list(range(grouping.num_groups)), list(grouping.dominant), groups, dropped)
    return ordered_plan(config, layer, plan)


def experts_config(config):
    """The config that holds the experts' count and routing: a multimodal model's text config
    (config.get_text_config(): Qwen3.5-MoE's, Qwen3-VL-MoE's, Llama-4's text_config), else the config itself."""
    from transformers import PretrainedConfig

    text = config.get_text_config()
    return text if isinstance(text, PretrainedConfig) else config


def plan_standard(model: nn.Module) -> dict[str, LayerPlan]:
    """{layer name: LayerPlan} for every MoE layer, or a ValueError naming what the standard format
    cannot express."""
    config = experts_config(model.config)
    expert_count_fields(config)
    layers = moe_layers(model)
    plans = {layer.name: plan_layer(model, layer) for layer in layers}
    check_expert_counts(config, layers, {name: p.num_experts for name, p in plans.items()})
    return {layer.name: ordered_plan(config, layer, plans[layer.name]) for layer in layers}
