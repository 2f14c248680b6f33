"""Routing statistics: streaming accumulators equal a plain computation over all stored tokens."""
import pytest
import torch
import torch.nn.functional as F

from mcsmoe_fast import collect_routing_stats, moe_layers
from merge_helpers import build, calibration


def stored_layer_inputs(model, batches):
    """Plain reference: every MoE layer's full input per batch, kept in memory, with its token mask."""
    layers = moe_layers(model)
    store = {layer.name: [] for layer in layers}
    handles = []
    for layer in layers:
        def hook(module, args, name=layer.name):
            store[name].append(args[0].detach().clone())
        handles.append(layer.module.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            for b in batches:
                inputs = dict(b)
                if model.config.is_encoder_decoder and "decoder_input_ids" not in inputs:
                    inputs["decoder_input_ids"] = model._shift_right(inputs["input_ids"])
                model(**inputs)
    finally:
        for h in handles:
            h.remove()
    return layers, store


def plain_expert(layer, e, x):
    """Expert e of an unmerged HF block on tokens x [T, d], straight from the HF modules."""
    experts = layer.module.experts
    if layer.activation == "relu":
        return experts[f"expert_{e}"].wo(F.relu(experts[f"expert_{e}"].wi(x)))
    gate, up = F.linear(x, experts.gate_up_proj[e]).chunk(2, dim=-1)
    return F.linear(F.silu(gate) * up, experts.down_proj[e])


@pytest.mark.parametrize("family", ["switch", "mixtral"])
def test_stats_match_plain_computation(family, tmp_path):
    model = build(family, tmp_path)
    batches = calibration(model, batches=3)
    for b in batches:  # decoder masks differ from encoder masks, to see each side uses its own
        b["decoder_attention_mask"] = torch.ones_like(b["attention_mask"])
        b["decoder_attention_mask"][1, -3:] = 0
    stats = collect_routing_stats(model, batches, bases=("router-logits", "feature", "expert-output"), progress=False)
    layers, store = stored_layer_inputs(model, batches)
    assert list(stats) == [layer.name for layer in layers]
    for layer in layers:
        decoder = layer.name.startswith("decoder.")
        key = "decoder_attention_mask" if decoder else "attention_mask"
        x = torch.cat([h[b[key].bool()] for h, b in zip(store[layer.name], batches)]).double()
        w = layer.router_weight().double()
        logits = x @ w.T
        top = logits.topk(layer.top_k, dim=-1).indices
        counts = torch.zeros(layer.num_experts, dtype=torch.float64)
        feature = torch.zeros(layer.num_experts, x.shape[1], dtype=torch.float64)
        for t in range(x.shape[0]):
            for e in top[t].tolist():
                counts[e] += 1
                feature[e] += x[t]
        outputs = torch.stack([plain_expert(layer, e, x.float()).double().mean(0) for e in range(layer.num_experts)])
        s = stats[layer.name]
        assert s.tokens == x.shape[0]
        assert torch.equal(s.counts, counts)
        torch.testing.assert_close(s.frequency, counts / counts.sum())
        torch.testing.assert_close(s.logit_gram, logits.T @ logits, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(s.feature_sum, feature, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(s.mean_output, outputs, rtol=1e-4, atol=1e-5)


def test_padding_and_decoder_tokens_counted_as_documented(tmp_path):
    model = build("switch", tmp_path)
    batches = calibration(model, batches=1, batch=2, length=8)  # sequence 0: 4 real tokens, sequence 1: 8
    stats = collect_routing_stats(model, batches, progress=False)
    for name, s in stats.items():
        # encoder: padding excluded; decoder: no decoder mask given -> the input mask is reused
        assert s.tokens == 12, name
        assert s.counts.sum() == 12
    batches[0]["decoder_input_ids"] = batches[0]["input_ids"][:, :5]  # decoder inputs given, no decoder mask
    stats = collect_routing_stats(model, batches, progress=False)
    for name, s in stats.items():
        assert s.tokens == (10 if name.startswith("decoder.") else 12), name


def test_mixtral_top_k_selections_counted(tmp_path):
    model = build("mixtral", tmp_path)
    batches = calibration(model, batches=1, batch=2, length=6, pad=False)
    stats = collect_routing_stats(model, batches, progress=False)
    for s in stats.values():
        assert s.tokens == 12 and s.counts.sum() == 12 * 2
        assert torch.isclose(s.frequency.sum(), torch.tensor(1.0, dtype=torch.float64))


@pytest.mark.parametrize("family", ["switch", "mixtral"])
def test_streaming_equals_one_pass_and_memory_is_fixed(family, tmp_path):
    model = build(family, tmp_path)
    batches = calibration(model, batches=4, pad=False)
    joined = [{k: torch.cat([b[k] for b in batches]) for k in batches[0]}]
    many = collect_routing_stats(model, batches, bases=("router-logits", "expert-output"), progress=False)
    once = collect_routing_stats(model, joined, bases=("router-logits", "expert-output"), progress=False)
    few = collect_routing_stats(model, batches[:1], bases=("router-logits", "expert-output"), progress=False)
    for name in many:
        a, b, c = many[name], once[name], few[name]
        assert torch.equal(a.counts, b.counts)
        # float32 forward passes over different batch shapes: equal up to rounding
        torch.testing.assert_close(a.logit_gram, b.logit_gram, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(a.output_sum, b.output_sum, rtol=1e-4, atol=1e-4)
        for field in ("counts", "logit_gram", "feature_sum", "output_sum"):  # sizes do not depend on tokens
            assert getattr(a, field).shape == getattr(c, field).shape


def test_expert_output_only_on_request_and_bad_arguments(tmp_path):
    model = build("mixtral", tmp_path)
    batches = calibration(model, batches=1)
    stats = collect_routing_stats(model, batches, progress=False)
    s = next(iter(stats.values()))
    assert s.output_sum is None
    with pytest.raises(ValueError, match="expert-output"):
        s.mean_output
    with pytest.raises(ValueError, match="bases"):
        collect_routing_stats(model, batches, bases=("router-logitz",), progress=False)
    with pytest.raises(ValueError, match="no calibration batch"):
        collect_routing_stats(model, [], progress=False)
    with pytest.raises(ValueError, match="dicts"):
        collect_routing_stats(model, [batches[0]["input_ids"]], progress=False)


def test_never_routed_expert_and_empty_layer():
    from mcsmoe_fast.calibrate import LayerStats

    s = LayerStats(name="l", num_experts=3, top_k=1, tokens=4, counts=torch.tensor([3.0, 0.0, 1.0], dtype=torch.float64),
                   logit_gram=torch.eye(3, dtype=torch.float64),
                   feature_sum=torch.tensor([[3.0, 6.0], [0.0, 0.0], [1.0, 1.0]], dtype=torch.float64))
    assert s.frequency.tolist() == [0.75, 0.0, 0.25]
    assert s.mean_feature.tolist() == [[1.0, 2.0], [0.0, 0.0], [1.0, 1.0]]
    empty = LayerStats(name="e", num_experts=2, top_k=1, tokens=0, counts=torch.zeros(2, dtype=torch.float64),
                       logit_gram=torch.zeros(2, 2, dtype=torch.float64), feature_sum=torch.zeros(2, 2, dtype=torch.float64))
    assert empty.frequency.tolist() == [0.0, 0.0]
    assert empty.summary()["usage_frequency"] == [0.0, 0.0]


def test_statistics_of_a_drop_pruned_model_never_count_masked_experts(tmp_path):
    from mcsmoe_fast import merge_experts

    for family in ("switch", "mixtral"):
        model = build(family, tmp_path / family)
        batches = calibration(model)
        groupings = merge_experts(model, collect_routing_stats(model, batches, progress=False), 3, globally=False,
                                  strategy="drop", progress=False)
        stats = collect_routing_stats(model, batches, progress=False)
        for name, s in stats.items():
            dropped = [e for e in range(s.num_experts) if e not in groupings[name].dominant]
            assert s.counts[dropped].sum() == 0
            assert torch.isfinite(s.logit_gram).all()


@pytest.mark.parametrize("top_k,kept", [(2, 1), (3, 2)])
def test_fewer_kept_experts_than_top_k_counts_only_kept_selections(top_k, kept, tmp_path):
    """A Mixtral layer pruned to fewer experts than top_k: the top-k is filled with masked experts at
    weight 0; those fillers are no selection (counts, frequency, routed inputs) and their logits are 0
    in the Gram matrix. Checked against a plain computation over the stored layer inputs."""
    from mcsmoe_fast import merge_experts

    model = build("mixtral", tmp_path, top_k=top_k)
    batches = calibration(model)
    groupings = merge_experts(model, collect_routing_stats(model, batches, progress=False), kept, globally=False,
                              strategy="drop", progress=False)
    stats = collect_routing_stats(model, batches, progress=False)
    layers, store = stored_layer_inputs(model, batches)
    for layer in layers:
        s, g = stats[layer.name], groupings[layer.name]
        x = torch.cat([h[b["attention_mask"].bool()] for h, b in zip(store[layer.name], batches)]).double()
        keep = torch.zeros(layer.num_experts, dtype=torch.bool)
        keep[g.dominant] = True
        logits = x @ layer.router_weight().double().T
        top = logits.masked_fill(~keep, float("-inf")).topk(kept, dim=-1).indices  # every kept expert
        counts = torch.bincount(top.flatten(), minlength=layer.num_experts).double()
        feature = torch.zeros(layer.num_experts, x.shape[1], dtype=torch.float64).index_add_(
            0, top.flatten(), x.repeat_interleave(kept, 0))
        masked = logits * keep  # masked experts' logits count as 0
        assert s.tokens == x.shape[0]
        assert torch.equal(s.counts, counts) and s.counts.sum() == kept * x.shape[0]
        assert torch.equal(s.counts[~keep], torch.zeros(int((~keep).sum()), dtype=torch.float64))
        torch.testing.assert_close(s.frequency, counts / counts.sum())
        torch.testing.assert_close(s.feature_sum, feature, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(s.logit_gram, masked.T @ masked, rtol=1e-5, atol=1e-5)
