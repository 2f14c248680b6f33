"""optimize(model) and the drop-in modules against the transformers modules they replace."""
import copy

import pytest
import torch

import mcsmoe_fast
from mcsmoe_fast import moe_layers, optimize
from mcsmoe_fast.modules import MoEExperts, SwitchMoE
from mcsmoe_fast.tiny import tiny_mixtral, tiny_switch

ATOL = 1e-5


def switch_inputs(batch=2, enc=24, dec=9, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return dict(input_ids=torch.randint(2, 128, (batch, enc), generator=gen),
                decoder_input_ids=torch.randint(2, 128, (batch, dec), generator=gen))


def merge_by_hand(model, groups):
    """Merge every MoE layer: the slot of group g = mean of its experts. Returns (merged model with
    MoEExperts of G slots, HF model holding each expert's slot weights as E full experts)."""
    merged, expanded = copy.deepcopy(model), copy.deepcopy(model)
    emap = torch.tensor(groups)
    G = int(emap.max()) + 1
    for lm, le in zip(moe_layers(merged), moe_layers(expanded)):
        w_in, w_out = (w.detach().clone() for w in lm.expert_weights())
        slots_in = torch.stack([w_in[emap == g].mean(0) for g in range(G)])
        slots_out = torch.stack([w_out[emap == g].mean(0) for g in range(G)])
        le.set_expert_weights(slots_in[emap], slots_out[emap])
        lm.install_experts(MoEExperts(slots_in, slots_out, emap, lm.activation))
    return merged, expanded


@pytest.mark.parametrize("capacity", [2, 4, 64])
@pytest.mark.parametrize("grad", [False, True])
def test_switch_equals_transformers_including_capacity(capacity, grad):
    model = tiny_switch(expert_capacity=capacity)
    inputs = switch_inputs()
    fast = optimize(copy.deepcopy(model))
    assert all(isinstance(layer.module, SwitchMoE) for layer in moe_layers(fast))
    with torch.set_grad_enabled(grad):
        ref = model(**inputs, output_router_logits=True)
        out = fast(**inputs, output_router_logits=True)
    assert (out.logits - ref.logits).abs().max() <= ATOL
    for a, b in zip(ref.encoder_router_logits, out.encoder_router_logits):  # router logits still recorded
        torch.testing.assert_close(a, b)
    if grad:
        out.logits.sum().backward()  # gradients flow through the fused backward
        assert moe_layers(fast)[0].module.experts.w_in.grad is not None


def test_switch_capacity_really_drops_tokens_and_dropless_differs():
    model = tiny_switch(expert_capacity=2)
    inputs = switch_inputs(enc=40)
    layer = moe_layers(optimize(copy.deepcopy(model)))[0]
    hidden = torch.randn(2, 40, 32)
    mask, _, _ = layer.module.router(hidden)  # transformers' router: the dispatch mask, capacity applied
    assert (mask.sum(-1) == 0).any()
    with torch.no_grad():
        ref = model(**inputs).logits
        dropless = optimize(copy.deepcopy(model), dropless=True)(**inputs).logits
        big = tiny_switch(expert_capacity=1000)
        big.load_state_dict(model.state_dict())
        assert (big(**inputs).logits - dropless).abs().max() <= ATOL  # dropless == unlimited capacity
    assert (ref - dropless).abs().max() > 1e-3


def test_mixtral_equals_transformers_and_generates():
    model = tiny_mixtral()
    ids = torch.randint(3, 128, (2, 13), generator=torch.Generator().manual_seed(1))
    fast = optimize(copy.deepcopy(model))
    assert fast.config._experts_implementation == "mcsmoe_fast"  # the family's modules stay, run by our op
    assert all(type(a.module.experts) is type(b.module.experts) for a, b in zip(moe_layers(fast), moe_layers(model)))
    with torch.no_grad():
        assert (fast(ids).logits - model(ids).logits).abs().max() <= ATOL
        want = model.generate(ids, max_new_tokens=6, do_sample=False)
        got = fast.generate(ids, max_new_tokens=6, do_sample=False)
    assert torch.equal(want, got)


def test_optimize_keeps_mixtral_parameters_and_is_idempotent():
    model = tiny_mixtral()
    gate_up = moe_layers(model)[0].module.experts.gate_up_proj
    fast = optimize(model)
    assert fast is model
    assert moe_layers(fast)[0].module.experts.gate_up_proj is gate_up
    again = optimize(fast)
    assert moe_layers(again)[0].module.experts.gate_up_proj is gate_up
    assert again.config._experts_implementation == "mcsmoe_fast"


@pytest.mark.parametrize("groups", [[0, 0, 1, 1, 2, 2, 3, 3], [0, 1, 0, 1, 0, 1, 0, 1], [0, 0, 0, 0, 0, 0, 0, 0]])
def test_merged_mixtral_equals_expanded_hf_model(groups):
    merged, expanded = merge_by_hand(tiny_mixtral(), groups)
    optimize(merged)
    assert moe_layers(merged)[0].module.experts.num_slots == max(groups) + 1
    ids = torch.randint(3, 128, (3, 11), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (merged(ids).logits - expanded(ids).logits).abs().max() <= ATOL


@pytest.mark.parametrize("capacity", [3, 64])
def test_merged_switch_equals_expanded_hf_model(capacity):
    merged, expanded = merge_by_hand(tiny_switch(expert_capacity=capacity), [0, 1, 2, 0, 1, 2, 0, 1])
    optimize(merged)
    inputs = switch_inputs(seed=3)
    with torch.no_grad():
        assert (merged(**inputs).logits - expanded(**inputs).logits).abs().max() <= ATOL


def test_compile_moe_blocks():
    mixtral = optimize(tiny_mixtral())
    block = moe_layers(mixtral)[0].module
    hidden = torch.randn(2, 5, 32)
    compiled = torch.compile(block)
    with torch.no_grad():
        torch.testing.assert_close(compiled(hidden), block(hidden))
    switch = optimize(tiny_switch(expert_capacity=3))
    sblock = moe_layers(switch)[0].module
    hidden = torch.randn(2, 7, 32)
    compiled = torch.compile(sblock)
    with torch.no_grad():
        torch.testing.assert_close(compiled(hidden), sblock(hidden))


def test_compile_whole_mixtral():
    model = optimize(tiny_mixtral(num_layers=1))
    ids = torch.randint(3, 128, (1, 8), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want = model(ids).logits
        got = torch.compile(model)(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_optimize_is_exported():
    assert mcsmoe_fast.optimize is optimize


@pytest.mark.parametrize("family", ["switch", "mixtral"])
def test_merged_checkpoint_loads_into_fast_modules(family, tmp_path):
    from merge_helpers import build, calibration, forward

    from mcsmoe_fast import collect_routing_stats, from_pretrained, merge_experts, save_pretrained

    model = build(family, tmp_path)
    batches = calibration(model)
    merge_experts(model, collect_routing_stats(model, batches, progress=False), 3, globally=False, progress=False)
    loaded = optimize(from_pretrained(save_pretrained(model, tmp_path / "merged")))
    for layer in moe_layers(loaded):
        assert isinstance(layer.module.experts, MoEExperts) and layer.module.experts.num_slots == 3
        if family == "switch":
            assert isinstance(layer.module, SwitchMoE)
    with torch.no_grad():  # the fused op (no gradients needed) against the merged model's reference path
        for b in batches:
            with torch.enable_grad():
                want = forward(model, b)
            assert (forward(loaded, b) - want).abs().max() <= ATOL


def test_model_without_moe_layers_is_returned_unchanged_with_a_warning():
    from transformers import SwitchTransformersConfig, SwitchTransformersForConditionalGeneration

    config = SwitchTransformersConfig(vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_layers=2, num_decoder_layers=2,
                                      num_heads=2, num_experts=4, num_sparse_encoder_layers=0,
                                      num_sparse_decoder_layers=0, decoder_start_token_id=0)
    config.encoder_sparse_step = config.decoder_sparse_step = 0  # no sparse block at all
    model = SwitchTransformersForConditionalGeneration(config).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.warns(UserWarning, match="no MoE layer"):
        assert optimize(model) is model
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    with pytest.raises(ValueError, match="no MoE layer"):  # the algorithm steps still refuse it
        moe_layers(model)
