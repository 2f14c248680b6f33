"""Grouping: similarity bases, dominant experts, assignment, hierarchical clustering, group counts;
each against a plain computation on random inputs, plus the documented edge cases."""
import pytest
import torch
import torch.nn.functional as F

from mcsmoe_fast.calibrate import LayerStats
from mcsmoe_fast.grouping import (
    assign_to_dominant, build_grouping, cosine_similarity_matrix, dominant_experts, gram_similarity, group_counts,
    group_layer, hierarchical_clusters, random_similarity, similarity_matrix, usage_order,
)


def rng(seed):
    return torch.Generator().manual_seed(seed)


def check_partition(g, num_experts, num_groups):
    """Every expert in exactly one group, the dominant expert heads its group, expert_map agrees."""
    assert g.num_groups == num_groups
    members = sorted(e for group in g.groups for e in group)
    assert members == list(range(num_experts))
    for slot, (group, weights) in enumerate(zip(g.groups, g.weights)):
        assert group[0] == g.dominant[slot]
        assert all(g.expert_map[e] == slot for e in group)
        assert len(weights) == len(group)
        assert sum(weights) == pytest.approx(1.0)


# --- similarity ----------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(8, 5), (3, 17), (1, 4)])
def test_cosine_similarity_matches_pairwise_cosine(shape):
    v = torch.randn(*shape, generator=rng(shape[1]), dtype=torch.float64)
    plain = torch.tensor([[F.cosine_similarity(a, b, dim=0).item() for b in v] for a in v], dtype=torch.float64)
    torch.testing.assert_close(cosine_similarity_matrix(v), (plain + 1) / 2)


def test_zero_vectors_have_similarity_one_half():
    v = torch.tensor([[1.0, 0.0], [0.0, 0.0], [-1.0, 0.0]])
    s = cosine_similarity_matrix(v)
    assert s[1].tolist() == [0.5, 0.5, 0.5] and s[0, 2] == 0.0 and s[0, 0] == 1.0


def test_gram_similarity_is_cosine_of_logit_columns():
    logits = torch.randn(50, 6, generator=rng(1), dtype=torch.float64)
    plain = torch.tensor([[F.cosine_similarity(logits[:, i], logits[:, j], dim=0).item() for j in range(6)]
                          for i in range(6)], dtype=torch.float64)
    torch.testing.assert_close(gram_similarity(logits.T @ logits), (plain + 1) / 2)


def make_stats(num_experts=6, d=4, seed=0):
    g = rng(seed)
    logits = torch.randn(40, num_experts, generator=g, dtype=torch.float64)
    counts = torch.randint(0, 20, (num_experts,), generator=g).double()
    return LayerStats(name="layer", num_experts=num_experts, top_k=1, tokens=40, counts=counts,
                      logit_gram=logits.T @ logits, feature_sum=torch.randn(num_experts, d, generator=g, dtype=torch.float64),
                      output_sum=torch.randn(num_experts, d, generator=g, dtype=torch.float64))


def test_every_basis_against_plain_cosine():
    s = make_stats()
    g = rng(3)
    router = torch.randn(6, 4, generator=g)
    w_in, w_out = torch.randn(6, 5, 4, generator=g), torch.randn(6, 4, 5, generator=g)

    def plain(vectors):
        return torch.stack([(F.cosine_similarity(vectors[i : i + 1].double(), vectors.double(), dim=1) + 1) / 2
                            for i in range(vectors.shape[0])])

    torch.testing.assert_close(similarity_matrix("router-weight", router_weight=router), plain(router))
    flat = torch.cat([w_in.reshape(6, -1), w_out.reshape(6, -1)], 1)
    torch.testing.assert_close(similarity_matrix("weight", w_in=w_in, w_out=w_out), plain(flat))
    torch.testing.assert_close(similarity_matrix("feature", stats=s), plain(s.feature_sum / s.counts.clamp_min(1)[:, None]))
    torch.testing.assert_close(similarity_matrix("expert-output", stats=s), plain(s.output_sum))
    r = similarity_matrix("random", num_experts=6, seed=7)
    assert torch.equal(r, r.T) and torch.equal(r, random_similarity(6, 7)) and not torch.equal(r, random_similarity(6, 8))
    with pytest.raises(ValueError, match="unknown basis"):
        similarity_matrix("cosine", stats=s)
    with pytest.raises(ValueError, match="routing statistics"):
        similarity_matrix("router-logits")


