"""ops.linear_assignment on CUDA (one thread block per problem) against scipy (reference.linear_assignment).

Covers the three block sizes the launcher picks (m <= 128, <= 1024, larger), shared-memory and
global-memory working arrays (m above ~8000 columns does not fit in shared memory), float32 and
float64, maximize, batches, ties, magnitudes, empty problems and argument errors; and scipy's
contract: forbidden pairs (big M substituted before the kernel), infeasible and invalid matrices,
n > m, integer, bool and half dtypes, ops.linear_sum_assignment on CUDA tensors."""
import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment as scipy_lsa

from lap_check import check_optimal
from mcsmoe_fast import ops, reference

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("maximize", [False, True])
def test_random_sizes(dtype, maximize):
    gen = torch.Generator().manual_seed(3)
    for _ in range(30):
        n = int(torch.randint(1, 300, (), generator=gen))
        m = n + int(torch.randint(0, 3, (), generator=gen)) * int(torch.randint(0, 60, (), generator=gen))
        cost = torch.randn(n, m, generator=gen, dtype=dtype).cuda()
        check_optimal(cost, ops.linear_assignment(cost, maximize), maximize)


@pytest.mark.parametrize(
    "n,m",
    [(1, 1), (1, 7), (2, 2), (31, 32), (128, 128), (129, 129), (100, 700), (1024, 1024), (1025, 1100),
     (1500, 1500), (3, 10000), (40, 9000)],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_square_and_rectangular(n, m, dtype):
    cost = torch.rand(n, m, dtype=dtype, device="cuda")
    check_optimal(cost, ops.linear_assignment(cost), False)


@pytest.mark.parametrize("high", [1, 2, 3, 5])
def test_tied_integer_costs(high):
    gen = torch.Generator().manual_seed(high)
    for n, m in [(5, 5), (17, 17), (40, 40), (33, 50), (100, 100), (150, 151), (300, 300)]:
        cost = torch.randint(0, high + 1, (n, m), generator=gen).double().cuda()
        for maximize in (False, True):
            check_optimal(cost, ops.linear_assignment(cost, maximize), maximize)


@pytest.mark.parametrize("scale", [1e-30, 1e-12, 1e12, 1e30])
def test_huge_and_tiny_magnitudes(scale):
    cost = torch.randn(60, 70, dtype=torch.float64, device="cuda") * scale
    check_optimal(cost, ops.linear_assignment(cost), False)
    check_optimal(cost, ops.linear_assignment(cost, maximize=True), True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_batch_matches_cpu(dtype):
    cost = torch.randn(9, 65, 200, dtype=dtype)
    gpu = ops.linear_assignment(cost.cuda(), maximize=True)
    assert gpu.shape == (9, 65) and gpu.device.type == "cuda"
    check_optimal(cost.cuda(), gpu, True)
    cpu = ops.linear_assignment(cost, maximize=True)
    torch.testing.assert_close(
        reference.assignment_objective(cost, gpu.cpu()), reference.assignment_objective(cost, cpu), rtol=1e-12, atol=1e-9
    )


def test_correlated_weights_batch():
    """The alignment use case: match the neurons of experts that are noisy permutations of a reference."""
    torch.manual_seed(0)
    ref = torch.randn(256, 64, device="cuda")
    perms = [torch.randperm(256, device="cuda") for _ in range(5)]
    experts = torch.stack([ref[p] + 0.05 * torch.randn(256, 64, device="cuda") for p in perms])
    sim = ref @ experts.transpose(1, 2)  # [5, 256, 256]
    cols = ops.linear_assignment(sim, maximize=True)
    check_optimal(sim, cols, True)
    for c, p in zip(cols, perms):  # row i of ref is neuron inv(p)[i] of the expert
        assert torch.equal(p[c], torch.arange(256, device="cuda"))


def test_identity_and_known_permutation():
    perm = torch.randperm(500, device="cuda")
    cost = torch.ones(500, 500, device="cuda")
    cost[torch.arange(500, device="cuda"), perm] = 0.0
    assert torch.equal(ops.linear_assignment(cost), perm)


def test_noncontiguous_input():
    base = torch.randn(140, 130, dtype=torch.float64, device="cuda")
    cost = base.T  # [130, 140], a transposed view
    check_optimal(cost, ops.linear_assignment(cost), False)


def test_empty_problems():
    assert ops.linear_assignment(torch.zeros(0, 5, device="cuda")).shape == (0,)
    assert ops.linear_assignment(torch.zeros(3, 0, 5, device="cuda")).shape == (3, 0)
    assert ops.linear_assignment(torch.zeros(0, 4, 5, device="cuda")).shape == (0, 4)


def test_bad_input_raises():
    inf = float("inf")
    with pytest.raises(ValueError, match="invalid numeric entries"):
        ops.linear_assignment(torch.tensor([[0.0, float("nan")]], device="cuda"))
    with pytest.raises(ValueError, match="invalid numeric entries"):
        ops.linear_assignment(torch.tensor([[0.0, -inf]], device="cuda"))
    with pytest.raises(ValueError, match="invalid numeric entries"):
        ops.linear_assignment(torch.tensor([[0.0, inf]], device="cuda"), maximize=True)
    with pytest.raises(ValueError, match="cost matrix is infeasible"):
        ops.linear_assignment(torch.tensor([[inf, inf], [0.0, 1.0]], device="cuda"))
    with pytest.raises(TypeError, match="real"):
        ops.linear_assignment(torch.zeros(2, 2, dtype=torch.complex64, device="cuda"))
    with pytest.raises(ValueError, match="rank"):
        ops.linear_assignment(torch.zeros(2, device="cuda"))


@pytest.mark.parametrize("n,m", [(5, 4), (129, 100), (1100, 1025), (9000, 3)])
@pytest.mark.parametrize("maximize", [False, True])
def test_more_rows_than_columns(n, m, maximize):
    cost = torch.randn(n, m, device="cuda")
    cols = ops.linear_assignment(cost, maximize)
    assert (cols == -1).sum() == n - m
    check_optimal(cost, cols, maximize)
    cpu = ops.linear_assignment(cost.cpu(), maximize)
    torch.testing.assert_close(reference.assignment_objective(cost.cpu(), cols.cpu()),
                               reference.assignment_objective(cost.cpu(), cpu), rtol=1e-12, atol=1e-9)


@pytest.mark.parametrize("dtype", [torch.bool, torch.uint8, torch.int32, torch.int64, torch.float16, torch.bfloat16])
def test_integer_bool_and_half_dtypes(dtype):
    cost = torch.randint(0, 50, (4, 37, 45), device="cuda").to(dtype)
    for c in (cost, cost.transpose(1, 2)):
        for maximize in (False, True):
            check_optimal(c, ops.linear_assignment(c, maximize), maximize)


def forbid(cost: torch.Tensor, mask: torch.Tensor, maximize: bool) -> torch.Tensor:
    return cost.masked_fill(mask, -float("inf") if maximize else float("inf"))


def band_mask(n: int, m: int, width: int, gen: torch.Generator) -> torch.Tensor:
    """Forbidden everywhere but a band of `width` columns from a hidden injective map (n <= m)."""
    hidden = torch.randperm(m, generator=gen)[:n]
    return (torch.arange(m)[None, :] - hidden[:, None]) % m >= width


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("maximize", [False, True])
def test_random_forbidden_masks_vs_scipy(dtype, maximize):
    """Feasible problems: scipy's objective, no forbidden pair; infeasible ones: ValueError, as in scipy.
    Sizes cross the launcher's block sizes; the batch mixes feasible and infeasible problems."""
    gen = torch.Generator().manual_seed(21 + maximize)
    verdicts = []
    for trial in range(60):
        n = int(torch.randint(1, 300, (), generator=gen))
        m = max(1, n + int(torch.randint(-20, 40, (), generator=gen)))
        p = [0.05, 0.5, 0.9, 0.97, 0.99][trial % 5]
        cost = torch.randn(n, m, generator=gen, dtype=dtype)
        mask = band_mask(n, m, 2, gen) if trial % 7 == 0 and n <= m else torch.rand(n, m, generator=gen) < p
        cost = forbid(cost, mask, maximize)
        try:
            scipy_lsa(cost.double().numpy(), maximize=maximize)
            feasible = True
        except ValueError:
            feasible = False
        verdicts.append(feasible)
        if feasible:
            check_optimal(cost.cuda(), ops.linear_assignment(cost.cuda(), maximize), maximize)
        else:
            with pytest.raises(ValueError, match="cost matrix is infeasible"):
                ops.linear_assignment(cost.cuda(), maximize)
    assert 0.2 < np.mean(verdicts) < 0.8


def test_forbidden_batch_names_the_infeasible_problem():
    gen = torch.Generator().manual_seed(4)
    cost = torch.randn(5, 200, 230, generator=gen)
    cost[1] = forbid(cost[1], band_mask(200, 230, 2, gen), False)
    cost[3, 17, :] = float("inf")
    with pytest.raises(ValueError, match=r"cost matrix is infeasible \(problem 3\)"):
        ops.linear_assignment(cost.cuda())
    cost[3, 17, 5] = 0.0
    cols = ops.linear_assignment(cost.cuda())
    check_optimal(cost.cuda(), cols, False)
    torch.testing.assert_close(reference.assignment_objective(cost, cols.cpu()),
                               reference.assignment_objective(cost, ops.linear_assignment(cost)), rtol=1e-12, atol=1e-9)
    cost[4, 2, 2] = float("nan")  # invalid entries are reported first, as in scipy
    with pytest.raises(ValueError, match=r"invalid numeric entries .*\(problem 4\)"):
        ops.linear_assignment(cost.cuda())


@pytest.mark.parametrize("n,m", [(1500, 1500), (40, 9000)])
def test_forbidden_pairs_large_and_global_workspace(n, m):
    gen = torch.Generator().manual_seed(n)
    cost = forbid(torch.rand(n, m, generator=gen), band_mask(n, m, 3, gen), False)
    check_optimal(cost.cuda(), ops.linear_assignment(cost.cuda()), False)


@pytest.mark.parametrize("scale", [1e-300, 1e300])
def test_forbidden_pairs_at_extreme_magnitudes(scale):
    gen = torch.Generator().manual_seed(6)
    for maximize in (False, True):
        cost = torch.randn(60, 70, generator=gen, dtype=torch.float64).clamp(-1.5, 1.5) * scale
        cost = forbid(cost, band_mask(60, 70, 2, gen), maximize).cuda()
        check_optimal(cost, ops.linear_assignment(cost, maximize), maximize)


@pytest.mark.parametrize("shape", [(30, 30), (20, 35), (35, 20), (0, 4), (4, 0)])
def test_linear_sum_assignment_on_cuda_tensors(shape):
    """Tensors in, tensors out on the same device; scipy's rows and columns (a unique optimum)."""
    cost = torch.randn(shape, dtype=torch.float64)
    for maximize in (False, True):
        rows, cols = ops.linear_sum_assignment(cost.cuda(), maximize)
        assert rows.device == cols.device == cost.cuda().device
        assert rows.dtype == cols.dtype == torch.int64
        want_rows, want_cols = scipy_lsa(cost.numpy(), maximize)
        assert rows.cpu().tolist() == want_rows.tolist() and cols.cpu().tolist() == want_cols.tolist()
    inf = torch.eye(3, device="cuda")
    inf[:, 0] = float("inf")
    with pytest.raises(ValueError, match="cost matrix is infeasible"):
        ops.linear_sum_assignment(inf)


def test_runs_on_the_current_stream():
    cost = torch.randn(8, 100, 120, device="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())  # cost was written on the default stream
    with torch.cuda.stream(stream):
        cols = ops.linear_assignment(cost)
    stream.synchronize()
    check_optimal(cost, cols, False)


def test_last_device():
    """The op runs on the cost's device, not on the current one (cuda:0 on a one-GPU machine)."""
    device = torch.device("cuda", torch.cuda.device_count() - 1)
    cost = torch.randn(3, 50, 60, device=device)
    cols = ops.linear_assignment(cost)
    assert cols.device == cost.device
    check_optimal(cost, cols, False)
