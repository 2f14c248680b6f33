"""Behaviours of prune.py that the method tests (test_reap.py, test_methods_*.py) left unchecked, found by mutation
testing (benchmarks/mutation.sh prune; benchmarks/MUTATION.md): the refusals' messages in full, the type and range
checks of the expert count and ratio, the routing-group checks on a group-limited config, which layers count as
merged or compressed, and what the pruned model carries over (dtype, generation config, the saved record)."""
from __future__ import annotations

import re
from types import SimpleNamespace

import pytest
import torch

import mcsmoe_fast as mf
from mcsmoe_fast.drop import install_logit_mask
from mcsmoe_fast.models import moe_layers
from mcsmoe_fast.prune import (check_expert_count, check_prune, check_routing_group_counts, expert_scores,
                               merged_or_compressed, prune_experts, resolve_count)
from mcsmoe_fast.tiny import tiny_mixtral
from merge_helpers import calibration


def refused(message: str):
    return pytest.raises(ValueError, match="^" + re.escape(message) + "$")


@pytest.fixture(scope="module")
def measured():
    model = tiny_mixtral(seed=3).eval()
    stats = mf.collect_routing_stats(model, calibration(model, seed=4), saliency="reap", progress=False)
    return model, stats


def test_score_refusals_name_the_method_and_the_layer(measured):
    _, stats = measured
    name, layer_stats = next(iter(stats.items()))
    with refused("method must be one of reap, frequency, got 'magnitude'"):
        expert_scores(layer_stats, "magnitude")
    plain = mf.collect_routing_stats(tiny_mixtral(seed=3).eval(), calibration(tiny_mixtral(), seed=4), progress=False)
    with refused(f"method='reap' needs expert saliency for layer {name!r}: collect the statistics with "
                 "collect_routing_stats(..., saliency='reap')"):
        expert_scores(plain[name], "reap")
    broken = SimpleNamespace(**{**vars(layer_stats), "saliency_sum": layer_stats.saliency_sum.clone()})
    broken.saliency_sum[[1, 3]] = float("nan")
    broken.saliency = torch.where(layer_stats.counts > 0, broken.saliency_sum / layer_stats.counts.clamp_min(1), 0.0)
    with refused(f"layer {name!r}: the REAP saliency of experts [1, 3] is NaN (their outputs on routed tokens are "
                 "not finite); check the model's weights"):
        expert_scores(broken, "reap")


def test_the_count_and_the_ratio_are_checked_for_type_and_range():
    with refused("give exactly one of num_experts (experts kept per layer) or ratio (share of experts removed)"):
        resolve_count(8, None, None)
    for bad in (2.0, True, "2"):
        with refused(f"num_experts must be an int, got {bad!r}"):
            resolve_count(8, bad, None)
    for bad in ("0.5", True, 1, -0.1):
        with refused(f"ratio (the share of experts removed) must be in [0, 1), got {bad!r}"):
            resolve_count(8, None, bad)
    assert resolve_count(8, None, 0) == 8 and resolve_count(8, None, 0.5) == 4 and resolve_count(8, 3, None) == 3


def test_expert_counts_of_the_layers():
    layers = [SimpleNamespace(num_experts=8), SimpleNamespace(num_experts=4), SimpleNamespace(num_experts=8)]
    with refused("the MoE layers have different expert counts [4, 8]; a pruned checkpoint has one"):
        check_expert_count(layers, 2)
    assert check_expert_count(layers[:1], 8) == 8  # keeping every expert is allowed
    with refused("num_experts=9 exceeds the 8 experts per layer"):
        check_expert_count(layers[:1], 9)


