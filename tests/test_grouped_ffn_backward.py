"""The fused backward of ops.grouped_expert_ffn (ops.grouped_expert_ffn_backward, registered as its autograd)
against autograd through reference.grouped_expert_ffn: every gradient (hidden, w_in, w_out, top_k_weights, and
the expert biases b_in, b_out) on fresh random inputs of odd shapes, every activation (GPT-OSS's clamped
SwiGLU with pre-activations on both sides of +-limit and exactly on it), merged and unmerged maps, top-1 to
top-6, -1 entries, empty slots, one token, all tokens on one slot, k entries of a token on one slot;
output_mask; gradcheck in float64; opcheck of both ops; MoEExperts' parameter gradients. CUDA variants (names
hold "cuda") run only with a CUDA device."""
import itertools

import pytest
import torch

from mcsmoe_fast import ops, reference
from mcsmoe_fast.activations import ACTIVATIONS
from mcsmoe_fast.modules import MoEExperts
from test_grouped_ffn import SHAPES, biases, problem

cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
TOL = {torch.float32: dict(rtol=1e-4, atol=1e-5), torch.float64: dict(rtol=1e-10, atol=1e-12),
       torch.float16: dict(rtol=3e-2, atol=3e-2), torch.bfloat16: dict(rtol=8e-2, atol=8e-2)}
NAMES = ("hidden", "w_in", "w_out", "top_k_weights")
DIFFERENTIABLE = (0, 1, 2, 5)  # argument positions of hidden, w_in, w_out, top_k_weights
# with_biases' args: ... activation (6), b_in (7), b_out (8), alpha (9), limit (10)
ARG_NAMES = {0: "hidden", 1: "w_in", 2: "w_out", 5: "top_k_weights", 7: "b_in", 8: "b_out"}
WITH_BIASES = (0, 1, 2, 5, 7, 8)


def with_biases(args, which=("b_in", "b_out"), alpha=1.702, limit=7.0, seed=1):
    """problem(...)'s args followed by b_in, b_out (random, or None when not in `which`), alpha and limit:
    all eleven arguments of grouped_expert_ffn, positionally."""
    b = biases(args, which, seed=seed)
    return [*args, b.get("b_in"), b.get("b_out"), alpha, limit]


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
        assert g.shape == w.shape and g.dtype == w.dtype, ARG_NAMES[i]
        torch.testing.assert_close(g, w, **(tol or TOL[hidden.dtype]), msg=lambda m: f"grad of {ARG_NAMES[i]}: {m}")
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


@pytest.mark.parametrize("mode", ["0", "1", "balanced"])
def test_every_thread_schedule_and_row_blocks(mode, monkeypatch):
    monkeypatch.setenv("MCSMOE_SLOT_PARALLEL", mode)
    for T in (1, 3, 70):
        check_grads(problem(T, 24, 40, 8, 4, 2, "swiglu", seed=T))
    # a slot with more than 1024 rows runs in row blocks whose weight gradients add up
    emap = torch.tensor([0, 0, 0, 0, 0, 0, 1, 2])
    check_grads(problem(1300, 8, 12, 8, 3, 2, "silu", torch.float64, seed=5, emap=emap))
    with torch.inference_mode(False), torch.enable_grad():
        check_grads(problem(200, 24, 40, 8, 4, 2, "relu", seed=9))


@pytest.mark.parametrize("mode", ["0", "1", "balanced"])
def test_many_small_slots_on_two_threads(mode, monkeypatch):
    """Many small slots (E = S = 64, top-6) above kSmallCallMacs, so every thread takes slots from the
    shared counter: every gradient equals the reference's."""
    monkeypatch.setenv("MCSMOE_SLOT_PARALLEL", mode)
    threads = torch.get_num_threads()
    torch.set_num_threads(max(2, threads))
    try:
        check_grads(problem(300, 32, 16, 64, 64, 6, "swiglu", torch.float64, 0.05, seed=6, emap=torch.arange(64)))
    finally:
        torch.set_num_threads(threads)


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
        for mask in ([True] * 6, [False, True, True, False, False, False], [True, False, False, True, True, True]):
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


# --- expert biases and GPT-OSS's clamped SwiGLU ------------------------------------------------------------
BIAS_SETS = [("b_in",), ("b_out",), ("b_in", "b_out")]