# --- dominant experts and assignment -------------------------------------------------------------
def test_usage_order_and_dominant_experts_ties_and_unused():
    f = torch.tensor([0.2, 0.0, 0.4, 0.2, 0.0, 0.2])
    assert usage_order(f) == [2, 0, 3, 5, 1, 4]
    assert dominant_experts(f, 3) == [2, 0, 3]
    # experts never routed to become dominant only when fewer routed experts than groups exist
    assert dominant_experts(f, 4) == [2, 0, 3, 5]
    assert dominant_experts(f, 5) == [2, 0, 3, 5, 1]
    assert dominant_experts(f, 10) == [2, 0, 3, 5, 1, 4]
    with pytest.raises(ValueError, match="num_groups"):
        dominant_experts(f, 0)


@pytest.mark.parametrize("seed", range(5))
def test_assignment_matches_plain_loop(seed):
    g = rng(seed)
    e, k = 9, 3
    sim = torch.rand(e, e, generator=g, dtype=torch.float64)
    freq = torch.rand(e, generator=g, dtype=torch.float64)
    dominant = dominant_experts(freq, k)
    leader = assign_to_dominant(sim, freq, dominant)
    for x in range(e):
        if x in dominant:
            assert leader[x] == x
        else:
            best = max(dominant, key=lambda d: sim[x, d].item())
            assert leader[x] == best


def test_assignment_similarity_tie_goes_to_more_used_dominant():
    sim = torch.full((4, 4), 0.5, dtype=torch.float64)
    freq = torch.tensor([0.1, 0.4, 0.3, 0.2])
    assert assign_to_dominant(sim, freq, dominant_experts(freq, 2)) == [1, 1, 2, 1]


@pytest.mark.parametrize("method", ["dominant", "hierarchical"])
@pytest.mark.parametrize("num_groups", [1, 2, 5, 8, 20])
def test_group_layer_invariants(method, num_groups):
    e = 8
    g = rng(num_groups)
    logits = torch.randn(30, e, generator=g)
    freq = torch.rand(e, generator=g).double()
    freq /= freq.sum()
    grouping = group_layer("l", freq, gram_similarity(logits.T @ logits), num_groups, method)
    check_partition(grouping, e, min(num_groups, e))
    for slot, group in enumerate(grouping.groups):  # dominant = most used member; frequency weights
        assert grouping.dominant[slot] == max(group, key=lambda x: (freq[x].item(), -x))
        total = sum(freq[x].item() for x in group)
        assert grouping.weights[slot] == pytest.approx([freq[x].item() / total for x in group])
    assert grouping.dominant == sorted(grouping.dominant)
    if num_groups >= e:
        assert grouping.expert_map == list(range(e)) and grouping.groups == [[x] for x in range(e)]


def test_group_layer_bad_arguments():
    sim, freq = torch.eye(4), torch.ones(4) / 4
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="num_groups"):
            group_layer("l", freq, sim, bad)
    with pytest.raises(ValueError, match="method"):
        group_layer("l", freq, sim, 2, method="kmeans")
    with pytest.raises(ValueError, match="similarity"):
        group_layer("l", freq, torch.eye(3), 2)
    with pytest.raises(ValueError, match="strategy"):
        group_layer("l", freq, sim, 2, strategy="fisher")


def test_merge_weights_per_strategy_and_unused_group():
    freq = torch.tensor([0.0, 0.6, 0.0, 0.4])
    labels = [1, 1, 3, 3]  # group {2, 3}: dominant 3; group {0, 1}: dominant 1
    g = build_grouping("l", labels, freq, "frequency")
    assert g.dominant == [1, 3] and g.groups == [[1, 0], [3, 2]] and g.expert_map == [0, 0, 1, 1]
    assert g.weights == [[1.0, 0.0], [1.0, 0.0]]
    assert build_grouping("l", labels, freq, "average").weights == [[0.5, 0.5], [0.5, 0.5]]
    assert build_grouping("l", labels, freq, "drop").weights == [[1.0, 0.0], [1.0, 0.0]]
    unused = build_grouping("l", [0, 0, 2, 2], torch.tensor([0.0, 0.0, 0.5, 0.5]), "frequency")
    assert unused.groups[0] == [0, 1] and unused.weights[0] == [0.5, 0.5]  # nobody used: uniform


