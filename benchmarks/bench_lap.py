"""Batched linear assignment and expert alignment against the original recipe (scipy in a loop).

Run:  python -m pytest benchmarks/bench_lap.py --benchmark-only
The slow scipy anchors run one round each; every group prints its ratio in the summary."""
from __future__ import annotations

import pytest
import torch

from mcsmoe_fast import ops, reference
from mcsmoe_fast.permute import apply_permutation, match_permutations

BATCH = 31  # the 31 non-reference experts of a 32-expert layer


def correlated_costs(batch: int, n: int, features: int = 256, seed: int = 0) -> torch.Tensor:
    """Weight-matching costs between a reference expert and shuffled, noisy copies of it."""
    gen = torch.Generator().manual_seed(seed)
    ref = torch.randn(n, features, generator=gen)
    costs = []
    for _ in range(batch):
        target = 0.6 * ref[torch.randperm(n, generator=gen)] + 0.8 * torch.randn(n, features, generator=gen)
        costs.append(ref @ target.T)
    return torch.stack(costs)


def random_costs(batch: int, n: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(batch, n, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def tied_costs(batch: int, n: int, seed: int = 0) -> torch.Tensor:
    """Integers 0..3: every row has hundreds of tied minima (searches must not walk through them)."""
    return torch.randint(0, 4, (batch, n, n), generator=torch.Generator().manual_seed(seed)).double()


COSTS = {"random": random_costs, "correlated": correlated_costs, "tied": tied_costs}


@pytest.mark.parametrize("n", [1024, 3072])
@pytest.mark.parametrize("kind", ["random", "correlated", "tied"])
@pytest.mark.parametrize("impl", ["scipy_loop", "mcsmoe_fast"])
def test_linear_assignment(benchmark, impl, kind, n):
    cost = COSTS[kind](BATCH, n)
    maximize = kind == "correlated"
    benchmark.group = f"lap {kind} {BATCH}x{n}"
    if impl == "scipy_loop":
        benchmark.extra_info["anchor"] = True
        cols = benchmark.pedantic(reference.linear_assignment, (cost, maximize), rounds=1, iterations=1)
    else:
        cols = benchmark.pedantic(ops.linear_assignment, (cost, maximize), rounds=3 if n < 3072 else 1, iterations=1)
        expected = reference.assignment_objective(cost, reference.linear_assignment(cost[:2], maximize))
        got = reference.assignment_objective(cost[:2], cols[:2])
        assert torch.allclose(got, expected, rtol=1e-9, atol=0), "objective differs from scipy"
    benchmark.extra_info["objective_sum"] = float(reference.assignment_objective(cost, cols).sum())


def forbidden_costs(batch: int, n: int, seed: int = 0) -> torch.Tensor:
    """Uniform costs with half the pairs forbidden (+inf): solved with big M on a float64 copy."""
    gen = torch.Generator().manual_seed(seed)
    cost = torch.rand(batch, n, n, generator=gen)
    return cost.masked_fill(torch.rand(batch, n, n, generator=gen) < 0.5, float("inf"))


@pytest.mark.parametrize("impl", ["scipy_loop", "mcsmoe_fast"])
def test_linear_assignment_forbidden_pairs(benchmark, impl):
    cost = forbidden_costs(BATCH, 1024)
    benchmark.group = f"lap forbidden pairs {BATCH}x1024"
    if impl == "scipy_loop":
        benchmark.extra_info["anchor"] = True
        cols = benchmark.pedantic(reference.linear_assignment, (cost, False), rounds=1, iterations=1)
    else:
        cols = benchmark.pedantic(ops.linear_assignment, (cost, False), rounds=3, iterations=1)
        expected = reference.assignment_objective(cost[:2], reference.linear_assignment(cost[:2], False))
        got = reference.assignment_objective(cost[:2], cols[:2])
        assert torch.allclose(got, expected, rtol=1e-9, atol=0), "objective differs from scipy"
    benchmark.extra_info["objective_sum"] = float(reference.assignment_objective(cost, cols).sum())


def switch_base_layer(experts: int = 32, d: int = 768, ff: int = 3072, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(experts, ff, d, generator=gen) * d**-0.5, torch.randn(experts, d, ff, generator=gen) * d**-0.5)


def original_recipe(w_in: torch.Tensor, w_out: torch.Tensor) -> torch.Tensor:
    """What the paper's code does: per expert, torch.mm cost to expert 0, scipy, serially."""
    from scipy.optimize import linear_sum_assignment

    perm = torch.arange(w_in.shape[1]).repeat(w_in.shape[0], 1)
    for e in range(1, w_in.shape[0]):
        cost = w_in[0] @ w_in[e].T + w_out[0].T @ w_out[e]
        _, cols = linear_sum_assignment(cost.numpy(), maximize=True)
        perm[e] = torch.from_numpy(cols)
    return perm


def ours(w_in: torch.Tensor, w_out: torch.Tensor) -> torch.Tensor:
    return match_permutations(w_in, w_out, torch.zeros(w_in.shape[0], dtype=torch.int64), "relu")


@pytest.mark.parametrize("impl", ["original_recipe", "mcsmoe_fast"])
def test_align_switch_base_layer(benchmark, impl):
    w_in, w_out = switch_base_layer()
    benchmark.group = "align switch-base-32 layer (32 x 768 x 3072)"
    if impl == "original_recipe":
        benchmark.extra_info["anchor"] = True
        perm = benchmark.pedantic(original_recipe, (w_in, w_out), rounds=1, iterations=1)
    else:
        perm = benchmark.pedantic(ours, (w_in, w_out), rounds=1, iterations=1)
    aligned_in, aligned_out = apply_permutation(w_in, w_out, perm, "relu")
    score = ((aligned_in[0] * aligned_in[1:]).sum() + (aligned_out[0] * aligned_out[1:]).sum()).item()
    benchmark.extra_info["alignment_score"] = round(score, 3)
