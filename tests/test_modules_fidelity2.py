"""The runtime modules keep what transformers' modules promise (second audit): optimized and merged models run
under torch.autocast without gradients as transformers' own model does, a drop-baseline model (masked routers)
pickles, compressed slots take an int32 top_k_index as the dense ones do, the optimized Llama-4 block follows its
router's top_k, and optimize() on a part of a model says what to pass instead."""
import copy
import io
import pickle

import pytest
import torch

from mcsmoe_fast import collect_routing_stats, merge_experts, moe_layers, optimize
from mcsmoe_fast.compress import full_bank
from mcsmoe_fast.modules import CompressedMoEExperts, MoEExperts
from mcsmoe_fast.tiny import tiny_moe, tiny_switch


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def inputs_of(family, seed=0):
    ids = torch.randint(3, 128, (2, 10), generator=torch.Generator().manual_seed(seed))
    return dict(input_ids=ids, decoder_input_ids=ids[:, :5].contiguous()) if family == "switch" else dict(input_ids=ids)


def tiny(family):
    return tiny_switch(num_experts=4) if family == "switch" else tiny_moe(family, num_experts=4)


# --- 1. the dense fused op under torch.autocast: autocast off, the slots' dtype, the caller's dtype back ----
@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_dense_slots_under_autocast_without_grad_compute_in_their_dtype(mode):
    g = torch.Generator().manual_seed(0)
    experts = MoEExperts(torch.randn(3, 24, 16, generator=g) / 4, torch.randn(3, 16, 12, generator=g) / 4,
                         torch.tensor([0, 1, 2, 1]), "swiglu")
    x, index = torch.randn(7, 16, generator=g), torch.randint(0, 4, (7, 2), generator=g)
    weights = torch.rand(7, 2, generator=g).bfloat16()  # a router's weights under autocast
    with torch.no_grad():
        want = experts(x, index, weights.float())  # float32, no autocast
    context = torch.no_grad() if mode == "no_grad" else torch.inference_mode()
    with context, torch.autocast("cpu", dtype=torch.bfloat16):
        got = experts(x, index, weights)
    assert got.dtype == torch.float32 and torch.equal(got, want)


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss", "llama4_text", "switch"])
@pytest.mark.parametrize("merged", [False, True])
def test_optimized_model_under_autocast_without_grad_follows_transformers(family, merged):
    """Merged with as many groups as experts: the same function as transformers' model, now on our slots."""
    base = tiny(family)
    model = copy.deepcopy(base)
    inputs = inputs_of(family)
    if merged:
        stats = collect_routing_stats(model, [inputs], progress=False)
        merge_experts(model, stats, num_groups=4, globally=False, progress=False)
    optimize(model)
    for context in (torch.no_grad, torch.inference_mode):
        with context(), torch.autocast("cpu", dtype=torch.bfloat16):
            want, got = base(**inputs).logits, model(**inputs).logits
        assert rel(got, want) < 2e-2  # bf16 rounding of transformers' autocast forward (ours runs float32 experts)


# --- 2. a drop-baseline model pickles ------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "llama4_text"])
def test_model_with_masked_routers_pickles_and_reloads_the_same_model(family):
    model = tiny_moe(family, num_experts=4)
    for layer in moe_layers(model):
        layer.mask_router(torch.tensor([True, False, True, False]))
    ids = inputs_of(family)["input_ids"]
    with torch.no_grad():
        want = model(ids).logits
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    for back in (torch.load(buffer, weights_only=False), pickle.loads(pickle.dumps(model))):
        assert [type(layer.module).__name__ for layer in moe_layers(back)] == \
            [type(layer.module).__name__ for layer in moe_layers(model)]
        assert all(torch.equal(a.logit_mask(), b.logit_mask()) for a, b in zip(moe_layers(back), moe_layers(model)))
        with torch.no_grad():
            assert torch.equal(back(ids).logits, want)


