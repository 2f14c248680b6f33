"""M-SMoE merging: group each layer's experts around dominant experts, align every group member to its
dominant expert (weight matching, permute.py), and average the group with usage-frequency weights.

A merged layer stores only its G merged experts plus `expert_map` [E] (modules.MoEExperts); the router
is unchanged and still scores all E experts, and every member of a group computes with the group's
merged weights. With G = E and no permutation the merged model equals the original.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn
from tqdm.auto import tqdm

from .calibrate import LayerStats, refuse_unmeasured
from .drop import check_maskable, install_logit_mask
from .grouping import (
    ALL_GROUPINGS, MERGE_STRATEGIES, SIMILARITY_BASES, LayerGrouping, group_counts, group_layer, layer_seed,
    capped_groups, check_routing_groups, ream_scores, similarity_matrix,
)
from .edits import edits_model
from .flags import check_flags
from .models import MoELayer, expert_weights_per_expert, moe_layers, select_layers, unwrap
from .modules import MoEExperts
from .permute import (
    DEFAULT_MEMORY_BUDGET, apply_permutation, apply_permutation_, match_permutations, with_bias_column,
)
from .checkpoint.plain_save import guard_plain_save
from .models.config_fields import routing_groups
from .models.dispatched import refuse_meta_experts
from .sections import record_merge

def merge_group_weights(w_in: torch.Tensor, w_out: torch.Tensor, grouping: LayerGrouping, *more: torch.Tensor):
    """Merged slots (w_in [G, F, d], w_out [G, d, ff], then any more per-expert tensors such as biases):
    slot g = sum_i weight_i * expert_i over group g, accumulated in float32 (float64 for float64 weights; a
    single-member group is copied exactly)."""
    merged = []
    for t in (w_in, w_out, *more):
        slots = []
        acc_dtype = torch.promote_types(t.dtype, torch.float32)
        for members, weights in zip(grouping.groups, grouping.weights):
            acc = torch.zeros(t.shape[1:], dtype=acc_dtype, device=t.device)
            for e, w in zip(members, weights):
                if w != 0.0:
                    acc.add_(t[e].to(acc_dtype), alpha=w)
            slots.append(acc.to(t.dtype))
        merged.append(torch.stack(slots))
    return tuple(merged)


def check_finite_slots(name: str, grouping: LayerGrouping, merged: tuple[torch.Tensor, ...]) -> None:
    """Refuse merged experts holding inf or NaN (their members' weights held them: nothing merged from them runs)."""
    bad = [g for g in range(grouping.num_groups) if not all(torch.isfinite(t[g]).all() for t in merged)]
    if bad:
        raise ValueError(f"layer {name!r}: merged experts {bad} (of experts {[grouping.groups[g] for g in bad]}) are "
                         "not finite: their members' weights hold inf or NaN (a cast to float16 makes weights beyond "
                         "its range inf); check the model's weights, or load it in bfloat16 or float32")


def _stats_for(stats: Mapping[str, LayerStats], layer: MoELayer) -> LayerStats:
    if layer.name not in stats:
        raise ValueError(f"stats: no routing statistics for layer {layer.name!r} "
                         "(collect them with collect_routing_stats on this model)")
    s = stats[layer.name]
    if s.num_experts != layer.num_experts:
        raise ValueError(f"stats[{layer.name!r}] has {s.num_experts} experts, the layer has {layer.num_experts}")
    return s


@torch.no_grad()
def merge_layer_weights(name: str, stats: LayerStats, w_in: torch.Tensor, w_out: torch.Tensor, num_groups: int,
                        activation: str, *, router_weight: torch.Tensor | None = None,
                        similarity: str = "router-logits", permute: bool = True, strategy: str = "frequency",
                        grouping: str = "dominant", seed: int = 0, memory_budget: int = DEFAULT_MEMORY_BUDGET,
                        b_in: torch.Tensor | None = None, b_out: torch.Tensor | None = None,
                        inplace: bool = False, max_group_size: int | None = None, routing_groups: int = 1):
    """One layer of merge_experts on plain tensors (the streaming pipeline calls it with one layer's
    weights read from disk): w_in [E, F, d], w_out [E, d, ff] (and optional biases b_in [E, F],
    b_out [E, d]) per original expert, the layer's routing statistics and its group count. Returns
    (LayerGrouping, merged w_in [G, F, d], merged w_out [G, d, ff], merged b_in, merged b_out), the
    biases None when not given. router_weight [E, d] is needed only for the router-weight basis;
    memory_budget bounds the bytes of weight-matching cost matrices built at once (match_permutations).
    inplace=True permutes w_out in place, and w_in too when there is no b_in (the streaming pipeline's own
    buffers: no second copy of the layer); with b_in, w_in is copied with its bias column and the caller's
    w_in keeps the unaligned order, so read the aligned experts from the return values, never the buffers. routing_groups > 1: every group inside one
    block of E / routing_groups consecutive experts (grouping.within_routing_groups)."""
    num_experts, d = w_in.shape[0], w_in.shape[-1]
    sim = similarity_matrix(similarity, stats=stats, router_weight=router_weight, w_in=w_in, w_out=w_out,
                            seed=layer_seed(seed, name), num_experts=num_experts)
    scores = ream_scores(stats.saliency) if grouping == "ream" else stats.frequency.cpu()  # REAM ranks by saliency
    g = group_layer(name, scores, sim, num_groups, grouping, strategy, max_group_size, routing_groups)
    w_in = with_bias_column(w_in, b_in)
    if permute and strategy != "drop" and g.num_groups < num_experts:
        leader = torch.tensor([g.dominant[slot] for slot in g.expert_map], device=w_in.device)
        perm = match_permutations(w_in, w_out, leader, activation, memory_budget=memory_budget, name=name)
        permute_fn = apply_permutation_ if inplace else apply_permutation
        w_in, w_out = permute_fn(w_in, w_out, perm, activation)
    merged = merge_group_weights(w_in, w_out, g, *(() if b_out is None else (b_out,)))
    check_finite_slots(name, g, merged)
    merged_in, merged_out = merged[0], merged[1]
    merged_b_out = merged[2] if b_out is not None else None
    merged_b_in = merged_in[..., d].clone() if b_in is not None else None
    return g, merged_in[..., :d].contiguous(), merged_out, merged_b_in, merged_b_out


@torch.no_grad()
def check_merge_options(similarity: str, strategy: str, grouping: str) -> None:
    if similarity not in SIMILARITY_BASES:
        raise ValueError(f"similarity must be one of {', '.join(SIMILARITY_BASES)}, got {similarity!r}")
    if strategy not in MERGE_STRATEGIES:
        raise ValueError(f"strategy must be one of {', '.join(MERGE_STRATEGIES)}, got {strategy!r}")
    if grouping not in ALL_GROUPINGS:
        raise ValueError(f"grouping must be one of {', '.join(ALL_GROUPINGS)}, got {grouping!r}")


def check_saliency_grouping(grouping: str, layer_stats: Mapping[str, LayerStats], counts: Mapping[str, int],
                            max_group_size: int | None) -> None:
    """REAM's needs, checked before any layer changes: saliency in every layer's statistics and groups of
    max_group_size that can hold every expert."""
    if grouping != "ream":
        if max_group_size is not None:
            raise ValueError(f"max_group_size caps REAM's groups (grouping='ream'), not grouping={grouping!r}")
        return
    for name, s in layer_stats.items():
        s.saliency  # ValueError naming the layer when saliency was not collected
        capped_groups(torch.eye(s.num_experts), torch.ones(s.num_experts), counts[name], max_group_size)


@edits_model
def merge_experts(
    model: nn.Module,
    stats: Mapping[str, LayerStats],
    num_groups,
    similarity: str = "router-logits",
    globally: bool = True,
    permute: bool = True,
    strategy: str = "frequency",
    layers=None,
    grouping: str = "dominant",
    seed: int = 0,
    progress: bool = True,
    max_group_size: int | None = None,
    within_routing_groups: bool = False,
) -> dict[str, LayerGrouping]:
    """Merge the experts of `model` in place; returns {layer name: LayerGrouping} of the merged layers.

    num_groups: average groups per merged layer with globally=True (one global budget spread by usage
      frequency, exactly num_groups x layers in total, >= 1 per layer), else the count of every layer
      (an int, or a {layer name: count} mapping). See grouping.py for ties and edge cases.
    similarity: the similarity basis (router-logits, router-weight, weight, feature, expert-output, random).
        'weight' compares the expert weights as they are (the alignment comes after grouping): align the
        model first (align_experts, `mcsmoe-fast permute`), as the original's pipeline did, for a comparison
        that does not depend on the order of each expert's neurons.
    permute: align each member's neurons to its group's dominant expert before averaging.
    strategy: "frequency" (usage-frequency weights), "average" (uniform), or "drop" (keep only the
      dominant experts' weights and mask the others' router logits to -inf: a pruning baseline).
    layers: None (all MoE layers) or layer names / positions to merge; the others stay as they are
      (the paper keeps switch-base-32's first encoder MoE layer: pass every position but 0).
    grouping: "dominant" (the paper's), "hierarchical" (average-linkage clustering, HC-SMoE) or "ream"
      (REAM: centroids and merge weights by REAP saliency, stats collected with saliency="reap"; groups of
      at most max_group_size experts; see grouping.py and ream.py).
    within_routing_groups: for group-limited routers (DeepSeek-V3's n_group), merge only experts of the same
      routing group, the same number of groups in each (what a standard checkpoint needs: format="standard"
      refuses groups across routing groups); num_groups must be a multiple of n_group (globally=True gives
      each layer a multiple of it). No effect on other routers.
    """
    model = unwrap(model)
    check_flags("merge_experts", globally=globally, permute=permute, within_routing_groups=within_routing_groups)
    check_merge_options(similarity, strategy, grouping)
    chosen = select_layers(moe_layers(model), layers)
    refuse_meta_experts(chosen, "merge_experts")
    if strategy == "drop":  # before any layer changes: a refused layer must not leave the model half merged
        for layer in chosen:
            check_maskable(layer)
    layer_stats = {layer.name: _stats_for(stats, layer) for layer in chosen}
    refuse_unmeasured(layer_stats.values())
    n_group = routing_groups(model.config) if within_routing_groups else 1
    counts = group_counts({n: s.frequency for n, s in layer_stats.items()}, num_groups, globally, n_group)
    check_saliency_grouping(grouping, layer_stats, counts, max_group_size)
    for name, s in layer_stats.items():  # before any layer changes
        if counts[name] < s.num_experts:
            check_routing_groups(name, s.num_experts, counts[name], n_group)

    result: dict[str, LayerGrouping] = {}
    for layer in tqdm(chosen, desc="merging experts", unit="layer", disable=not progress):
        w_in, w_out, b_in, b_out = expert_weights_per_expert(layer, biases=True)
        g, merged_in, merged_out, merged_b_in, merged_b_out = merge_layer_weights(
            layer.name, layer_stats[layer.name], w_in, w_out, counts[layer.name], layer.activation,
            router_weight=layer.router_weight(), similarity=similarity, permute=permute, strategy=strategy,
            grouping=grouping, seed=seed, b_in=b_in, b_out=b_out, max_group_size=max_group_size,
            routing_groups=n_group)
        emap = torch.tensor(g.expert_map, dtype=torch.int64, device=w_in.device)
        layer.take_over_experts(MoEExperts(merged_in, merged_out, emap, layer.activation, merged_b_in, merged_b_out,
                                           layer.activation_args))
        if strategy == "drop":
            keep = torch.zeros(layer.num_experts, dtype=torch.bool)
            keep[g.dominant] = True
            install_logit_mask(layer, keep)
        result[layer.name] = g

    record_merge(model, result, layer_stats, dict(num_groups=num_groups if isinstance(num_groups, int) else dict(num_groups),
                                                  similarity=similarity, globally=globally, permute=permute,
                                                  strategy=strategy, grouping=grouping, seed=seed,
                                                  **({} if max_group_size is None else {"max_group_size": max_group_size}),
                                                  **({"within_routing_groups": n_group} if n_group > 1 else {})))
    guard_plain_save(model)
    return result