def test_routing_group_checks_on_a_group_limited_config():
    layer = SimpleNamespace(num_experts=16, top_k=6)
    assert check_routing_group_counts(SimpleNamespace(), [SimpleNamespace(num_experts=8, top_k=1)], 1) == 1
    grouped = SimpleNamespace(n_group=4, topk_group=2)
    with refused("num_experts=8: top_k=6 exceeds topk_group=2 x 2 experts per routing group"):
        check_routing_group_counts(grouped, [layer], 8)
    assert check_routing_group_counts(SimpleNamespace(n_group=4), [layer], 8) == 4  # topk_group: every group
    with refused("num_experts=4: group-limited routing (n_group=4) keeps the same number of experts in every routing "
                 "group, at least 2 each: choose a multiple of 4 that is >= 8"):
        check_routing_group_counts(grouped, [layer], 4)


def test_merged_compressed_and_masked_layers_are_told_apart():
    identity = torch.arange(4)

    def layer(slots, expert_map, experts=None):
        return SimpleNamespace(module=SimpleNamespace(experts=experts), num_experts=4,
                               expert_weights=lambda: (torch.zeros(slots, 3, 2), torch.zeros(slots, 2, 3)),
                               expert_map=lambda: expert_map)

    assert not merged_or_compressed(layer(4, identity))
    assert merged_or_compressed(layer(4, torch.tensor([1, 0, 2, 3])))  # as many slots, another order
    assert merged_or_compressed(layer(2, torch.tensor([0, 0, 1, 1])))
    model = tiny_mixtral(seed=5)
    mf.compress_experts(model, rank=2, keep_ratio=0.1, progress=False)
    assert all(merged_or_compressed(layer) for layer in moe_layers(model))
    masked = tiny_mixtral(seed=5)
    first = moe_layers(masked)[0]
    install_logit_mask(first, [True, False] * (first.num_experts // 2))
    with refused(f"layer {first.name!r} has a router logit mask (merged with strategy='drop', or the drop baseline): "
                 "its masked experts would be kept unmasked; prune the original model"):
        check_prune(masked, 4)


def test_the_pruned_model_keeps_dtype_generation_config_and_record(measured):
    model, stats = measured
    half = tiny_mixtral(seed=3).to(torch.bfloat16).eval()
    half.generation_config.max_new_tokens = 7
    pruned = prune_experts(half, stats, num_experts=4)
    assert {p.dtype for p in pruned.parameters()} == {torch.bfloat16}
    assert pruned.generation_config.max_new_tokens == 7
    assert pruned.config.mcsmoe_standard["router"] == "dominant"
    record = pruned.config.mcsmoe_prune
    for name, entry in record["layers"].items():
        scores = expert_scores(stats[name], "reap")
        assert entry["scores"] == [round(float(x), 6) for x in scores]
        assert any(round(float(x), 7) != round(float(x), 6) for x in scores)  # the rounding is visible


def test_statistics_of_another_model_are_refused_by_name(measured):
    model, stats = measured
    name = mf.moe_layers(model)[0].name
    with refused(f"stats: no routing statistics of layer {name!r} with 8 experts (collect them with "
                 "collect_routing_stats on this model)"):
        prune_experts(model, {}, num_experts=4)


@pytest.mark.parametrize("family,dtype", [("deepseek_v3", torch.bfloat16), ("gpt_oss", torch.float16)])
def test_tensors_transformers_keeps_in_float32_stay_float32(tmp_path, family, dtype):
    """DeepSeek-V3's router gate and score-correction bias (bfloat16 and float16) and GPT-OSS's norms (float16)
    stay float32, as transformers loads them: the pruned model's dtypes are those of its own checkpoint loaded by
    transformers."""
    from transformers import AutoModelForCausalLM

    from merge_helpers import build

    build(family, tmp_path)
    model = mf.open_model(str(tmp_path / f"{family}-base"), dtype)
    stats = mf.collect_routing_stats(model, calibration(model, seed=4), saliency="reap", progress=False)
    pruned = prune_experts(model, stats, num_experts=4)
    pruned.save_pretrained(tmp_path / "pruned")
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "pruned"), dtype=dtype)
    dtypes = {name: p.dtype for name, p in loaded.named_parameters()}
    assert {name: p.dtype for name, p in pruned.named_parameters()} == dtypes
    assert torch.float32 in dtypes.values() and dtype in dtypes.values()