def present(args, which=WITH_BIASES):
    """The positions in `which` that hold a tensor (a bias left at None has no gradient)."""
    return tuple(i for i in which if isinstance(args[i], torch.Tensor))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("which", BIAS_SETS, ids="+".join)
@pytest.mark.parametrize("activation", ["relu", "swiglu", "clamped_swiglu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_grads_with_biases_match_reference(shape, which, activation, dtype):
    T, d, ff, E, S, k, drop = shape
    args = with_biases(problem(T, d, ff, E, S, k, activation, dtype, drop, seed=int(sum(shape) * 10)), which,
                       limit=0.8, seed=T + d)
    check_grads(args, seed=T, which=present(args))


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_every_activation_with_biases(activation):
    for dtype, seed in ((torch.float64, 7), (torch.float32, 8)):
        args = with_biases(problem(37, 24, 40, 8, 3, 2, activation, dtype, 0.1, seed=seed), limit=0.9, seed=seed)
        check_grads(args, which=WITH_BIASES)


@pytest.mark.parametrize("alpha,limit,scale", [(1.702, 7.0, 9.0), (1.702, 0.8, 1.0), (0.5, 2.0, 2.5), (3.0, 0.0, 1.0)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("which", [(), ("b_in", "b_out")], ids=["nobias", "biases"])
def test_clamped_swiglu_grads_straddle_the_limit(alpha, limit, scale, dtype, which):
    args = list(problem(61, 20, 18, 8, 4, 2, "clamped_swiglu", dtype, 0.1, seed=17))
    args[1] = args[1] * scale
    args = with_biases(args, which, alpha, limit)
    hidden, w_in, emap, idx = args[0], args[1], args[3], args[4]
    slots, tokens = emap[idx.clamp(min=0)][idx >= 0], (idx >= 0).nonzero()[:, 0]
    h = torch.einsum("nd,nfd->nf", hidden[tokens], w_in[slots])
    if args[7] is not None:
        h = h + args[7][slots]
    gate, up = h.chunk(2, dim=-1)
    for clamped in (gate > limit, up > limit, up < -limit):  # both sides of +-limit: gradients pass and stop
        assert 0.1 < clamped.double().mean() < 0.6
    # pre-activations up to ~25 in float32: an absolute tolerance on that scale
    check_grads(args, which=present(args), **(dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else {}))


def test_clamped_swiglu_grads_exactly_at_the_limit():
    # One-hot tokens make H = W_in[s][:, c] exactly: gate and up entries equal to +-limit, where torch's clamp
    # passes the gradient (min <= x <= max), and just outside, where it does not.
    limit = 0.75
    T, d, ff, S = 6, 6, 4, 2
    hidden = torch.eye(T, d, dtype=torch.float64)
    gen = torch.Generator().manual_seed(0)
    w_in = torch.randn(S, 2 * ff, d, generator=gen, dtype=torch.float64) * 0.3
    w_in[:, 0, :] = limit                          # gate == limit
    w_in[:, 1, :] = torch.nextafter(torch.tensor(limit, dtype=torch.float64), torch.tensor(2.0, dtype=torch.float64))
    w_in[:, ff, :] = limit                         # up == limit
    w_in[:, ff + 1, :] = -limit                    # up == -limit
    w_in[:, ff + 2, :] = -limit - 1e-9             # up just below -limit
    w_out = torch.randn(S, d, ff, generator=gen, dtype=torch.float64)
    emap, idx = torch.tensor([0, 1, 1]), torch.tensor([[0, 1], [1, 2], [2, 0], [0, -1], [1, 0], [2, 1]])
    weights = torch.rand(T, 2, generator=gen, dtype=torch.float64)
    args = [hidden, w_in, w_out, emap, idx, weights, "clamped_swiglu", None, None, 1.702, limit]
    _, g_w_in, *_ = check_grads(args, which=(0, 1, 2, 5), rtol=1e-12, atol=1e-12)
    # W_in[s][f, c] has a gradient only where token c reaches slot s
    routed = torch.zeros(S, d, dtype=torch.bool)
    for t, j in (idx >= 0).nonzero().tolist():
        routed[emap[idx[t, j]], t] = True
    assert routed.sum() >= 6
    at = lambda f: g_w_in[:, f][routed]  # noqa: E731
    assert torch.all(at(0) != 0) and torch.all(at(1) == 0)  # gate at the limit passes, just above it stops
    assert torch.all(at(ff) != 0) and torch.all(at(ff + 1) != 0) and torch.all(at(ff + 2) == 0)


def test_routing_weight_grad_includes_b_out():
    # With w_out = 0 every slot's output is b_out[s]: the weight's gradient is <grad_out[t], b_out[s]>.
    args = with_biases(problem(12, 7, 5, 4, 3, 2, "swiglu", torch.float64, emap=torch.tensor([0, 1, 1, 2])))
    args[2] = torch.zeros_like(args[2])
    grad_out = torch.randn(12, 7, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    g_weights = ops.grouped_expert_ffn_backward(grad_out, *args[:7], output_mask=[False, False, False, True, False, False],
                                                b_in=args[7], b_out=args[8])[3]
    expected = torch.einsum("td,tkd->tk", grad_out, args[8][args[3][args[4]]])
    torch.testing.assert_close(g_weights, expected, rtol=1e-12, atol=1e-12)
    check_grads(args, which=WITH_BIASES)


def test_bias_grads_edge_cases():
    emap = torch.full((8,), 2, dtype=torch.int64)  # slots 0, 1, 3 never used: zero bias gradients there
    args = with_biases(problem(50, 16, 24, 8, 4, 2, "clamped_swiglu", emap=emap), limit=0.6)
    grads_ = check_grads(args, which=WITH_BIASES)
    g_bin, g_bout = grads_[4], grads_[5]
    for s in (0, 1, 3):
        assert torch.all(g_bin[s] == 0) and torch.all(g_bout[s] == 0)
    assert g_bin[2].abs().sum() > 0 and g_bout[2].abs().sum() > 0
    args = with_biases(problem(9, 12, 10, 4, 2, 3, "swiglu", torch.float64))
    args[4] = args[4].clone()
    args[4][[1, 4]] = -1  # dropped tokens: no gradient from them, not even through b_out
    args[4][2, 1] = -1
    g_hidden, _, _, g_weights, _, _ = check_grads(args, which=WITH_BIASES)
    assert torch.all(g_hidden[[1, 4]] == 0) and torch.all(g_weights[[1, 4]] == 0) and g_weights[2, 1] == 0
    args[4] = torch.full_like(args[4], -1)  # nothing routed: every gradient 0, the biases' too
    for g in check_grads(args, which=WITH_BIASES):
        assert torch.all(g == 0)
    for T in (0, 1):
        check_grads(with_biases(problem(T, 9, 7, 6, 3, 2, "clamped_swiglu", torch.float64), limit=0.5), which=WITH_BIASES)
    # merged: several experts per slot, k = 3 (a token's entries may share a slot)
    args = with_biases(problem(40, 12, 10, 8, 3, 3, "geglu", torch.float64, emap=torch.tensor([0, 0, 0, 1, 1, 2, 2, 2])))
    check_grads(args, which=WITH_BIASES)


@pytest.mark.parametrize("mask", list(itertools.product([False, True], repeat=6)))
def test_output_mask_with_biases(mask):
    args = with_biases(problem(23, 10, 14, 8, 3, 2, "clamped_swiglu", torch.float64, 0.1, seed=2), limit=0.7)
    grad_out = torch.randn(23, 10, dtype=torch.float64)
    kw = dict(b_in=args[7], b_out=args[8], alpha=args[9], limit=args[10])
    full = ops.grouped_expert_ffn_backward(grad_out, *args[:7], **kw)
    part = ops.grouped_expert_ffn_backward(grad_out, *args[:7], output_mask=mask, **kw)
    for need, f, p, name in zip(mask, full, part, NAMES + ("b_in", "b_out")):
        if need:
            torch.testing.assert_close(p, f, rtol=0, atol=0, msg=name)
        else:
            assert p.shape == (0,), name


def test_bias_grads_of_absent_biases_are_empty_and_four_bool_masks_still_work():
    args = problem(23, 10, 14, 8, 3, 2, "swiglu", torch.float64, 0.1, seed=2)
    grad_out = torch.randn(23, 10, dtype=torch.float64)
    six = ops.grouped_expert_ffn_backward(grad_out, *args)
    assert len(six) == 6 and six[4].shape == (0,) and six[5].shape == (0,)
    b = biases(args, ("b_out",))
    six = ops.grouped_expert_ffn_backward(grad_out, *args, **b)
    assert six[4].shape == (0,) and six[5].shape == (3, 10)
    four = ops.grouped_expert_ffn_backward(grad_out, *args, output_mask=(True,) * 4, **b)  # the op before biases
    assert len(four) == 4
    for f, s in zip(four, six):
        torch.testing.assert_close(f, s, rtol=0, atol=0)
    with pytest.raises(ValueError, match="four or six bools"):
        ops.grouped_expert_ffn_backward(grad_out, *args, output_mask=(True,) * 5)


@pytest.mark.parametrize("which", [(7,), (8,), (5, 8), (0, 7), (1, 8), (7, 8), (2, 5)])
def test_autograd_asks_only_for_needed_grads_with_biases(which):
    args = with_biases(problem(31, 12, 9, 8, 3, 2, "clamped_swiglu", torch.float64, 0.1, seed=4), limit=0.5)
    check_grads(args, which=which)


def test_raw_op_with_one_bias_passed_short():
    # The dispatcher drops trailing arguments left at their defaults; autograd sees 8 or 9 inputs.
    args = problem(17, 8, 6, 4, 3, 2, "swiglu", torch.float64, seed=6)
    b = biases(args)
    op = torch.ops.mcsmoe_fast.grouped_expert_ffn
    for call, ref_kw in ((lambda a, bi: op(*a, bi), "b_in"), (lambda a, bo: op(*a, b_out=bo), "b_out")):
        a = leaves(args)
        bias = b[ref_kw].clone().requires_grad_()
        g = torch.autograd.grad(call(a, bias).square().sum(), [a[0], a[1], a[2], a[5], bias])
        r = leaves(args)
        bias_r = b[ref_kw].clone().requires_grad_()
        want = torch.autograd.grad(reference.grouped_expert_ffn(*r, **{ref_kw: bias_r}).square().sum(),
                                   [r[0], r[1], r[2], r[5], bias_r])
        for x, y in zip(g, want):
            torch.testing.assert_close(x, y, **TOL[torch.float64])


@pytest.mark.parametrize("mode", ["0", "1", "balanced"])
def test_biases_every_thread_schedule_and_row_blocks(mode, monkeypatch):
    monkeypatch.setenv("MCSMOE_SLOT_PARALLEL", mode)
    for T in (1, 3, 70):
        check_grads(with_biases(problem(T, 24, 40, 8, 4, 2, "clamped_swiglu", seed=T), limit=0.7), which=WITH_BIASES)
    # a slot with more than 1024 rows runs in row blocks whose bias gradients add up
    emap = torch.tensor([0, 0, 0, 0, 0, 0, 1, 2])
    for act in ("silu", "clamped_swiglu"):
        check_grads(with_biases(problem(1300, 8, 12, 8, 3, 2, act, torch.float64, seed=5, emap=emap), limit=0.7),
                    which=WITH_BIASES)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("activation", ["swiglu", "clamped_swiglu"])
def test_biases_half_precision_on_cpu(dtype, activation):
    args = with_biases(problem(23, 16, 24, 8, 4, 2, activation, dtype, 0.1), limit=0.6)
    grad_out = torch.randn(23, 16, dtype=torch.float64).to(dtype)
    _, got = grads(ops.grouped_expert_ffn, args, grad_out, WITH_BIASES)
    wide = [a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]
    _, want = grads(reference.grouped_expert_ffn, wide, grad_out.double(), WITH_BIASES)
    for g, w, i in zip(got, want, WITH_BIASES):
        assert g.dtype == (torch.float32 if i == 5 else dtype), ARG_NAMES[i]
        torch.testing.assert_close(g.double(), w, **TOL[dtype], msg=ARG_NAMES[i])


@pytest.mark.parametrize("activation", ["relu", "gelu", "swiglu", "clamped_swiglu"])
@pytest.mark.parametrize("which", BIAS_SETS, ids="+".join)
def test_gradcheck_float64_with_biases(activation, which):
    args = leaves(with_biases(problem(7, 5, 4, 6, 3, 2, activation, torch.float64, 0.15, seed=11), which, limit=0.5),
                  present(with_biases(problem(1, 1, 1, 1, 1, 1, "relu"), which)))
    pos = present(args)
    # random inputs: no pre-activation lies within gradcheck's eps of relu's kink at 0 or of +-limit

    def fn(*xs):
        a = list(args)
        for i, x in zip(pos, xs):
            a[i] = x
        return ops.grouped_expert_ffn(*a)
    assert torch.autograd.gradcheck(fn, tuple(args[i] for i in pos), eps=1e-6, atol=1e-7)


def test_opcheck_with_biases_and_clamped_swiglu():
    for activation, which, T in (("clamped_swiglu", WITH_BIASES, 13), ("swiglu", (7,), 13), ("relu", (8, 5), 1),
                                 ("gelu", (), 0)):
        args = with_biases(problem(T, 8, 6, 8, 3, 2, activation, seed=1), limit=0.5)
        if activation == "relu":
            args[7] = None
        args = leaves(args, which)
        torch.library.opcheck(torch.ops.mcsmoe_fast.grouped_expert_ffn.default, tuple(args))
        plain = [a.detach() if isinstance(a, torch.Tensor) else a for a in args]
        for mask in ([True] * 6, [False, True, True, False, True, False], [True, False, False, True, False, True]):
            torch.library.opcheck(torch.ops.mcsmoe_fast.grouped_expert_ffn_backward.default,
                                  (torch.randn(T, 8), *plain[:7], mask, *plain[7:]))


def test_torch_compile_backward_with_biases():
    args = leaves(with_biases(problem(12, 8, 6, 4, 2, 2, "clamped_swiglu"), limit=0.6), WITH_BIASES)
    compiled = torch.compile(lambda *a: ops.grouped_expert_ffn(*a).square().sum(), fullgraph=True, backend="aot_eager")
    got = torch.autograd.grad(compiled(*args), [args[i] for i in WITH_BIASES])
    ref = leaves(args, WITH_BIASES)
    want = torch.autograd.grad(reference.grouped_expert_ffn(*ref).square().sum(), [ref[i] for i in WITH_BIASES])
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **TOL[torch.float32])


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
    torch.library.opcheck(torch.ops.mcsmoe_fast.grouped_expert_ffn_backward.default, (grad_out, *args, [True] * 6))


def check_grads_cuda_with_biases(args64, dtype, seed=0):
    """check_grads_cuda for with_biases' eleven arguments: every present gradient, b_in and b_out included."""
    args = [a.to("cuda", dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() else
            a.to("cuda") if isinstance(a, torch.Tensor) else a for a in args64]
    args[5] = args[5].float()
    which = present(args)
    grad_out = torch.randn(args[0].shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    _, got = grads(ops.grouped_expert_ffn, args, grad_out.to("cuda", dtype), which)
    wide = [a.cpu().double() if isinstance(a, torch.Tensor) and a.is_floating_point() else
            a.cpu() if isinstance(a, torch.Tensor) else a for a in args]
    _, want = grads(reference.grouped_expert_ffn, wide, grad_out.to(dtype).double(), which)
    tol = {torch.float32: dict(rtol=1e-4, atol=1e-4)}.get(dtype, TOL[dtype])
    for g, w, i in zip(got, want, which):
        assert g.device.type == "cuda", ARG_NAMES[i]
        torch.testing.assert_close(g.cpu().double(), w, **tol, msg=ARG_NAMES[i])


@cuda_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("which", BIAS_SETS, ids="+".join)
@pytest.mark.parametrize("activation", ["relu", "swiglu", "clamped_swiglu"])
def test_cuda_grads_with_biases_match_reference(shape, which, activation, dtype):
    T, d, ff, E, S, k, drop = shape
    args = with_biases(problem(T, d, ff, E, S, k, activation, torch.float64, drop, seed=int(sum(shape))), which,
                       limit=0.8, seed=T + d)
    check_grads_cuda_with_biases(args, dtype, seed=T)


@cuda_only
@pytest.mark.parametrize("alpha,limit,scale", [(1.702, 7.0, 9.0), (1.702, 0.8, 1.0), (0.5, 2.0, 2.5)])
def test_cuda_clamped_swiglu_grads_straddle_the_limit(alpha, limit, scale):
    args = list(problem(61, 20, 18, 8, 4, 2, "clamped_swiglu", torch.float64, 0.1, seed=17))
    args[1] = args[1] * scale
    check_grads_cuda_with_biases(with_biases(args, ("b_in", "b_out"), alpha, limit), torch.float32)


@cuda_only
def test_cuda_bias_edge_cases_and_mask():
    emap = torch.full((8,), 2, dtype=torch.int64)
    check_grads_cuda_with_biases(with_biases(problem(50, 16, 24, 8, 4, 2, "clamped_swiglu", torch.float64, emap=emap),
                                             limit=0.6), torch.float32)
    args = with_biases(problem(9, 12, 10, 4, 2, 3, "swiglu", torch.float64))
    args[4][[1, 4]] = -1
    check_grads_cuda_with_biases(args, torch.float32)
    args[4] = torch.full_like(args[4], -1)
    check_grads_cuda_with_biases(args, torch.float32)
    args = [a.cuda().float() if isinstance(a, torch.Tensor) and a.is_floating_point() else
            a.cuda() if isinstance(a, torch.Tensor) else a
            for a in with_biases(problem(23, 10, 14, 8, 3, 2, "clamped_swiglu", drop=0.1), limit=0.7)]
    grad_out = torch.randn(23, 10, device="cuda")
    kw = dict(b_in=args[7], b_out=args[8], alpha=args[9], limit=args[10])
    full = ops.grouped_expert_ffn_backward(grad_out, *args[:7], **kw)
    for mask in itertools.product([False, True], repeat=6):
        part = ops.grouped_expert_ffn_backward(grad_out, *args[:7], output_mask=mask, **kw)
        for need, f, p in zip(mask, full, part):
            assert torch.equal(p, f) if need else p.shape == (0,)
    torch.library.opcheck(torch.ops.mcsmoe_fast.grouped_expert_ffn_backward.default,
                          (grad_out, *args[:7], [True] * 6, *args[7:]))
    torch.library.opcheck(torch.ops.mcsmoe_fast.grouped_expert_ffn.default, tuple(leaves(args, WITH_BIASES)))


@pytest.mark.parametrize("drop", [0.0, 1.0])  # 1.0: nothing routed, the zero gradients of masked_ffn_grads
@pytest.mark.parametrize("activation", ["swiglu", "clamped_swiglu_interleaved", "relu"])
def test_weights_stored_transposed_get_their_gradients_in_their_own_layout(activation, drop):
    """Weights that are transposed views of [S, d, F] and [S, ff, d] banks (GPT-OSS and Llama-4 store theirs so)
    get gradients with the views' strides, so autograd hands each bank a contiguous gradient without a
    transposing copy (which took most of a GPT-OSS training step); the values equal those of contiguous
    weights, and the fake (torch.compile) promises the same layout (opcheck)."""
    hidden, w_in, w_out, emap, idx, weights, _ = problem(11, 6, 5, 8, 3, 2, "swiglu", drop=drop, seed=3)
    if activation == "relu":
        w_in = w_in[:, :5].contiguous()
    banks = [w_in.transpose(1, 2).contiguous().transpose(1, 2), w_out.transpose(1, 2).contiguous().transpose(1, 2)]
    g = torch.randn(11, 6, generator=torch.Generator().manual_seed(5))
    mask = [True] * 4
    got = ops.grouped_expert_ffn_backward(g, hidden, *banks, emap, idx, weights, activation, mask)
    want = ops.grouped_expert_ffn_backward(g, hidden, w_in, w_out, emap, idx, weights, activation, mask)
    assert (got[1].stride(), got[2].stride()) == (banks[0].stride(), banks[1].stride())
    assert (want[1].stride(), want[2].stride()) == (w_in.stride(), w_out.stride())
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    torch.library.opcheck(torch.ops.mcsmoe_fast.grouped_expert_ffn_backward.default,
                          (g, hidden, *banks, emap, idx, weights, activation, [True] * 6))