# --- hierarchical clustering ---------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(6))
def test_hierarchical_matches_scipy_average_linkage(seed):
    from scipy.cluster.hierarchy import fcluster, linkage
    from scipy.spatial.distance import squareform

    g = rng(seed)
    e = 10
    sim = torch.rand(e, e, generator=g, dtype=torch.float64)
    sim = (sim + sim.T) / 2
    sim.fill_diagonal_(1.0)
    dist = squareform((1 - sim).numpy(), checks=False)
    tree = linkage(dist, method="average")
    for k in (1, 2, 3, 5, 9, 10):
        ours = hierarchical_clusters(sim, k)
        theirs = fcluster(tree, t=k, criterion="maxclust").tolist()

        def partition(labels):
            return {frozenset(i for i in range(e) if labels[i] == lab) for lab in set(labels)}

        assert partition(ours) == partition(theirs), k
        assert all(ours[i] == min(j for j in range(e) if ours[j] == ours[i]) for i in range(e))


# --- group counts ----------------------------------------------------------------------------------
def plain_threshold_counts(freqs: dict, num_groups: int) -> dict:
    """The paper's rule, without ties: top of each layer set to 1.0, threshold = budget-th largest,
    count = experts at or above the threshold."""
    normed = {}
    for n, f in freqs.items():
        f = f.double() / f.sum()
        f[f.argmax()] = 1.0
        normed[n] = f
    budget = num_groups * len(freqs)
    threshold = torch.cat(list(normed.values())).sort(descending=True).values[budget - 1]
    return {n: int((f >= threshold).sum()) for n, f in normed.items()}


@pytest.mark.parametrize("seed", range(8))
def test_global_counts_match_threshold_rule_and_sum_to_budget(seed):
    g = rng(seed)
    sizes = [8, 8, 6, 8, 4]
    freqs = {f"layer{i}": torch.rand(s, generator=g).double() ** 3 for i, s in enumerate(sizes)}
    for num_groups in (1, 2, 3, 4):
        counts = group_counts(freqs, num_groups, globally=True)
        assert sum(counts.values()) == num_groups * len(sizes)
        assert all(1 <= counts[n] <= len(f) for n, f in freqs.items())
        assert counts == plain_threshold_counts(freqs, num_groups)


def test_global_counts_ties_are_broken_by_layer_then_usage_order():
    freqs = {"a": torch.tensor([0.5, 0.25, 0.25, 0.0]), "b": torch.tensor([0.5, 0.25, 0.25, 0.0]),
             "c": torch.tensor([1.0, 0.0, 0.0, 0.0])}
    # budget 6: three tops, then 0.25 x 4 tied for 3 places -> a gets 2, b gets 1 more
    assert group_counts(freqs, 2) == {"a": 3, "b": 2, "c": 1}
    # budget 9: seven non-zero entries, then two of the five zero-frequency ones: earliest layers first
    assert group_counts(freqs, 3) == {"a": 4, "b": 4, "c": 1}
    assert sum(group_counts(freqs, 3).values()) == 9


def test_global_counts_edge_cases():
    freqs = {"a": torch.zeros(4), "b": torch.tensor([3.0, 1.0, 0.0, 0.0])}  # layer a saw no token at all
    assert group_counts(freqs, 1) == {"a": 1, "b": 1}
    assert group_counts(freqs, 4) == {"a": 4, "b": 4}
    assert group_counts(freqs, 100) == {"a": 4, "b": 4}
    assert group_counts(freqs, 2, globally=False) == {"a": 2, "b": 2}
    assert group_counts(freqs, 9, globally=False) == {"a": 4, "b": 4}
    assert group_counts(freqs, {"a": 1, "b": 3}, globally=False) == {"a": 1, "b": 3}
    for bad in (0, -2):
        with pytest.raises(ValueError, match="num_groups"):
            group_counts(freqs, bad)
    with pytest.raises(ValueError, match="globally=False"):
        group_counts(freqs, {"a": 1, "b": 3}, globally=True)
    with pytest.raises(ValueError, match="no count"):
        group_counts(freqs, {"a": 1}, globally=False)
    with pytest.raises(ValueError, match="no layer"):
        group_counts({}, 2)


