"""What an optimized model keeps of the transformers model it replaces: weights that are never stale
(GPT-OSS's canonical re-layout), transformers' state-dict names (Switch), transformers' expert dropout in
training mode (Switch), and optimize() on the meta device."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transformers import SwitchTransformersForConditionalGeneration

from mcsmoe_fast import moe_layers, optimize
from mcsmoe_fast.modules import MoEExperts, SwitchMoE, experts_interface
from mcsmoe_fast.modules.experts_spec import ExpertsSpec
from mcsmoe_fast.tiny import tiny_moe, tiny_switch
from test_optimize import merge_by_hand, switch_inputs

ATOL = 1e-5


def ids(seed=0, batch=2, length=12):
    return torch.randint(3, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


def max_diff(a, b):
    return (a - b).abs().max().item()


def switch_with_dropout(rate: float, **kwargs):
    """tiny_switch's model built again from its config with dropout_rate = rate (every dropout of the model)."""
    config = tiny_switch(**kwargs).config
    config.dropout_rate = rate
    torch.manual_seed(0)
    return SwitchTransformersForConditionalGeneration(config).eval()


# --- GPT-OSS: the canonical (re-laid-out) weights are never stale ------------------------------------
@pytest.mark.parametrize("edit", ["gate_up_proj", "down_proj", "gate_up_proj_bias", "down_proj_bias"])
def test_gpt_oss_sees_in_place_edits_through_data(edit):
    """`p.data.mul_()` does not bump p's version counter (weight loaders and patching tools write so)."""
    model = tiny_moe("gpt_oss")
    fast = optimize(copy.deepcopy(model))
    x = ids()
    with torch.no_grad():
        fast(x)  # a first call (the old cache kept its copy from here on)
        for m in (model, fast):
            for layer in moe_layers(m):
                getattr(layer.module.experts, edit).data.mul_(3.0)
        assert max_diff(fast(x).logits, model(x).logits) <= ATOL


def test_gpt_oss_sees_in_place_edits_under_inference_mode():
    model = tiny_moe("gpt_oss")
    fast = optimize(copy.deepcopy(model))
    x = ids()
    with torch.inference_mode():
        fast(x)
        for m in (model, fast):
            for layer in moe_layers(m):
                layer.module.experts.gate_up_proj.data.add_(0.1)
        assert max_diff(fast(x).logits, model(x).logits) <= ATOL


def test_gpt_oss_built_under_inference_mode_runs():
    """Inference tensors have no version counter: a model built or loaded under inference_mode must run."""
    with torch.inference_mode():
        model = tiny_moe("gpt_oss")
        want = model(ids()).logits
        fast = optimize(model)
        got = fast(ids()).logits
    assert max_diff(got, want) <= ATOL


def test_gpt_oss_experts_forward_with_few_experts_hit_dropped_tokens_and_an_expert_map():
    """The composed path on the stored banks (interleaved gate/up): one token, tokens with no expert (-1),
    all tokens on one expert, and an experts module whose E experts share G slots through `expert_map`."""
    experts = tiny_moe("gpt_oss").model.layers[0].mlp.experts
    spec = ExpertsSpec.of(experts)
    gen = torch.Generator().manual_seed(0)
    for T, index in [(1, None), (5, torch.tensor([[2, 7]] * 5)), (4, torch.tensor([[3, -1], [-1, -1], [0, 3], [-1, 5]])),
                     (0, torch.zeros(0, 2, dtype=torch.long))]:
        x = torch.randn(T, 32, generator=gen)
        if index is None:
            index = torch.tensor([[6, 1]])
        weights = torch.rand(T, 2, generator=gen)
        with torch.no_grad():
            got = experts_interface.mcsmoe_fast_experts_forward(experts, x, index, weights)
            want = MoEExperts(*(t.clone() for t in spec.weights(experts)), torch.arange(8), spec.activation,
                              *(t.clone() for t in spec.biases(experts)), spec.activation_args)(x, index, weights)
        assert got.shape == (T, 32) and (T == 0 or max_diff(got, want) <= ATOL)
    merged = copy.deepcopy(experts)
    emap = torch.tensor([0, 0, 1, 1, 2, 2, 0, 1])
    for name in ("gate_up_proj", "down_proj", "gate_up_proj_bias", "down_proj_bias"):
        setattr(merged, name, nn.Parameter(getattr(merged, name)[:3].detach().clone()))
    merged.register_buffer("expert_map", emap)
    x, index, weights = torch.randn(6, 32, generator=gen), torch.randint(0, 8, (6, 2), generator=gen), torch.rand(6, 2)
    with torch.no_grad():
        got = experts_interface.mcsmoe_fast_experts_forward(merged, x, index, weights)
        want = MoEExperts(*(t.clone() for t in spec.weights(merged)), emap, spec.activation,
                          *(t.clone() for t in spec.biases(merged)), spec.activation_args)(x, index, weights)
    assert max_diff(got, want) <= ATOL


