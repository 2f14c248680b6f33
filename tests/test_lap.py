"""ops.linear_assignment and ops.linear_sum_assignment against scipy.optimize.linear_sum_assignment.

The second half ports scipy's own test cases for linear_sum_assignment (scipy/optimize/tests/
test_linear_assignment.py and the small inputs of scipy/sparse/csgraph/tests/test_matching.py) and
adds scipy's contract around them: forbidden pairs (+inf, or -inf when maximizing), infeasible
matrices, invalid entries, n > m, integer and bool dtypes, empty matrices, the exception types."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import linear_sum_assignment as scipy_lsa

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


@pytest.mark.parametrize("n,m", [(7, 1), (2, 1), (300, 257), (1000, 64), (45, 33)])
@pytest.mark.parametrize("maximize", [False, True])
def test_more_rows_than_columns(n, m, maximize):
    """n > m is solved transposed: every column gets a row, the other rows get -1."""
    cost = torch.randn(n, m, dtype=torch.float64)
    cols = ops.linear_assignment(cost, maximize)
    assert (cols == -1).sum() == n - m
    check_optimal(cost, cols, maximize)
    batch = torch.randn(3, n, m)
    check_optimal(batch, ops.linear_assignment(batch, maximize), maximize)


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
    assert torch.equal(ops.linear_assignment(torch.zeros(3, 0)), torch.full((3,), -1))
    assert torch.equal(ops.linear_assignment(torch.zeros(2, 3, 0)), torch.full((2, 3), -1))


@pytest.mark.parametrize(
    "cost,error,match",
    [
        (torch.zeros(4), ValueError, "rank"),
        (torch.zeros(2, 2, 2, 2), ValueError, "rank"),
        (torch.zeros(3, 3, dtype=torch.complex64), TypeError, "real"),
        (torch.tensor([[0.0, float("nan")], [1.0, 2.0]]), ValueError, "invalid numeric entries"),
        (torch.tensor([[0.0, -float("inf")], [1.0, 2.0]]), ValueError, "invalid numeric entries"),
        (torch.tensor([[float("inf"), float("inf")], [1.0, 2.0]]), ValueError, "cost matrix is infeasible"),
    ],
)
def test_bad_input_raises(cost, error, match):
    with pytest.raises(error, match=match):
        ops.linear_assignment(cost)


def test_opcheck():
    inf = float("inf")
    forbidden = torch.randn(5, 8, dtype=torch.float64)
    forbidden[1, :6] = inf
    for cost, maximize in [
        (torch.randn(6, 9), True),
        (torch.randn(3, 5, 5, dtype=torch.float64), True),
        (torch.randn(9, 6), False),
        (torch.randint(-5, 5, (2, 4, 3)), False),
        (torch.eye(4, dtype=torch.bool), True),
        (forbidden, False),
        (-forbidden, True),
    ]:
        torch.library.opcheck(torch.ops.mcsmoe_fast.linear_assignment.default, (cost, maximize))


def test_compile_traces_the_op():
    fn = torch.compile(lambda c: ops.linear_assignment(c, maximize=True), backend="eager", fullgraph=True)
    cost = torch.randn(4, 12, 12)
    assert torch.equal(fn(cost), ops.linear_assignment(cost, maximize=True))
    wide = torch.randn(4, 12, 9)
    assert torch.equal(fn(wide), ops.linear_assignment(wide, maximize=True))


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


@pytest.mark.parametrize("bad", [float("nan"), -float("inf")])
def test_invalid_entry_in_one_problem_of_a_batch(bad):
    for dtype in (torch.float32, torch.float64):
        for maximize in (False, True):
            cost = torch.randn(5, 20, 23, dtype=dtype)
            cost[3, 19, 22] = -bad if maximize else bad
            with pytest.raises(ValueError, match=r"invalid numeric entries .*\(problem 3\)"):
                ops.linear_assignment(cost, maximize)


def test_infeasible_problem_of_a_batch_is_named():
    inf = float("inf")
    for dtype in (torch.float32, torch.float64):
        for maximize in (False, True):
            cost = torch.randn(5, 20, 23, dtype=dtype)
            forbidden = -inf if maximize else inf
            cost[1, :, :3] = forbidden  # 20 columns left for 20 rows: feasible
            cost[2, 7, :] = forbidden  # a row with no allowed pair
            cost[4, :, 3] = forbidden  # a forbidden column: fine, 23 > 20 columns
            with pytest.raises(ValueError, match=r"cost matrix is infeasible \(problem 2\)"):
                ops.linear_assignment(cost, maximize)
            cost[2, 7, 0] = 1.0  # now feasible
            check_optimal(cost, ops.linear_assignment(cost, maximize), maximize)


def test_invalid_beats_infeasible():
    """As in scipy, invalid entries are reported before infeasibility (here in a later problem)."""
    cost = torch.randn(3, 4, 4)
    cost[0, 0, :] = float("inf")
    cost[2, 1, 1] = float("nan")
    with pytest.raises(ValueError, match=r"invalid numeric entries .*\(problem 2\)"):
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


# --- forbidden pairs ----------------------------------------------------------------------------
def forbid(cost: torch.Tensor, mask: torch.Tensor, maximize: bool) -> torch.Tensor:
    return cost.masked_fill(mask, -float("inf") if maximize else float("inf"))


def band_mask(n: int, m: int, width: int, gen: torch.Generator) -> torch.Tensor:
    """Forbidden everywhere but a band of `width` columns from a hidden injective map (n <= m): feasible,
    and tight enough that a too small big M would make trading a forbidden pair pay off."""
    hidden = torch.randperm(m, generator=gen)[:n]
    return (torch.arange(m)[None, :] - hidden[:, None]) % m >= width


def scipy_feasible(cost: torch.Tensor, maximize: bool) -> bool:
    try:
        scipy_lsa(cost.double().numpy(), maximize=maximize)
        return True
    except ValueError as e:
        assert "infeasible" in str(e)
        return False


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("maximize", [False, True])
def test_random_forbidden_masks_vs_scipy(dtype, maximize):
    """Random masks from sparse to dense: feasible ones solve to scipy's objective without a forbidden
    pair, infeasible ones raise ValueError exactly where scipy does."""
    gen = torch.Generator().manual_seed(5 + maximize)
    verdicts = []
    for trial in range(150):
        n = int(torch.randint(1, 40, (), generator=gen))
        m = max(1, n + int(torch.randint(-10, 20, (), generator=gen)))
        p = [0.05, 0.3, 0.6, 0.85, 0.95][trial % 5]
        cost = torch.randn(n, m, generator=gen, dtype=dtype)
        if trial % 3 == 0:
            cost = torch.randint(0, 4, (n, m), generator=gen).to(dtype)  # ties
        cost = forbid(cost, torch.rand(n, m, generator=gen) < p, maximize)
        feasible = scipy_feasible(cost, maximize)
        verdicts.append(feasible)
        if feasible:
            check_optimal(cost, ops.linear_assignment(cost, maximize), maximize)
        else:
            with pytest.raises(ValueError, match="cost matrix is infeasible"):
                ops.linear_assignment(cost, maximize)
    assert 0.2 < np.mean(verdicts) < 0.8, "want a mix of feasible and infeasible problems"


def test_forbidden_batch_mixed_with_finite_problems():
    gen = torch.Generator().manual_seed(2)
    cost = torch.randn(6, 30, 41, generator=gen)
    cost[1] = forbid(cost[1], band_mask(30, 41, 2, gen), False)
    cost[4, :, ::4] = float("inf")  # 11 forbidden columns, 30 left for 30 rows
    check_optimal(cost, ops.linear_assignment(cost), False)
    for b in (1, 4):  # the same answer as alone
        alone = ops.linear_assignment(cost[b])
        assert torch.equal(reference.assignment_objective(cost[b], alone),
                           reference.assignment_objective(cost[b], ops.linear_assignment(cost)[b]))


@pytest.mark.parametrize("maximize", [False, True])
@pytest.mark.parametrize("extra", [0.0, 0.03])
def test_forbidden_pairs_in_the_sparse_phase(maximize, extra):
    """n >= 640: candidate sets hold big-M entries; a band of 3 allowed pairs around a hidden
    permutation (plus a few random ones): a too small M would let the optimum trade a forbidden pair
    for cheaper ones elsewhere."""
    gen = torch.Generator().manual_seed(8)
    n = 700
    hidden = torch.randperm(n, generator=gen)
    offset = (torch.arange(n)[None, :] - hidden[:, None]) % n
    mask = (offset > 2) & (torch.rand(n, n, generator=gen) >= extra)
    cost = forbid(torch.rand(n, n, generator=gen, dtype=torch.float64) * (-1 if maximize else 1), mask, maximize)
    check_optimal(cost, ops.linear_assignment(cost, maximize), maximize)
    cost32 = cost.float()
    check_optimal(cost32, ops.linear_assignment(cost32, maximize), maximize)
    cost[17] = -float("inf") if maximize else float("inf")
    with pytest.raises(ValueError, match="infeasible"):
        ops.linear_assignment(cost, maximize)


@pytest.mark.parametrize("maximize", [False, True])
def test_big_m_beats_the_naive_bound(maximize):
    """(n + 1) * max|c| + 1 is not a big enough M (lap.h): the identity at cost 1 is the only allowed
    assignment, and the cycle of -1 entries closed by the forbidden pair (0, 3) costs M - 3 < 4."""
    sign = -1 if maximize else 1
    cost = torch.full((4, 4), sign * float("inf"), dtype=torch.float64)
    cost[range(4), range(4)] = sign * 1.0
    cost[[1, 2, 3], [0, 1, 2]] = sign * -1.0
    assert ops.linear_assignment(cost, maximize).tolist() == [0, 1, 2, 3]


@pytest.mark.parametrize("scale", [1e-300, 1e-30, 1e30, 1e300])
def test_forbidden_pairs_at_extreme_magnitudes(scale):
    """big M stays exact: far above tiny costs, and scaled down (by a power of two) near the top of
    the float64 range."""
    gen = torch.Generator().manual_seed(3)
    for maximize in (False, True):
        for mask in (torch.rand(40, 50, generator=gen) < 0.5, band_mask(40, 50, 2, gen)):
            cost = torch.randn(40, 50, generator=gen, dtype=torch.float64).clamp(-1.5, 1.5) * scale
            cost = forbid(cost, mask, maximize)
            check_optimal(cost, ops.linear_assignment(cost, maximize), maximize)
    cost32 = (torch.rand(40, 50, generator=gen) * 1e37).masked_fill(band_mask(40, 50, 2, gen), float("inf"))
    check_optimal(cost32, ops.linear_assignment(cost32), False)  # M = ~1e40 is beyond float32: solved in float64


@settings(max_examples=80, deadline=None)
@given(
    n=st.integers(1, 12),
    m=st.integers(1, 12),
    p=st.floats(0.0, 0.95),
    maximize=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_property_forbidden_like_scipy(n, m, p, maximize, seed):
    rng = np.random.default_rng(seed)
    cost = rng.integers(-5, 6, size=(n, m)).astype(np.float64)
    cost[rng.random((n, m)) < p] = -np.inf if maximize else np.inf
    try:
        want_rows, want_cols = scipy_lsa(cost, maximize=maximize)
    except ValueError:
        with pytest.raises(ValueError, match="infeasible"):
            ops.linear_sum_assignment(cost, maximize)
        return
    check_like_scipy(cost, ops.linear_sum_assignment(cost, maximize), (want_rows, want_cols))


def check_like_scipy(cost, got, want):
    """scipy's return convention (int64 row and column indices, rows ascending and distinct, min(n, m)
    pairs, no column twice, no forbidden pair) and scipy's objective, exactly (integer-valued costs).
    Among tied optima the indices may differ from scipy's."""
    cost = as_numpy(cost).astype(np.float64)
    rows, cols = (as_numpy(x) for x in got)
    assert rows.dtype == cols.dtype == np.int64 and rows.shape == cols.shape == want[0].shape
    assert np.all(np.diff(rows) > 0) and len(np.unique(cols)) == len(cols)
    assert np.isfinite(cost[rows, cols]).all()
    assert cost[rows, cols].sum() == cost[want[0], want[1]].sum()


