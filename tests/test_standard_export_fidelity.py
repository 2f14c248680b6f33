"""The standard export (checkpoint/standard*.py, streaming/standard.py) where a family departs from the common path:
a router tensor whose expert dimension is not its first (ERNIE-4.5's [1, E] correction bias), the sigmoid routers of
DeepSeek-V3's design under other class names (fitted rows must fit their sigmoid scores), DeepSeek-V3's routing-group
counts refused before the streamed merge's first pass, and multimodal (composite) models, whose expert count lives in
their text config."""
import warnings

import pytest
import torch
import torch.nn.functional as F
import transformers

import mcsmoe_fast as mf
import mcsmoe_fast.streaming.passes as passes
from mcsmoe_fast.checkpoint import to_standard
from mcsmoe_fast.checkpoint.standard_router import is_sigmoid_router, router_inputs
from mcsmoe_fast.models.config_fields import routing_groups
from mcsmoe_fast.streaming import merge_checkpoint
from mcsmoe_fast.tiny import tiny_moe
from mcsmoe_fast.tiny_any import tiny_from_model_type
from merge_helpers import calibration


def ids(seed, shape=(2, 12)):
    return torch.randint(3, 128, shape, generator=torch.Generator().manual_seed(seed))


def merged(model, groups=4, batches=3, shape=(2, 12)):
    """`model` merged to `groups` experts per layer (within its routing groups where it has them); its batches."""
    b = [{"input_ids": ids(s, shape)} for s in range(batches)]
    mf.merge_experts(model, mf.collect_routing_stats(model, b, progress=False), groups, globally=False,
                     within_routing_groups=routing_groups(model.config) > 1, progress=False)
    return model, b


# --- a router tensor [1, E]: ERNIE-4.5's moe_statics.e_score_correction_bias ----------------------------------
def test_ernie_correction_bias_sliced_along_its_expert_dimension(tmp_path):
    model, _ = merged(tiny_from_model_type("ernie4_5_moe"))
    mf.save_pretrained(model, tmp_path / "std", format="standard", router="dominant")
    loaded, info = transformers.Ernie4_5_MoeForCausalLM.from_pretrained(tmp_path / "std", output_loading_info=True)
    assert not any(info.values()), info
    rows = loaded.config.mcsmoe_standard["layers"]
    for layer in mf.moe_layers(model):
        old, new = layer.router_rows()[0], loaded.get_submodule(layer.name).gate
        r = rows[layer.name]["router_rows"]
        assert torch.equal(new.moe_statics.e_score_correction_bias, old.moe_statics.e_score_correction_bias[:, r])
        assert torch.equal(new.weight, old.weight[r])


def test_router_tensor_without_a_leading_expert_dimension_refused_before_any_work():
    model, _ = merged(tiny_moe("mixtral", num_layers=1))
    layer = mf.moe_layers(model)[0]
    layer.router_rows()[0].register_buffer("odd", torch.zeros(3, layer.num_experts))
    with pytest.raises(ValueError, match=r"router tensor .*odd.* \(3, 8\).*format='exact'"):
        to_standard(model, router="dominant")


# --- sigmoid routers of DeepSeek-V3's design under other class names -------------------------------------------
SIGMOID_FAMILIES = ("deepseek_v3", "deepseek_v32", "glm4_moe", "glm4_moe_lite", "glm_moe_dsa", "dots1", "solar_open",
                    "mimo_v2_flash", "minicpm5_moe", "kimi_linear", "nemotron_h", "exaone_moe")


@torch.no_grad()
def sigmoid_objective(model, standard, batches) -> float:
    """The fitted sigmoid router's objective (docs/standard_format.md), averaged over the layers: the binary
    cross-entropy between the standard router's sigmoid(logits) and the clamped sum of each group's member scores."""
    layers = mf.moe_layers(model)
    hidden = router_inputs(model, layers, batches)
    groups = standard.config.mcsmoe_standard["layers"]
    losses = []
    for old, new in zip(layers, mf.moe_layers(standard)):
        h = hidden[old.name]
        scores = old.router_logits(h).float().sigmoid()
        target = torch.stack([scores[:, g].sum(-1) for g in groups[old.name]["groups"]], -1).clamp(1e-6, 1 - 1e-6)
        losses.append(float(F.binary_cross_entropy_with_logits(new.router_logits(h).float(), target)))
    return sum(losses) / len(losses)


@pytest.mark.parametrize("family, sigmoid", [("glm4_moe", True), ("nemotron_h", True), ("laguna", True),
                                             ("mixtral", False), ("qwen3_moe", False), ("gpt_oss", False),
                                             ("ernie4_5_moe", False), ("cohere2_moe", False),
                                             ("cohere2_moe-sigmoid", True)])
