"""REAM-style merging (grouping.capped_groups, ream.py): the groups against a transcription of REAM's
pseudo-grouping, the centroids, saliency merge weights, the centroid's router row in the standard
checkpoint (loaded by vanilla transformers), every option's effect, and refusals."""
import copy

import pytest
import torch

from mcsmoe_fast import collect_routing_stats, moe_layers
from mcsmoe_fast.checkpoint import save_pretrained, to_standard
from mcsmoe_fast.grouping import capped_groups, ream_scores, similarity_matrix
from mcsmoe_fast.merge import merge_experts
from mcsmoe_fast.models import expert_weights_per_expert
from mcsmoe_fast.ream import ream_experts
from merge_helpers import build, calibration, forward
from test_reap import vanilla_logits


def pseudo_group_by_definition(saliency, similarity, k, group_size):
    """REAM's grouping as the paper writes it: the k most salient experts are centroids; from the most
    salient centroid on, each centroid collects its closest (distance 1 - similarity) unassigned experts
    until its group has group_size experts; group_size 0: every expert joins its closest centroid.
    Returns {centroid: sorted members}."""
    n = len(saliency)
    distance = 1 - similarity
    centroids = sorted(range(n), key=lambda i: -float(saliency[i]))[:k]
    label = {c: c for c in centroids}
    if group_size == 0:
        for j in range(n):
            if j not in label:
                label[j] = min(centroids, key=lambda c: float(distance[c, j]))
    else:
        for c in centroids:
            group = [c]
            for j in sorted(range(n), key=lambda j: float(distance[c, j])):
                if j != c and j not in label:
                    group.append(j)
                    label[j] = c
                if len(group) >= group_size:
                    break
            if len(label) == n:
                break
    groups = {}
    for j, c in label.items():
        groups.setdefault(c, []).append(j)
    return {c: sorted(m) for c, m in groups.items()}


def as_groups(leader):
    groups = {}
    for j, c in enumerate(leader):
        groups.setdefault(c, []).append(j)
    return groups