# --- scipy's own test cases, through ops.linear_sum_assignment --------------------------------------
SCIPY_SMALL_CASES = [
    # square
    ([[400, 150, 400], [400, 450, 600], [300, 225, 300]], [150, 400, 300]),
    # rectangular variant
    ([[400, 150, 400, 1], [400, 450, 600, 2], [300, 225, 300, 3]], [150, 2, 300]),
    ([[10, 10, 8], [9, 8, 1], [9, 7, 4]], [10, 1, 7]),
    # square
    ([[10, 10, 8, 11], [9, 8, 1, 1], [9, 7, 4, 10]], [10, 1, 4]),
    # rectangular variant, forbidden pairs
    ([[10, float("inf"), float("inf")], [float("inf"), float("inf"), 1], [float("inf"), 7, float("inf")]], [10, 1, 7]),
]


def as_numpy(x):
    return x.numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


@pytest.mark.parametrize("array_type", [np.array, torch.tensor], ids=["numpy", "tensor"])
@pytest.mark.parametrize("sign", [-1, 1])
@pytest.mark.parametrize("case", range(len(SCIPY_SMALL_CASES)))
def test_scipy_small_inputs(array_type, sign, case):
    """scipy's linear_sum_assignment_assertions: rows sorted, the expected entries chosen; then the
    transposed matrix (n > m for the rectangular cases)."""
    matrix, expected = SCIPY_SMALL_CASES[case]
    maximize = sign == -1
    cost = sign * array_type(matrix)
    expected = sign * np.array(expected)
    for transposed in (False, True):
        c = cost.T if transposed else cost
        rows, cols = ops.linear_sum_assignment(c, maximize=maximize)
        assert type(rows) is type(c) and type(cols) is type(c)
        assert rows.dtype == cols.dtype == (torch.int64 if isinstance(c, torch.Tensor) else np.int64)
        rows, cols = as_numpy(rows), as_numpy(cols)
        assert np.array_equal(rows, np.sort(rows))
        got = as_numpy(c)[rows, cols]
        if transposed:
            assert np.array_equal(np.sort(got), np.sort(expected))
        else:
            assert np.array_equal(got, expected)
        check_like_scipy(c, (rows, cols), scipy_lsa(as_numpy(c), maximize=maximize))


