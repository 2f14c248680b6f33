"""merge_experts: merged weights equal a plain permute-then-average computation, forward semantics are
"each expert replaced by its group's merged weights", identity cases, drop baseline, layer selection."""
import copy

import pytest
import torch
import torch.nn.functional as F

from mcsmoe_fast import collect_routing_stats, merge_experts, moe_layers
from mcsmoe_fast.modules.masked_router import MaskedLinear, MaskedTopKRouter
from mcsmoe_fast.modules import MoEExperts
from mcsmoe_fast.reference import linear_assignment
from merge_helpers import build, calibration, forward

FAMILIES = ["switch", "mixtral"]


def setup(family, tmp_path, **kwargs):
    model = build(family, tmp_path, **kwargs)
    batches = calibration(model)
    return model, batches, collect_routing_stats(model, batches, progress=False)


def original_weights(model):
    return {layer.name: tuple(t.clone() for t in layer.expert_weights()) for layer in moe_layers(model)}


def plain_align(w_in, w_out, ref, target, activation):
    """Target expert's (w_in, w_out) with neurons reordered to match the reference (scipy LAP)."""
    ff = w_out.shape[-1]
    rows_r = [w_in[ref][:ff], w_in[ref][ff:]] if activation == "swiglu" else [w_in[ref]]
    rows_t = [w_in[target][:ff], w_in[target][ff:]] if activation == "swiglu" else [w_in[target]]
    cost = sum(a @ b.T for a, b in zip(rows_r, rows_t)) + w_out[ref].T @ w_out[target]
    perm = linear_assignment(cost, maximize=True)
    index = torch.cat([perm, perm + ff]) if activation == "swiglu" else perm
    return w_in[target][index], w_out[target][:, perm]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("permute", [True, False])
