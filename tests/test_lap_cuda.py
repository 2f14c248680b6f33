"""ops.linear_assignment on CUDA (one thread block per problem) against scipy (reference.linear_assignment).

Covers the three block sizes the launcher picks (m <= 128, <= 1024, larger), shared-memory and
global-memory working arrays (m above ~8000 columns does not fit in shared memory), float32 and
float64, maximize, batches, ties, magnitudes, empty problems and argument errors."""
import pytest
import torch

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
    with pytest.raises(RuntimeError, match="n <= m"):
        ops.linear_assignment(torch.zeros(5, 4, device="cuda"))
    with pytest.raises(RuntimeError, match="NaN or infinite"):
        ops.linear_assignment(torch.tensor([[0.0, float("nan")]], device="cuda"))
    with pytest.raises(RuntimeError, match="float32 or float64"):
        ops.linear_assignment(torch.zeros(2, 2, dtype=torch.float16, device="cuda"))
    with pytest.raises(RuntimeError, match="rank"):
        ops.linear_assignment(torch.zeros(2, device="cuda"))


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