# --- found by mutation testing (benchmarks/mutation.sh grouping) ----------------------------------
def test_layer_grouping_to_dict_is_the_saved_description():
    g = build_grouping("l", [0, 0, 0, 3], torch.tensor([0.1, 0.1, 0.1, 0.7]), "average")
    assert g.name == "l" and g.num_experts == 4 and g.num_groups == 2
    assert g.to_dict() == {"expert_map": [0, 0, 0, 1], "dominant": [0, 3], "groups": [[0, 1, 2], [3]],
                           "weights": [[0.333333, 0.333333, 0.333333], [1.0]]}  # rounded to 6 digits


def test_similarity_stays_in_zero_one_despite_rounding():
    """Cosines of (anti)parallel vectors can round past +-1 by a few ulps; the documented range [0, 1]
    holds exactly for both cosine forms (rows of a matrix; columns known through their Gram matrix)."""
    for seed in range(20):
        g = rng(seed)
        scale = torch.logspace(-3, 3, 50, dtype=torch.float64)
        base = torch.randn(50, generator=g, dtype=torch.float64) * scale
        factors = torch.rand(4, generator=g, dtype=torch.float64) * 10
        rows = torch.cat([torch.stack([base * f for f in factors]), -base.unsqueeze(0),
                          torch.randn(3, 50, generator=g, dtype=torch.float64) * scale])  # 4 parallel, 1 opposite
        for sim in (cosine_similarity_matrix(rows), gram_similarity(rows @ rows.T)):
            assert sim.max() <= 1.0 and sim.min() >= 0.0, seed
            torch.testing.assert_close(sim[:4, :4], torch.ones(4, 4, dtype=torch.float64))
            torch.testing.assert_close(sim[:4, 4], torch.zeros(4, dtype=torch.float64))


def test_random_similarity_range_defaults_and_fallbacks():
    r = random_similarity(32)
    assert torch.equal(r, random_similarity(32, seed=0))  # seed 0 by default, as merge_experts
    assert torch.equal(r.diagonal(), torch.ones(32, dtype=torch.float64)) and torch.equal(r, r.T)
    off = r[~torch.eye(32, dtype=torch.bool)]
    assert off.min() >= 0.0 and off.max() < 1.0 and off.max() > 0.9 and abs(off.mean().item() - 0.5) < 0.05
    s = make_stats(num_experts=5)
    assert torch.equal(similarity_matrix("random", num_experts=7), random_similarity(7, 0))
    assert torch.equal(similarity_matrix("random", stats=s), random_similarity(5, 0))  # E from the statistics
    assert torch.equal(similarity_matrix("random", stats=s, num_experts=3, seed=2), random_similarity(3, 2))
    with pytest.raises(ValueError, match="^similarity 'random' needs num_experts$"):
        similarity_matrix("random")


def test_statistics_bases_without_statistics_and_unknown_names_fail_clearly():
    for basis in ("router-logits", "feature", "expert-output"):
        with pytest.raises(ValueError, match=f"similarity '{basis}' needs routing statistics"):
            similarity_matrix(basis)
    every = "router-logits, router-weight, weight, feature, expert-output, random"
    with pytest.raises(ValueError, match=f"unknown basis 'cosine'; choose from {every}$"):
        similarity_matrix("cosine")
    sim, freq = torch.eye(4), torch.ones(4) / 4
    with pytest.raises(ValueError, match="^grouping method must be one of dominant, hierarchical, ream, got 'kmeans'$"):
        group_layer("l", freq, sim, 2, method="kmeans")
    with pytest.raises(ValueError, match="^strategy must be one of frequency, average, drop, got 'fisher'$"):
        build_grouping("l", [0, 1, 2, 3], freq, "fisher")
    with pytest.raises(ValueError, match="^num_groups must be >= 1, got 0$"):
        dominant_experts(freq, 0)
    with pytest.raises(ValueError, match="^num_groups must be an int, got 1.5$"):
        dominant_experts(freq, 1.5)
    freqs = {"a": torch.ones(4), "b": torch.ones(4)}
    with pytest.raises(ValueError, match=r"^num_groups\['b'\] must be >= 1, got 0$"):
        group_counts(freqs, {"a": 1, "b": 0}, globally=False)
    with pytest.raises(ValueError, match="^num_groups: a per-layer mapping needs globally=False$"):
        group_counts(freqs, {"a": 1, "b": 1})
    with pytest.raises(ValueError, match="^no layer to merge$"):
        group_counts({}, 1)


