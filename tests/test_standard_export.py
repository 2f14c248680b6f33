"""The standard format (checkpoint/standard.py): a merged model as the family's own transformers checkpoint
with M experts and M router rows, loaded by vanilla transformers in a process that never imports mcsmoe_fast;
the refusals of what it cannot express; DeepSeek-V3's routing groups; the router choices."""
import json
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import save_file

import mcsmoe_fast as mf
from mcsmoe_fast.checkpoint import to_standard
from mcsmoe_fast.models.config_fields import expert_count_fields
from mcsmoe_fast.checkpoint.standard_router import routing_targets
from mcsmoe_fast.grouping import LayerGrouping
from mcsmoe_fast.merge import merge_group_weights
from mcsmoe_fast.models import expert_weights_per_expert
from mcsmoe_fast.modules import MoEExperts
from mcsmoe_fast.sections import record_merge
from mcsmoe_fast.tiny import FAMILY_NAMES, tiny_moe
from merge_helpers import build, calibration, forward

FAMILIES = ("switch",) + FAMILY_NAMES + ("llama4_text",)

# groups inside DeepSeek-V3's two routing groups of 4 (experts 0-3, 4-7), slots interleaved on purpose:
# the standard order is routing group by routing group, i.e. slots 0, 2, 1, 3
WITHIN_ROUTING_GROUPS = [[1, 0], [4, 5], [3, 2], [7, 6]]  # dominant first
EXPORTED = FAMILIES + ("deepseek_v3-within",)  # DeepSeek-V3 merged by merge_experts within its routing groups


def merge_by_hand(model, groups, stats):
    """Merge every layer with the given groups (dominant first, uniform weights), recorded like merge_experts."""
    groupings = {}
    for layer in mf.moe_layers(model):
        expert_map = [next(s for s, g in enumerate(groups) if e in g) for e in range(layer.num_experts)]
        g = LayerGrouping(layer.name, expert_map, [m[0] for m in groups], groups,
                          [[1 / len(m)] * len(m) for m in groups])
        w_in, w_out, b_in, b_out = expert_weights_per_expert(layer, biases=True)
        merged = merge_group_weights(w_in, w_out, g, *(t for t in (b_in, b_out) if t is not None))
        biases = merged[2:] if b_in is not None else (None, None)
        layer.install_experts(MoEExperts(merged[0], merged[1], torch.tensor(expert_map), layer.activation, *biases,
                                         layer.activation_args))
        groupings[layer.name] = g
    record_merge(model, groupings, stats, {"by_hand": True})


def merged_model(family, tmp_path, strategy="frequency"):
    """family "deepseek_v3-within": merged by merge_experts within its routing groups (the others: by hand)."""
    within = family == "deepseek_v3-within"
    model = build("deepseek_v3" if within else family, tmp_path)
    batches = calibration(model)
    stats = mf.collect_routing_stats(model, batches, progress=False)
    if within:
        mf.merge_experts(model, stats, 4, globally=False, within_routing_groups=True, progress=False)
    elif family == "deepseek_v3":
        merge_by_hand(model, WITHIN_ROUTING_GROUPS, stats)
    else:
        mf.merge_experts(model, stats, 4, globally=False, strategy=strategy, progress=False)
    return model, batches