def test_sigmoid_routers_told_by_what_they_compute(family, sigmoid):
    """Cohere2-MoE's one router class scores by softmax or sigmoid as its config's expert_selection_fn says."""
    model = tiny_from_model_type(family.removesuffix("-sigmoid"))
    layers = mf.moe_layers(model)
    if family.endswith("-sigmoid"):
        for layer in layers:
            layer.router.expert_selection_fn = "sigmoid"
    hidden = router_inputs(model, layers, [{"input_ids": ids(0)}])
    assert [is_sigmoid_router(layer, hidden[layer.name]) for layer in layers] == [sigmoid] * len(layers)


@pytest.mark.parametrize("family", SIGMOID_FAMILIES)
def test_fitted_rows_of_sigmoid_routers_fit_their_sigmoid_scores(family):
    """The fit starts from the dominant rows and minimises the sigmoid objective (with a small ridge), so it must
    end no worse than the dominant rows; fitted as a softmax it ends worse (glm4_moe 0.693 -> 0.886)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    if family not in CONFIG_MAPPING_NAMES:  # minicpm5_moe joined transformers in 5.25 (the floor is older)
        pytest.skip(f"transformers {transformers.__version__} has no {family!r} model")
    model, batches = merged(tiny_from_model_type(family), batches=4, shape=(4, 16))
    dominant = sigmoid_objective(model, to_standard(model, router="dominant"), batches)
    fitted = sigmoid_objective(model, to_standard(model, router="fitted", batches=batches), batches)
    assert fitted < dominant, (family, dominant, fitted)


# --- DeepSeek-V3's routing groups: every count refused before the streamed merge's first pass --------------------
@pytest.mark.parametrize("case", ["one-per-routing-group", "top_k-over-topk_group"])
def test_streamed_routing_group_counts_refused_before_the_first_pass(case, tmp_path, monkeypatch):
    model = tiny_moe("deepseek_v3", num_layers=1)
    groups, message = 2, "at least 2"
    if case == "top_k-over-topk_group":  # 4 experts, 2 per routing group, but topk_group=1 group holds only 2 < 3
        model.config.num_experts_per_tok = 3
        groups, message = 4, "top_k=3 exceeds topk_group=1 x 2"
    model.save_pretrained(tmp_path / "src")
    ran = []
    run_layer = passes.run_layer
    monkeypatch.setattr(passes, "run_layer", lambda *a, **k: ran.append(1) or run_layer(*a, **k))
    with warnings.catch_warnings(), pytest.raises(ValueError, match=message):
        warnings.simplefilter("ignore")
        merge_checkpoint(tmp_path / "src", tmp_path / "out", calibration(model, batches=1), groups,
                         format="standard", router="dominant", progress=False)
    assert not ran and not (tmp_path / "out").exists()


# --- multimodal (composite) models: the expert count in config.text_config -------------------------------------
def composite_qwen3_5_moe():
    text = tiny_moe("qwen3_5_moe").config.to_dict()
    vision = dict(depth=1, hidden_size=32, intermediate_size=32, num_heads=2, out_hidden_size=32,
                  num_position_embeddings=16, patch_size=4, temporal_patch_size=1, spatial_merge_size=1)
    config = transformers.Qwen3_5MoeConfig(text_config=text, vision_config=vision)
    torch.manual_seed(0)
    return transformers.Qwen3_5MoeForConditionalGeneration(config).eval()


@torch.no_grad()
def test_composite_model_standard_export_through_its_text_config(tmp_path):
    model = composite_qwen3_5_moe()
    e = model.config.text_config.num_experts
    model, _ = merged(model, groups=e)  # every group one expert: the standard model computes the merged model
    x = ids(7)
    standard = to_standard(model, router="dominant")
    assert type(standard) is type(model) and standard.config.text_config.num_experts == e
    # (up to rounding: the merged model's fused op and transformers' experts sum in another order)
    torch.testing.assert_close(standard(input_ids=x).logits, model(input_ids=x).logits, rtol=1e-5, atol=1e-6)

    model, _ = merged(composite_qwen3_5_moe(), groups=4)
    mf.save_pretrained(model, tmp_path / "std", format="standard", router="dominant")
    loaded, info = transformers.Qwen3_5MoeForConditionalGeneration.from_pretrained(tmp_path / "std",
                                                                                   output_loading_info=True)
    assert not any(info.values()), info
    assert loaded.config.text_config.num_experts == 4
    assert all(layer.num_experts == 4 for layer in mf.moe_layers(loaded))


@torch.no_grad()
def test_composite_model_dense_export(tmp_path):
    model, _ = merged(composite_qwen3_5_moe(), groups=4)
    mf.save_pretrained(model, tmp_path / "dense", export_dense=True)
    loaded, info = transformers.Qwen3_5MoeForConditionalGeneration.from_pretrained(tmp_path / "dense",
                                                                                   output_loading_info=True)
    assert not any(info.values()), info
    x = ids(7)
    torch.testing.assert_close(loaded(input_ids=x).logits, model(input_ids=x).logits, rtol=1e-5, atol=1e-5)
