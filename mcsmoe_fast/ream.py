"""REAM-style merging (Jha et al., "REAM: Merging Improves Pruning of Experts in LLMs", 2026) on the
M-SMoE engine: one grouping method and one set of merge weights, nothing else new.

  centroids  the M experts of highest REAP saliency (collect_routing_stats(..., saliency="reap"));
  groups     centroid by centroid in saliency order, each takes its most similar unassigned experts
             (expert-output similarity) until it holds max_group_size members (grouping.capped_groups);
  merge      members aligned to their centroid by the batched weight-matching assignment (permute.py),
             then averaged with saliency weights (never-routed experts weighted as the least salient);
  router     each merged expert keeps its centroid's router row: save with
             save_pretrained(model, dir, format="standard", router="dominant") (or to_standard(model,
             router="dominant")), the family's own checkpoint with M experts.

Differences from REAM's code, on purpose: similarity is our `expert-output` basis (cosine of the experts'
mean outputs over the calibration tokens) where REAM averages per-token output cosines (optionally with
router-logit similarity); alignment uses weight costs only (REAM adds activation costs).
Group-limited routers (DeepSeek-V3's n_group) are refused, as REAM's groups cross routing groups, unless
within_routing_groups=True merges each routing group on its own (what a standard checkpoint needs).
"""
from __future__ import annotations

from collections.abc import Mapping

from torch import nn

from .calibrate import LayerStats
from .models.config_fields import routing_groups
from .grouping import LayerGrouping
from .merge import merge_experts
from .models import moe_layers
from .prune import check_prune, resolve_count

REAM_GROUP_SIZE = 16  # REAM's default cap C


def check_ream(model: nn.Module, num_keep: int, within_routing_groups: bool = False) -> None:
    """ValueError unless REAM can merge every MoE layer of `model` to num_keep experts."""
    if routing_groups(model.config) > 1 and not within_routing_groups:
        raise ValueError(f"REAM merges experts across routing groups, which group-limited routing "
                         f"(n_group={routing_groups(model.config)}) cannot express; prune instead (prune_experts)")
    check_prune(model, num_keep)


def ream_experts(model: nn.Module, stats: Mapping[str, LayerStats], num_experts: int | None = None,
                 ratio: float | None = None, max_group_size: int | None = REAM_GROUP_SIZE, permute: bool = True,
                 progress: bool = True, within_routing_groups: bool = False) -> dict[str, LayerGrouping]:
    """Merge every MoE layer of `model` in place to num_experts (or E - round(ratio E)) experts, REAM's way;
    returns {layer name: LayerGrouping} (dominant = centroid). `stats` must hold saliency and expert outputs:
    collect_routing_stats(model, batches, bases=("expert-output",), saliency="reap"). within_routing_groups: on a
    group-limited router, each routing group merged on its own (merge_experts); refused there otherwise."""
    layers = moe_layers(model)
    num_keep = resolve_count(layers[0].num_experts, num_experts, ratio)
    check_ream(model, num_keep, within_routing_groups)
    return merge_experts(model, stats, num_keep, similarity="expert-output", globally=False, permute=permute,
                         strategy="frequency", grouping="ream", max_group_size=max_group_size, progress=progress,
                         within_routing_groups=within_routing_groups)
