"""ops.linear_assignment against scipy.optimize.linear_sum_assignment (reference.linear_assignment)."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lap_check import check_optimal
from mcsmoe_fast import ops, reference


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("maximize", [False, True])
def test_random_sizes(dtype, maximize):
    gen = torch.Generator().manual_seed(1)
    for _ in range(40):
        n = int(torch.randint(1, 120, (), generator=gen))
        m = n + int(torch.randint(0, 3, (), generator=gen)) * int(torch.randint(0, 40, (), generator=gen))
        cost = torch.randn(n, m, generator=gen, dtype=dtype)
        check_optimal(cost, ops.linear_assignment(cost, maximize), maximize)


@pytest.mark.parametrize("n,m", [(1, 1), (1, 7), (2, 2), (300, 300), (257, 300), (64, 1000)])
def test_square_and_rectangular(n, m):
    cost = torch.rand(n, m, dtype=torch.float64)
    check_optimal(cost, ops.linear_assignment(cost), False)


@pytest.mark.parametrize("high", [1, 2, 3, 5])
def test_tied_integer_costs(high):
    gen = torch.Generator().manual_seed(high)
    for n, m in [(5, 5), (17, 17), (40, 40), (33, 50), (100, 100), (150, 151)]:
        cost = torch.randint(0, high + 1, (n, m), generator=gen).double()
        for maximize in (False, True):
            check_optimal(cost, ops.linear_assignment(cost, maximize), maximize)


@pytest.mark.parametrize("scale", [1e-30, 1e-12, 1e12, 1e30])
def test_huge_and_tiny_magnitudes(scale):
    cost = torch.randn(60, 70, dtype=torch.float64) * scale
    check_optimal(cost, ops.linear_assignment(cost), False)
    check_optimal(cost, ops.linear_assignment(cost, maximize=True), True)


def test_batch_matches_single_problems():
    cost = torch.randn(7, 33, 45)
    batched = ops.linear_assignment(cost, maximize=True)
    check_optimal(cost, batched, True)
    singles = torch.stack([ops.linear_assignment(c, maximize=True) for c in cost])
    assert torch.equal(reference.assignment_objective(cost, batched), reference.assignment_objective(cost, singles))


def test_identity_and_known_permutation():
    perm = torch.randperm(50)
    cost = torch.ones(50, 50)
    cost[torch.arange(50), perm] = 0.0
    assert torch.equal(ops.linear_assignment(cost), perm)


def test_noncontiguous_input():
    base = torch.randn(40, 30, dtype=torch.float64)
    cost = base.T  # [30, 40], a transposed view
    check_optimal(cost, ops.linear_assignment(cost), False)


def test_empty_problems():
    assert ops.linear_assignment(torch.zeros(0, 5)).shape == (0,)
    assert ops.linear_assignment(torch.zeros(3, 0, 4)).shape == (3, 0)
    assert ops.linear_assignment(torch.zeros(0, 4, 4)).shape == (0, 4)


@pytest.mark.parametrize(
    "cost,match",
    [
        (torch.zeros(5, 4), "n <= m"),
        (torch.zeros(4), "rank"),
        (torch.zeros(2, 2, 2, 2), "rank"),
        (torch.zeros(3, 3, dtype=torch.int64), "float32 or float64"),
        (torch.tensor([[0.0, float("nan")], [1.0, 2.0]]), "NaN or infinite"),
        (torch.tensor([[0.0, float("inf")], [1.0, 2.0]]), "NaN or infinite"),
    ],
)
def test_bad_input_raises(cost, match):
    with pytest.raises(RuntimeError, match=match):
        ops.linear_assignment(cost)


def test_opcheck():
    for cost in (torch.randn(6, 9), torch.randn(3, 5, 5, dtype=torch.float64)):
        torch.library.opcheck(torch.ops.mcsmoe_fast.linear_assignment.default, (cost, True))


def test_compile_traces_the_op():
    fn = torch.compile(lambda c: ops.linear_assignment(c, maximize=True), backend="eager", fullgraph=True)
    cost = torch.randn(4, 12, 12)
    assert torch.equal(fn(cost), ops.linear_assignment(cost, maximize=True))


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 25),
    extra=st.integers(0, 10),
    high=st.sampled_from([1, 3, 1000]),
    maximize=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_property_optimal_like_scipy(n, extra, high, maximize, seed):
    rng = np.random.default_rng(seed)
    cost = torch.from_numpy(rng.integers(-high, high + 1, size=(n, n + extra)).astype(np.float64))
    check_optimal(cost, ops.linear_assignment(cost, maximize), maximize)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_entry_in_one_problem_of_a_batch(bad):
    for dtype in (torch.float32, torch.float64):
        cost = torch.randn(5, 20, 23, dtype=dtype)
        cost[3, 19, 22] = bad
        with pytest.raises(RuntimeError, match=r"NaN or infinite entries \(problem 3\)"):
            ops.linear_assignment(cost)


@pytest.mark.parametrize("kind", ["gaussian", "uniform", "integers", "low_rank", "constant", "row_constant"])
@pytest.mark.parametrize("maximize", [False, True])
def test_large_square_problems_use_the_sparse_phase(kind, maximize):
    """n >= 640 square problems run the candidate-set searches plus the dense check: still optimal."""
    gen = torch.Generator().manual_seed(11)
    n = 700
    cost = {
        "gaussian": lambda: torch.randn(n, n, generator=gen, dtype=torch.float64),
        "uniform": lambda: torch.rand(n, n, generator=gen),
        "integers": lambda: torch.randint(0, 4, (n, n), generator=gen).double(),
        "low_rank": lambda: torch.randn(n, 8, generator=gen) @ torch.randn(8, n, generator=gen),
        "constant": lambda: torch.full((n, n), 0.5),  # every search ties everywhere; many sparse searches fail
        "row_constant": lambda: torch.arange(n, dtype=torch.float64)[:, None].expand(n, n).contiguous(),
    }[kind]()
    check_optimal(cost, ops.linear_assignment(cost, maximize), maximize)