@pytest.mark.parametrize("strategy", ["frequency", "average"])
def test_merged_weights_match_plain_computation(family, permute, strategy, tmp_path):
    model, _, stats = setup(family, tmp_path)
    before = original_weights(model)
    groupings = merge_experts(model, stats, 3, globally=False, permute=permute, strategy=strategy, progress=False)
    for layer in moe_layers(model):
        g = groupings[layer.name]
        experts = layer.module.experts
        assert isinstance(experts, MoEExperts) and experts.num_slots == 3
        assert experts.expert_map.tolist() == g.expert_map
        w_in, w_out = before[layer.name]
        counts = stats[layer.name].counts
        for slot, group in enumerate(g.groups):
            weights = counts[group] / counts[group].sum() if strategy == "frequency" else torch.ones(len(group)) / len(group)
            assert g.weights[slot] == pytest.approx(weights.tolist())
            exp_in = torch.zeros_like(w_in[0], dtype=torch.float64)
            exp_out = torch.zeros_like(w_out[0], dtype=torch.float64)
            for e, w in zip(group, weights.tolist()):
                a, b = (plain_align(w_in, w_out, group[0], e, layer.activation) if permute and e != group[0]
                        else (w_in[e], w_out[e]))
                exp_in += w * a.double()
                exp_out += w * b.double()
            torch.testing.assert_close(experts.w_in[slot].double(), exp_in, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(experts.w_out[slot].double(), exp_out, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_forward_is_each_expert_replaced_by_its_group(family, tmp_path):
    model, batches, stats = setup(family, tmp_path)
    plain = copy.deepcopy(model)
    merge_experts(model, stats, 2, progress=False)
    for layer, plain_layer in zip(moe_layers(model), moe_layers(plain)):
        experts = layer.module.experts
        emap = experts.expert_map
        plain_layer.set_expert_weights(experts.w_in[emap], experts.w_out[emap])
    for batch in batches:
        torch.testing.assert_close(forward(model, batch), forward(plain, batch), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("permute", [True, False])
def test_identity_merge_equals_original(family, permute, tmp_path):
    model, batches, stats = setup(family, tmp_path)
    reference = [forward(model, b) for b in batches]
    before = original_weights(model)
    groupings = merge_experts(model, stats, 8, permute=permute, progress=False)
    for layer in moe_layers(model):
        g = groupings[layer.name]
        assert g.expert_map == list(range(8)) and g.groups == [[e] for e in range(8)]
        assert all(w == [1.0] for w in g.weights)
        assert torch.equal(layer.module.experts.w_in, before[layer.name][0])
        assert torch.equal(layer.module.experts.w_out, before[layer.name][1])
    for b, ref in zip(batches, reference):  # same weights; the fused expert kernel may round differently
        torch.testing.assert_close(forward(model, b), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_global_budget_and_invariants(family, tmp_path):
    model, _, stats = setup(family, tmp_path)
    groupings = merge_experts(model, stats, 2, globally=True, progress=False)
    assert sum(g.num_groups for g in groupings.values()) == 2 * len(groupings)
    for layer in moe_layers(model):
        g = groupings[layer.name]
        assert layer.module.experts.num_slots == g.num_groups >= 1
        freq = stats[layer.name].frequency
        for slot, group in enumerate(g.groups):
            assert sorted(group) == sorted(e for e in range(8) if g.expert_map[e] == slot)
            assert group[0] == g.dominant[slot] == max(group, key=lambda e: (freq[e].item(), -e))
            assert sum(g.weights[slot]) == pytest.approx(1.0)
    assert getattr(model.config, "mcsmoe_merge")["merges"][-1]["method"]["num_groups"] == 2


@pytest.mark.parametrize("family", FAMILIES)
def test_drop_masks_non_dominant_experts(family, tmp_path):
    model, batches, stats = setup(family, tmp_path)
    groupings = merge_experts(model, stats, 3, globally=False, strategy="drop", progress=False)
    hidden = torch.randn(2, 9, model.config.hidden_size if family == "mixtral" else model.config.d_model)
    for layer in moe_layers(model):
        g = groupings[layer.name]
        assert all(w[0] == 1.0 and sum(w) == 1.0 for w in g.weights)
        dropped = [e for e in range(8) if e not in g.dominant]
        with torch.no_grad():
            if family == "switch":  # the router's classifier returns -inf for dropped experts
                assert isinstance(layer.module.router.classifier, MaskedLinear)
                logits = layer.module.router.classifier(hidden)
                plain = hidden @ layer.router_weight().T
                assert torch.isinf(logits[..., dropped]).all() and (logits[..., dropped] < 0).all()
                kept = g.dominant
                torch.testing.assert_close(logits[..., kept], plain[..., kept])
                assert not torch.isin(logits.argmax(-1), torch.tensor(dropped)).any()
            else:
                assert isinstance(layer.module.gate, MaskedTopKRouter)
                _, weights, index = layer.module.gate(hidden)
                assert not torch.isin(index[weights > 0], torch.tensor(dropped)).any()
        slots = layer.module.experts
        w_in, _ = original_weights(build(family, tmp_path / "again"))[layer.name]
        assert torch.equal(slots.w_in, w_in[g.dominant])  # dominant experts kept as they were
    for b in batches:
        assert torch.isfinite(forward(model, b)).all()


def test_drop_with_every_expert_kept_equals_original(tmp_path):
    model, batches, stats = setup("switch", tmp_path)
    reference = [forward(model, b) for b in batches]
    merge_experts(model, stats, 8, strategy="drop", progress=False)
    for b, ref in zip(batches, reference):  # same weights; the fused expert kernel may round differently
        torch.testing.assert_close(forward(model, b), ref, rtol=1e-5, atol=1e-5)


def test_layer_selection_leaves_other_layers_alone(tmp_path):
    model, _, stats = setup("switch", tmp_path)
    names = [layer.name for layer in moe_layers(model)]
    groupings = merge_experts(model, stats, 2, layers=[names[1], 3], progress=False)
    assert list(groupings) == [names[1], names[3]]
    assert sum(g.num_groups for g in groupings.values()) == 4
    kinds = [type(layer.module.experts).__name__ for layer in moe_layers(model)]
    assert kinds[0] != "MoEExperts" and kinds[2] != "MoEExperts"
    assert kinds[1] == kinds[3] == "MoEExperts"
    with pytest.raises(ValueError, match="unknown MoE layers"):
        merge_experts(model, stats, 2, layers=["encoder.block.0"], progress=False)


def test_bad_arguments_are_rejected(tmp_path):
    model, _, stats = setup("mixtral", tmp_path)
    for kwargs, match in [(dict(similarity="cosine"), "similarity"), (dict(strategy="fisher"), "strategy"),
                          (dict(grouping="kmeans"), "grouping"), (dict(num_groups=0), "num_groups")]:
        args = dict(num_groups=2, progress=False) | kwargs
        with pytest.raises(ValueError, match=match):
            merge_experts(model, stats, **args)
    with pytest.raises(ValueError, match="no routing statistics"):
        merge_experts(model, {}, 2, progress=False)
    with pytest.raises(ValueError, match="expert-output"):
        merge_experts(model, stats, 2, similarity="expert-output", progress=False)


@pytest.mark.parametrize("similarity", ["router-weight", "weight", "feature", "expert-output", "random"])
def test_every_similarity_and_hierarchical_grouping_merge(similarity, tmp_path):
    model = build("mixtral", tmp_path)
    batches = calibration(model)
    stats = collect_routing_stats(model, batches, bases=("router-logits", "feature", "expert-output"), progress=False)
    for grouping in ("dominant", "hierarchical"):
        m = copy.deepcopy(model)
        groupings = merge_experts(m, stats, 3, similarity=similarity, grouping=grouping, progress=False)
        assert sum(g.num_groups for g in groupings.values()) == 3 * len(groupings)
        assert all(torch.isfinite(forward(m, b)).all() for b in batches)


def test_merging_a_merged_model_again(tmp_path):
    model, batches, stats = setup("mixtral", tmp_path)
    merge_experts(model, stats, 4, globally=False, progress=False)
    stats2 = collect_routing_stats(model, batches, bases=("router-logits", "expert-output"), progress=False)
    groupings = merge_experts(model, stats2, 2, globally=False, similarity="expert-output", progress=False)
    for layer in moe_layers(model):
        assert layer.module.experts.num_slots == 2 == groupings[layer.name].num_groups
    assert len(model.config.mcsmoe_merge["merges"]) == 2


def plain_cosine(vectors):
    """(cos + 1) / 2 between the rows of vectors, one pair at a time (zero rows: cosine 0)."""
    v = vectors.double().reshape(vectors.shape[0], -1)
    return torch.stack([(F.cosine_similarity(v[i : i + 1], v, dim=1) + 1) / 2 for i in range(v.shape[0])])


def plain_gram_cosine(gram):
    """(cos + 1) / 2 between the columns of the logit matrix, from its Gram matrix, entry by entry."""
    e = gram.shape[0]
    return torch.tensor([[(gram[i, j] / (gram[i, i] * gram[j, j]).sqrt() + 1).item() / 2 for j in range(e)]
                         for i in range(e)], dtype=torch.float64)


def spy_group_layer(monkeypatch):
    """Record every (layer name, frequency, similarity, num_groups) that merge_experts groups with."""
    import mcsmoe_fast.merge as merge_module

    calls = {}
    real = merge_module.group_layer

    def spy(name, frequency, similarity, num_groups, *args, **kwargs):
        calls[name] = (frequency.clone(), similarity.clone(), num_groups)
        return real(name, frequency, similarity, num_groups, *args, **kwargs)

    monkeypatch.setattr(merge_module, "group_layer", spy)
    return calls


@pytest.mark.parametrize("similarity", ["router-logits", "router-weight", "weight", "feature", "expert-output",
                                        "random"])
def test_each_similarity_basis_is_computed_from_the_right_data(similarity, tmp_path, monkeypatch):
    """The similarity matrix each layer is grouped with equals one computed by hand from that layer's own
    statistics (router-logits: Gram matrix; feature: mean routed input; expert-output: mean output over all
    tokens) or weights (router-weight: the gate; weight: every expert's w_in and w_out, before alignment)."""
    from mcsmoe_fast.grouping import layer_seed, random_similarity

    model = build("mixtral", tmp_path)
    batches = calibration(model)
    stats = collect_routing_stats(model, batches, bases=("router-logits", "feature", "expert-output"), progress=False)
    before = original_weights(model)
    routers = {layer.name: layer.router_weight().detach().clone() for layer in moe_layers(model)}
    calls = spy_group_layer(monkeypatch)
    merge_experts(model, stats, 3, similarity=similarity, globally=False, seed=5, progress=False)
    assert list(calls) == list(stats)
    for name, (frequency, sim, num_groups) in calls.items():
        s = stats[name]
        if similarity == "router-logits":
            expected = plain_gram_cosine(s.logit_gram)
        elif similarity == "feature":
            expected = plain_cosine(s.feature_sum / s.counts.clamp_min(1).unsqueeze(1))
        elif similarity == "expert-output":
            expected = plain_cosine(s.output_sum / s.tokens)
        elif similarity == "router-weight":
            expected = plain_cosine(routers[name])
        elif similarity == "weight":
            w_in, w_out = before[name]
            expected = plain_cosine(torch.cat([w_in.flatten(1), w_out.flatten(1)], 1))
        else:
            expected = random_similarity(8, seed=layer_seed(5, name))
            assert not torch.equal(expected, random_similarity(8, seed=layer_seed(0, name)))
        torch.testing.assert_close(sim.double(), expected, rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(frequency.double(), s.counts / s.counts.sum())
        assert num_groups == 3
    if similarity in ("router-logits", "feature", "expert-output"):  # each layer its own statistics
        names = list(calls)
        assert not torch.allclose(calls[names[0]][1], calls[names[1]][1])


def test_weight_similarity_of_a_merged_model_compares_every_original_expert(tmp_path, monkeypatch):
    """A merged layer stores G slots; the weight basis still compares E experts, each with its slot's
    weights (experts sharing a slot are identical: similarity 1)."""
    model, _, stats = setup("mixtral", tmp_path)
    merge_experts(model, stats, 4, globally=False, permute=False, progress=False)
    slots = {layer.name: (layer.module.experts.w_in.detach().clone(), layer.module.experts.w_out.detach().clone(),
                          layer.module.experts.expert_map.clone()) for layer in moe_layers(model)}
    calls = spy_group_layer(monkeypatch)
    merge_experts(model, stats, 2, similarity="weight", globally=False, progress=False)
    for name, (_, sim, _) in calls.items():
        w_in, w_out, emap = slots[name]
        expected = plain_cosine(torch.cat([w_in[emap].flatten(1), w_out[emap].flatten(1)], 1))
        assert sim.shape == (8, 8)
        torch.testing.assert_close(sim.double(), expected, rtol=1e-6, atol=1e-9)
        same = emap[:, None] == emap[None, :]
        torch.testing.assert_close(sim[same].double(), torch.ones(int(same.sum()), dtype=torch.float64))


def test_random_similarity_differs_per_layer_and_is_reproducible(tmp_path, monkeypatch):
    import mcsmoe_fast.merge as merge_module

    seen = []
    real = merge_module.similarity_matrix
    monkeypatch.setattr(merge_module, "similarity_matrix", lambda *a, **k: seen.append(real(*a, **k)) or seen[-1])
    for seed in (0, 0, 1):
        model, _, stats = setup("mixtral", tmp_path / str(len(seen)), num_layers=3)
        merge_experts(model, stats, num_groups=2, similarity="random", seed=seed, progress=False)
    first, again, other = seen[:3], seen[3:6], seen[6:]
    assert not torch.equal(first[0], first[1]) and not torch.equal(first[1], first[2]), "one matrix for every layer"
    assert all(torch.equal(a, b) for a, b in zip(first, again)), "the same seed must draw the same matrices"
    assert not any(torch.equal(a, b) for a, b in zip(first, other)), "another seed must draw other matrices"