LOADER = textwrap.dedent("""
    import json, sys
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM
    jobs = json.loads(sys.argv[1])
    for job in jobs:
        config = AutoConfig.from_pretrained(job["dir"])
        cls = AutoModelForSeq2SeqLM if config.model_type == "switch_transformers" else AutoModelForCausalLM
        model, info = cls.from_pretrained(job["dir"], output_loading_info=True)
        inputs = load_file(job["inputs"])
        with torch.no_grad():
            logits = model.eval()(**inputs).logits
        save_file({"logits": logits.contiguous()}, job["out"])
        json.dump({k: sorted(map(str, v)) for k, v in info.items()}, open(job["out"] + ".json", "w"))
    assert not any(m.startswith("mcsmoe_fast") for m in sys.modules), "the loader imported mcsmoe_fast"
""")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Every family merged to 4 experts, saved in the standard format, loaded back by vanilla transformers
    in one subprocess that never imports mcsmoe_fast: {family: (merged, standard in memory, logits there,
    loading info there)}."""
    tmp = tmp_path_factory.mktemp("standard")
    jobs, ours = [], {}
    for family in EXPORTED:
        model, batches = merged_model(family, tmp)
        router = "fitted" if family == "deepseek_v3-within" else "dominant"  # fitted rows keep the routing groups
        out = mf.save_pretrained(model, tmp / f"{family}-standard", format="standard", router=router,
                                 batches=batches)
        standard = to_standard(model, router=router, batches=batches)
        inputs = dict(batches[0])
        if family == "switch":
            inputs["decoder_input_ids"] = inputs["input_ids"][:, :7]
        save_file({k: v.contiguous() for k, v in inputs.items()}, tmp / f"{family}-inputs.safetensors")
        jobs.append({"dir": str(out), "inputs": str(tmp / f"{family}-inputs.safetensors"),
                     "out": str(tmp / f"{family}-logits.safetensors")})
        ours[family] = (model, standard, forward(standard, inputs))
    subprocess.run([sys.executable, "-c", LOADER, json.dumps(jobs)], check=True, cwd=tmp)
    from safetensors.torch import load_file
    return {f: (*ours[f], load_file(j["out"])["logits"], json.loads(open(j["out"] + ".json").read()))
            for f, j in zip(EXPORTED, jobs)}


@pytest.mark.parametrize("family", FAMILIES)
def test_vanilla_transformers_loads_the_standard_checkpoint_with_our_logits(exported, family):
    merged, standard, ours, theirs, info = exported[family]
    assert all(not v for v in info.values()), info  # no missing, unexpected or mismatched keys
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
    config = standard.config
    assert [getattr(config, f) for f in expert_count_fields(config)] == [4] * len(expert_count_fields(config))
    assert not hasattr(config, "mcsmoe_merge")


def test_deepseek_merged_within_routing_groups_exports_and_loads_in_vanilla_transformers(exported):
    """merge_experts(within_routing_groups=True) on DeepSeek-V3 (2 routing groups of 4, merged to 4): every group
    inside one routing group, 2 per routing group, so the standard export (fitted rows, correction bias sliced)
    is accepted and vanilla transformers computes our standard model's logits."""
    merged, standard, ours, theirs, info = exported["deepseek_v3-within"]
    assert all(not v for v in info.values()), info
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
    assert standard.config.n_routed_experts == 4 and standard.config.n_group == 2
    layers = merged.config.mcsmoe_merge["merges"][-1]["layers"]
    assert merged.config.mcsmoe_merge["merges"][-1]["method"]["within_routing_groups"] == 2
    for name, entry in layers.items():
        blocks = [{e // 4 for e in g} for g in entry["groups"]]
        assert all(len(b) == 1 for b in blocks), entry["groups"]
        assert sorted(b.pop() for b in blocks) == [0, 0, 1, 1]
        # the standard experts: routing group 0's two merged experts, then routing group 1's
        assert [{e // 4 for e in g} for g in standard.config.mcsmoe_standard["layers"][name]["groups"]] == \
            [{0}, {0}, {1}, {1}]
    for old, new in zip(mf.moe_layers(merged), mf.moe_layers(standard), strict=True):
        rows = standard.config.mcsmoe_standard["layers"][old.name]["router_rows"]
        torch.testing.assert_close(new.router.e_score_correction_bias, old.router.e_score_correction_bias[rows])


def test_merging_within_routing_groups_keeps_each_block_apart():
    """Hand-computed: experts 0-3 and 4-7 are two routing groups. Without the constraint the dominant experts are
    0, 1, 2, 5 (the most used), expert 3 joins 5 (its most similar) and 4 joins 0 (a tie, the first): both
    cross. Within routing groups each block is grouped on its own around its 2 most used experts: 0, 1 and 5, 4."""
    from mcsmoe_fast.grouping import group_layer

    freq = torch.tensor([9., 8., 7., 1., 2., 3., 0.5, 0.25])
    sim = torch.eye(8, dtype=torch.float64) * 0.75 + 0.25
    for a, b in ((3, 5), (6, 5), (7, 5), (2, 0), (3, 1)):
        sim[a, b] = sim[b, a] = 0.9 if (a, b) == (3, 5) else 0.8
    free = group_layer("l", freq, sim, 4)
    assert free.dominant == [0, 1, 2, 5] and free.expert_map[3] == free.expert_map[5] and free.expert_map[4] == 0
    within = group_layer("l", freq, sim, 4, routing_groups=2)
    assert within.groups == [[0, 2], [1, 3], [4], [5, 6, 7]]
    assert within.expert_map == [0, 1, 0, 1, 2, 3, 3, 3]
    assert group_layer("l", freq, sim, 8, routing_groups=2).expert_map == list(range(8))
    with pytest.raises(ValueError, match=r"group count \(3\) to be multiples of 2"):
        group_layer("l", freq, sim, 3, routing_groups=2)


def test_merge_within_routing_groups_refuses_counts_that_do_not_split_before_any_work(tmp_path):
    model = build("deepseek_v3", tmp_path)
    stats = mf.collect_routing_stats(model, calibration(model), progress=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"group count \(3\) to be multiples of 2"):
        mf.merge_experts(model, stats, 3, globally=False, within_routing_groups=True, progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("family", FAMILIES)
def test_standard_experts_are_the_merged_slots_and_router_rows_the_dominant_experts(exported, family):
    merged, standard, *_ = exported[family]
    section = merged.config.mcsmoe_merge["merges"][-1]["layers"]
    for old, new in zip(mf.moe_layers(merged), mf.moe_layers(standard), strict=True):
        assert new.num_experts == 4 and old.name == new.name
        dominant = section[old.name]["dominant"]
        order = [0, 2, 1, 3] if family == "deepseek_v3" else [0, 1, 2, 3]
        rows = [dominant[s] for s in order]
        torch.testing.assert_close(new.router_weight(), old.router_weight()[rows])
        for a, b in zip(new.expert_weights(), old.expert_weights()):
            torch.testing.assert_close(a, b.detach()[order])
        for a, b in zip(new.expert_biases(), old.expert_biases()):
            assert (a is None) == (b is None)
            if a is not None:  # GPT-OSS: expert biases written, and the router bias sliced with the rows
                torch.testing.assert_close(a, b.detach()[order])
                torch.testing.assert_close(new.router.bias, old.router.bias[rows])
        if family == "deepseek_v3":
            torch.testing.assert_close(new.router.e_score_correction_bias, old.router.e_score_correction_bias[rows])
        assert standard.config.mcsmoe_standard["layers"][old.name]["router_rows"] == rows


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "switch"])
def test_drop_strategy_standard_model_computes_exactly_what_the_masked_model_computes(family, tmp_path):
    """Dropped experts' router logits are masked: softmax over the kept rows is the standard router's, so the
    standard model equals the merged one whatever the router choice."""
    model, batches = merged_model(family, tmp_path, strategy="drop")
    for router in ("dominant", "fitted"):
        standard = to_standard(model, router=router, batches=batches)
        for b in batches:
            torch.testing.assert_close(forward(standard, b), forward(model, b), rtol=1e-5, atol=1e-5)


@torch.no_grad()
def router_kl(merged, standard, batches):
    """Mean KL(what each group receives in the merged model || standard router) on calibration tokens, per layer."""
    from mcsmoe_fast.checkpoint.standard_router import router_inputs

    layers = mf.moe_layers(merged)
    hidden = router_inputs(merged, layers, batches)
    groups = standard.config.mcsmoe_standard["layers"]
    out = []
    for old, new in zip(layers, mf.moe_layers(standard)):
        target = routing_targets(old, hidden[old.name], groups[old.name]["groups"])
        logp = new.router_logits(hidden[old.name]).float().log_softmax(-1)
        out.append(float((target * (target.clamp_min(1e-12).log() - logp)).sum(-1).mean()))
    return out


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
def test_fitted_rows_match_the_groups_routing_probability_better_and_are_the_default_with_batches(family, tmp_path):
    model, batches = merged_model(family, tmp_path)
    dominant = to_standard(model, router="dominant")
    fitted = to_standard(model, batches=batches)
    assert fitted.config.mcsmoe_standard["router"] == "fitted"
    assert dominant.config.mcsmoe_standard["router"] == "dominant"
    for kl_fit, kl_dom in zip(router_kl(model, fitted, batches), router_kl(model, dominant, batches), strict=True):
        assert kl_fit < 0.8 * kl_dom
    if family == "gpt_oss":  # the router bias is fitted too
        for a, b in zip(mf.moe_layers(fitted), mf.moe_layers(dominant)):
            assert not torch.allclose(a.router.bias, b.router.bias)


def test_compressed_model_exports_its_reconstructed_experts(tmp_path):
    model, batches = merged_model("mixtral", tmp_path)
    mf.compress_experts(model, rank=4, keep_ratio=0.2, progress=False)
    standard = to_standard(model, router="dominant")
    for old, new in zip(mf.moe_layers(model), mf.moe_layers(standard)):
        for a, b in zip(new.expert_weights(), old.module.experts.dense_weights()):
            torch.testing.assert_close(a, b)
    experts = mf.moe_layers(model)[0].module.experts
    experts.set_keep(torch.ones(experts.in_S_rows.shape[0], dtype=torch.bool),
                     torch.ones(experts.out_S_rows.shape[0], dtype=torch.bool))
    with pytest.raises(ValueError, match="still being pruned"):
        mf.save_pretrained(model, tmp_path / "pruning", format="standard", router="dominant")
    assert not (tmp_path / "pruning").exists()


def test_switch_expert_capacity_scales_with_the_largest_group(exported, tmp_path):
    merged, standard, *_ = exported["switch"]
    groups = standard.config.mcsmoe_standard["layers"]
    largest = max(len(g) for entry in groups.values() for g in entry["groups"])
    assert largest > 1 and standard.config.expert_capacity == merged.config.expert_capacity * largest
    assert to_standard(merged, router="dominant", expert_capacity=7).config.expert_capacity == 7
    with pytest.raises(ValueError, match="expert_capacity must be a positive int"):
        to_standard(merged, router="dominant", expert_capacity=0)


# --- refusals: before anything is written, naming the reason --------------------------------------------
def refused(model, tmp_path, match, **kwargs):
    with pytest.raises(ValueError, match=match):
        mf.save_pretrained(model, tmp_path / "refused", format="standard", **kwargs)
    assert not (tmp_path / "refused").exists()


def test_refuses_layers_with_different_counts(tmp_path):
    model = build("mixtral", tmp_path)
    stats = mf.collect_routing_stats(model, calibration(model), progress=False)
    names = [layer.name for layer in mf.moe_layers(model)]
    mf.merge_experts(model, stats, {names[0]: 4, names[1]: 3}, globally=False, progress=False)
    refused(model, tmp_path, r"different numbers of experts .*globally=False", router="dominant")


def test_refuses_top_k_above_the_merged_count(tmp_path):
    model = build("mixtral", tmp_path)
    stats = mf.collect_routing_stats(model, calibration(model), progress=False)
    mf.merge_experts(model, stats, 1, globally=False, progress=False)
    refused(model, tmp_path, r"top_k=2 experts but keeps only 1", router="dominant")


@pytest.mark.parametrize("groups, match", [
    ([[0, 4], [1, 5], [2, 6], [3, 7]], r"across routing groups \[0, 1\].*merge within routing groups"),
    ([[0], [1], [2, 3], [4, 5, 6, 7]], r"keeps \[3, 1\] merged experts in its 2 routing groups"),
])
def test_deepseek_group_limited_routing_rule(tmp_path, groups, match):
    model = build("deepseek_v3", tmp_path)
    stats = mf.collect_routing_stats(model, calibration(model), progress=False)
    merge_by_hand(model, groups, stats)
    refused(model, tmp_path, match, router="dominant")


def test_refuses_bad_options(tmp_path):
    model, batches = merged_model("mixtral", tmp_path)
    refused(model, tmp_path, "router='fitted' needs calibration batches", router="fitted")
    refused(model, tmp_path, "router must be one of dominant, fitted", router="best")
    refused(model, tmp_path, "export_dense=True .* choose one", export_dense=True)
    with pytest.raises(ValueError, match="format must be one of exact, standard"):
        mf.save_pretrained(model, tmp_path / "x", format="gguf")
    with pytest.raises(ValueError, match="format='standard' only"):
        mf.save_pretrained(model, tmp_path / "x", router="dominant")


def test_refuses_what_it_cannot_slice_yet(tmp_path):
    """MiniMax-M2's correction bias lives in the block, not the router: a standard checkpoint would need it sliced
    with the router rows, so it is refused by name (the exact format keeps every row and saves it)."""
    from mcsmoe_fast.tiny_any import tiny_from_model_type

    refused(tiny_from_model_type("minimax_m2"), tmp_path, r"format='standard': model.layers.0.mlp: its router takes "
            r"the block's e_score_correction_bias, .* save format='exact'", router="dominant")


def test_merge_within_routing_groups_with_the_global_allocation(tmp_path):
    """globally=True (the default) with within_routing_groups: each layer's count is given out in units of n_group,
    so a --num-groups that is a multiple of n_group merges (the global allocation once gave a layer 7 groups and the
    merge failed on a count the user never gave). 3 layers at 4 groups on average: 12 groups, multiples of 2."""
    model = tiny_moe("deepseek_v3", num_layers=3)
    stats = mf.collect_routing_stats(model, calibration(model), progress=False)
    result = mf.merge_experts(model, stats, 4, within_routing_groups=True, progress=False)
    counts = [g.num_groups for g in result.values()]
    assert all(c % 2 == 0 for c in counts) and sum(counts) == 4 * len(counts)
    for g in result.values():
        assert all(len({e // 4 for e in members}) == 1 for members in g.groups), g.groups
    with pytest.raises(ValueError, match=r"group count \(3\) to be multiples of 2"):
        mf.merge_experts(tiny_moe("deepseek_v3", num_layers=3), stats, 3, within_routing_groups=True,
                         progress=False)
