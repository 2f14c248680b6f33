"""ops.sparse_lowrank_linear and ops.grouped_expert_ffn_slr on CUDA against mcsmoe_fast.reference (in float64
on the CPU, from the very same rounded inputs): odd shapes, K = 0, r = 0, T = 0, empty slots, float32, float16
and bfloat16; gradients against the reference's; row index errors of the same type and message as the CPU
op's; device mismatches. Every test name holds "cuda" (benchmarks/gpu_check.sh selects -k "cuda or gpu")."""
import re

import pytest
import torch

from mcsmoe_fast import ops, reference
# the problems of the CPU tests, built in float64 on the CPU and moved (and rounded) by `to`
from test_slr import clamped_problem, ffn_problem as cpu_ffn_problem, linear_problem as cpu_linear_problem, slr_bank as bank

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
DEVICE = "cuda"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOL = {torch.float32: dict(rtol=1e-4, atol=1e-4), torch.float16: dict(rtol=2e-2, atol=2e-2),
       torch.bfloat16: dict(rtol=5e-2, atol=5e-2)}


# --- problems (float64 on the CPU; `to` moves and rounds them) ---------------------------------------------
def to(args, dtype, device=DEVICE):
    """Floating tensors to dtype, everything to device; lists (banks) element-wise; None and str as they are."""
    if isinstance(args, (list, tuple)):
        return [to(a, dtype, device) for a in args]
    if not isinstance(args, torch.Tensor):
        return args
    return args.to(device=device, dtype=dtype) if args.is_floating_point() else args.to(device)


def linear_problem(lead, inn, out, r, K, bias, seed=0):
    return list(cpu_linear_problem(lead, inn, out, r, K, bias, torch.float64, seed))


def check_linear(args64, dtype, **tol):
    """The op on CUDA in dtype against the reference in float64 of the same rounded inputs."""
    args = to(args64, dtype)
    out = ops.sparse_lowrank_linear(*args)
    ref = reference.sparse_lowrank_linear(*to(args, torch.float64, "cpu"))
    assert out.shape == ref.shape and out.dtype == dtype and out.device.type == DEVICE
    torch.testing.assert_close(out.cpu().double(), ref, **(tol or TOL[dtype]))
    return out


def ffn_problem(T, d, ff, E, S, k, r, activation, drop=0.0, seed=0, emap=None, kept="mixed"):
    return cpu_ffn_problem(T, d, ff, E, S, k, r, activation, torch.float64, drop, seed, emap, kept)


def check_ffn(args64, dtype, kw=None, **tol):
    """kw: alpha and limit (clamped_swiglu), when given."""
    kw = kw or {}
    args = to(args64, dtype)
    args[5] = args[5].float()  # routing weights stay float32, as models pass them
    out = ops.grouped_expert_ffn_slr(*args, **kw)
    ref = reference.grouped_expert_ffn_slr(*to(args, torch.float64, "cpu"), **kw)
    assert out.shape == ref.shape and out.dtype == dtype and out.device.type == DEVICE
    torch.testing.assert_close(out.cpu().double(), ref, **(tol or TOL[dtype]))
    return out


# --- sparse_lowrank_linear ----------------------------------------------------------------------------------
LINEAR_SHAPES = [  # leading dims of x, in, out, r, K
    ((5,), 7, 6, 3, 2), ((1,), 33, 17, 4, 5), ((0,), 9, 5, 2, 2), ((2, 3), 13, 11, 3, 0), ((4,), 8, 10, 2, 10),
    ((6,), 12, 9, 0, 3), ((6,), 12, 9, 0, 0), ((3,), 0, 5, 2, 2), ((7,), 10, 1, 2, 1), ((), 9, 8, 2, 3),
    ((3, 0, 2), 5, 4, 1, 2), ((3,), 4, 0, 2, 0), ((2, 2, 129), 17, 24, 5, 9), ((1000,), 96, 80, 8, 40),
    ((33,), 1024, 3584, 32, 358), ((257,), 3584, 1024, 32, 102),  # Mixtral-sized, rank 32, keep 10%
]


@pytest.mark.parametrize("shape", LINEAR_SHAPES, ids=str)
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_linear_matches_reference(shape, bias, dtype):
    lead, inn, out, r, K = shape
    check_linear(linear_problem(lead, inn, out, r, K, bias, seed=sum(lead) * 7 + inn + out + r + K), dtype)


