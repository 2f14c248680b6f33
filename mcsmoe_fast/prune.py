"""Expert pruning: keep the M most salient (REAP) or most used (frequency) experts of every MoE layer and
drop the others, router rows included. The result is the family's own transformers model with M experts
(the standard format: save it with save_pretrained(..., format="standard") or transformers' own
save_pretrained; vanilla transformers, vLLM and SGLang load it).

REAP (Lasby et al., "REAP the Experts", 2025): the saliency of expert j is the mean, over the calibration
tokens whose top-k contains j, of g_j(x) * ||f_j(x)||_2 (collect_routing_stats(..., saliency="reap"),
calibrate.py); the experts with the lowest saliency are pruned. "frequency" prunes the least used experts
(the usage-frequency baseline).

Defined behaviours:
  - Order: experts ranked by score, descending; ties go to the lower expert index. The kept experts keep
    their original order (standard expert i is the i-th kept expert by index).
  - Group-limited routers (DeepSeek-V3's n_group / topk_group): every routing group keeps M / n_group
    experts, its own highest-scoring ones, so the pruned model's routing groups are the original's; M must
    split evenly, with at least 2 per group (a group is scored by its top-2), and top_k <= topk_group x that.
  - Refused before any work: M > E, M < top_k, both or neither of num_experts / ratio, a ratio outside
    [0, 1), a merged or compressed layer (prune the original model), statistics without saliency for
    method="reap", layers with different expert counts.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from .calibrate import LayerStats, refuse_unmeasured
from .checkpoint.format import model_dtype
from .checkpoint.standard import carry_generation_config, copy_shared_tensors, standard_config, write_experts
from .checkpoint.standard_plan import LayerPlan
from .models.config_fields import expert_count_fields, routing_groups
from .checkpoint.standard_router import router_state
from .edits import edits_model
from .models import moe_layers, unwrap
from .modules import CompressedMoEExperts

PRUNE_METHODS = ("reap", "frequency")
PRUNE_SECTION = "mcsmoe_prune"  # config.json: the method and each layer's kept experts


def expert_scores(stats: LayerStats, method: str) -> torch.Tensor:
    """The score [E] that pruning keeps the highest of: REAP saliency or usage counts."""
    if method not in PRUNE_METHODS:
        raise ValueError(f"method must be one of {', '.join(PRUNE_METHODS)}, got {method!r}")
    if method == "reap":
        if stats.saliency_sum is None:
            raise ValueError(f"method='reap' needs expert saliency for layer {stats.name!r}: collect the statistics "
                             "with collect_routing_stats(..., saliency='reap')")
        scores = stats.saliency.double().cpu()
        nan = torch.isnan(scores).nonzero().flatten().tolist()
        if nan:  # NaN has no order: sorting on it would misrank the finite experts too
            raise ValueError(f"layer {stats.name!r}: the REAP saliency of experts {nan} is NaN (their outputs on routed "
                             "tokens are not finite); check the model's weights")
        return scores
    return stats.counts.double().cpu()


def top_experts(scores: torch.Tensor, num_keep: int, n_group: int = 1) -> list[int]:
    """The num_keep highest-scoring experts (ties: lower index), num_keep / n_group from each block of
    E / n_group consecutive experts (a routing group); returned in index order."""
    e = len(scores)
    size, per_group = e // n_group, num_keep // n_group
    s = [float(x) for x in scores]
    kept = []
    for j in range(n_group):
        members = range(j * size, (j + 1) * size)
        kept += sorted(members, key=lambda i: (-s[i], i))[:per_group]
    return sorted(kept)


def resolve_count(num_experts_total: int, num_experts: int | None, ratio: float | None) -> int:
    """M from exactly one of num_experts (M itself) or ratio (the share of experts removed: M = E - round(ratio E))."""
    if (num_experts is None) == (ratio is None):
        raise ValueError("give exactly one of num_experts (experts kept per layer) or ratio (share of experts removed)")
    if ratio is not None:
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 <= ratio < 1:
            raise ValueError(f"ratio (the share of experts removed) must be in [0, 1), got {ratio!r}")
        return num_experts_total - int(round(ratio * num_experts_total))
    if isinstance(num_experts, bool) or not isinstance(num_experts, int):
        raise ValueError(f"num_experts must be an int, got {num_experts!r}")
    return num_experts


def check_prune(model: nn.Module, num_keep: int) -> int:
    """ValueError unless every MoE layer can be pruned to num_keep experts; returns the routing-group count."""
    layers = moe_layers(model)  # a model without one is refused there
    expert_count_fields(model.config)
    check_expert_count(layers, num_keep)
    for layer in layers:
        if layer.logit_mask() is not None:
            raise ValueError(f"layer {layer.name!r} has a router logit mask (merged with strategy='drop', or the drop "
                             "baseline): its masked experts would be kept unmasked; prune the original model")
        if layer.top_k > num_keep:
            raise ValueError(f"num_experts={num_keep} is fewer than the top_k={layer.top_k} experts each token of "
                             f"layer {layer.name!r} uses; keep at least {layer.top_k}")
        if merged_or_compressed(layer):
            raise ValueError(f"layer {layer.name!r} is merged or compressed; prune the original model")
    return check_routing_group_counts(model.config, layers, num_keep)


def merged_or_compressed(layer) -> bool:
    """Whether an MoE layer's experts are compressed, or merged (fewer slots than router experts, or a slot map
    other than the identity)."""
    if isinstance(getattr(layer.module, "experts", None), CompressedMoEExperts):
        return True
    slots = layer.expert_weights()[0].shape[0]
    return slots != layer.num_experts or not torch.equal(layer.expert_map().cpu(), torch.arange(layer.num_experts))


def check_expert_count(layers: list, num_keep: int) -> int:
    """E, the one expert count of the MoE layers; ValueError when they differ or num_keep exceeds it."""
    counts = {layer.num_experts for layer in layers}
    if len(counts) > 1:
        raise ValueError(f"the MoE layers have different expert counts {sorted(counts)}; a pruned checkpoint has one")
    e = counts.pop()
    if num_keep > e:
        raise ValueError(f"num_experts={num_keep} exceeds the {e} experts per layer")
    return e


def check_routing_group_counts(config, layers: list, num_keep: int) -> int:
    """The routing-group count n_group (1 without group-limited routing); ValueError unless num_keep keeps the same
    number of experts, at least 2, in every routing group and the layers' top_k still fits in topk_group groups."""
    n_group = routing_groups(config)
    if n_group > 1:
        per = num_keep // n_group
        topk_group = int(getattr(config, "topk_group", n_group))
        if layers[0].num_experts % n_group or num_keep % n_group or per < 2:
            raise ValueError(f"num_experts={num_keep}: group-limited routing (n_group={n_group}) keeps the same number "
                             f"of experts in every routing group, at least 2 each: choose a multiple of {n_group} "
                             f"that is >= {2 * n_group}")
        top_k = max(layer.top_k for layer in layers)
        if top_k > topk_group * per:
            raise ValueError(f"num_experts={num_keep}: top_k={top_k} exceeds topk_group={topk_group} x {per} experts "
                             "per routing group")
    return n_group


