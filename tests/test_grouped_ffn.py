"""ops.grouped_expert_ffn (fused expert FFN over merged slots) against reference.grouped_expert_ffn."""
import os

import pytest
import torch

from mcsmoe_fast import ops, reference
from mcsmoe_fast.activations import ACTIVATIONS, is_gated

cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float64: dict(rtol=1e-12, atol=1e-12),
       torch.float16: dict(rtol=2e-2, atol=2e-2), torch.bfloat16: dict(rtol=5e-2, atol=5e-2)}


def problem(T, d, ff, E, S, k, activation, dtype=torch.float32, drop=0.0, seed=0, device="cpu", emap=None):
    gen = torch.Generator().manual_seed(seed)
    F = 2 * ff if is_gated(activation) else ff
    hidden = torch.randn(T, d, generator=gen, dtype=torch.float64)
    w_in = torch.randn(S, F, d, generator=gen, dtype=torch.float64) / d**0.5
    w_out = torch.randn(S, d, ff, generator=gen, dtype=torch.float64) / ff**0.5
    if emap is None:
        emap = torch.randint(0, S, (E,), generator=gen)
    idx = torch.stack([torch.randperm(E, generator=gen)[:k] for _ in range(T)]) if T else torch.empty(0, k, dtype=torch.int64)
    idx = torch.where(torch.rand(T, k, generator=gen) < drop, -1, idx)
    weights = torch.rand(T, k, generator=gen, dtype=torch.float64)
    to = dict(device=device, dtype=dtype)
    return (hidden.to(**to), w_in.to(**to), w_out.to(**to), emap.to(device), idx.to(device),
            weights.to(device=device, dtype=torch.float64 if dtype == torch.float64 else torch.float32), activation)


def check(args, **tol):
    out = ops.grouped_expert_ffn(*args)
    ref = reference.grouped_expert_ffn(*args)
    assert out.shape == ref.shape and out.dtype == ref.dtype and out.device == ref.device
    torch.testing.assert_close(out, ref, **(tol or TOL[args[0].dtype]))
    return out


