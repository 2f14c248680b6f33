"""ops.grouped_expert_ffn (fused expert FFN over merged slots) against reference.grouped_expert_ffn: every
activation, odd shapes and edge cases, with and without the expert biases b_in / b_out, GPT-OSS's clamped
SwiGLU with values on both sides of +-limit (and against transformers' GptOssExperts itself)."""
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


def biases(args, which=("b_in", "b_out"), seed=1, scale=0.5):
    """Random expert biases for problem(...)'s args: {"b_in": [S, F], "b_out": [S, d]} (those in `which`),
    in the weights' dtype and device."""
    hidden, w_in, w_out = args[:3]
    gen = torch.Generator().manual_seed(seed)
    shapes = {"b_in": (w_in.shape[0], w_in.shape[1]), "b_out": (w_out.shape[0], w_out.shape[1])}
    return {name: (scale * torch.randn(shapes[name], generator=gen, dtype=torch.float64)).to(w_in)
            for name in which}


def check(args, kw=None, **tol):
    """The op against the reference on the same args (and keyword arguments kw: biases, alpha, limit)."""
    kw = kw or {}
    out = ops.grouped_expert_ffn(*args, **kw)
    ref = reference.grouped_expert_ffn(*args, **kw)
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


@pytest.mark.parametrize("mode", ["0", "1", "balanced"])
def test_every_thread_schedule(mode, monkeypatch):
    monkeypatch.setenv("MCSMOE_SLOT_PARALLEL", mode)
    for T in (1, 3, 70):
        check(problem(T, 24, 40, 8, 4, 2, "swiglu", seed=T))
        with torch.inference_mode():  # thread-local mode must reach the worker threads
            check(problem(T, 24, 40, 8, 4, 2, "relu", seed=T))


@pytest.mark.parametrize("mode", ["0", "1", "balanced"])
def test_many_small_slots_on_two_threads(mode, monkeypatch):
    """Many small slots (Qwen3-like: E = S = 96, top-8), large enough to run on every thread (above
    kSmallCallMacs): in parallel the threads take slots from a shared counter. Equal to the reference,
    and bit for bit the same on every call whichever thread ran which slot."""
    monkeypatch.setenv("MCSMOE_SLOT_PARALLEL", mode)
    threads = torch.get_num_threads()
    torch.set_num_threads(max(2, threads))
    try:
        args = problem(300, 64, 32, 96, 96, 8, "swiglu", seed=3, emap=torch.arange(96))
        args[4][:40] = args[4][0]  # a few slots with many more rows than the rest
        first = check(args, rtol=1e-4, atol=1e-5)
        for _ in range(3):
            assert torch.equal(ops.grouped_expert_ffn(*args), first)
        args = problem(257, 48, 40, 64, 32, 4, "clamped_swiglu", seed=4)
        check(args, dict(biases(args), alpha=1.702, limit=7.0), rtol=1e-4, atol=1e-5)
    finally:
        torch.set_num_threads(threads)


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


