"""The `drop` baseline (drop.py): a pruned model equals transformers' own model whose dropped experts can
never be chosen, and the masking modules behave as documented (errors, re-installation, no mask)."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mcsmoe_fast import collect_routing_stats, from_pretrained, merge_experts, moe_layers, optimize, save_pretrained
from mcsmoe_fast.drop import install_logit_mask, logit_mask
from mcsmoe_fast.modules.masked_router import SOFTMAX_TOP_K_ROUTERS, MaskedLinear, MaskedTopKRouter, mask_top_k_router
from mcsmoe_fast.models.hub import load_model
from merge_helpers import build, calibration, forward


GATE_FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe"]  # softmax top-k gates


def hf_router_never_choosing(gate, dropped):
    """transformers' MixtralTopKRouter.forward (and Qwen2/3-MoE's, OLMoE's), written out (transformers 5.x
    modeling_*.py), with the logits of the dropped experts set to -inf before the softmax and the top-k:
    softmax in float32 over all experts, top-k of the probabilities, the top-k weights divided by their
    sum (Mixtral always, the others when norm_topk_prob) and, but for Mixtral, cast to the logits' dtype."""
    dropped = torch.as_tensor(dropped, dtype=torch.int64)
    mixtral = type(gate).__name__ == "MixtralTopKRouter"

    def forward(hidden_states):
        hidden_states = hidden_states.reshape(-1, gate.hidden_dim)
        router_logits = F.linear(hidden_states, gate.weight)
        router_logits[:, dropped] = float("-inf")
        router_probs = torch.nn.functional.softmax(router_logits.float(), dim=-1)
        router_top_value, router_indices = torch.topk(router_probs, gate.top_k, dim=-1)
        if mixtral or gate.norm_topk_prob:
            router_top_value /= router_top_value.sum(dim=-1, keepdim=True)
        if not mixtral:
            router_top_value = router_top_value.to(router_logits.dtype)
        return router_logits, router_top_value, router_indices

    return forward


@pytest.mark.parametrize("family", GATE_FAMILIES)
@pytest.mark.parametrize("norm_topk_prob", [False, True])
def test_hand_written_reference_router_is_transformers_router_when_nothing_is_dropped(family, norm_topk_prob,
                                                                                      tmp_path):
    """The reference below is only as good as its copy of transformers' router: with no expert dropped
    it must give exactly what transformers' own gate gives."""
    model = build(family, tmp_path, **({} if family == "mixtral" else {"norm_topk_prob": norm_topk_prob}))
    gate = moe_layers(model)[0].module.gate
    hidden = torch.randn(2, 7, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        theirs = gate(hidden)
        ours = hf_router_never_choosing(gate, [])(hidden)
    for a, b in zip(theirs, ours):
        assert torch.equal(a, b)


@pytest.mark.parametrize("family", GATE_FAMILIES)
@pytest.mark.parametrize("num_groups", [3, 1])  # 1 < top_k = 2: the second pick has weight 0
def test_pruned_model_equals_transformers_with_dropped_experts_never_chosen(family, num_groups, tmp_path):
    normalised = family == "mixtral" or num_groups == 1  # Qwen / OLMoE: both settings of norm_topk_prob
    model = build(family, tmp_path, **({} if family == "mixtral" else {"norm_topk_prob": normalised}))
    batches = calibration(model, batches=3)
    stats = collect_routing_stats(model, batches, progress=False)
    groupings = merge_experts(model, stats, num_groups, globally=False, strategy="drop", progress=False)

    reference = load_model(str(tmp_path / f"{family}-base"))  # transformers' model, original weights
    for layer in moe_layers(reference):
        assert type(layer.module.gate).__name__ in SOFTMAX_TOP_K_ROUTERS
        dropped = [e for e in range(layer.num_experts) if e not in groupings[layer.name].dominant]
        assert len(dropped) == layer.num_experts - num_groups
        layer.module.gate.forward = hf_router_never_choosing(layer.module.gate, dropped)

    for layer, ref_layer in zip(moe_layers(model), moe_layers(reference)):  # the router's weights directly
        hidden = torch.randn(13, model.config.hidden_size, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            logits, weights, index = layer.module.gate(hidden)
            ref_logits, ref_weights, ref_index = ref_layer.module.gate(hidden)
        assert torch.equal(logits, ref_logits)
        kept = weights > 0
        assert torch.equal(kept, ref_weights > 0)
        assert torch.equal(index[kept], ref_index[kept])  # zero-weight fillers may be any dropped expert
        torch.testing.assert_close(weights, ref_weights)
        if normalised:
            torch.testing.assert_close(weights.sum(-1), torch.ones(13))  # renormalised over the top-k

    expected = [forward(reference, b) for b in batches]
    for b, ref in zip(batches, expected):
        torch.testing.assert_close(forward(model, b), ref, rtol=1e-5, atol=1e-5)
    # saved, loaded back and run through the fused modules: still transformers' pruned model
    fast = optimize(from_pretrained(save_pretrained(model, tmp_path / "pruned")))
    for b, ref in zip(batches, expected):
        torch.testing.assert_close(forward(fast, b), ref, rtol=1e-5, atol=1e-5)


def test_pruned_switch_equals_transformers_with_dropped_logits_at_minus_infinity(tmp_path):
    model = build("switch", tmp_path)
    batches = calibration(model)
    stats = collect_routing_stats(model, batches, progress=False)
    groupings = merge_experts(model, stats, 3, globally=False, strategy="drop", progress=False)
    reference = load_model(str(tmp_path / "switch-base"))
    for layer in moe_layers(reference):
        dropped = [e for e in range(layer.num_experts) if e not in groupings[layer.name].dominant]
        classifier = layer.module.router.classifier

        def masked(x, classifier=classifier, dropped=dropped):
            logits = F.linear(x, classifier.weight)
            logits[..., dropped] = float("-inf")
            return logits

        classifier.forward = masked
    for b in batches:
        torch.testing.assert_close(forward(model, b), forward(reference, b), rtol=1e-5, atol=1e-5)


# --- the masking modules -------------------------------------------------------------------------
def test_masked_topk_router_by_hand():
    gate = nn.Module()
    gate.weight = nn.Parameter(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.0]]))
    gate.top_k = 2
    router = mask_top_k_router(gate, torch.tensor([True, False, True, True]))
    assert router is gate and isinstance(router, MaskedTopKRouter)
    x = torch.tensor([[[2.0, 1.0]]])  # logits 2, 1, 3, -2; expert 1 masked
    logits, weights, index = router(x)
    assert logits.shape == (1, 4) and logits[0, 1] == float("-inf")
    assert logits[0, [0, 2, 3]].tolist() == [2.0, 3.0, -2.0]
    assert index.tolist() == [[2, 0]]
    e = torch.tensor([3.0, 2.0]).exp()
    torch.testing.assert_close(weights, (e / e.sum()).unsqueeze(0))  # renormalised over the kept top-2
    only = mask_top_k_router(gate, torch.tensor([False, False, False, True]))  # fewer kept than top_k
    _, weights, index = only(x)
    assert index[0, 0] == 3 and weights.tolist() == [[1.0, 0.0]]