SHAPES = [  # T, d, ff, E, S, k, drop
    (1, 16, 24, 8, 8, 2, 0.0), (1, 13, 7, 4, 2, 1, 0.0), (5, 7, 11, 3, 3, 3, 0.0), (37, 24, 40, 8, 3, 2, 0.1),
    (64, 33, 17, 32, 8, 1, 0.3), (100, 8, 8, 8, 1, 2, 0.0), (19, 40, 9, 16, 16, 4, 0.25), (0, 8, 8, 4, 2, 2, 0.0),
    (200, 16, 16, 64, 5, 6, 0.05), (7, 8, 0, 4, 2, 2, 0.0), (6, 0, 8, 4, 2, 1, 0.0),  # zero-width experts, d = 0
]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("activation", ["relu", "swiglu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_reference(shape, activation, dtype):
    T, d, ff, E, S, k, drop = shape
    check(problem(T, d, ff, E, S, k, activation, dtype, drop, seed=int(sum(shape) * 10)))


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("shape", [(37, 24, 40, 8, 3, 2, 0.1), (1, 13, 7, 4, 2, 1, 0.0)])
def test_every_activation_matches_reference(activation, shape):
    T, d, ff, E, S, k, drop = shape
    args = problem(T, d, ff, E, S, k, activation, torch.float64, drop, seed=5)
    check(args)
    others = [a for a in ACTIVATIONS if a != activation and is_gated(a) == is_gated(activation)]
    for other in others:  # each name computes its own function
        assert not torch.allclose(ops.grouped_expert_ffn(*args[:-1], other), ops.grouped_expert_ffn(*args))


def test_unknown_activation_is_a_value_error():
    args = list(problem(5, 8, 6, 4, 2, 2, "relu"))
    args[-1] = "quick_gelu"
    with pytest.raises(ValueError, match="unknown activation 'quick_gelu'"):
        ops.grouped_expert_ffn(*args)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_on_cpu(dtype):
    check(problem(23, 16, 24, 8, 4, 2, "swiglu", dtype, 0.1))


@pytest.mark.parametrize("mode", ["0", "1"])
def test_both_thread_strategies(mode, monkeypatch):
    monkeypatch.setenv("MCSMOE_SLOT_PARALLEL", mode)
    for T in (1, 3, 70):
        check(problem(T, 24, 40, 8, 4, 2, "swiglu", seed=T))
        with torch.inference_mode():  # thread-local mode must reach the worker threads
            check(problem(T, 24, 40, 8, 4, 2, "relu", seed=T))


def test_empty_slots_and_all_tokens_on_one_slot():
    emap = torch.full((8,), 2, dtype=torch.int64)  # slots 0, 1, 3 never used
    out = check(problem(50, 16, 24, 8, 4, 2, "swiglu", emap=emap))
    args = problem(50, 16, 24, 8, 4, 2, "swiglu", emap=emap)
    hidden, w_in, w_out, _, _, weights, _ = args
    h = hidden @ w_in[2].T
    dense = (torch.nn.functional.silu(h[:, :24]) * h[:, 24:]) @ w_out[2].T * weights.sum(-1, keepdim=True)
    torch.testing.assert_close(out, dense, rtol=1e-5, atol=1e-5)


def test_shared_slot_runs_once_with_summed_weight():
    # Two experts in one slot: the token's output is the slot's FFN times the summed weight.
    args = list(problem(6, 12, 10, 4, 2, 2, "relu", emap=torch.tensor([0, 0, 1, 1])))
    args[4] = torch.tensor([[0, 1]] * 6)
    hidden, w_in, w_out, _, _, weights, _ = args
    expected = torch.relu(hidden @ w_in[0].T) @ w_out[0].T * weights.sum(-1, keepdim=True)
    torch.testing.assert_close(ops.grouped_expert_ffn(*args), expected, rtol=1e-5, atol=1e-5)


def test_dropped_tokens_give_zero_rows():
    args = list(problem(9, 12, 10, 4, 2, 2, "swiglu"))
    args[4] = args[4].clone()
    args[4][[1, 4]] = -1
    out = check(args)
    assert torch.all(out[[1, 4]] == 0) and torch.all(out[0] != 0)


def test_non_contiguous_inputs():
    hidden, w_in, w_out, emap, idx, w, act = problem(21, 16, 12, 8, 3, 2, "swiglu")
    nc = (hidden.t().contiguous().t(), w_in.transpose(1, 2).contiguous().transpose(1, 2),
          w_out.transpose(0, 2).contiguous().transpose(0, 2), emap, idx.t().contiguous().t(), w.t().contiguous().t(), act)
    torch.testing.assert_close(ops.grouped_expert_ffn(*nc), reference.grouped_expert_ffn(hidden, w_in, w_out, emap, idx, w, act))


def test_mixed_weight_dtype():
    args = list(problem(11, 16, 12, 8, 3, 2, "relu"))
    args[5] = args[5].double()
    check(args)


def test_grad_inputs_get_the_reference_gradient():
    # the fused backward (every case in test_grouped_ffn_backward.py)
    args = list(problem(4, 8, 8, 4, 2, 2, "relu"))
    args[1] = args[1].clone().requires_grad_()
    ops.grouped_expert_ffn(*args).sum().backward()
    want = torch.autograd.grad(reference.grouped_expert_ffn(*args).sum(), args[1])[0]
    torch.testing.assert_close(args[1].grad, want, **TOL[torch.float32])


def good_args():
    return list(problem(5, 8, 6, 4, 2, 2, "swiglu"))


@pytest.mark.parametrize("edit,match", [
    (lambda a: a.__setitem__(6, "gelu"), "F = 12 rows but gelu"),  # ungated: w_in must have ff rows
    (lambda a: a.__setitem__(0, a[0][None]), r"hidden must be \[T, d\]"),
    (lambda a: a.__setitem__(0, a[0][:, :7]), "hidden size"),
    (lambda a: a.__setitem__(1, a[1][:, :6]), "F = 12"),
    (lambda a: a.__setitem__(2, a[2][:1]), "number of slots"),
    (lambda a: a.__setitem__(1, a[1].double()), "one dtype"),
    (lambda a: a.__setitem__(1, a[1][0]), r"\[S, F, d\]"),
    (lambda a: a.__setitem__(0, a[0].long()), "floating point"),
    (lambda a: (a.__setitem__(4, a[4][:3]), a.__setitem__(5, a[5][:3])), "tokens"),
    (lambda a: a.__setitem__(4, a[4].int()), "int64"),
    (lambda a: a.__setitem__(4, torch.full_like(a[4], 4)), r"top_k_index\[0, 0\] = 4"),
    (lambda a: a.__setitem__(4, torch.full_like(a[4], -3)), r"= -3"),
    (lambda a: a.__setitem__(3, torch.tensor([0, 1, 2, 0])), r"expert_map\[2\] = 2"),
    (lambda a: a.__setitem__(3, torch.tensor([0, 1, -1, 0])), r"expert_map\[2\] = -1"),
    (lambda a: a.__setitem__(5, a[5][:, :1]), "shape"),
    (lambda a: a.__setitem__(3, a[3].float()), "int64"),
    (lambda a: a.__setitem__(0, a[0].to("meta")), "device"),
])
def test_bad_inputs_raise(edit, match):
    args = good_args()
    edit(args)
    with pytest.raises((RuntimeError, NotImplementedError), match=match):
        ops.grouped_expert_ffn(*args)


def test_opcheck():
    for shape in [(7, 8, 6, 4, 3, 2, 0.2), (1, 8, 6, 4, 2, 2, 0.0)]:
        T, d, ff, E, S, k, drop = shape
        for act in ("relu", "swiglu"):
            torch.library.opcheck(torch.ops.mcsmoe_fast.grouped_expert_ffn, problem(T, d, ff, E, S, k, act, drop=drop))


def test_torch_compile_traces_the_op():
    args = problem(12, 8, 6, 4, 2, 2, "swiglu")
    compiled = torch.compile(ops.grouped_expert_ffn, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(*args), reference.grouped_expert_ffn(*args))


@cuda_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES + [(4099, 64, 96, 8, 4, 2, 0.1), (2048, 128, 64, 32, 8, 1, 0.3)])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_cuda_matches_reference(shape, activation, dtype):
    T, d, ff, E, S, k, drop = shape
    args = problem(T, d, ff, E, S, k, activation, dtype, drop, seed=int(sum(shape) * 10), device="cuda")
    ref = reference.grouped_expert_ffn(*problem(T, d, ff, E, S, k, activation, torch.float64, drop, seed=int(sum(shape) * 10)))
    out = ops.grouped_expert_ffn(*args)
    assert out.dtype == dtype and out.device.type == "cuda"
    torch.testing.assert_close(out.double().cpu(), ref, **TOL[dtype])


@cuda_only
def test_cuda_bad_inputs_raise():
    args = problem(5, 8, 6, 4, 2, 2, "swiglu", device="cuda")
    bad = list(args)
    bad[4] = torch.full_like(args[4], 7)
    with pytest.raises(RuntimeError, match="top_k_index"):
        ops.grouped_expert_ffn(*bad)
    bad = list(args)
    bad[0] = args[0].cpu()
    with pytest.raises(RuntimeError, match="device"):
        ops.grouped_expert_ffn(*bad)


@cuda_only
def test_cuda_opcheck():
    torch.library.opcheck(torch.ops.mcsmoe_fast.grouped_expert_ffn, problem(7, 8, 6, 4, 3, 2, "swiglu", drop=0.2, device="cuda"))