# --- Switch: transformers' state-dict names -----------------------------------------------------------
def test_optimized_switch_state_dict_has_transformers_keys_and_loads_into_transformers():
    model = tiny_switch()
    fast = optimize(copy.deepcopy(model))
    state = fast.state_dict()
    assert list(state) == list(model.state_dict())  # exactly transformers' keys, in its order
    assert "encoder.block.1.layer.1.mlp.experts.expert_3.wi.weight" in state
    loaded = SwitchTransformersForConditionalGeneration.from_pretrained(None, config=model.config, state_dict=state)
    inputs = switch_inputs()
    with torch.no_grad():
        assert max_diff(loaded.eval()(**inputs).logits, model(**inputs).logits) <= ATOL


def test_optimized_switch_state_dict_survives_safetensors_and_accelerate_saving(tmp_path):
    """Each expert is its own tensor (no views of one bank, which savers that drop tensors sharing a
    storage, like accelerate's safetensors path, would reduce to one expert)."""
    from accelerate import PartialState
    from accelerate.utils.other import clean_state_dict_for_safetensors
    from safetensors.torch import load_file, save_file

    PartialState(cpu=True)  # accelerate's logging (it warns about the tied embeddings) needs its state
    model = tiny_switch()
    fast = optimize(copy.deepcopy(model))
    cleaned = clean_state_dict_for_safetensors(fast.state_dict())
    save_file(cleaned, str(tmp_path / "model.safetensors"))
    reloaded = load_file(str(tmp_path / "model.safetensors"))
    want = model.state_dict()
    assert set(reloaded) >= {k for k in want if ".experts." in k}
    for k, v in reloaded.items():
        assert torch.equal(v, want[k]), k


def test_optimized_switch_loads_transformers_state_dicts():
    fast = optimize(tiny_switch(seed=0))
    other = tiny_switch(seed=1)
    inputs = switch_inputs()
    result = fast.load_state_dict(other.state_dict())  # strict
    assert not result.missing_keys and not result.unexpected_keys
    with torch.no_grad():
        assert max_diff(fast(**inputs).logits, other(**inputs).logits) <= ATOL
    assert isinstance(moe_layers(fast)[0].module, SwitchMoE)
    fresh = optimize(tiny_switch(seed=2))
    fresh.load_state_dict(other.state_dict(), assign=True)
    with torch.no_grad():
        assert max_diff(fresh(**inputs).logits, other(**inputs).logits) <= ATOL
    partial = {k: v for k, v in other.state_dict().items() if "expert_5" not in k}
    result = optimize(tiny_switch(seed=2)).load_state_dict(partial, strict=False)
    assert sorted(result.missing_keys) == sorted(k for k in other.state_dict() if "expert_5" in k)
    assert not result.unexpected_keys
    with pytest.raises(RuntimeError, match="expert_5"):
        optimize(tiny_switch(seed=2)).load_state_dict(partial)


def test_merged_switch_state_dict_loads_into_transformers_as_the_expanded_model():
    """A merged Switch's state dict names every expert as transformers does (each one its slot's weights):
    transformers loads the model it computes, never fresh random experts."""
    merged, expanded = merge_by_hand(tiny_switch(expert_capacity=3), [0, 1, 2, 0, 1, 2, 0, 1])
    optimize(merged)
    state = merged.state_dict()
    assert list(state) == list(expanded.state_dict())
    loaded = SwitchTransformersForConditionalGeneration.from_pretrained(None, config=expanded.config, state_dict=state)
    inputs = switch_inputs(seed=3)
    with torch.no_grad():
        want = merged(**inputs).logits
        assert max_diff(loaded.eval()(**inputs).logits, want) <= ATOL
        assert max_diff(expanded(**inputs).logits, want) <= ATOL
    again = copy.deepcopy(merged)  # and back into a merged model: the slots are rebuilt from their members
    with torch.no_grad():
        for p in again.parameters():
            p.zero_()
    again.load_state_dict(state)
    with torch.no_grad():
        assert max_diff(again(**inputs).logits, want) <= ATOL
    assert moe_layers(again)[0].module.experts.num_slots == 3


def test_merged_switch_refuses_experts_that_disagree_on_a_slot():
    merged, _ = merge_by_hand(tiny_switch(), [0, 1, 2, 0, 1, 2, 0, 1])
    optimize(merged)
    with pytest.raises(RuntimeError, match="share slot"):
        merged.load_state_dict(tiny_switch(seed=1).state_dict())  # an unmerged model's experts differ


