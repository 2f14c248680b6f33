"""Grouping experts (M-SMoE step 1): how many groups each layer gets, which experts are dominant,
and which group every other expert joins. Pure functions on small tensors; merge.py applies them.

Defined behaviours (the contract the tests check):

- Usage order: experts sorted by usage frequency, descending; ties go to the lower expert index.
  Dominant experts are the first G experts in usage order, so an expert never routed to (frequency 0)
  is dominant only when fewer than G experts were routed to at all.
- Every non-dominant expert, in usage order, joins the dominant expert it is most similar to; a
  similarity tie goes to the dominant expert that comes first in usage order.
- num_groups < 1 is a ValueError; num_groups >= the number of experts keeps every expert in its own
  group (identity grouping).
- Similarity is cosine similarity mapped to [0, 1] by (cos + 1) / 2; a zero vector (e.g. the mean
  routed input of an expert never routed to) has cosine 0 with everything, i.e. similarity 0.5.
- Global adaptive counts (`globally=True`): budget = num_groups x number of merged layers. Each
  layer's usage frequencies are normalised to sum to 1 and its most used expert is set to 1.0, so every
  layer keeps a group. All (layer, expert) entries are ranked by frequency, descending; ties go to
  the earlier layer (module order), then to the expert earlier in its layer's usage order. The first
  `budget` entries are kept and a layer's group count is how many of its entries were kept: exactly the
  budget in total, at least one and at most E per layer. Without ties this is the paper's rule "count
  the experts at or above the budget-th largest frequency".
- REAM (grouping="ream", Jha et al. 2026): the scores are REAP saliencies (calibrate.py) instead of usage
  frequencies, an expert never routed to scored as the smallest positive saliency (so it is merged, with a
  small weight). Centroids are the first G experts in score order; then, centroid by centroid in score
  order, each takes its most similar not yet assigned non-centroid experts until its group holds
  max_group_size members (similarity ties: the lower index); it stops once every expert is assigned.
  G x max_group_size < E is a ValueError (some expert could join no group). max_group_size=None: no cap,
  every non-centroid joins its most similar centroid (as "dominant").
- Groups (slots) are numbered in the order of their dominant expert's index; inside a group the
  dominant expert comes first, then the other members by index. With G = E the grouping is the
  identity: expert_map = [0, 1, ..., E-1].
- Within routing groups (`routing_groups=R > 1`, DeepSeek-V3's group-limited routing, which a standard
  checkpoint must keep): the R blocks of E / R consecutive experts are grouped one by one, each into G / R
  groups by the method above on that block's frequencies and similarities alone; E or G not a multiple of R
  is a ValueError.
"""
from __future__ import annotations

import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

SIMILARITY_BASES = ("router-logits", "router-weight", "weight", "feature", "expert-output", "random")
GROUPING_METHODS = ("dominant", "hierarchical")  # ranked by usage frequency
SALIENCY_GROUPINGS = ("ream",)  # ranked by REAP saliency: needs statistics collected with saliency="reap"
ALL_GROUPINGS = GROUPING_METHODS + SALIENCY_GROUPINGS
MERGE_STRATEGIES = ("frequency", "average", "drop")
WEIGHT_GRAM_CHUNK_BYTES = 64 << 20  # float64 columns of the expert weights converted at once (weight similarity)


@dataclass
class LayerGrouping:
    """The grouping of one MoE layer: group g's merged weights go to slot g."""

    name: str
    expert_map: list[int]  # [E] slot (group index) of every original expert
    dominant: list[int]  # [G] dominant expert of each group
    groups: list[list[int]]  # [G] members of each group, dominant first
    weights: list[list[float]] = field(default_factory=list)  # [G] merge weight of each member, sums to 1

    @property
    def num_groups(self) -> int:
        return len(self.groups)

    @property
    def num_experts(self) -> int:
        return len(self.expert_map)

    def to_dict(self) -> dict:
        return {"expert_map": self.expert_map, "dominant": self.dominant, "groups": self.groups,
                "weights": [[round(w, 6) for w in ws] for ws in self.weights]}