def test_scipy_input_shape():
    with pytest.raises(ValueError, match="expected a matrix"):
        ops.linear_sum_assignment([1, 2, 3])
    with pytest.raises(ValueError, match="expected a matrix"):
        ops.linear_sum_assignment(5.0)
    with pytest.raises(ValueError, match="expected a matrix"):
        ops.linear_sum_assignment(np.zeros((2, 2, 2)))
    with pytest.raises(ValueError, match="expected a matrix"):
        ops.linear_sum_assignment(torch.zeros(2, 2, 2))  # linear_assignment's batches are not scipy's


@pytest.mark.filterwarnings("ignore::PendingDeprecationWarning")  # np.matrix, as scipy tests it
def test_scipy_input_object():
    c = [[1, 2, 3], [4, 5, 6]]
    want = ops.linear_sum_assignment(np.asarray(c))
    for got in (ops.linear_sum_assignment(c), ops.linear_sum_assignment(np.asmatrix(c))):
        assert all(isinstance(x, np.ndarray) and type(x) is np.ndarray for x in got)
        assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1])


def test_scipy_input_bool():
    eye = np.identity(3)
    for a, b in [(eye.astype(np.bool_), eye), (torch.eye(3, dtype=torch.bool), torch.eye(3))]:
        for maximize in (False, True):
            got, want = ops.linear_sum_assignment(a, maximize), ops.linear_sum_assignment(b, maximize)
            assert all(as_numpy(x).tolist() == as_numpy(y).tolist() for x, y in zip(got, want))