# --- 3. compressed slots take an int32 top_k_index, as MoEExperts ----------------------------------------------
def test_compressed_slots_take_int32_top_k_index_in_inference():
    g = torch.Generator().manual_seed(0)
    w_in, w_out = torch.randn(2, 12, 8, generator=g), torch.randn(2, 8, 6, generator=g)
    emap = torch.tensor([0, 1, 1, 0])
    compressed = CompressedMoEExperts(full_bank(w_in, 2, "exact"), full_bank(w_out, 2, "exact"), emap, "swiglu")
    x, index = torch.randn(5, 8, generator=g), torch.randint(0, 4, (5, 2), generator=g)
    weights = torch.rand(5, 2, generator=g)
    with torch.no_grad():
        assert torch.equal(compressed(x, index.int(), weights), compressed(x, index, weights))


# --- 4. the optimized Llama-4 block follows its router's top_k ------------------------------------------------
def test_optimized_llama4_follows_a_later_change_of_the_router_top_k():
    base = tiny_moe("llama4_text", top_k=1)
    model = optimize(copy.deepcopy(base))
    for m in (base, model):
        for layer in moe_layers(m):
            layer.module.router.top_k = 3
    ids = inputs_of("llama4_text")["input_ids"]
    with torch.no_grad():
        assert rel(model(ids).logits, base(ids).logits) < 1e-5
    assert all(layer.module.router.top_k == 3 for layer in moe_layers(model))


# --- 5. optimize() on a part of a model --------------------------------------------------------------------------
@pytest.mark.parametrize("part", ["MixtralDecoderLayer", "MixtralSparseMoeBlock", "SwitchTransformersSparseMLP"])
def test_optimize_on_a_part_of_a_model_says_to_pass_the_model(part):
    mixtral, switch = tiny_moe("mixtral", num_experts=4), tiny_switch(num_experts=4)
    module = {"MixtralDecoderLayer": mixtral.model.layers[0], "MixtralSparseMoeBlock": mixtral.model.layers[0].mlp,
              "SwitchTransformersSparseMLP": switch.encoder.block[1].layer[1].mlp}[part]
    before = copy.deepcopy(module.state_dict())
    with pytest.raises(ValueError, match=rf"optimize\(\) takes the transformers model .*got {part}"):
        optimize(module)
    assert type(module).__name__ == part and module.state_dict().keys() == before.keys()


def test_optimize_on_a_base_model_or_a_stack_still_works():
    mixtral, switch = tiny_moe("mixtral", num_experts=4), tiny_switch(num_experts=4)
    optimize(mixtral.model)
    optimize(switch.encoder)
    assert mixtral.config._experts_implementation == "mcsmoe_fast"
    assert type(moe_layers(switch)[0].module).__name__ == "SwitchMoE"


# --- 6. transformers' save_pretrained after optimize(): what README says is what happens ------------------------
def test_transformers_save_of_optimized_models_is_refused_only_where_readme_says(tmp_path):
    import re
    from pathlib import Path

    import transformers

    from mcsmoe_fast.checkpoint.plain_save import PlainSaveRefused

    for family in ("mixtral", "llama4_text"):  # unmerged experts contract, Llama-4: transformers' names, saved
        model = optimize(tiny_moe(family, num_experts=4))
        model.save_pretrained(tmp_path / family)
        back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / family)
        assert all(torch.equal(t, back.state_dict()[k]) for k, t in model.state_dict().items())
    with pytest.raises(PlainSaveRefused):
        optimize(tiny_switch(num_experts=4)).save_pretrained(tmp_path / "switch")
    readme = " ".join((Path(__file__).resolve().parents[1] / "README.md").read_text().split())
    claim = re.search(r"transformers' own `model\.save_pretrained` is refused[^.]*\.[^.]*\.", readme).group(0)
    assert "optimized Switch" in claim and "optimized models" not in claim and "unmerged" in claim, claim


def test_the_optimized_llama4_blocks_top_k_is_an_attribute_as_on_transformers_block():
    """transformers' Llama4TextMoe.top_k is an attribute its forward does not read (the router's top_k routes); the
    optimized block's can be set the same way, with the same (no) effect."""
    base = tiny_moe("llama4_text", top_k=1)
    model = optimize(copy.deepcopy(base))
    for m in (base, model):
        for layer in moe_layers(m):
            layer.module.top_k = 2
    assert all(layer.module.top_k == 2 and layer.module.router.top_k == 1 for layer in moe_layers(model))
    ids = inputs_of("llama4_text")["input_ids"]
    with torch.no_grad():
        assert rel(model(ids).logits, base(ids).logits) < 1e-5