def test_cuda_linear_kept_rows_land_in_their_columns():
    # U = V = 0: y is x S_rows^T placed in the kept columns, zero elsewhere.
    x, S_rows = torch.randn(4, 6, device=DEVICE), torch.randn(3, 6, device=DEVICE)
    row_idx = torch.tensor([5, 0, 2], device=DEVICE)
    zeros = torch.zeros(7, 2, device=DEVICE), torch.zeros(2, 6, device=DEVICE)
    y = ops.sparse_lowrank_linear(x, *zeros, S_rows, row_idx)
    expected = torch.zeros(4, 7, device=DEVICE)
    expected[:, row_idx] = x @ S_rows.T
    torch.testing.assert_close(y, expected)


def test_cuda_linear_non_contiguous_inputs():
    x, U, V, S_rows, row_idx, b = to(linear_problem((2, 11), 12, 10, 3, 4, True, seed=1), torch.float32)
    nc = [x.transpose(0, 1).contiguous().transpose(0, 1), U.t().contiguous().t(), V.t().contiguous().t(),
          S_rows.t().contiguous().t(), torch.stack([row_idx, row_idx], 1)[:, 0], torch.stack([b, b], 1)[:, 0]]
    assert not any(t.is_contiguous() for t in nc)
    torch.testing.assert_close(ops.sparse_lowrank_linear(*nc), ops.sparse_lowrank_linear(x, U, V, S_rows, row_idx, b))


def test_cuda_linear_side_stream():
    # The kernels must run on the current stream, not the default one.
    args = to(linear_problem((300,), 64, 48, 4, 9, True, seed=2), torch.float32)
    expected = ops.sparse_lowrank_linear(*args)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        out = ops.sparse_lowrank_linear(*args)
    torch.cuda.current_stream().wait_stream(stream)
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [((3, 7), 13, 11, 3, 5), ((1,), 40, 33, 0, 4), ((9,), 16, 12, 4, 0)], ids=str)
def test_cuda_linear_gradients_match_reference(shape, dtype):
    # gradcheck needs float64, which the CUDA op does not take: gradients against the reference's instead
    # (float64 on the CPU, same rounded inputs), tight in float32.
    lead, inn, out, r, K = shape
    args = to(linear_problem(lead, inn, out, r, K, True, seed=12), dtype)
    ref_args = to(args, torch.float64, "cpu")
    wanted = (0, 1, 2, 3, 5)
    for a in (args, ref_args):
        for i in wanted:
            a[i].requires_grad_()
    g = torch.randn(*lead, out, dtype=torch.float64)
    ours = torch.autograd.grad(ops.sparse_lowrank_linear(*args), [args[i] for i in wanted], g.to(DEVICE, dtype))
    ref = torch.autograd.grad(reference.sparse_lowrank_linear(*ref_args), [ref_args[i] for i in wanted], g)
    for i, a, e in zip(wanted, ours, ref):
        assert a.dtype == dtype and a.device.type == DEVICE and a.shape == e.shape, i
        # half gradients sum T or `in` rounded terms: their tolerance scales with the largest gradient
        scale = 1.0 if dtype == torch.float32 or e.numel() == 0 else max(1.0, e.abs().max().item())
        tol = dict(rtol=TOL[dtype]["rtol"], atol=TOL[dtype]["atol"] * scale)
        torch.testing.assert_close(a.cpu().double(), e, **tol, msg=lambda m: f"gradient of input {i}: {m}")


def test_cuda_linear_opcheck():
    for lead, bias, grad in [((5,), True, True), ((2, 3), False, True), ((1,), True, False), ((0,), False, False)]:
        args = to(linear_problem(lead, 7, 6, 2, 3, bias, seed=31), torch.float32)
        if grad:
            for t in args[:4]:
                t.requires_grad_()
        torch.library.opcheck(torch.ops.mcsmoe_fast.sparse_lowrank_linear, args)