@pytest.mark.parametrize("bad", [np.identity(3).astype(str), np.identity(3).astype(complex),
                                 np.array([[1, None], [2, 3]], dtype=object), np.identity(2).astype(np.longdouble)])
def test_scipy_input_not_castable(bad):
    """The dtypes scipy refuses (no safe cast to float64) raise its TypeError."""
    with pytest.raises(TypeError, match="Cannot cast array data"):
        scipy_lsa(bad)
    with pytest.raises(TypeError, match="Cannot cast array data"):
        ops.linear_sum_assignment(bad)


def test_complex_tensor_is_a_type_error():
    with pytest.raises(TypeError, match="real"):
        ops.linear_sum_assignment(torch.eye(3, dtype=torch.complex64))


@pytest.mark.parametrize("array_type", [np.array, torch.tensor], ids=["numpy", "tensor"])
def test_scipy_input_nan(array_type):
    with pytest.raises(ValueError, match="contains invalid numeric entries"):
        ops.linear_sum_assignment(array_type(np.diag([np.nan, 1, 1])))
    with pytest.raises(ValueError, match="contains invalid numeric entries"):
        ops.linear_sum_assignment(array_type(np.diag([np.nan, 1, 1])), maximize=True)


@pytest.mark.parametrize("array_type", [np.array, torch.tensor], ids=["numpy", "tensor"])
def test_scipy_input_neginf(array_type):
    with pytest.raises(ValueError, match="contains invalid numeric entries"):
        ops.linear_sum_assignment(array_type(np.diag([1, -np.inf, 1])))
    # maximizing, +inf is the invalid entry and -inf a forbidden pair
    with pytest.raises(ValueError, match="contains invalid numeric entries"):
        ops.linear_sum_assignment(array_type(np.diag([1, np.inf, 1])), maximize=True)
    allowed = np.diag([1, -np.inf, 1])
    got = ops.linear_sum_assignment(array_type(allowed), maximize=True)
    check_like_scipy(allowed, got, scipy_lsa(allowed, maximize=True))


