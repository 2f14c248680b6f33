"""merge.py behaviours the mutation run (benchmarks/mutation.sh merge) found unchecked by the merge tests:
merge_layer_weights' defaults, its bias handling when d != F, and the wording of the statistics errors.
Each is checked against an independent computation, not against the code under test."""
from __future__ import annotations

import re

import pytest
import torch

import mcsmoe_fast as mf
from mcsmoe_fast.calibrate import LayerStats
from mcsmoe_fast.merge import merge_layer_weights
from mcsmoe_fast.modules import MoEExperts
from mcsmoe_fast.tiny import tiny_mixtral

E, D, FF = 8, 6, 5  # d != F = 2 ff: a column index mixed up between them shows


def layer_stats(seed: int = 0) -> LayerStats:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(40, E, generator=g, dtype=torch.float64)
    counts = torch.randint(1, 50, (E,), generator=g).double()
    return LayerStats(name="l", num_experts=E, top_k=2, tokens=40, counts=counts, logit_gram=logits.T @ logits,
                      feature_sum=torch.randn(E, D, generator=g, dtype=torch.float64))


def expert_tensors(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(E, 2 * FF, D, generator=g), torch.randn(E, D, FF, generator=g),
            torch.randn(E, 2 * FF, generator=g), torch.randn(E, D, generator=g))


def test_defaults_are_dominant_grouping_and_seed_zero():
    stats, (w_in, w_out, _, _) = layer_stats(), expert_tensors()
    default = merge_layer_weights("l", stats, w_in, w_out, 3, "swiglu")
    explicit = merge_layer_weights("l", stats, w_in, w_out, 3, "swiglu", similarity="router-logits", permute=True,
                                   strategy="frequency", grouping="dominant", seed=0)
    assert default[0].to_dict() == explicit[0].to_dict()
    assert all(torch.equal(a, b) for a, b in zip(default[1:3], explicit[1:3]))
    # M-SMoE's dominant experts: the 3 most used lead the groups
    assert sorted(default[0].dominant) == sorted(stats.counts.argsort(descending=True)[:3].tolist())
    # the random basis draws from the seed: default 0, and another seed groups differently
    maps = {s: merge_layer_weights("l", stats, w_in, w_out, 3, "swiglu", similarity="random", seed=s)[0].expert_map
            for s in (0, 1, 2)}
    assert merge_layer_weights("l", stats, w_in, w_out, 3, "swiglu", similarity="random")[0].expert_map == maps[0]
    assert maps[1] != maps[0] or maps[2] != maps[0]


def test_biases_are_averaged_with_the_weights_when_d_differs_from_f():
    """Unpermuted, slot s = the frequency-weighted average of its members, biases included (b_in rides as an
    extra column of w_in, which must be cut off at d, not at F)."""
    stats, (w_in, w_out, b_in, b_out) = layer_stats(), expert_tensors()
    g, m_in, m_out, mb_in, mb_out = merge_layer_weights("l", stats, w_in, w_out, 3, "swiglu", permute=False,
                                                       b_in=b_in, b_out=b_out)
    assert m_in.shape == (3, 2 * FF, D) and mb_in.shape == (3, 2 * FF) and mb_out.shape == (3, D)
    for s in range(3):
        members = [e for e in range(E) if g.expert_map[e] == s]
        w = stats.counts[members].float() / stats.counts[members].float().sum()
        for merged, per_expert in ((m_in, w_in), (m_out, w_out), (mb_in, b_in), (mb_out, b_out)):
            expected = (w.view(-1, *[1] * (per_expert.dim() - 1)) * per_expert[members]).sum(0)
            torch.testing.assert_close(merged[s], expected, rtol=1e-5, atol=1e-6)