# --- similarity ----------------------------------------------------------------------------------
def cosine_similarity_matrix(vectors: torch.Tensor) -> torch.Tensor:
    """(cos + 1) / 2 between the rows of vectors [E, n]; zero rows have cosine 0 with everything."""
    v = vectors.double().reshape(vectors.shape[0], -1)
    norms = v.norm(dim=1)
    unit = v / norms.clamp_min(1e-300).unsqueeze(1)
    cos = (unit @ unit.T).clamp(-1.0, 1.0)
    zero = norms == 0
    cos[zero, :] = 0.0
    cos[:, zero] = 0.0
    return (cos + 1) / 2


def gram_similarity(gram: torch.Tensor) -> torch.Tensor:
    """(cos + 1) / 2 between the columns of a matrix X known only through its Gram matrix X^T X."""
    gram = gram.double()
    norms = gram.diagonal().clamp_min(0).sqrt()
    denom = norms.unsqueeze(0) * norms.unsqueeze(1)
    cos = torch.where(denom > 0, gram / denom.clamp_min(1e-300), torch.zeros_like(gram)).clamp(-1.0, 1.0)
    return (cos + 1) / 2


def weight_gram(w_in: torch.Tensor, w_out: torch.Tensor) -> torch.Tensor:
    """Float64 Gram matrix [E, E] of the experts' flattened weights (w_in's entries, then w_out's),
    summed over column chunks of WEIGHT_GRAM_CHUNK_BYTES in float64: the layer is never joined or
    converted as a whole."""
    e = w_in.shape[0]
    gram = torch.zeros(e, e, dtype=torch.float64, device=w_in.device)
    step = max(1, WEIGHT_GRAM_CHUNK_BYTES // (8 * e))
    for w in (w_in.reshape(e, -1), w_out.reshape(e, -1)):
        for c in range(0, w.shape[1], step):
            chunk = w[:, c : c + step].double()
            gram += chunk @ chunk.T
    return gram


def weight_gram_bytes(num_experts: int, columns: int) -> int:
    """The float64 bytes weight_gram holds at once for experts of at most `columns` entries per matrix: a
    converted chunk and the one before it is freed, the Gram matrix and a chunk's product (memory plans count
    them in a layer's floor)."""
    step = max(1, WEIGHT_GRAM_CHUNK_BYTES // (8 * num_experts))
    return 8 * num_experts * (2 * min(step, columns) + 2 * num_experts)


def layer_seed(seed: int, layer_name: str) -> int:
    """One seed per layer from the user's seed and the layer's name: the random baseline draws a
    different similarity in every layer, and the same one for a layer whichever layers are merged."""
    return zlib.crc32(f"{seed}:{layer_name}".encode())


def random_similarity(num_experts: int, seed: int = 0) -> torch.Tensor:
    """A symmetric random similarity in [0, 1) (the paper's `random` baseline), reproducible by seed."""
    g = torch.Generator().manual_seed(seed)
    r = torch.rand(num_experts, num_experts, generator=g, dtype=torch.float64)
    r = (r + r.T) / 2
    r.fill_diagonal_(1.0)
    return r


def similarity_matrix(basis: str, *, stats=None, router_weight=None, w_in=None, w_out=None,
                      seed: int = 0, num_experts: int | None = None) -> torch.Tensor:
    """Expert-expert similarity [E, E] in [0, 1] for one layer, from the named similarity basis.

    router-logits, feature, expert-output need `stats` (calibrate.LayerStats); router-weight needs
    router_weight [E, d]; weight needs per-expert w_in [E, F, d] and w_out [E, d, ff] (compared as they
    are, neuron by neuron: run align_experts first for a permutation-invariant comparison).
    """
    if basis not in SIMILARITY_BASES:
        raise ValueError(f"similarity: unknown basis {basis!r}; choose from {', '.join(SIMILARITY_BASES)}")
    if basis in ("router-logits", "feature", "expert-output") and stats is None:
        raise ValueError(f"similarity {basis!r} needs routing statistics (collect_routing_stats)")
    if basis == "router-logits":
        return gram_similarity(stats.logit_gram).cpu()
    if basis == "feature":
        return cosine_similarity_matrix(stats.mean_feature).cpu()
    if basis == "expert-output":
        return cosine_similarity_matrix(stats.mean_output).cpu()
    if basis == "router-weight":
        return cosine_similarity_matrix(router_weight.detach()).cpu()
    if basis == "weight":
        return gram_similarity(weight_gram(w_in.detach(), w_out.detach())).cpu()
    n = num_experts if num_experts is not None else (stats.num_experts if stats is not None else None)
    if n is None:
        raise ValueError("similarity 'random' needs num_experts")
    return random_similarity(n, seed)


# --- dominant experts and assignment -------------------------------------------------------------
def usage_order(frequency: torch.Tensor) -> list[int]:
    """Expert indices by usage frequency, descending; ties to the lower index."""
    f = [float(x) for x in frequency.double().cpu()]
    return sorted(range(len(f)), key=lambda e: (-f[e], e))


def _check_num_groups(num_groups: int, name: str = "num_groups") -> None:
    if isinstance(num_groups, bool) or not isinstance(num_groups, int):
        raise ValueError(f"{name} must be an int, got {num_groups!r}")
    if num_groups < 1:
        raise ValueError(f"{name} must be >= 1, got {num_groups}")


def dominant_experts(frequency: torch.Tensor, num_groups: int) -> list[int]:
    """The min(num_groups, E) most used experts, in usage order."""
    _check_num_groups(num_groups)
    return usage_order(frequency)[:num_groups]


def assign_to_dominant(similarity: torch.Tensor, frequency: torch.Tensor, dominant: list[int]) -> list[int]:
    """Group leader [E] of every expert: dominant experts lead themselves, every other expert (in usage
    order) joins its most similar dominant expert (ties: the dominant expert first in `dominant`)."""
    leader = list(range(len(frequency)))
    dom = set(dominant)
    cols = torch.as_tensor(dominant, dtype=torch.int64)
    for e in usage_order(frequency):
        if e in dom:
            continue
        sims = similarity[e, cols]
        leader[e] = dominant[int(torch.argmax(sims))]  # argmax returns the first maximum
    return leader


def ream_scores(saliency: torch.Tensor) -> torch.Tensor:
    """REAM's scores: saliency, with experts never routed to (0) raised to just below the smallest positive
    saliency (weighed as the least salient when merged, ranked after every routed expert). NaN is refused."""
    s = saliency.double().cpu().clone()
    if torch.isnan(s).any():
        raise ValueError(f"the saliency of experts {torch.isnan(s).nonzero().flatten().tolist()} is NaN (their outputs "
                         "on routed tokens are not finite); check the model's weights")
    positive = s[s > 0]
    if len(positive):
        s[s <= 0] = torch.nextafter(positive.min(), torch.zeros((), dtype=s.dtype))
    return s


def capped_groups(similarity: torch.Tensor, scores: torch.Tensor, num_groups: int,
                  max_group_size: int | None) -> list[int]:
    """REAM's pseudo-grouping: leader [E] of every expert (see the module docstring)."""
    _check_num_groups(num_groups)
    centroids = usage_order(scores)[:num_groups]
    if max_group_size is None:
        return assign_to_dominant(similarity, scores, centroids)
    if isinstance(max_group_size, bool) or not isinstance(max_group_size, int) or max_group_size < 1:
        raise ValueError(f"max_group_size must be a positive int or None, got {max_group_size!r}")
    e = len(scores)
    if len(centroids) * max_group_size < e:
        raise ValueError(f"max_group_size={max_group_size}: {len(centroids)} groups of at most {max_group_size} "
                         f"experts cannot hold all {e} experts; raise it to >= {-(-e // len(centroids))}")
    leader = [-1] * e
    for c in centroids:
        leader[c] = c
    for c in centroids:
        sims = [float(x) for x in similarity[c].double().cpu()]
        free = sorted((i for i in range(e) if leader[i] == -1), key=lambda i: (-sims[i], i))
        for i in free[: max_group_size - 1]:
            leader[i] = c
        if -1 not in leader:
            break
    return leader


def hierarchical_clusters(similarity: torch.Tensor, num_groups: int) -> list[int]:
    """Agglomerative clustering (average linkage on similarity, as HC-SMoE) cut at num_groups clusters.

    Returns a cluster id [E] per expert (the smallest member index of its cluster). At each step the
    two clusters with the highest mean pairwise similarity merge; ties go to the pair that comes first
    in (smaller cluster id, larger cluster id) order.
    """
    _check_num_groups(num_groups)
    sums = similarity.double().cpu().clone()  # running sums of pairwise similarity between clusters
    n = sums.shape[0]
    clusters = {i: [i] for i in range(n)}
    size = torch.ones(n, dtype=torch.float64)
    upper = torch.ones(n, n, dtype=torch.bool).triu(1)  # pairs (a, b) with a < b
    while len(clusters) > num_groups:
        alive = torch.zeros(n, dtype=torch.bool)
        alive[list(clusters)] = True
        avg = sums / torch.outer(size, size)
        avg[~(upper & alive[:, None] & alive[None, :])] = float("-inf")
        a, b = divmod(int(torch.argmax(avg)), n)  # first maximum in row-major order
        clusters[a] = clusters[a] + clusters.pop(b)
        sums[a, :] += sums[b, :]
        sums[:, a] += sums[:, b]
        size[a] += size[b]
    label = [0] * n
    for cid, members in clusters.items():
        for e in members:
            label[e] = cid
    return label


def build_grouping(name: str, labels: list[int], frequency: torch.Tensor, strategy: str = "frequency") -> LayerGrouping:
    """Canonical LayerGrouping from any per-expert cluster labels: each cluster's dominant expert is its
    most used member (ties: lower index); merge weights follow `strategy` (see merge_weights)."""
    if strategy not in MERGE_STRATEGIES:
        raise ValueError(f"strategy must be one of {', '.join(MERGE_STRATEGIES)}, got {strategy!r}")
    order = usage_order(frequency)
    rank = {e: r for r, e in enumerate(order)}
    members: dict[int, list[int]] = {}
    for e, lab in enumerate(labels):
        members.setdefault(lab, []).append(e)
    heads = []
    for group in members.values():
        head = min(group, key=lambda e: rank[e])
        heads.append((head, [head] + sorted(e for e in group if e != head)))
    heads.sort()
    expert_map = [0] * len(labels)
    for slot, (_, group) in enumerate(heads):
        for e in group:
            expert_map[e] = slot
    groups = [g for _, g in heads]
    return LayerGrouping(name=name, expert_map=expert_map, dominant=[h for h, _ in heads], groups=groups,
                         weights=[merge_weights(g, frequency, strategy) for g in groups])


def merge_weights(group: list[int], frequency: torch.Tensor, strategy: str) -> list[float]:
    """Weights of a group's members (dominant first), summing to 1.

    frequency: f_i / sum f (uniform when no member was ever routed to); average: 1 / n;
    drop: 1 for the dominant expert, 0 for the others (they are pruned, not merged)."""
    if strategy == "average":
        return [1.0 / len(group)] * len(group)
    if strategy == "drop":
        return [1.0] + [0.0] * (len(group) - 1)
    f = [float(frequency[e]) for e in group]
    total = sum(f)
    if total <= 0:
        return [1.0 / len(group)] * len(group)
    return [x / total for x in f]


def check_routing_groups(name: str, num_experts: int, num_groups: int, routing_groups: int) -> None:
    """Grouping within routing groups (DeepSeek-V3's n_group blocks of E / n_group consecutive experts) needs
    E and the group count to split evenly over the routing groups."""
    if isinstance(routing_groups, bool) or not isinstance(routing_groups, int) or routing_groups < 1:
        raise ValueError(f"routing_groups must be a positive int, got {routing_groups!r}")
    if routing_groups > 1 and (num_experts % routing_groups or num_groups % routing_groups):
        raise ValueError(f"{name}: merging within {routing_groups} routing groups needs the expert count ({num_experts}) "
                         f"and the group count ({num_groups}) to be multiples of {routing_groups}")


def within_routing_groups(frequency: torch.Tensor, similarity: torch.Tensor, num_groups: int, routing_groups: int,
                          method: str, max_group_size: int | None) -> list[int]:
    """Cluster labels [E] when every group must stay inside one routing group: each block of E / routing_groups
    consecutive experts is grouped on its own into num_groups / routing_groups groups (the block's frequencies and
    similarities only), so every routing group keeps the same count."""
    e = len(frequency)
    size, per_block = e // routing_groups, num_groups // routing_groups
    labels = []
    for j in range(routing_groups):
        block = slice(j * size, (j + 1) * size)
        sub = group_layer("block", frequency[block], similarity[block, block], per_block, method,
                          max_group_size=max_group_size)
        labels += [j * e + slot for slot in sub.expert_map]
    return labels


def group_layer(name: str, frequency: torch.Tensor, similarity: torch.Tensor, num_groups: int,
                method: str = "dominant", strategy: str = "frequency",
                max_group_size: int | None = None, routing_groups: int = 1) -> LayerGrouping:
    """Group one layer's experts into min(num_groups, E) groups. `frequency`: the scores that rank the
    experts and weigh the merge (REAM: ream_scores(saliency)); max_group_size: REAM's cap; routing_groups > 1:
    every group inside one of that many blocks of consecutive experts, the same count in each
    (within_routing_groups)."""
    _check_num_groups(num_groups)
    if method not in ALL_GROUPINGS:
        raise ValueError(f"grouping method must be one of {', '.join(ALL_GROUPINGS)}, got {method!r}")
    e = len(frequency)
    if similarity.shape != (e, e):
        raise ValueError(f"{name}: similarity must be [{e}, {e}], got {tuple(similarity.shape)}")
    if routing_groups != 1 and num_groups < e:
        check_routing_groups(name, e, num_groups, routing_groups)
        return build_grouping(name, within_routing_groups(frequency, similarity, num_groups, routing_groups, method,
                                                          max_group_size), frequency, strategy)
    if num_groups >= e:
        labels = list(range(e))
    elif method == "dominant":
        labels = assign_to_dominant(similarity, frequency, dominant_experts(frequency, num_groups))
    elif method == "ream":
        labels = capped_groups(similarity, frequency, num_groups, max_group_size)
    else:
        labels = hierarchical_clusters(similarity, num_groups)
    return build_grouping(name, labels, frequency, strategy)


# --- how many groups per layer -------------------------------------------------------------------
def group_counts(frequencies: Mapping[str, torch.Tensor], num_groups, globally: bool = True,
                 unit: int = 1) -> dict[str, int]:
    """Group count per layer (layers in the mapping's order).

    num_groups: an int (the average per layer when globally=True, else the count of every layer) or,
    with globally=False, a mapping {layer name: count}. Counts above a layer's E are capped at E.
    unit: with globally=True, every count is a multiple of it (merging within `unit` routing groups: each
    unit gives every routing group of a layer one more group); num_groups and each E must be multiples.
    """
    names = list(frequencies)
    if not names:
        raise ValueError("no layer to merge")
    sizes = {n: len(frequencies[n]) for n in names}
    if isinstance(num_groups, Mapping):
        if globally:
            raise ValueError("num_groups: a per-layer mapping needs globally=False")
        missing = [n for n in names if n not in num_groups]
        if missing:
            raise ValueError(f"num_groups: no count for layers {missing}")
        extra = [n for n in num_groups if n not in sizes]
        if extra:
            raise ValueError(f"num_groups: counts for layers that are not merged {extra}; the merged layers are "
                             f"{names}")
        for n in names:
            _check_num_groups(num_groups[n], f"num_groups[{n!r}]")
        return {n: min(num_groups[n], sizes[n]) for n in names}
    _check_num_groups(num_groups)
    if not globally:
        return {n: min(num_groups, sizes[n]) for n in names}
    budget = num_groups * len(names)
    if budget >= sum(sizes.values()):
        return dict(sizes)
    for n in names:
        check_routing_groups(n, sizes[n], num_groups, unit)
    entries = []  # (-frequency, layer position, rank in the layer's usage order, layer name)
    for li, n in enumerate(names):
        for r, value in enumerate(_unit_frequencies(frequencies[n], unit)):
            entries.append((-1.0 if r == 0 else -value, li, r, n))
    entries.sort()
    counts = dict.fromkeys(names, 0)
    for *_, n in entries[: budget // unit]:
        counts[n] += unit
    return counts


def _unit_frequencies(frequency: torch.Tensor, unit: int) -> list[float]:
    """A layer's normalized usage, one value per allocation unit in the order units are given: with unit 1
    the frequencies in usage order; else the sum over the `unit` blocks of consecutive experts of each
    block's r-th largest frequency (unit r gives every block its (r+1)-th group)."""
    f = frequency.double().cpu()
    total = f.sum()
    f = f / total if total > 0 else torch.zeros_like(f)
    blocks = f.reshape(unit, -1).sort(dim=1, descending=True).values
    return blocks.sum(dim=0).tolist()