@pytest.mark.parametrize("array_type", [np.array, torch.tensor], ids=["numpy", "tensor"])
def test_scipy_input_inf(array_type):
    eye = np.identity(3)
    eye[:, 0] = np.inf
    with pytest.raises(ValueError, match="cost matrix is infeasible"):
        ops.linear_sum_assignment(array_type(eye))
    with pytest.raises(ValueError, match="cost matrix is infeasible"):
        ops.linear_sum_assignment(array_type(-eye), maximize=True)
    with pytest.raises(ValueError, match="cost matrix is infeasible"):
        ops.linear_sum_assignment(array_type(eye.T))  # n > m is no different
    wide = np.hstack([eye, np.ones((3, 1))])  # a spare column: feasible
    check_like_scipy(wide, ops.linear_sum_assignment(array_type(wide)), scipy_lsa(wide))
    check_like_scipy(wide.T, ops.linear_sum_assignment(array_type(wide.T)), scipy_lsa(wide.T))


def test_scipy_constant_cost_matrix():
    """scipy's #11602 case. Its test asserts the identity, its own tie-break; the contract is an
    optimal assignment with rows in order."""
    rows, cols = ops.linear_sum_assignment(np.ones((8, 8)))
    assert np.array_equal(rows, np.arange(8)) and np.array_equal(np.sort(cols), np.arange(8))