def test_statistics_errors_name_the_layer_and_the_remedy():
    model = tiny_mixtral(num_experts=4)
    name = mf.moe_layers(model)[0].name
    with pytest.raises(ValueError, match=rf"^stats: no routing statistics for layer '{name}' \(collect them with "
                                         r"collect_routing_stats on this model\)$"):
        mf.merge_experts(model, {}, num_groups=2, progress=False)
    wrong = {layer.name: layer_stats() for layer in mf.moe_layers(model)}  # statistics of 8 experts
    experts = mf.moe_layers(model)[0].num_experts  # 4
    with pytest.raises(ValueError, match=rf"^stats\['{name}'\] has {E} experts, the layer has {experts}$"):
        mf.merge_experts(model, wrong, num_groups=2, progress=False)


def swiglu_expert(w_in, w_out, e, x):
    gate, up = (x @ w_in[e].T).chunk(2, dim=-1)
    return (torch.nn.functional.silu(gate) * up) @ w_out[e].T


def test_inplace_permutes_the_given_buffers_and_the_default_leaves_them_alone():
    """inplace=True (the streaming pipeline's own buffers): w_in and w_out hold the aligned experts afterwards,
    each expert still the same function; the default copies and leaves the caller's tensors as they were."""
    stats, (w_in, w_out, _, _) = layer_stats(), expert_tensors()
    before = w_in.clone(), w_out.clone()
    merge_layer_weights("l", stats, w_in, w_out, 3, "swiglu")
    assert torch.equal(w_in, before[0]) and torch.equal(w_out, before[1])
    merge_layer_weights("l", stats, w_in, w_out, 3, "swiglu", inplace=True)
    assert not torch.equal(w_in, before[0])  # some member was permuted towards its dominant expert
    x = torch.randn(7, D, generator=torch.Generator().manual_seed(2))
    for e in range(E):
        torch.testing.assert_close(swiglu_expert(w_in, w_out, e, x), swiglu_expert(*before, e, x), rtol=1e-5, atol=1e-5)


def test_option_errors_list_every_choice():
    from mcsmoe_fast.grouping import ALL_GROUPINGS, MERGE_STRATEGIES, SIMILARITY_BASES
    from mcsmoe_fast.merge import check_merge_options

    ok = dict(similarity="router-logits", strategy="frequency", grouping="dominant")
    check_merge_options(**ok)
    for option, choices in (("similarity", SIMILARITY_BASES), ("strategy", MERGE_STRATEGIES),
                            ("grouping", ALL_GROUPINGS)):
        expected = f"{option} must be one of {', '.join(choices)}, got 'x'"
        with pytest.raises(ValueError) as info:
            check_merge_options(**{**ok, option: "x"})
        assert str(info.value) == expected


def test_merge_spreads_the_budget_over_layers_by_default():
    """globally=True is the default: the same per-layer counts as asked explicitly, which here differ from the
    per-layer count of globally=False (one layer's routing is made far more concentrated than the other's)."""
    from dataclasses import replace

    from merge_helpers import calibration

    model = tiny_mixtral()
    stats = mf.collect_routing_stats(model, calibration(model), progress=False)
    first = mf.moe_layers(model)[0].name
    stats[first] = replace(stats[first], counts=torch.tensor([500.0, 1, 1, 1, 1, 1, 1, 1], dtype=torch.float64))
    counts = {}
    for how, kwargs in (("default", {}), ("global", dict(globally=True)), ("per-layer", dict(globally=False))):
        groupings = mf.merge_experts(tiny_mixtral(), stats, 4, progress=False, **kwargs)
        counts[how] = {name: len(g.dominant) for name, g in groupings.items()}
    assert counts["default"] == counts["global"] != counts["per-layer"]
    assert sum(counts["default"].values()) == 4 * len(counts["default"])