def test_merged_checkpoint_keeps_its_slot_format(tmp_path):
    from safetensors import safe_open

    from mcsmoe_fast import from_pretrained, save_pretrained

    merged, _ = merge_by_hand(tiny_switch(), [0, 1, 2, 0, 1, 2, 0, 1])
    optimize(merged)
    path = save_pretrained(merged, tmp_path / "merged")
    with safe_open(str(path / "mcsmoe_model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "encoder.block.1.layer.1.mlp.experts.w_in" in keys and not any("expert_0.wi" in k for k in keys)
    loaded = from_pretrained(path)
    inputs = switch_inputs()
    with torch.no_grad():
        assert max_diff(loaded(**inputs).logits, merged(**inputs).logits) <= ATOL


# --- Switch: transformers' expert dropout in training mode ------------------------------------------
def sparse_blocks(model):
    return [layer.module for layer in moe_layers(model)]


@pytest.mark.parametrize("merged", [False, True])
def test_switch_dropout_one_zeroes_the_experts_like_transformers(merged):
    model = switch_with_dropout(1.0)
    if merged:
        fast, model = merge_by_hand(model, [0, 1, 2, 0, 1, 2, 0, 1])
        optimize(fast)
    else:
        fast = optimize(copy.deepcopy(model))
    hidden = torch.randn(2, 10, 32, generator=torch.Generator().manual_seed(0))
    for ref, ours in zip(sparse_blocks(model.train()), sparse_blocks(fast.train())):
        torch.manual_seed(1)
        want = ref(hidden.clone())  # clones: the router's jitter scales its input in place
        torch.manual_seed(1)
        got = ours(hidden.clone())
        assert want.abs().max() == 0 and max_diff(got, want) == 0


@pytest.mark.parametrize("merged", [False, True])
def test_switch_dropout_in_training_mode_equals_transformers(merged):
    """Same seed, same masks: the optimized model in train mode draws transformers' per-expert dropout
    (between wi's activation and wo, experts in transformers' order) and its other dropouts identically."""
    model = switch_with_dropout(0.5, expert_capacity=3)
    if merged:
        fast, model = merge_by_hand(model, [0, 1, 2, 0, 1, 2, 0, 1])
        optimize(fast)
    else:
        fast = optimize(copy.deepcopy(model))
    inputs = switch_inputs()
    model.train(), fast.train()
    torch.manual_seed(3)
    want = model(**inputs).logits
    torch.manual_seed(3)
    got = fast(**inputs).logits
    assert max_diff(got, want) <= ATOL
    got.sum().backward()
    assert sparse_blocks(fast)[0].experts.w_in.grad.abs().sum() > 0
    fast.eval()  # no dropout in eval: the fused path, equal to transformers' eval outputs
    with torch.no_grad():
        assert max_diff(fast(**inputs).logits, model.eval()(**inputs).logits) <= ATOL


def test_compressed_switch_draws_the_same_expert_dropout():
    """Compressed slots (full rank, every row kept: the merged model's function) in training mode: the same
    per-expert dropout masks as transformers' model holding each expert's slot weights."""
    from mcsmoe_fast import compress_experts

    merged, expanded = merge_by_hand(switch_with_dropout(0.5), [0, 1, 2, 0, 1, 2, 0, 1])
    compress_experts(merged, rank=10_000, keep_ratio=1.0, progress=False)
    inputs = switch_inputs()
    merged.train(), expanded.train()
    torch.manual_seed(5)
    want = expanded(**inputs).logits
    torch.manual_seed(5)
    got = merged(**inputs).logits
    assert max_diff(got, want) <= 1e-4


def test_switch_dropout_is_applied_inside_the_experts():
    model = switch_with_dropout(0.5)
    fast = optimize(copy.deepcopy(model))
    block = sparse_blocks(fast)[0]
    hidden = torch.randn(2, 10, 32, generator=torch.Generator().manual_seed(0))
    run = lambda: block(hidden.clone())  # noqa: E731  (the router's jitter, as transformers', scales its input in place)
    with torch.no_grad():
        block.eval()
        plain = run()
        block.train()
        torch.manual_seed(0)
        dropped = run()
        torch.manual_seed(1)
        other = run()
    assert max_diff(dropped, plain) > 1e-3 and max_diff(dropped, other) > 1e-3
    block.expert_dropout.p = 0.0  # no dropout (and no router jitter): training mode equals eval
    block.router.jitter_noise = 0.0
    with torch.no_grad():
        assert max_diff(run(), plain) <= ATOL


# --- Switch on the meta device --------------------------------------------------------------------
def test_optimize_a_meta_switch_model():
    with torch.device("meta"):
        model = tiny_switch(num_experts=8, d_model=32, d_ff=64)
    names = list(model.state_dict())
    optimize(model)
    blocks = sparse_blocks(model)
    assert blocks and all(isinstance(b, SwitchMoE) for b in blocks)
    for block in blocks:
        experts = block.experts
        assert experts.w_in.is_meta and experts.w_out.is_meta and experts.expert_map.is_meta
        assert experts.w_in.shape == (8, 64, 32) and experts.w_out.shape == (8, 32, 64)
        assert experts.expert_map.shape == (8,) and block.router.classifier.weight.is_meta
    assert list(model.state_dict()) == names
    with torch.no_grad():  # and transformers' weights load into it (assign: the usual meta-device pattern)
        plain = tiny_switch(num_experts=8, d_model=32, d_ff=64)
        model.load_state_dict(plain.state_dict(), assign=True)
        model.tie_weights()
        inputs = switch_inputs()
        assert max_diff(model.eval()(**inputs).logits, plain(**inputs).logits) <= ATOL