@pytest.mark.parametrize("array_type", [np.empty, torch.empty], ids=["numpy", "tensor"])
@pytest.mark.parametrize("shape", [(0, 0), (2, 0), (0, 3)])
def test_scipy_trivial_cost(array_type, shape):
    rows, cols = ops.linear_sum_assignment(array_type(shape))
    assert len(rows) == 0 and len(cols) == 0
    want = scipy_lsa(np.empty(shape))
    assert as_numpy(rows).dtype == as_numpy(cols).dtype == want[0].dtype == np.int64


def test_one_by_one():
    for value in (5.0, -3, True):
        for maximize in (False, True):
            rows, cols = ops.linear_sum_assignment([[value]], maximize)
            assert rows.tolist() == [0] and cols.tolist() == [0]
    with pytest.raises(ValueError, match="infeasible"):
        ops.linear_sum_assignment([[np.inf]])


@pytest.mark.parametrize(
    "dtype", [np.bool_, np.int8, np.uint8, np.int16, np.int32, np.int64, np.uint64, np.float16, np.float32, np.float64]
)
@pytest.mark.parametrize("shape", [(6, 6), (5, 9), (9, 5)])
def test_numpy_dtypes_like_scipy(dtype, shape):
    rng = np.random.default_rng(0)
    cost = rng.integers(0, 50, size=shape).astype(dtype)
    for maximize in (False, True):
        check_like_scipy(cost, ops.linear_sum_assignment(cost, maximize), scipy_lsa(cost, maximize))


@pytest.mark.parametrize(
    "dtype", [torch.bool, torch.uint8, torch.int8, torch.int32, torch.int64, torch.float16, torch.bfloat16]
)
def test_tensor_dtypes(dtype):
    cost = torch.randint(0, 50, (7, 11)).to(dtype)
    for c in (cost, cost.T):
        for maximize in (False, True):
            rows, cols = ops.linear_sum_assignment(c, maximize)
            assert rows.dtype == cols.dtype == torch.int64
            check_like_scipy(c.double(), (rows, cols), scipy_lsa(c.double().numpy(), maximize))
            check_optimal(c, ops.linear_assignment(c, maximize), maximize)


@pytest.mark.parametrize("shape", [(30, 30), (20, 35), (35, 20), (1, 9), (9, 1)])
@pytest.mark.parametrize("maximize", [False, True])
def test_return_convention_like_scipy(shape, maximize):
    """Distinct random costs: a unique optimum, so rows and columns are exactly scipy's, as are their
    types; numpy in numpy out, tensor in tensor out; non-contiguous and read-only arrays work."""
    rng = np.random.default_rng(shape[0] * 100 + shape[1])
    cost = rng.standard_normal(shape)
    want = scipy_lsa(cost, maximize)
    readonly = cost.copy()
    readonly.flags.writeable = False
    flipped, single = cost[::-1], cost.astype(np.float32)  # negative strides; float32 stays float32
    variants = [(cost, want), (np.asfortranarray(cost), want), (readonly, want),
                (flipped, scipy_lsa(flipped, maximize)), (single, scipy_lsa(single, maximize))]
    for c, w in variants:
        got = ops.linear_sum_assignment(c, maximize)
        assert isinstance(got, tuple) and len(got) == 2
        assert all(type(x) is np.ndarray and x.dtype == np.int64 for x in got)
        assert np.array_equal(got[0], w[0]) and np.array_equal(got[1], w[1])
    got = ops.linear_sum_assignment(torch.from_numpy(cost), maximize)
    assert all(isinstance(x, torch.Tensor) and x.dtype == torch.int64 for x in got)
    assert np.array_equal(got[0].numpy(), want[0]) and np.array_equal(got[1].numpy(), want[1])
