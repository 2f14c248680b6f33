"""What vLLM's (and SGLang's) loader reads from a standard checkpoint, checked without a GPU or vLLM: for the
standard output of every family, the config's expert counts (every count field = M, top_k <= M, DeepSeek-V3's
n_group / topk_group consistent with M), and the tensor names and shapes of every layer, which must be what a
fresh model of the family built with M experts saves (the family's hub layout, as transformers writes it): the
same key set, the same shapes. vLLM builds its layers from the config and then looks every expert tensor up by
these names (its expert-parameter mapping: one checkpoint expert e -> its local expert e), so a checkpoint that
passes here is what it loads; serving it needs a GPU (benchmarks/gpu_check.sh, docs/standard_format.md).
Switch Transformers is checked too, though vLLM does not serve it (transformers does)."""
import json
import re

import pytest
import torch
from safetensors import safe_open

import mcsmoe_fast as mf
from mcsmoe_fast.models.config_fields import EXPERT_COUNT_FIELDS
from mcsmoe_fast.tiny import tiny_moe, tiny_switch
from test_standard_export import FAMILIES, merged_model

M = 4  # merged_model merges every family to 4 experts per layer
SERVED = tuple("deepseek_v3-within" if f == "deepseek_v3" else f for f in FAMILIES)

# the per-expert tensors vLLM's loaders look up (its FusedMoE expert-parameter mapping), by family; {e} is the
# expert index, which must run over range(M) in every MoE layer
EXPERT_NAMES = {
    "mixtral": ("block_sparse_moe.experts.{e}.w1.weight", "block_sparse_moe.experts.{e}.w2.weight",
                "block_sparse_moe.experts.{e}.w3.weight"),
    "gpt_oss": ("mlp.experts.gate_up_proj", "mlp.experts.gate_up_proj_bias", "mlp.experts.down_proj",
                "mlp.experts.down_proj_bias"),
    "llama4_text": ("feed_forward.experts.gate_up_proj", "feed_forward.experts.down_proj"),  # fused, as on the hub
}
PROJ_NAMES = ("mlp.experts.{e}.gate_proj.weight", "mlp.experts.{e}.up_proj.weight", "mlp.experts.{e}.down_proj.weight")
ROUTER_NAMES = ("gate.weight", "gate.e_score_correction_bias", "router.weight", "router.bias",
                "router.classifier.weight")


def tensor_shapes(directory) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for path in sorted(directory.glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            shapes.update({k: tuple(f.get_slice(k).get_shape()) for k in f.keys()})
    return shapes


def fresh(family: str, num_experts: int):
    """A fresh model of `family` with num_experts experts, built by the same tiny builder as the merged one."""
    if family == "switch":
        return tiny_switch(num_experts=num_experts)
    if family == "mixtral":
        from mcsmoe_fast.tiny import tiny_mixtral
        return tiny_mixtral(num_experts=num_experts)
    return tiny_moe(family.removesuffix("-within"), num_experts=num_experts)


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    """{family: (standard config dict, standard tensor shapes, fresh M-expert config dict, fresh tensor shapes,
    the original model's config dict)}."""
    tmp = tmp_path_factory.mktemp("vllm_layout")
    out = {}
    for family in SERVED:
        model, batches = merged_model(family, tmp)
        standard = mf.save_pretrained(model, tmp / f"{family}-standard", format="standard", batches=batches)
        reference = tmp / f"{family}-fresh"
        fresh(family, M).save_pretrained(reference)
        load = lambda d: json.loads((d / "config.json").read_text())  # noqa: E731
        out[family] = (load(standard), tensor_shapes(standard), load(reference), tensor_shapes(reference),
                       model.config.to_dict())
    return out


@pytest.mark.parametrize("family", SERVED)
def test_config_fields_vllm_reads_are_consistent(layouts, family):
    config, _, fresh_config, _, original = layouts[family]
    counts = {f: config[f] for f in EXPERT_COUNT_FIELDS if isinstance(config.get(f), int)}
    assert counts and set(counts.values()) == {M}, counts  # every expert count field the config has
    assert set(counts) == {f for f in EXPERT_COUNT_FIELDS if isinstance(fresh_config.get(f), int)}
    top_k = config.get("num_experts_per_tok", config.get("num_selected_experts", 1))
    assert 1 <= top_k <= M and top_k == original.get("num_experts_per_tok", top_k)
    if config.get("n_group", 1) > 1:  # DeepSeek-V3: routing groups of equal size, at least 2, topk fits
        n_group, topk_group = config["n_group"], config["topk_group"]
        assert M % n_group == 0 and M // n_group >= 2 and topk_group <= n_group
        assert top_k <= topk_group * (M // n_group)
    # everything else vLLM reads (sizes, layer pattern, routing options) is the original's
    skip = set(EXPERT_COUNT_FIELDS) | {"mcsmoe_standard", "mcsmoe_merge", "expert_capacity", "architectures",
                                       "transformers_version", "dtype", "torch_dtype"}
    changed = {k for k in config if k not in skip and config[k] != original.get(k, config[k])}
    assert not changed, {k: (original.get(k), config[k]) for k in changed}


@pytest.mark.parametrize("family", SERVED)
def test_tensor_names_and_shapes_are_a_fresh_m_expert_models(layouts, family):
    _, shapes, _, fresh_shapes, _ = layouts[family]
    assert set(shapes) == set(fresh_shapes), (sorted(set(shapes) - set(fresh_shapes))[:5],
                                              sorted(set(fresh_shapes) - set(shapes))[:5])
    different = {k: (shapes[k], fresh_shapes[k]) for k in shapes if shapes[k] != fresh_shapes[k]}
    assert not different, different


@pytest.mark.parametrize("family", SERVED)
def test_every_moe_layer_has_m_experts_and_m_router_rows_under_vllms_names(layouts, family):
    _, shapes, *_ = layouts[family]
    base = family.removesuffix("-within")
    routers = [k for k in shapes if k.endswith(ROUTER_NAMES) and ".shared_expert" not in k]
    assert routers and all(shapes[k][0] == M for k in routers), {k: shapes[k] for k in routers}
    for router in routers:
        if not router.endswith(("gate.weight", "router.weight", "router.classifier.weight")):
            continue
        block = router.rsplit(".", 2 if router.endswith("classifier.weight") else 1)[0].rsplit(".", 1)[0]
        if base == "switch":
            indices = {int(m.group(1)) for k in shapes if (m := re.match(re.escape(block) + r"\.experts\.expert_(\d+)\.", k))}
            assert indices == set(range(M)), (block, indices)
            continue
        layer = block.rsplit(".", 1)[0]  # model.layers.N
        names = EXPERT_NAMES.get(base, PROJ_NAMES)
        for name in names:
            if "{e}" in name:
                found = {int(m.group(1)) for k in shapes
                         if (m := re.fullmatch(re.escape(f"{layer}.{name}").replace(r"\{e\}", r"(\d+)"), k))}
                assert found == set(range(M)), (layer, name, found)
            else:  # a fused tensor: experts first
                assert shapes[f"{layer}.{name}"][0] == M, (layer, name, shapes[f"{layer}.{name}"])


def test_the_layout_check_catches_a_wrong_expert_count(layouts, tmp_path):
    """The comparison is not vacuous: a fresh model with M + 1 experts differs from the standard output."""
    _, shapes, *_ = layouts["mixtral"]
    fresh(("mixtral"), M + 1).save_pretrained(tmp_path / "more")
    other = tensor_shapes(tmp_path / "more")
    assert set(other) != set(shapes) and torch.Size(other["model.layers.0.block_sparse_moe.gate.weight"])[0] == M + 1
