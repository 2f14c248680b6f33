"""The fused backward of ops.grouped_expert_ffn (ops.grouped_expert_ffn_backward, registered as its autograd)
against autograd through reference.grouped_expert_ffn: every gradient (hidden, w_in, w_out, top_k_weights) on
fresh random inputs of odd shapes, every activation, merged and unmerged maps, top-1 to top-6, -1 entries,
empty slots, one token, all tokens on one slot, k entries of a token on one slot; output_mask; gradcheck in
float64; opcheck of both ops; MoEExperts' parameter gradients. CUDA variants (names hold "cuda") run only
with a CUDA device."""
import itertools

import pytest
import torch

from mcsmoe_fast import ops, reference
from mcsmoe_fast.activations import ACTIVATIONS
from mcsmoe_fast.modules import MoEExperts
from test_grouped_ffn import SHAPES, problem

cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
TOL = {torch.float32: dict(rtol=1e-4, atol=1e-5), torch.float64: dict(rtol=1e-10, atol=1e-12),
       torch.float16: dict(rtol=3e-2, atol=3e-2), torch.bfloat16: dict(rtol=8e-2, atol=8e-2)}
NAMES = ("hidden", "w_in", "w_out", "top_k_weights")
DIFFERENTIABLE = (0, 1, 2, 5)  # argument positions of hidden, w_in, w_out, top_k_weights


def leaves(args, which=DIFFERENTIABLE):
    """args with fresh leaves requiring grad at the positions `which` (the others as they are)."""
    args = list(args)
    for i in which:
        args[i] = args[i].detach().clone().requires_grad_()
    return args


def grads(fn, args, grad_out, which=DIFFERENTIABLE):
    args = leaves(args, which)
    out = fn(*args)
    inputs = [args[i] for i in which]
    if not out.requires_grad:  # the reference with no token routed builds no graph: every gradient is 0
        return out, tuple(torch.zeros_like(a) for a in inputs)
    return out, torch.autograd.grad(out, inputs, grad_out, allow_unused=True, materialize_grads=True)