def test_masked_linear_keeps_bias_and_masks():
    linear = nn.Linear(3, 4)
    masked = MaskedLinear(linear, [True, True, False, True])
    assert masked.weight is linear.weight and masked.bias is linear.bias
    x = torch.randn(5, 3)
    out = masked(x)
    plain = linear(x)
    assert torch.isneginf(out[:, 2]).all()
    assert torch.equal(out[:, [0, 1, 3]], plain[:, [0, 1, 3]])
    assert masked.keep.dtype == torch.bool and masked.keep.tolist() == [True, True, False, True]


@pytest.mark.parametrize("family", ["switch", "mixtral"])
def test_install_logit_mask_reinstalls_in_place_and_rejects_bad_masks(family, tmp_path):
    model = build(family, tmp_path)
    layer = moe_layers(model)[0]
    assert logit_mask(layer) is None
    with pytest.raises(ValueError, match=r"keep must be \[8\] booleans"):
        install_logit_mask(layer, [True] * 7)
    with pytest.raises(ValueError, match="at least one True"):
        install_logit_mask(layer, [False] * 8)
    assert logit_mask(layer) is None  # a refused mask installs nothing
    install_logit_mask(layer, [e % 2 == 0 for e in range(8)])
    owner = layer.module.router.classifier if family == "switch" else layer.module.gate
    assert isinstance(owner, MaskedLinear if family == "switch" else MaskedTopKRouter)
    assert logit_mask(layer).tolist() == [e % 2 == 0 for e in range(8)]
    install_logit_mask(layer, [e < 3 for e in range(8)])  # a second mask replaces the first, same module
    again = layer.module.router.classifier if family == "switch" else layer.module.gate
    assert again is owner
    assert logit_mask(layer).tolist() == [e < 3 for e in range(8)]
    hidden = torch.randn(4, 6, layer.hidden_size)
    with torch.no_grad():
        logits = owner(hidden) if family == "switch" else owner(hidden)[0]
    assert torch.isneginf(logits[..., 3:]).all() and torch.isfinite(logits[..., :3]).all()
    assert logit_mask(moe_layers(model)[1]) is None  # other layers untouched


def test_masks_are_bool_buffers_on_the_router_device():
    """keep given as 0/1 numbers becomes a bool mask (`~keep` of integers would be -1/-2, no mask at all);
    the mask lives on the router's device (a CPU mask from a checkpoint next to a model on another device;
    the meta device stands in for a GPU here)."""
    linear = nn.Linear(3, 4)
    masked = MaskedLinear(linear, [1, 1, 0, 1])
    assert masked.keep.dtype == torch.bool
    out = masked(torch.randn(5, 3))
    assert torch.isneginf(out[:, 2]).all() and torch.isfinite(out[:, [0, 1, 3]]).all()
    gate = nn.Module()
    gate.weight = nn.Parameter(torch.randn(4, 3))
    gate.top_k = 2
    router = mask_top_k_router(gate, torch.tensor([1, 0, 1, 1], dtype=torch.uint8))
    assert router.keep.dtype == torch.bool
    logits, _, index = router(torch.randn(5, 3))
    assert torch.isneginf(logits[:, 1]).all() and not (index == 1).any()
    meta_linear = nn.Linear(3, 4, device="meta")
    assert MaskedLinear(meta_linear, torch.ones(4, dtype=torch.bool)).keep.device.type == "meta"
    meta_gate = nn.Module()
    meta_gate.weight = nn.Parameter(torch.empty(4, 3, device="meta"))
    meta_gate.top_k = 2
    assert mask_top_k_router(meta_gate, torch.ones(4, dtype=torch.bool)).keep.device.type == "meta"