def test_ream_cap_too_small_for_a_later_layer_is_refused_before_any_layer_changes():
    """max_group_size is checked for every layer's count first: a cap that holds the first layer's groups but not
    the second's must leave the first layer unmerged too."""
    from merge_helpers import calibration

    model = tiny_mixtral()
    stats = mf.collect_routing_stats(model, calibration(model), bases=("expert-output",), saliency="reap",
                                     progress=False)
    names = [layer.name for layer in mf.moe_layers(model)]
    before = [t.clone() for t in mf.moe_layers(model)[0].expert_weights()]
    with pytest.raises(ValueError, match=r"^max_group_size=3: 2 groups of at most 3 experts cannot hold all 8 "
                                         r"experts; raise it to >= 4$"):
        mf.merge_experts(model, stats, {names[0]: 4, names[1]: 2}, globally=False, grouping="ream",
                         similarity="expert-output", max_group_size=3, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(mf.moe_layers(model)[0].expert_weights(), before))
    assert not isinstance(mf.moe_layers(model)[0].module.experts, MoEExperts)
    groupings = mf.merge_experts(model, stats, {names[0]: 4, names[1]: 3}, globally=False, grouping="ream",
                                 similarity="expert-output", max_group_size=3, progress=False)
    assert [len(groupings[n].dominant) for n in names] == [4, 3]
    assert max(len(m) for m in groupings[names[1]].groups) <= 3


def test_merge_experts_defaults(capsys):
    """merge_experts' documented defaults: permute=True, seed=0, a progress bar, within_routing_groups=False; each
    compared with the option given explicitly, and with its other value (which must change something)."""
    from merge_helpers import calibration

    from mcsmoe_fast.tiny import tiny_moe

    model = tiny_mixtral()
    stats = mf.collect_routing_stats(model, calibration(model), progress=False)

    def merged(**kwargs):
        m = tiny_mixtral()
        groupings = mf.merge_experts(m, stats, 4, globally=False, **kwargs)
        return {n: g.expert_map for n, g in groupings.items()}, [t.clone() for t in mf.moe_layers(m)[0].expert_weights()]

    def same(a, b):
        return a[0] == b[0] and all(torch.equal(x, y) for x, y in zip(a[1], b[1]))

    default = merged(progress=False)
    assert same(default, merged(progress=False, permute=True)) and not same(default, merged(progress=False, permute=False))
    rand = {s: merged(progress=False, similarity="random", seed=s) for s in (0, 1, 2)}
    assert same(merged(progress=False, similarity="random"), rand[0])
    assert not (same(rand[1], rand[0]) and same(rand[2], rand[0]))
    capsys.readouterr()
    merged()
    bar = capsys.readouterr().err
    assert re.search(r"(?:^|\r)merging experts: ", bar) and ("layer/s" in bar or "s/layer" in bar)
    merged(progress=False)
    assert "merging experts" not in capsys.readouterr().err

    deepseek = tiny_moe("deepseek_v3")  # group-limited routing: across routing groups unless asked otherwise
    ds_stats = mf.collect_routing_stats(deepseek, calibration(deepseek), progress=False)
    groupings = mf.merge_experts(tiny_moe("deepseek_v3"), ds_stats, 3, globally=False, progress=False)
    assert all(len(g.dominant) == 3 for g in groupings.values())
    first = mf.moe_layers(deepseek)[0].name  # the error names the layer and both counts
    with pytest.raises(ValueError, match=rf"^{first}: merging within 2 routing groups needs the expert count \(8\) "
                                         r"and the group count \(3\) to be multiples of 2$"):
        mf.merge_experts(tiny_moe("deepseek_v3"), ds_stats, 3, globally=False, progress=False,
                         within_routing_groups=True)