@pytest.mark.parametrize("n,k,cap", [(8, 4, 2), (8, 3, 3), (12, 4, 5), (16, 4, 4), (10, 3, None)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_capped_groups_match_ream(n, k, cap, seed):
    g = torch.Generator().manual_seed(seed)
    saliency = torch.rand(n, generator=g, dtype=torch.float64)
    sim = torch.rand(n, n, generator=g, dtype=torch.float64)
    sim = (sim + sim.T) / 2
    sim.fill_diagonal_(1.0)
    ours = as_groups(capped_groups(sim, saliency, k, cap))
    assert ours == pseudo_group_by_definition(saliency, sim, k, cap or 0)
    assert all(len(m) <= (cap or n) for m in ours.values())


def test_capped_groups_ties_and_refusals():
    sim = torch.full((4, 4), 0.5, dtype=torch.float64)
    assert capped_groups(sim, torch.tensor([1.0, 1.0, 0.5, 0.5]), 2, 2) == [0, 1, 0, 1]  # ties: lower index
    with pytest.raises(ValueError, match="max_group_size=2: 2 groups of at most 2 experts cannot hold all 5"):
        capped_groups(torch.eye(5), torch.ones(5), 2, 2)
    with pytest.raises(ValueError, match="max_group_size must be a positive int"):
        capped_groups(sim, torch.ones(4), 2, 0)
    scores = ream_scores(torch.tensor([0.0, 2.0, 0.5, 0.0]))  # never routed: just below the least salient routed
    assert scores.tolist() == pytest.approx([0.5, 2.0, 0.5, 0.5], rel=1e-12) and scores[0] == scores[3] < scores[2]


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    path = tmp_path_factory.mktemp("ream")
    model = build("mixtral", path)
    batches = calibration(model, batches=3)
    stats = collect_routing_stats(model, batches, bases=("expert-output",), saliency="reap", progress=False)
    return path, batches, stats


def fresh(calibrated, name):
    path, _, _ = calibrated
    return build("mixtral", path / name)


def test_ream_groups_weights_and_router_rows(calibrated, tmp_path):
    _, batches, stats = calibrated
    model = fresh(calibrated, "a")
    original = {layer.name: [t.clone() for t in expert_weights_per_expert(layer)] for layer in moe_layers(model)}
    rows = {layer.name: layer.router_weight().detach().clone() for layer in moe_layers(model)}
    groupings = ream_experts(model, stats, num_experts=3, max_group_size=3, permute=False, progress=False)
    for name, g in groupings.items():
        s = stats[name].saliency.double()
        expected = pseudo_group_by_definition(s, similarity_matrix("expert-output", stats=stats[name]), 3, 3)
        assert {d: sorted(m) for d, m in zip(g.dominant, g.groups)} == expected
        layer = next(layer for layer in moe_layers(model) if layer.name == name)
        w_in, _ = layer.expert_weights()
        for slot, members in enumerate(g.groups):
            w = s[members] / s[members].sum()
            avg = sum(float(wi) * original[name][0][e].double() for wi, e in zip(w, members))
            torch.testing.assert_close(w_in[slot].double(), avg, rtol=1e-5, atol=1e-6)
    standard = to_standard(model, router="dominant")
    for name, g in groupings.items():
        torch.testing.assert_close(standard.get_submodule(name).gate.weight, rows[name][g.dominant])
    save_pretrained(model, tmp_path / "ream", format="standard", router="dominant")
    torch.testing.assert_close(vanilla_logits(tmp_path / "ream", batches[0], tmp_path), forward(standard, batches[0]),
                               rtol=1e-5, atol=1e-5)


def test_options_have_effects(calibrated):
    _, _, stats = calibrated
    capped = ream_experts(fresh(calibrated, "b"), stats, num_experts=2, max_group_size=4, progress=False)
    free = ream_experts(fresh(calibrated, "c"), stats, num_experts=2, max_group_size=None, progress=False)
    assert all(len(m) <= 4 for g in capped.values() for m in g.groups)
    assert any(max(len(m) for m in g.groups) > 4 for g in free.values())
    aligned, plain = fresh(calibrated, "d"), fresh(calibrated, "e")
    ream_experts(aligned, stats, ratio=0.5, progress=False)
    ream_experts(plain, stats, ratio=0.5, permute=False, progress=False)
    assert moe_layers(aligned)[0].expert_weights()[0].shape[0] == 4
    assert not torch.allclose(moe_layers(aligned)[0].expert_weights()[0], moe_layers(plain)[0].expert_weights()[0])


def test_refusals(calibrated, tmp_path):
    _, batches, stats = calibrated
    model = fresh(calibrated, "f")
    before = moe_layers(model)[0].expert_weights()[0].clone()
    with pytest.raises(ValueError, match="2 groups of at most 3 experts cannot hold all 8"):
        ream_experts(model, stats, num_experts=2, max_group_size=3)
    with pytest.raises(ValueError, match="num_experts=9 exceeds"):
        ream_experts(model, stats, num_experts=9)
    with pytest.raises(ValueError, match="fewer than the top_k=2"):
        ream_experts(model, stats, num_experts=1)
    plain = collect_routing_stats(model, batches[:1], bases=("expert-output",), progress=False)
    with pytest.raises(ValueError, match="saliency was not collected"):
        ream_experts(model, plain, num_experts=4)
    with pytest.raises(ValueError, match="max_group_size caps REAM's groups"):
        merge_experts(model, stats, 4, globally=False, max_group_size=3, progress=False)
    assert torch.equal(moe_layers(model)[0].expert_weights()[0], before)  # nothing changed before refusing
    deepseek = build("deepseek_v3", tmp_path)
    with pytest.raises(ValueError, match="across routing groups"):
        ream_experts(deepseek, {}, num_experts=4)


def test_ream_within_routing_groups_merges_each_routing_group_on_its_own(tmp_path):
    """within_routing_groups=True on DeepSeek-V3 (2 routing groups of 4): every REAM group inside one routing group,
    the same count in each; equal to merge_experts' REAM grouping within routing groups (what compare runs)."""
    deepseek = build("deepseek_v3", tmp_path)
    stats = collect_routing_stats(deepseek, calibration(deepseek), bases=("expert-output",), saliency="reap",
                                  progress=False)
    twin, fresh = copy.deepcopy(deepseek), copy.deepcopy(deepseek)
    groups = ream_experts(deepseek, stats, num_experts=4, within_routing_groups=True, progress=False)
    for g in groups.values():
        assert all(len({e // 4 for e in members}) == 1 for members in g.groups), g.groups
        assert sum(1 for members in g.groups if members[0] < 4) == 2  # 2 of the 4 groups in each routing group
    reference = merge_experts(twin, stats, 4, similarity="expert-output", globally=False, grouping="ream",
                              max_group_size=16, within_routing_groups=True, progress=False)
    assert {n: g.expert_map for n, g in groups.items()} == {n: g.expert_map for n, g in reference.items()}
    with pytest.raises(ValueError, match=r"choose a multiple of 2"):
        ream_experts(fresh, stats, num_experts=3, within_routing_groups=True, progress=False)