# --- grouped_expert_ffn_slr ---------------------------------------------------------------------------------
FFN_SHAPES = [  # T, d, ff, E, S, k, r, drop
    (1, 16, 24, 8, 8, 2, 4, 0.0), (1, 13, 7, 4, 2, 1, 3, 0.0), (5, 7, 11, 3, 3, 3, 2, 0.0), (37, 24, 40, 8, 3, 2, 5, 0.1),
    (64, 33, 17, 32, 8, 1, 0, 0.3), (100, 8, 8, 8, 1, 2, 2, 0.0), (19, 40, 9, 16, 16, 4, 3, 0.25), (0, 8, 8, 4, 2, 2, 2, 0.0),
    (200, 16, 16, 64, 5, 6, 3, 0.05), (7, 8, 0, 4, 2, 2, 2, 0.0), (6, 0, 8, 4, 2, 1, 2, 0.0), (2048, 128, 96, 8, 4, 2, 8, 0.1),
]


@pytest.mark.parametrize("shape", FFN_SHAPES, ids=str)
@pytest.mark.parametrize("activation", ["relu", "swiglu"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_ffn_matches_reference(shape, activation, dtype):
    T, d, ff, E, S, k, r, drop = shape
    check_ffn(ffn_problem(T, d, ff, E, S, k, r, activation, drop, seed=int(sum(shape) * 10)), dtype)


@pytest.mark.parametrize("kept", ["none", "full"])
@pytest.mark.parametrize("activation", ["relu", "swiglu"])
def test_cuda_ffn_no_kept_rows_and_all_rows_kept(kept, activation):
    check_ffn(ffn_problem(29, 12, 10, 8, 4, 2, 3, activation, kept=kept, seed=21), torch.float32)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_ffn_empty_slots_and_all_tokens_on_one_slot(dtype):
    emap = torch.full((8,), 2, dtype=torch.int64)  # slots 0, 1 and 3 get no token
    check_ffn(ffn_problem(50, 16, 24, 8, 4, 2, 3, "swiglu", emap=emap, seed=22), dtype)


def test_cuda_ffn_mixtral_sized_slots():
    # d 1024, ff 3584, 4 slots, rank 32, ~10% of the rows kept: the benchmark's shapes, checked.
    args = ffn_problem(96, 1024, 3584, 8, 4, 2, 32, "swiglu", seed=23)
    for w in args[1:3]:  # keep about a tenth of the rows in every slot
        out, S = w[0].shape[1], w[0].shape[0]
        gen = torch.Generator().manual_seed(out)
        w[:] = bank(S, out, w[1].shape[2], 32, [out // 10] * S, gen)
    check_ffn(args, torch.bfloat16)


def test_cuda_ffn_dropped_tokens_give_zero_rows():
    args = ffn_problem(9, 12, 10, 4, 2, 2, 3, "swiglu", seed=24)
    args[4][[1, 4]] = -1
    out = check_ffn(args, torch.float32)
    assert torch.all(out[[1, 4]] == 0) and torch.all(out[0] != 0)


def test_cuda_ffn_matches_cpu_op():
    args = ffn_problem(70, 24, 40, 8, 4, 2, 4, "swiglu", drop=0.1, seed=25)
    cpu = to(args, torch.float32, "cpu")
    cpu[5] = cpu[5].float()
    gpu = to(cpu, torch.float32)
    torch.testing.assert_close(ops.grouped_expert_ffn_slr(*gpu).cpu(), ops.grouped_expert_ffn_slr(*cpu), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("alpha,limit,scale", [(1.702, 7.0, 9.0), (1.702, 0.6, 1.0), (0.8, 1.5, 2.0)])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_ffn_clamped_swiglu_straddles_the_limit(alpha, limit, scale, dtype):
    tol = dict(rtol=1e-4, atol=5e-4) if dtype == torch.float32 else {}
    check_ffn(clamped_problem(41, torch.float64, scale), dtype, dict(alpha=alpha, limit=limit), **tol)


def test_cuda_ffn_clamped_swiglu_matches_cpu_op_and_opcheck():
    cpu = to(clamped_problem(300, torch.float64, 2.0, seed=36), torch.float32, "cpu")
    gpu = to(cpu, torch.float32)
    kw = dict(alpha=1.3, limit=0.9)
    torch.testing.assert_close(ops.grouped_expert_ffn_slr(*gpu, **kw).cpu(), ops.grouped_expert_ffn_slr(*cpu, **kw),
                               rtol=1e-4, atol=1e-4)
    torch.library.opcheck(torch.ops.mcsmoe_fast.grouped_expert_ffn_slr, gpu, kw)


@pytest.mark.parametrize("activation", ["swiglu", "clamped_swiglu"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_ffn_expert_biases_match_reference_and_cpu_op(activation, dtype):
    args64 = ffn_problem(57, 24, 20, 8, 4, 2, 3, activation, drop=0.1, seed=37)
    S, F, d = args64[1][0].shape[0], args64[1][0].shape[1], args64[0].shape[1]
    gen = torch.Generator().manual_seed(38)
    b_in, b_out = torch.randn(S, F, generator=gen, dtype=torch.float64), torch.randn(S, d, generator=gen, dtype=torch.float64)
    kw = dict(alpha=1.2, limit=1.5) if activation == "clamped_swiglu" else {}
    args = to(args64, dtype)
    args[5] = args[5].float()
    biases = dict(b_in=b_in.to(DEVICE, dtype), b_out=b_out.to(DEVICE, dtype))
    out = ops.grouped_expert_ffn_slr(*args, **biases, **kw)
    ref = reference.grouped_expert_ffn_slr(*to(args, torch.float64, "cpu"), b_in=biases["b_in"].cpu().double(),
                                           b_out=biases["b_out"].cpu().double(), **kw)
    torch.testing.assert_close(out.cpu().double(), ref, **TOL[dtype])
    if dtype == torch.float32:
        cpu = to(args, torch.float32, "cpu")
        torch.testing.assert_close(out.cpu(), ops.grouped_expert_ffn_slr(*cpu, b_in=b_in.float(), b_out=b_out.float(),
                                                                         **kw), rtol=1e-4, atol=1e-4)
        torch.library.opcheck(torch.ops.mcsmoe_fast.grouped_expert_ffn_slr, args, {**biases, **kw})


def test_cuda_ffn_opcheck():
    for T, act in [(7, "relu"), (1, "swiglu"), (0, "swiglu")]:
        args = to(ffn_problem(T, 8, 6, 4, 3, 2, 2, act, drop=0.2, seed=32), torch.float32)
        args[5] = args[5].float()
        torch.library.opcheck(torch.ops.mcsmoe_fast.grouped_expert_ffn_slr, args)


# --- errors: the CPU op's type and message ------------------------------------------------------------------
def raised(fn, args):
    with pytest.raises(Exception) as info:
        fn(*args)
    return type(info.value), str(info.value).splitlines()[0]


def same_error_as_cpu(fn, args_cpu, expected_type, match):
    """The op raises expected_type matching `match` on the CPU, and the same type and message on CUDA."""
    cpu = raised(fn, args_cpu)
    assert cpu[0] is expected_type, cpu
    assert re.search(match, cpu[1]), cpu
    assert raised(fn, to(args_cpu, None)) == cpu


def linear_args_cpu():
    return to(linear_problem((4,), 6, 5, 2, 3, True, seed=40), torch.float32, "cpu")


@pytest.mark.parametrize("row_idx,exc,match", [
    ([0, 5, 1], IndexError, r"row_idx\[1\] = 5 is not an output row in \[0, 5\)"),
    ([0, 1, -1], IndexError, r"row_idx\[2\] = -1 is not an output row"),
    ([3, 1, 3], ValueError, r"row_idx\[2\] = 3 repeats an earlier row"),
    ([3, 3, 9], ValueError, r"row_idx\[1\] = 3 repeats"),  # the first offending entry wins
    ([9, 3, 3], IndexError, r"row_idx\[0\] = 9"),
])
def test_cuda_linear_bad_row_idx(row_idx, exc, match):
    args = linear_args_cpu()
    args[4] = torch.tensor(row_idx)
    same_error_as_cpu(ops.sparse_lowrank_linear, args, exc, match)
    check_linear(linear_problem((4,), 6, 5, 2, 3, True), torch.float32)  # the device is still usable


def test_cuda_linear_device_mismatch_and_dtype():
    args = to(linear_args_cpu(), torch.float32)
    for i in (1, 3, 4, 5):
        bad = list(args)
        bad[i] = bad[i].cpu()
        with pytest.raises(RuntimeError, match="one device|on cpu"):  # bias: "bias must be Float on cuda:0, ..."
            ops.sparse_lowrank_linear(*bad)
    with pytest.raises(RuntimeError, match="CUDA supports float32, float16 and bfloat16"):
        ops.sparse_lowrank_linear(*to(args, torch.float64))


def set_bank(name, i, fn):
    def edit(a):
        a[1 if name == "w_in" else 2][i] = fn(a[1 if name == "w_in" else 2][i])
    return edit


FFN_BAD_ROWS = [  # edits of a problem with S 3, w_in kept rows [0, 5, 12] of 12, w_out [0, 4, 8] of 8
    (set_bank("w_in", 3, lambda t: torch.cat([t[:-1], torch.tensor([12])])), IndexError,
     r"w_in row_idx of slot 2, entry \[11\] = 12 is not an output row in \[0, 12\)"),
    (set_bank("w_out", 3, lambda t: torch.cat([t[:4], torch.tensor([-2]), t[5:]])), IndexError,
     r"w_out row_idx of slot 2, entry \[0\] = -2 is not an output row in \[0, 8\)"),
    (set_bank("w_in", 3, lambda t: torch.cat([t[:5], t[5:6], t[5:16]])), ValueError,
     r"w_in row_idx of slot 2, entry \[1\] = \d+ repeats an earlier row"),
    (set_bank("w_in", 3, lambda t: torch.cat([t[:1], t[:1], t[2:]])), ValueError,
     r"w_in row_idx of slot 1, entry \[1\] = \d+ repeats"),  # the first slot with an error wins
    (set_bank("w_in", 4, lambda t: torch.tensor([0, 3, 2, 17])), RuntimeError, "w_in row_offsets must not decrease"),
    (set_bank("w_out", 4, lambda t: torch.tensor([0, 0, 4, 13])), RuntimeError,
     "w_out row_offsets must start at 0 and end at 12, got 0 and 13"),
]


def ffn_args_cpu():
    args = ffn_problem(5, 8, 6, 4, 3, 2, 2, "swiglu", emap=torch.tensor([0, 1, 2, 2]), seed=47)
    assert args[1][4].tolist() == [0, 0, 5, 17] and args[2][4].tolist() == [0, 0, 4, 12]
    args = to(args, torch.float32, "cpu")
    args[5] = args[5].float()
    return args


@pytest.mark.parametrize("edit,exc,match", FFN_BAD_ROWS)
def test_cuda_ffn_bad_rows_and_offsets(edit, exc, match):
    args = ffn_args_cpu()
    edit(args)
    same_error_as_cpu(ops.grouped_expert_ffn_slr, args, exc, match)
    check_ffn(ffn_problem(5, 8, 6, 4, 3, 2, 2, "swiglu", seed=47), torch.float32)  # still usable


def test_cuda_ffn_bad_routing():
    # Same check as the dense op (the CPU names the alignment step, moe_align, in its message instead).
    args = to(ffn_args_cpu(), torch.float32)
    args[4] = torch.full_like(args[4], 4)
    with pytest.raises(RuntimeError, match=r"grouped_expert_ffn_slr: top_k_index\[0, 0\] = 4 is not an expert id"):
        ops.grouped_expert_ffn_slr(*args)


def test_cuda_ffn_rows_may_repeat_across_slots():
    args = ffn_problem(5, 8, 6, 4, 3, 2, 2, "swiglu", emap=torch.tensor([0, 1, 2, 2]), seed=47)
    slot1 = args[1][3][:5].tolist()
    args[1][3] = torch.tensor(slot1 + slot1 + [r for r in range(12) if r not in slot1])  # slot 2: all 12 rows
    check_ffn(args, torch.float32)


def test_cuda_ffn_device_mismatch_and_dtype():
    args = to(ffn_args_cpu(), torch.float32)
    for name, i in [("w_in", 0), ("w_in", 3), ("w_out", 4), ("w_out", 2)]:
        bad = to(args, None)
        set_bank(name, i, lambda t: t.cpu())(bad)
        with pytest.raises(RuntimeError, match="device"):
            ops.grouped_expert_ffn_slr(*bad)
    with pytest.raises(RuntimeError, match="CUDA supports float32, float16 and bfloat16"):
        ops.grouped_expert_ffn_slr(*to(args, torch.float64)[:5], args[5], args[6])