# --- expert biases and GPT-OSS's clamped SwiGLU ------------------------------------------------------------
BIAS_SETS = [("b_in",), ("b_out",), ("b_in", "b_out")]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("which", BIAS_SETS, ids="+".join)
@pytest.mark.parametrize("activation", ["relu", "swiglu", "clamped_swiglu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_biases_match_reference(shape, which, activation, dtype):
    T, d, ff, E, S, k, drop = shape
    args = problem(T, d, ff, E, S, k, activation, dtype, drop, seed=int(sum(shape) * 10))
    kw = biases(args, which, seed=T + d)
    out = check(args, kw)
    if T and d and (ff or "b_out" in which) and bool((args[4] >= 0).any()):  # the biases change the answer
        assert not torch.allclose(out, ops.grouped_expert_ffn(*args))


def test_bias_is_inside_the_routing_weight():
    # Zero weights: each slot's output is b_out[s] alone, times the token's summed weight on that slot.
    args = list(problem(10, 6, 5, 4, 3, 2, "swiglu", torch.float64, emap=torch.tensor([0, 1, 1, 2])))
    args[1], args[2] = torch.zeros_like(args[1]), torch.zeros_like(args[2])
    kw = biases(args, ("b_out",))
    slots = args[3][args[4]]  # [T, k]
    expected = (args[5][..., None] * kw["b_out"][slots]).sum(1)  # experts 1 and 2 share slot 1: summed weights
    torch.testing.assert_close(ops.grouped_expert_ffn(*args, **kw), expected, rtol=1e-12, atol=1e-12)
    # b_in alone: relu(b_in[s]) through w_out
    args = list(problem(10, 6, 5, 4, 3, 2, "relu", torch.float64))
    args[1] = torch.zeros_like(args[1])
    kw = biases(args, ("b_in",))
    slots = args[3][args[4]]
    per_slot = torch.einsum("sf,sdf->sd", torch.relu(kw["b_in"]), args[2])  # relu(b_in[s]) W_out[s]^T
    expected = (args[5][..., None] * per_slot[slots]).sum(1)
    torch.testing.assert_close(ops.grouped_expert_ffn(*args, **kw), expected, rtol=1e-12, atol=1e-12)


def test_biases_edge_cases():
    # all tokens on one slot (the others empty), -1 entries (a dropped token gets 0, not b_out), one token,
    # no token, a merged map with several experts per slot
    emap = torch.full((8,), 2, dtype=torch.int64)
    args = problem(50, 16, 24, 8, 4, 2, "clamped_swiglu", emap=emap)
    check(args, biases(args))
    args = list(problem(9, 12, 10, 4, 2, 2, "swiglu"))
    args[4] = args[4].clone()
    args[4][[1, 4]] = -1
    args[4][6, 1] = -1
    out = check(args, biases(args))
    assert torch.all(out[[1, 4]] == 0) and torch.all(out[6] != 0)
    for T in (0, 1):
        args = problem(T, 9, 7, 6, 3, 2, "clamped_swiglu", torch.float64)
        out = check(args, biases(args) | dict(limit=0.5))
        assert out.shape == (T, 9)
    args = problem(40, 12, 10, 8, 3, 3, "geglu", torch.float64, emap=torch.tensor([0, 0, 0, 1, 1, 2, 2, 2]))
    check(args, biases(args))


def test_bias_non_contiguous_and_expanded():
    args = problem(21, 16, 12, 8, 3, 2, "swiglu")
    kw = biases(args)
    nc = {k: v.t().contiguous().t() for k, v in kw.items()}
    torch.testing.assert_close(ops.grouped_expert_ffn(*args, **nc), reference.grouped_expert_ffn(*args, **kw))
    same = {"b_out": kw["b_out"][:1].expand(3, -1)}  # one bias row for every slot (stride 0)
    check(args, same)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_biases_and_clamped_swiglu_half_precision_on_cpu(dtype):
    args = problem(23, 16, 24, 8, 4, 2, "clamped_swiglu", dtype, 0.1)
    check(args, biases(args) | dict(limit=0.6))


@pytest.mark.parametrize("mode", ["0", "1", "balanced"])
def test_biases_and_clamped_swiglu_every_thread_schedule(mode, monkeypatch):
    monkeypatch.setenv("MCSMOE_SLOT_PARALLEL", mode)
    for T in (1, 3, 70, 1300):  # 1300: a slot with more than 1024 rows runs in row blocks
        args = problem(T, 24, 40, 8, 4, 2, "clamped_swiglu", seed=T)
        check(args, biases(args) | dict(limit=0.7))


def pre_activations(args, kw):
    """The slots' pre-activations H = x W_in[s]^T + b_in[s] of every routed (token, slot) pair."""
    hidden, w_in, _, emap, idx = args[:5]
    slots = emap[idx.clamp(min=0)][idx >= 0]
    tokens = (idx >= 0).nonzero()[:, 0]
    h = torch.einsum("nd,nfd->nf", hidden[tokens], w_in[slots])
    return h + kw["b_in"][slots] if "b_in" in kw else h


@pytest.mark.parametrize("alpha,limit,scale", [(1.702, 7.0, 9.0), (1.702, 0.8, 1.0), (0.5, 2.0, 2.5), (3.0, 0.0, 1.0)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_clamped_swiglu_straddles_the_limit(alpha, limit, scale, dtype):
    args = list(problem(61, 20, 18, 8, 4, 2, "clamped_swiglu", dtype, 0.1, seed=17))
    args[1] = args[1] * scale  # pre-activations of about +-scale around 0
    kw = biases(args, ("b_in",)) | dict(alpha=alpha, limit=limit)
    h = pre_activations(args, kw)
    gate, up = h.chunk(2, dim=-1)
    for part, share in ((gate > limit, (0.1, 0.6)), (up > limit, (0.1, 0.6)), (up < -limit, (0.1, 0.6))):
        assert share[0] < part.double().mean() < share[1]  # both sides of +-limit are exercised
    out = check(args, kw)
    # against GPT-OSS's formula written out here, on the reference's slots
    direct = reference.grouped_over_slots(
        args[0], 4, args[3], args[4], args[5],
        lambda s, x: ((x @ args[1][s].T + kw["b_in"][s]).chunk(2, -1)[1].clamp(-limit, limit) + 1)
        * (lambda g: g * torch.sigmoid(alpha * g))((x @ args[1][s].T + kw["b_in"][s]).chunk(2, -1)[0].clamp(max=limit))
        @ args[2][s].T)
    torch.testing.assert_close(out, direct, **TOL[dtype])


def test_clamped_swiglu_parameters_matter_and_others_ignore_them():
    args = problem(30, 12, 10, 8, 3, 2, "clamped_swiglu", torch.float64, seed=3)
    args = (args[0], args[1] * 4, *args[2:])
    base = ops.grouped_expert_ffn(*args)
    torch.testing.assert_close(base, ops.grouped_expert_ffn(*args, alpha=1.702, limit=7.0), rtol=0, atol=0)
    assert not torch.allclose(base, ops.grouped_expert_ffn(*args, alpha=1.0))
    assert not torch.allclose(base, ops.grouped_expert_ffn(*args, limit=1.0))
    check(args, dict(alpha=1.0, limit=1.0))
    # differs from plain swiglu (same layout)
    assert not torch.allclose(base, ops.grouped_expert_ffn(*args[:-1], "swiglu"))
    for act in ("swiglu", "relu"):
        other = problem(30, 12, 10, 8, 3, 2, act, torch.float64, seed=3)
        torch.testing.assert_close(ops.grouped_expert_ffn(*other, alpha=0.1, limit=0.2), ops.grouped_expert_ffn(*other),
                                   rtol=0, atol=0)


def test_matches_transformers_gpt_oss_experts():
    # GPT-OSS's experts (interleaved gate/up columns, transposed weights, biases) in our canonical layout.
    from transformers import GptOssConfig
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts

    cfg = GptOssConfig(hidden_size=24, intermediate_size=20, num_local_experts=6, num_experts_per_tok=2)
    cfg._experts_implementation = "eager"
    gen = torch.Generator().manual_seed(5)
    experts = GptOssExperts(cfg)
    with torch.no_grad():
        for p in experts.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 2.5)  # gate_up values of about +-12: clamped at 7
    hidden = torch.randn(33, 24, generator=gen, requires_grad=True)
    idx = torch.stack([torch.randperm(6, generator=gen)[:2] for _ in range(33)])
    weights = torch.rand(33, 2, generator=gen, requires_grad=True)
    want = experts(hidden, idx, weights)
    gu, gu_b = experts.gate_up_proj.detach(), experts.gate_up_proj_bias.detach()  # [E, d, 2ff], [E, 2ff]
    w_in = torch.cat([gu[..., ::2], gu[..., 1::2]], -1).transpose(1, 2).contiguous().requires_grad_()
    b_in = torch.cat([gu_b[:, ::2], gu_b[:, 1::2]], -1).requires_grad_()
    w_out = experts.down_proj.detach().transpose(1, 2).contiguous().requires_grad_()
    b_out = experts.down_proj_bias.detach().clone().requires_grad_()
    h2, w2 = hidden.detach().clone().requires_grad_(), weights.detach().clone().requires_grad_()
    got = ops.grouped_expert_ffn(h2, w_in, w_out, torch.arange(6), idx, w2, "clamped_swiglu", b_in, b_out,
                                 alpha=cfg.swiglu_alpha, limit=cfg.swiglu_limit)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    g = torch.randn(33, 24, generator=gen)
    want_grads = torch.autograd.grad(want, [hidden, weights, *experts.parameters()], g)
    got_grads = torch.autograd.grad(got, [h2, w2, w_in, b_in, w_out, b_out], g)
    names = [n for n, _ in experts.named_parameters()]
    theirs = dict(zip(["hidden", "weights"] + names, want_grads))
    ours = dict(zip(["hidden", "weights", "w_in", "b_in", "w_out", "b_out"], got_grads))
    interleave = lambda t: torch.stack([t[..., :20], t[..., 20:]], -1).flatten(-2)  # noqa: E731  (gate/up -> ::2/1::2)
    torch.testing.assert_close(ours["hidden"], theirs["hidden"], rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(ours["weights"], theirs["weights"], rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(interleave(ours["w_in"].transpose(1, 2)), theirs["gate_up_proj"], rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(interleave(ours["b_in"]), theirs["gate_up_proj_bias"], rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(ours["w_out"].transpose(1, 2), theirs["down_proj"], rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(ours["b_out"], theirs["down_proj_bias"], rtol=1e-4, atol=1e-3)


def bias_args():
    args = good_args()  # S = 2, F = 12, d = 8, ff = 6
    return args, biases(args)


@pytest.mark.parametrize("edit,match", [
    (lambda kw: kw.__setitem__("b_in", kw["b_in"][:, :11]), r"b_in must be \[S, F\] = \[2, 12\] \(one row per slot\), got shape \[2, 11\]"),
    (lambda kw: kw.__setitem__("b_in", kw["b_in"][0]), r"b_in must be \[S, F\] = \[2, 12\].*got shape \[12\]"),
    (lambda kw: kw.__setitem__("b_in", kw["b_in"][:1]), r"b_in must be \[S, F\] = \[2, 12\]"),
    (lambda kw: kw.__setitem__("b_out", kw["b_out"][:, :6]), r"b_out must be \[S, d\] = \[2, 8\].*got shape \[2, 6\]"),
    (lambda kw: kw.__setitem__("b_out", kw["b_out"][None]), r"b_out must be \[S, d\] = \[2, 8\]"),
    (lambda kw: kw.__setitem__("b_out", kw["b_out"].double()), "b_out must have the weights' dtype (Float|torch.float32), got (Double|torch.float64)"),
    (lambda kw: kw.__setitem__("b_in", kw["b_in"].half()), "b_in must have the weights' dtype (Float|torch.float32), got (Half|torch.float16)"),
    (lambda kw: kw.__setitem__("b_in", kw["b_in"].to("meta")), "device"),
])
def test_bad_biases_raise(edit, match):
    args, kw = bias_args()
    edit(kw)
    with pytest.raises((RuntimeError, NotImplementedError), match=match):
        ops.grouped_expert_ffn(*args, **kw)
    if not any(t.device.type == "meta" for t in kw.values()):
        with pytest.raises(RuntimeError, match=match):  # the backward checks them the same way
            ops.grouped_expert_ffn_backward(torch.randn(5, 8), *args, b_in=kw["b_in"], b_out=kw["b_out"])
        mode = torch._subclasses.FakeTensorMode()  # and so does the fake (torch.compile)
        fake = lambda t: mode.from_tensor(t) if isinstance(t, torch.Tensor) else t  # noqa: E731
        with mode, pytest.raises(RuntimeError, match=match):
            torch.ops.mcsmoe_fast.grouped_expert_ffn(*map(fake, args), **{n: fake(t) for n, t in kw.items()})


@pytest.mark.parametrize("alpha,limit,match", [(1.702, -1.0, "finite limit >= 0, got -1"),
                                               (1.702, float("nan"), "finite limit >= 0, got nan"),
                                               (1.702, float("inf"), "finite limit >= 0, got inf"),
                                               (float("nan"), 7.0, "finite alpha, got nan")])
def test_bad_clamped_swiglu_parameters_are_value_errors(alpha, limit, match):
    args = good_args()
    args[6] = "clamped_swiglu"
    with pytest.raises(ValueError, match=match):
        ops.grouped_expert_ffn(*args, alpha=alpha, limit=limit)
    mode = torch._subclasses.FakeTensorMode()  # the fake (torch.compile) raises the same
    fake = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
    with mode, pytest.raises(ValueError, match=match):
        torch.ops.mcsmoe_fast.grouped_expert_ffn(*fake, alpha=alpha, limit=limit)


def test_opcheck_with_biases_and_clamped_swiglu():
    for act, which, T in (("clamped_swiglu", ("b_in", "b_out"), 7), ("relu", ("b_out",), 1), ("swiglu", ("b_in",), 0),
                          ("clamped_swiglu", (), 9)):
        args = problem(T, 8, 6, 4, 3, 2, act, drop=0.2, seed=T)
        kw = biases(args, which)
        torch.library.opcheck(torch.ops.mcsmoe_fast.grouped_expert_ffn.default, args,
                              dict(kw, alpha=1.5, limit=0.5) if act == "clamped_swiglu" else kw)


def test_torch_compile_traces_biases_and_clamped_swiglu():
    args = problem(12, 8, 6, 4, 2, 2, "clamped_swiglu")
    kw = biases(args) | dict(alpha=1.2, limit=0.6)
    compiled = torch.compile(lambda *a, **k: ops.grouped_expert_ffn(*a, **k), fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(*args, **kw), reference.grouped_expert_ffn(*args, **kw))


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


@cuda_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES + [(4099, 64, 96, 8, 4, 2, 0.1)])
@pytest.mark.parametrize("which", BIAS_SETS, ids="+".join)
@pytest.mark.parametrize("activation", ["relu", "swiglu", "clamped_swiglu"])
def test_cuda_biases_and_clamped_swiglu_match_reference(shape, which, activation, dtype):
    T, d, ff, E, S, k, drop = shape
    seed = int(sum(shape) * 10)
    kw = dict(alpha=1.5, limit=0.8) if activation == "clamped_swiglu" else {}
    args64 = problem(T, d, ff, E, S, k, activation, torch.float64, drop, seed=seed)
    b64 = biases(args64, which, seed=T + d)
    # the same rounded inputs on both sides: the reference in float64 on the CPU
    args = problem(T, d, ff, E, S, k, activation, dtype, drop, seed=seed, device="cuda")
    b = {n: t.to("cuda", dtype) for n, t in b64.items()}
    wide = [a.cpu().double() if isinstance(a, torch.Tensor) and a.is_floating_point() else
            a.cpu() if isinstance(a, torch.Tensor) else a for a in args]
    ref = reference.grouped_expert_ffn(*wide, **{n: t.cpu().double() for n, t in b.items()}, **kw)
    out = ops.grouped_expert_ffn(*args, **b, **kw)
    assert out.dtype == dtype and out.device.type == "cuda"
    torch.testing.assert_close(out.double().cpu(), ref, **TOL[dtype])


@cuda_only
def test_cuda_clamped_swiglu_matches_cpu_op_and_opcheck():
    args = problem(300, 24, 40, 8, 4, 2, "clamped_swiglu", drop=0.1, seed=4)
    args = (args[0], args[1] * 3, *args[2:])  # pre-activations straddle +-limit
    kw = biases(args) | dict(alpha=1.702, limit=2.0)
    gpu = [a.cuda() if isinstance(a, torch.Tensor) else a for a in args]
    kw_gpu = {n: v.cuda() if isinstance(v, torch.Tensor) else v for n, v in kw.items()}
    torch.testing.assert_close(ops.grouped_expert_ffn(*gpu, **kw_gpu).cpu(), ops.grouped_expert_ffn(*args, **kw),
                               rtol=1e-4, atol=1e-4)
    torch.library.opcheck(torch.ops.mcsmoe_fast.grouped_expert_ffn.default, tuple(gpu), kw_gpu)
    bad = dict(kw_gpu, b_out=kw_gpu["b_out"].cpu())
    with pytest.raises(RuntimeError, match="b_out must be on hidden's device"):
        ops.grouped_expert_ffn(*gpu, **bad)


# --- bf16 models: calibration, and an fp32 model stays fp32 -------------------------------------------------
@pytest.mark.parametrize("family", ["mixtral", "switch"])
def test_calibration_of_a_bf16_model(family, tmp_path):
    """collect_routing_stats on a tiny bf16 model (every basis, input norms, REAP saliency): the statistics
    (float64 accumulators) agree with the fp32 model's to bf16's precision."""
    from mcsmoe_fast import collect_routing_stats
    from merge_helpers import build, calibration

    model = build(family, tmp_path)
    batches = calibration(model)
    kw = dict(bases=("router-logits", "expert-output"), progress=False, input_norms=True,
              saliency=None if family == "switch" else "reap")
    want = collect_routing_stats(model, batches, **kw)
    got = collect_routing_stats(model.to(torch.bfloat16), batches, **kw)
    assert set(got) == set(want)
    for name, stats in got.items():
        ref = want[name]
        assert stats.tokens == ref.tokens
        for field in ("feature_sum", "output_sum", "slot_input_sq", "logit_gram", "saliency_sum"):
            a, b = getattr(stats, field), getattr(ref, field)
            if b is None:
                continue
            assert torch.isfinite(a).all()
            assert (a.double() - b.double()).norm() <= 5e-2 * b.double().norm() + 1e-6, (name, field)
    # the model stays bf16, but Switch's router classifier, which transformers' own router forward casts to the
    # router's dtype (float32) for good
    kept = {n: p.dtype for n, p in model.named_parameters() if p.dtype != torch.bfloat16}
    assert all(n.endswith("router.classifier.weight") and d == torch.float32 for n, d in kept.items())
    assert bool(kept) == (family == "switch")


def test_fp32_model_stays_fp32():
    """Whatever the backend choices (bf16 may run as fp32 GEMMs), fp32 in gives fp32 out and fp32 gradients,
    bf16 in gives bf16 out and bf16 gradients."""
    for dtype in (torch.float32, torch.bfloat16):
        args = list(problem(300, 64, 96, 8, 4, 2, "swiglu", dtype, seed=2))
        args[1] = args[1].clone().requires_grad_()
        out = ops.grouped_expert_ffn(*args)
        out.float().sum().backward()
        assert out.dtype == dtype and args[1].grad.dtype == dtype


@pytest.mark.parametrize("autocast", [False, True])
def test_torch_compile_fullgraph_traces_meta_and_autocast_as_eager(autocast):
    """The autocast check traces under torch.compile(fullgraph=True) on every torch the package supports (dynamo
    before 2.12 could not trace torch.amp.is_autocast_available), for meta tensors too (no autocast: eager's branch)
    and for CPU tensors under autocast (eager's result)."""
    T, d, ff, S, k = 4, 8, 6, 3, 2
    g = torch.Generator().manual_seed(11)
    args = (torch.randn(T, d, generator=g), torch.randn(S, 2 * ff, d, generator=g), torch.randn(S, d, ff, generator=g),
            torch.tensor([0, 1, 2, 0]), torch.tensor([[0, 1], [2, 3], [1, 2], [0, 3]]), torch.rand(T, k, generator=g))

    def f(*a):
        return ops.grouped_expert_ffn(*a, "swiglu")

    torch._dynamo.reset()
    meta = [a.to("meta") for a in args]
    assert torch.compile(f, backend="eager", fullgraph=True)(*meta).shape == f(*meta).shape == (T, d)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        eager, compiled = f(*args), torch.compile(f, backend="eager", fullgraph=True)(*args)
    assert compiled.dtype == eager.dtype
    torch.testing.assert_close(compiled, eager, rtol=0, atol=0)