def kept_experts(model: nn.Module, stats: Mapping[str, LayerStats], num_experts: int | None = None,
                 ratio: float | None = None, method: str = "reap") -> dict[str, list[int]]:
    """{layer name: the experts prune_experts keeps}, checked as prune_experts checks (no model is built)."""
    model = unwrap(model)
    if method not in PRUNE_METHODS:
        raise ValueError(f"method must be one of {', '.join(PRUNE_METHODS)}, got {method!r}")
    layers = moe_layers(model)
    num_keep = resolve_count(layers[0].num_experts, num_experts, ratio)
    n_group = check_prune(model, num_keep)
    kept = {}
    for layer in layers:
        s = stats.get(layer.name)
        if s is None or s.num_experts != layer.num_experts:
            raise ValueError(f"stats: no routing statistics of layer {layer.name!r} with {layer.num_experts} experts "
                             "(collect them with collect_routing_stats on this model)")
        refuse_unmeasured([s])
        kept[layer.name] = top_experts(expert_scores(s, method), num_keep, n_group)
    return kept


@edits_model
def kept_model(model: nn.Module, kept: Mapping[str, list[int]], record: dict | None = None) -> nn.Module:
    """The family's own transformers model (eval mode) holding, per MoE layer, only the experts `kept[name]`
    and their router rows (bias and DeepSeek's e_score_correction_bias sliced alike), every other tensor
    copied. The same count in every layer; `record` goes into config.mcsmoe_prune."""
    model = unwrap(model)
    from transformers.initialization import no_init_weights

    from .models.hub import keep_float32_, model_class_for

    plans = {name: LayerPlan(name, list(k), list(k), [[e] for e in k], dropped=True) for name, k in kept.items()}
    config = standard_config(model, plans, "dominant", None)
    if record is not None:
        setattr(config, PRUNE_SECTION, record)
    dtype = getattr(torch, model_dtype(model))
    with no_init_weights():
        pruned = model_class_for(config).from_config(config, dtype=dtype)
    keep_float32_(pruned, dtype)  # as transformers loads it (e.g. GPT-OSS's norms in float16): not rounded on copy
    new_layers = {layer.name: layer for layer in moe_layers(pruned)}
    skip = tuple(p for layer in new_layers.values()
                 for p in (f"{layer.name}.experts.", f"{layer.name}.{layer.router_rows()[1]}"))
    copy_shared_tensors(model, pruned, skip)
    for layer in moe_layers(model):
        plan, new = plans[layer.name], new_layers[layer.name]
        new.router_rows()[0].load_state_dict(router_state(layer, layer.router_rows()[0], plan, None))
        write_experts(layer, new, plan)
    pruned.tie_weights()
    carry_generation_config(model, pruned)
    return pruned.eval()


def prune_experts(model: nn.Module, stats: Mapping[str, LayerStats], num_experts: int | None = None,
                  ratio: float | None = None, method: str = "reap") -> nn.Module:
    """A new model with the num_experts (or E - round(ratio E)) highest-scoring experts of every MoE layer
    (method "reap": REAP saliency, needing stats collected with saliency="reap" or "reap-softmax";
    "frequency": usage counts). `model` is left unchanged. See the module docstring for ties, routing
    groups and refusals."""
    kept = kept_experts(model, stats, num_experts, ratio, method)
    record = {"method": method, "layers": {
        name: {"kept": k, "scores": [round(float(x), 6) for x in expert_scores(stats[name], method)]}
        for name, k in kept.items()}}
    return kept_model(model, kept, record)