def test_build_grouping_defaults_to_frequency_weights_and_keeps_the_name():
    freq = torch.tensor([0.1, 0.3, 0.6])
    g = build_grouping("layer.7", [0, 0, 2], freq)
    assert g.name == "layer.7" and g.groups == [[1, 0], [2]]
    assert g.weights == [pytest.approx([0.75, 0.25]), [1.0]]
    assert group_layer("layer.7", freq, torch.eye(3), 2).name == "layer.7"


def test_group_layer_runs_the_method_it_is_asked_for():
    """Dominant-expert assignment and hierarchical clustering give different partitions here: each method
    must give its own."""
    e, k = 8, 3
    for seed in range(20):
        g = rng(100 + seed)
        sim = torch.rand(e, e, generator=g, dtype=torch.float64)
        sim = (sim + sim.T) / 2
        sim.fill_diagonal_(1.0)
        freq = torch.rand(e, generator=g, dtype=torch.float64)
        dominant = assign_to_dominant(sim, freq, dominant_experts(freq, k))
        hierarchical = hierarchical_clusters(sim, k)

        def partition(labels):
            return {frozenset(i for i in range(e) if labels[i] == lab) for lab in set(labels)}

        if partition(dominant) != partition(hierarchical):
            break
    else:
        pytest.fail("no input where the two methods differ")
    for method, labels in (("dominant", dominant), ("hierarchical", hierarchical)):
        grouping = group_layer("l", freq, sim, k, method)
        assert {frozenset(group) for group in grouping.groups} == partition(labels), method


def plain_unit_counts(freqs: dict, num_groups: int, unit: int) -> dict:
    """Global counts in units of `unit` routing groups, by brute force: among the allocations that give every
    layer a multiple of `unit` (>= unit) summing to the budget, the one keeping the most usage, where a layer
    with c groups keeps, in each of its `unit` blocks of consecutive experts, its c / unit most used experts."""
    import itertools

    names = list(freqs)

    def kept(f, c):
        f = f.double() / f.sum()
        return float(f.reshape(unit, -1).sort(dim=1, descending=True).values[:, : c // unit].sum())

    options = [range(unit, len(freqs[n]) + 1, unit) for n in names]
    best = max((c for c in itertools.product(*options) if sum(c) == num_groups * len(names)),
               key=lambda c: sum(kept(freqs[n], k) for n, k in zip(names, c)))
    return dict(zip(names, best))


@pytest.mark.parametrize("seed", range(6))
def test_global_counts_in_units_of_routing_groups(seed):
    """globally with unit=n_group (merging within DeepSeek-V3's routing groups): every count a multiple of the unit,
    the budget kept, and the most usage kept, against a brute-force search (generic frequencies: no ties)."""
    g = rng(seed)
    freqs = {f"layer{i}": torch.rand(8, generator=g).double() ** 3 for i in range(3)}
    for num_groups in (2, 4, 6):
        counts = group_counts(freqs, num_groups, globally=True, unit=2)
        assert all(c % 2 == 0 and 2 <= c <= 8 for c in counts.values()), counts
        assert sum(counts.values()) == num_groups * 3
        assert counts == plain_unit_counts(freqs, num_groups, 2)
    assert group_counts(freqs, 3, unit=1) == plain_threshold_counts(freqs, 3)
    with pytest.raises(ValueError, match=r"group count \(3\) to be multiples of 2"):
        group_counts(freqs, 3, globally=True, unit=2)