def test_merge_experts_averages_the_expert_biases_with_the_weights():
    """GPT-OSS's expert biases reach the merge: each slot's b_in and b_out are its group's weighted average of the
    members' biases (permute=False, so no neuron moves), computed here from the original biases."""
    from merge_helpers import calibration

    from mcsmoe_fast.models import expert_weights_per_expert
    from mcsmoe_fast.tiny import tiny_moe

    model = tiny_moe("gpt_oss")
    stats = mf.collect_routing_stats(model, calibration(model), progress=False)
    original = {layer.name: expert_weights_per_expert(layer, biases=True) for layer in mf.moe_layers(model)}
    groupings = mf.merge_experts(model, stats, 3, globally=False, permute=False, progress=False)
    for layer in mf.moe_layers(model):
        _, _, b_in, b_out = original[layer.name]
        g, experts = groupings[layer.name], layer.module.experts
        for bias, merged in ((b_in, experts.b_in), (b_out, experts.b_out)):
            want = torch.stack([sum(w * bias[e].double() for e, w in zip(members, weights))
                                for members, weights in zip(g.groups, g.weights)])
            torch.testing.assert_close(merged.double(), want.to(merged.device), rtol=1e-5, atol=1e-6)
        assert any(len(m) > 1 for m in g.groups)


def test_merge_records_every_setting_it_was_given(tmp_path):
    """The merge section saved in config.json records each option as given (the whole method dict compared): a
    setting recorded under another name, as None or not at all would make a merged checkpoint lie about itself."""
    from types import MappingProxyType

    from merge_helpers import calibration

    from mcsmoe_fast.checkpoint.plain_save import PlainSaveRefused
    from mcsmoe_fast.tiny import tiny_moe

    model = tiny_mixtral()
    stats = mf.collect_routing_stats(model, calibration(model), bases=("expert-output",), saliency="reap",
                                     progress=False)
    names = [layer.name for layer in mf.moe_layers(model)]
    counts = {names[0]: 4, names[1]: 3}
    mf.merge_experts(model, stats, MappingProxyType(counts), similarity="expert-output", globally=False, permute=False,
                     strategy="average", grouping="ream", seed=5, max_group_size=3, progress=False)
    assert model.config.mcsmoe_merge["merges"][-1]["method"] == dict(
        num_groups=counts, similarity="expert-output", globally=False, permute=False, strategy="average",
        grouping="ream", seed=5, max_group_size=3)
    assert type(model.config.mcsmoe_merge["merges"][-1]["method"]["num_groups"]) is dict  # JSON-ready
    with pytest.raises(PlainSaveRefused):  # and the merged model refuses transformers' plain save
        model.save_pretrained(str(tmp_path))
    assert not any(tmp_path.iterdir())

    model = tiny_mixtral()  # the defaults, recorded as such; no cap key without a cap
    mf.merge_experts(model, stats, 4, progress=False)
    assert model.config.mcsmoe_merge["merges"][-1]["method"] == dict(
        num_groups=4, similarity="router-logits", globally=True, permute=True, strategy="frequency",
        grouping="dominant", seed=0)

    deepseek = tiny_moe("deepseek_v3")  # merged within its routing groups: their number recorded
    ds_stats = mf.collect_routing_stats(deepseek, calibration(deepseek), progress=False)
    n_group = deepseek.config.n_group
    mf.merge_experts(deepseek, ds_stats, 2 * n_group, globally=False, within_routing_groups=True, progress=False)
    assert deepseek.config.mcsmoe_merge["merges"][-1]["method"]["within_routing_groups"] == n_group > 1


def test_merged_experts_keep_the_clamped_swiglu_limit():
    """GPT-OSS's clamped SwiGLU reads its limit from the config: the merged experts must keep it. With one expert
    per group (nothing averaged, nothing permuted) the merged model is the original function; a limit of 0.3 clamps
    most pre-activations here, so experts that fell back to the default limit (7.0) would differ."""
    from merge_helpers import calibration

    from mcsmoe_fast.tiny import tiny_moe

    model = tiny_moe("gpt_oss", swiglu_limit=0.3)
    ids = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(ids).logits
    stats = mf.collect_routing_stats(model, calibration(model), progress=False)
    mf.merge_experts(model, stats, 8, globally=False, permute=False, progress=False)
    assert all(isinstance(layer.module.experts, MoEExperts) for layer in mf.moe_layers(model))
    assert [layer.module.experts.activation_args["limit"] for layer in mf.moe_layers(model)] == [0.3, 0.3]
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, want, rtol=1e-5, atol=1e-5)