def check_grads(args, seed=0, which=DIFFERENTIABLE, **tol):
    """Fused gradients against the reference's autograd for a random grad_out; returns the fused ones."""
    hidden = args[0]
    grad_out = torch.randn(hidden.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    grad_out = grad_out.to(hidden)
    out, got = grads(ops.grouped_expert_ffn, args, grad_out, which)
    ref_out, want = grads(reference.grouped_expert_ffn, args, grad_out, which)
    torch.testing.assert_close(out, ref_out, **(tol or TOL[hidden.dtype]))
    for i, g, w in zip(which, got, want):
        assert g.shape == w.shape and g.dtype == w.dtype, NAMES[DIFFERENTIABLE.index(i)]
        torch.testing.assert_close(g, w, **(tol or TOL[hidden.dtype]), msg=lambda m: f"grad of {NAMES[DIFFERENTIABLE.index(i)]}: {m}")
    return got


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("activation", ["relu", "swiglu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_grads_match_reference(shape, activation, dtype):
    T, d, ff, E, S, k, drop = shape
    check_grads(problem(T, d, ff, E, S, k, activation, dtype, drop, seed=int(sum(shape) * 10)), seed=T)


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("shape", [(37, 24, 40, 8, 3, 2, 0.1), (1, 13, 7, 4, 2, 1, 0.0), (45, 9, 31, 8, 8, 2, 0.0)])
def test_every_activation(activation, shape):
    T, d, ff, E, S, k, drop = shape
    check_grads(problem(T, d, ff, E, S, k, activation, torch.float64, drop, seed=7))
    check_grads(problem(T, d, ff, E, S, k, activation, torch.float32, drop, seed=8))


@pytest.mark.parametrize("activation", ["gelu", "geglu_tanh"])
def test_merged_and_unmerged_maps_top1_and_top2(activation):
    for S, k in itertools.product((8, 3), (1, 2)):  # S = E unmerged, S < E merged
        emap = torch.arange(8) if S == 8 else torch.tensor([0, 0, 1, 1, 1, 2, 2, 0])
        check_grads(problem(29, 12, 10, 8, S, k, activation, torch.float64, 0.1, seed=S + k, emap=emap))


def test_empty_slot_and_all_tokens_on_one_slot():
    emap = torch.full((8,), 2, dtype=torch.int64)  # slots 0, 1, 3 never used: zero weight gradients
    g_hidden, g_w_in, g_w_out, g_weights = check_grads(problem(50, 16, 24, 8, 4, 2, "swiglu", emap=emap))
    for s in (0, 1, 3):
        assert torch.all(g_w_in[s] == 0) and torch.all(g_w_out[s] == 0)
    assert g_w_in[2].abs().sum() > 0 and g_w_out[2].abs().sum() > 0
    assert torch.equal(g_weights[:, 0], g_weights[:, 1])  # both entries of every token are slot 2


def test_one_token():
    for activation in ("silu", "reglu"):
        check_grads(problem(1, 9, 5, 4, 2, 2, activation, torch.float64, seed=3))


def test_entries_of_one_token_on_one_slot_get_the_same_grad():
    # Experts 0 and 1 share slot 0: the slot runs once with the summed weight, and the output's derivative
    # in each of the two weights is that one slot's output.
    args = list(problem(6, 12, 10, 4, 2, 2, "relu", torch.float64, emap=torch.tensor([0, 0, 1, 1])))
    args[4] = torch.tensor([[0, 1], [1, 0], [2, 3], [0, 2], [3, 3], [1, -1]])  # [3, 3]: one expert twice
    _, _, _, g_weights = check_grads(args)
    for t in (0, 1, 2, 4):
        assert g_weights[t, 0] == g_weights[t, 1]
    assert g_weights[3, 0] != g_weights[3, 1] and g_weights[5, 1] == 0  # two slots; a -1 entry


def test_minus_one_entries_get_zero_grads():
    args = list(problem(9, 12, 10, 4, 2, 3, "swiglu", torch.float64))
    args[4] = args[4].clone()
    args[4][[1, 4]] = -1  # tokens 1 and 4 dropped entirely
    args[4][2, 1] = -1
    g_hidden, _, _, g_weights = check_grads(args)
    assert torch.all(g_hidden[[1, 4]] == 0) and torch.all(g_weights[[1, 4]] == 0) and g_weights[2, 1] == 0
    assert torch.all(g_weights[0] != 0)


def test_no_routed_token_at_all():
    args = list(problem(5, 8, 6, 4, 2, 2, "geglu", torch.float64))
    args[4] = torch.full_like(args[4], -1)
    for g in check_grads(args):
        assert torch.all(g == 0)


@pytest.mark.parametrize("mask", list(itertools.product([False, True], repeat=4)))
def test_output_mask(mask):
    args = problem(23, 10, 14, 8, 3, 2, "swiglu", torch.float64, 0.1, seed=2)
    grad_out = torch.randn(23, 10, dtype=torch.float64)
    full = ops.grouped_expert_ffn_backward(grad_out, *args)
    part = ops.grouped_expert_ffn_backward(grad_out, *args, output_mask=mask)
    for need, f, p, name in zip(mask, full, part, NAMES):
        if need:
            torch.testing.assert_close(p, f, rtol=0, atol=0, msg=name)
        else:
            assert p.shape == (0,), name


@pytest.mark.parametrize("which", [(0,), (1,), (2,), (5,), (1, 2), (0, 5)])
def test_autograd_asks_only_for_needed_grads(which):
    check_grads(problem(31, 12, 9, 8, 3, 2, "gelu_tanh", torch.float64, 0.1, seed=4), which=which)


@pytest.mark.parametrize("mode", ["0", "1"])
def test_both_thread_strategies_and_row_blocks(mode, monkeypatch):
    monkeypatch.setenv("MCSMOE_SLOT_PARALLEL", mode)
    for T in (1, 3, 70):
        check_grads(problem(T, 24, 40, 8, 4, 2, "swiglu", seed=T))
    # a slot with more than 1024 rows runs in row blocks whose weight gradients add up
    emap = torch.tensor([0, 0, 0, 0, 0, 0, 1, 2])
    check_grads(problem(1300, 8, 12, 8, 3, 2, "silu", torch.float64, seed=5, emap=emap))
    with torch.inference_mode(False), torch.enable_grad():
        check_grads(problem(200, 24, 40, 8, 4, 2, "relu", seed=9))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_on_cpu(dtype):
    args = problem(23, 16, 24, 8, 4, 2, "swiglu", dtype, 0.1)
    grad_out = torch.randn(23, 16, dtype=torch.float64).to(dtype)
    _, got = grads(ops.grouped_expert_ffn, args, grad_out)
    wide = [a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]
    _, want = grads(reference.grouped_expert_ffn, wide, grad_out.double())
    for g, w, name in zip(got, want, NAMES):
        assert g.dtype == (torch.float32 if name == "top_k_weights" else dtype), name
        torch.testing.assert_close(g.double(), w, **TOL[dtype], msg=name)


def test_non_contiguous_inputs_and_expanded_grad():
    hidden, w_in, w_out, emap, idx, w, act = problem(21, 16, 12, 8, 3, 2, "swiglu", torch.float64)
    nc = [hidden.t().contiguous().t(), w_in.transpose(1, 2).contiguous().transpose(1, 2),
          w_out.transpose(0, 2).contiguous().transpose(0, 2), emap, idx.t().contiguous().t(), w.t().contiguous().t(), act]
    check_grads(nc)
    a = leaves(nc)
    ops.grouped_expert_ffn(*a).sum().backward()  # grad_out is an expanded (stride 0) tensor of ones
    b = leaves(nc)
    reference.grouped_expert_ffn(*b).sum().backward()
    for i in DIFFERENTIABLE:
        torch.testing.assert_close(a[i].grad, b[i].grad, **TOL[torch.float64])


def test_mixed_weight_dtype():
    args = list(problem(11, 16, 12, 8, 3, 2, "relu"))
    args[5] = args[5].double()  # float32 experts, float64 routing weights: their grad stays float64
    _, _, _, g_weights = check_grads(args)
    assert g_weights.dtype == torch.float64


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_gradcheck_float64(activation):
    args = leaves(problem(7, 5, 4, 6, 3, 2, activation, torch.float64, 0.15, seed=11))
    # random inputs: no pre-activation lies within gradcheck's eps of relu's kink at 0
    assert torch.autograd.gradcheck(lambda h, wi, wo, w: ops.grouped_expert_ffn(h, wi, wo, *args[3:5], w, activation),
                                    (args[0], args[1], args[2], args[5]), eps=1e-6, atol=1e-7)


def test_opcheck_forward_and_backward():
    for activation, which in (("swiglu", DIFFERENTIABLE), ("gelu", (1, 2)), ("relu", ())):
        args = leaves(problem(13, 8, 6, 8, 3, 2, activation, seed=1), which)
        torch.library.opcheck(torch.ops.mcsmoe_fast.grouped_expert_ffn.default, tuple(args))
        plain = [a.detach() if isinstance(a, torch.Tensor) else a for a in args]
        for mask in ([True] * 4, [False, True, True, False], [True, False, False, True]):
            torch.library.opcheck(torch.ops.mcsmoe_fast.grouped_expert_ffn_backward.default,
                                  (torch.randn(13, 8), *plain, mask))


def test_bad_grad_out_is_a_clear_error():
    args = problem(5, 8, 6, 4, 2, 2, "swiglu")
    with pytest.raises(RuntimeError, match=r"grad_out must have hidden's shape \[5, 8\], got \[5, 7\]"):
        ops.grouped_expert_ffn_backward(torch.randn(5, 7), *args)
    with pytest.raises(RuntimeError, match="grad_out must have hidden's dtype"):
        ops.grouped_expert_ffn_backward(torch.randn(5, 8, dtype=torch.float64), *args)
    with pytest.raises(ValueError, match="unknown activation 'quick_gelu'"):
        ops.grouped_expert_ffn_backward(torch.randn(5, 8), *args[:-1], "quick_gelu")


@pytest.mark.parametrize("activation,emap", [("swiglu", [0, 1, 1, 0, 2, 3, 3, 2]), ("relu", list(range(8)))])
def test_moe_experts_parameter_grads_match_reference(activation, emap):
    gen = torch.Generator().manual_seed(3)
    S = max(emap) + 1
    F = 24 if activation == "swiglu" else 12
    w_in, w_out = torch.randn(S, F, 16, generator=gen) / 4, torch.randn(S, 16, 12, generator=gen) / 3.5
    experts = MoEExperts(w_in.clone(), w_out.clone(), torch.tensor(emap), activation)
    hidden = torch.randn(40, 16, generator=gen, requires_grad=True)
    router = torch.randn(8, 16, generator=gen, requires_grad=True)
    probs = torch.softmax(hidden @ router.T, -1)
    weights, index = probs.topk(2, -1)
    loss = experts(hidden, index, weights).square().mean()  # through the fused op: no fallback any more
    loss.backward()
    ref_in, ref_out = w_in.clone().requires_grad_(), w_out.clone().requires_grad_()
    hidden2, router2 = hidden.detach().clone().requires_grad_(), router.detach().clone().requires_grad_()
    probs2 = torch.softmax(hidden2 @ router2.T, -1)
    weights2, index2 = probs2.topk(2, -1)
    reference.grouped_expert_ffn(hidden2, ref_in, ref_out, torch.tensor(emap), index2, weights2,
                                 activation).square().mean().backward()
    for got, want in ((experts.w_in.grad, ref_in.grad), (experts.w_out.grad, ref_out.grad), (hidden.grad, hidden2.grad),
                      (router.grad, router2.grad)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


# --- CUDA ------------------------------------------------------------------------------------------------
def check_grads_cuda(args64, dtype, seed=0):
    """The fused op on CUDA in dtype against the reference in float64 on the CPU, from the same rounded inputs."""
    args = [a.to("cuda", dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() else
            a.to("cuda") if isinstance(a, torch.Tensor) else a for a in args64]
    args[5] = args[5].float()
    grad_out = torch.randn(args[0].shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    _, got = grads(ops.grouped_expert_ffn, args, grad_out.to("cuda", dtype))
    wide = [a.cpu().double() if isinstance(a, torch.Tensor) and a.is_floating_point() else
            a.cpu() if isinstance(a, torch.Tensor) else a for a in args]
    _, want = grads(reference.grouped_expert_ffn, wide, grad_out.to(dtype).double())
    tol = {torch.float32: dict(rtol=1e-4, atol=1e-4)}.get(dtype, TOL[dtype])
    for g, w, name in zip(got, want, NAMES):
        assert g.device.type == "cuda", name
        torch.testing.assert_close(g.cpu().double(), w, **tol, msg=name)


@cuda_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("activation", ["relu", "swiglu"])
def test_cuda_grads_match_reference(shape, activation, dtype):
    T, d, ff, E, S, k, drop = shape
    check_grads_cuda(problem(T, d, ff, E, S, k, activation, torch.float64, drop, seed=int(sum(shape))), dtype, seed=T)


@cuda_only
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_cuda_every_activation(activation):
    check_grads_cuda(problem(37, 24, 40, 8, 3, 2, activation, torch.float64, 0.1, seed=5), torch.float32)


@cuda_only
def test_cuda_edge_cases_and_mask():
    emap = torch.full((8,), 2, dtype=torch.int64)
    check_grads_cuda(problem(50, 16, 24, 8, 4, 2, "swiglu", torch.float64, emap=emap), torch.float32)
    args = list(problem(6, 12, 10, 4, 2, 2, "relu", torch.float64, emap=torch.tensor([0, 0, 1, 1])))
    args[4] = torch.tensor([[0, 1], [1, 0], [2, 3], [0, 2], [3, 3], [1, -1]])
    check_grads_cuda(args, torch.float32)
    args = [a.cuda().float() if isinstance(a, torch.Tensor) and a.is_floating_point() else
            a.cuda() if isinstance(a, torch.Tensor) else a for a in problem(23, 10, 14, 8, 3, 2, "swiglu", drop=0.1)]
    grad_out = torch.randn(23, 10, device="cuda")
    full = ops.grouped_expert_ffn_backward(grad_out, *args)
    for mask in itertools.product([False, True], repeat=4):
        part = ops.grouped_expert_ffn_backward(grad_out, *args, output_mask=mask)
        for need, f, p in zip(mask, full, part):
            assert torch.equal(p, f) if need else p.shape == (0,)
    torch.library.opcheck(torch.ops.mcsmoe_fast.grouped_expert_ffn_backward.default, (grad_out, *args, [True] * 4))
