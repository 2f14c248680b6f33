"""GPT-OSS's experts on their stored banks: ops.grouped_expert_ffn with "clamped_swiglu_interleaved" (gate and up
rows interleaved, gate0, up0, gate1, ...), forward and fused backward, against the plain-PyTorch reference and
against "clamped_swiglu" on a gate-first copy; the ops that refuse it; and the "mcsmoe_fast" experts
implementation on GPT-OSS, which runs it on the CPU for inference and training."""
import pytest
import torch

from mcsmoe_fast import moe_layers, ops, reference
from mcsmoe_fast.activations import CLAMPED_SWIGLU_INTERLEAVED
from mcsmoe_fast.tiny import tiny_moe
from test_grouped_ffn import TOL, biases, problem
from test_slr import ffn_problem

SHAPES = [(1, 16, 24, 8, 8, 2, 0.0), (5, 7, 11, 3, 3, 3, 0.0), (37, 24, 40, 8, 3, 2, 0.1), (64, 33, 17, 32, 8, 1, 0.3),
          (300, 64, 48, 8, 4, 2, 0.05), (0, 8, 8, 4, 2, 2, 0.0), (7, 8, 0, 4, 2, 2, 0.0)]


def interleave(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Gate-first entries along `dim` (gate block, then up block) in GPT-OSS's order (gate0, up0, gate1, ...)."""
    gate, up = t.chunk(2, dim=dim)
    return torch.stack([gate, up], dim=dim + 1).flatten(dim, dim + 1)


def interleaved_problem(shape, dtype, transposed, seed):
    T, d, ff, E, S, k, drop = shape
    args = problem(T, d, ff, E, S, k, "clamped_swiglu", dtype, drop, seed=seed)
    kw = biases(args, seed=seed + 1, scale=3.0)  # large biases: values on both sides of +-limit
    args = list(args)
    args[1] = args[1] * 4  # wide pre-activations: the clamps matter
    w_in = interleave(args[1], 1)
    w_out = args[2]
    if transposed:  # stored [S, d, F] and [S, ff, d] as GPT-OSS stores them; the op gets views
        w_in, w_out = w_in.transpose(1, 2).contiguous().transpose(1, 2), w_out.transpose(1, 2).contiguous().transpose(1, 2)
    fast = (args[0], w_in, w_out, *args[3:6], CLAMPED_SWIGLU_INTERLEAVED)
    return args, kw, fast, dict(b_in=interleave(kw["b_in"], 1), b_out=kw["b_out"])


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("schedule", ["sequential", "parallel", "balanced"])
def test_interleaved_equals_the_reference_and_the_gate_first_op(shape, dtype, transposed, schedule, monkeypatch):
    monkeypatch.setenv("MCSMOE_SLOT_PARALLEL", schedule)
    args, kw, fast, fast_kw = interleaved_problem(shape, dtype, transposed, seed=sum(shape[:3]))
    out = ops.grouped_expert_ffn(*fast, **fast_kw)
    gate_first = ops.grouped_expert_ffn(*args, **kw)  # the same function on the gate-first layout
    wide = lambda t: t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t  # noqa: E731
    # the reference reads the interleaved columns itself, in float64 on the same (rounded) inputs
    ref = reference.grouped_expert_ffn(*map(wide, fast), **{k: wide(v) for k, v in fast_kw.items()})
    assert out.shape == ref.shape and out.dtype == dtype
    for got in (out, gate_first):
        if dtype == torch.bfloat16:  # one bf16 rounding of a pre-activation near 16 moves it by 0.125
            assert (got.double() - ref).norm() <= 2e-2 * ref.norm() + 1e-6
        else:
            torch.testing.assert_close(got.double(), ref, **TOL[dtype])
    if shape[2] and shape[0] and dtype != torch.bfloat16:
        plain = ops.grouped_expert_ffn(*args[:6], "swiglu", **kw)
        assert not torch.allclose(out, plain, rtol=1e-3, atol=1e-3), "design: clamped SwiGLU differs from SwiGLU here"


def test_alpha_and_limit_reach_the_interleaved_activation():
    args, kw, fast, fast_kw = interleaved_problem((9, 8, 6, 4, 2, 2, 0.0), torch.float64, True, seed=3)
    for alpha, limit in ((1.0, 0.5), (2.5, 3.0)):
        out = ops.grouped_expert_ffn(*fast, **fast_kw, alpha=alpha, limit=limit)
        torch.testing.assert_close(out, reference.grouped_expert_ffn(*args, **kw, alpha=alpha, limit=limit), **TOL[torch.float64])
        assert not torch.allclose(out, ops.grouped_expert_ffn(*fast, **fast_kw))


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("shape", SHAPES[:5])
@pytest.mark.parametrize("schedule", ["sequential", "parallel", "balanced"])
def test_interleaved_gradients_equal_the_references(shape, dtype, transposed, schedule, monkeypatch):
    """The fused backward on interleaved rows: dH written in h's own column order, so grad_w_in and grad_b_in come
    back interleaved like w_in and b_in; every gradient against autograd through the plain-PyTorch reference."""
    monkeypatch.setenv("MCSMOE_SLOT_PARALLEL", schedule)
    _, _, fast, fast_kw = interleaved_problem(shape, dtype, transposed, seed=sum(shape[:3]) + 7)
    grads = []
    for fn in (ops.grouped_expert_ffn, reference.grouped_expert_ffn):
        leaves = [t.detach().clone().requires_grad_() for t in (fast[0], fast[1], fast[2], fast[5], *fast_kw.values())]
        out = fn(*leaves[:3], fast[3], fast[4], leaves[3], fast[6], **dict(zip(fast_kw, leaves[4:])))
        probe = torch.randn(out.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
        (out * probe.to(out.dtype)).sum().backward()
        grads.append([t.grad for t in leaves])
    tol = TOL[dtype] if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-4)
    for name, got, want in zip(("hidden", "w_in", "w_out", "weights", "b_in", "b_out"), *grads):
        torch.testing.assert_close(got, want, **tol, msg=lambda m: f"{name}: {m}")


def test_the_ops_without_it_refuse_it():
    args, kw, fast, fast_kw = interleaved_problem((6, 8, 6, 4, 2, 2, 0.0), torch.float32, False, seed=4)
    compressed = ffn_problem(6, 8, 6, 4, 2, 2, 3, "clamped_swiglu")
    with pytest.raises(ValueError, match=r"^grouped_expert_ffn_slr: clamped_swiglu_interleaved .* use clamped_swiglu "
                                         r"with gate rows, then up rows"):
        ops.grouped_expert_ffn_slr(*compressed[:6], CLAMPED_SWIGLU_INTERLEAVED)
    bad = fast[1][:, :-1]  # an odd number of rows
    with pytest.raises(RuntimeError, match=r"clamped_swiglu_interleaved with w_out's ff = 6 needs F = 12 \(gate and up rows interleaved\)"):
        ops.grouped_expert_ffn(fast[0], bad, *fast[2:], **fast_kw)
    with pytest.raises(ValueError, match="clamped_swiglu_interleaved"):
        ops.grouped_expert_ffn(*fast[:6], "clamped_swiglu_interleave")  # the unknown-name message lists it


# --- the "mcsmoe_fast" experts implementation on GPT-OSS --------------------------------------------------------------
def gpt_oss_block():
    model = tiny_moe("gpt_oss", num_experts=6, hidden_size=16, intermediate_size=10, num_layers=1, top_k=2)
    return moe_layers(model)[0].module


def run(block, impl, x):
    block.experts.config._experts_implementation = impl
    out = block(x)
    return out[0] if isinstance(out, tuple) else out


@pytest.fixture
def activations_seen(monkeypatch):
    seen = []
    real = ops.grouped_expert_ffn

    def spy(*args, **kwargs):
        seen.append(args[6])
        return real(*args, **kwargs)
    monkeypatch.setattr(ops, "grouped_expert_ffn", spy)
    return seen


def test_inference_runs_the_fused_op_on_the_stored_banks(activations_seen):
    """The fused op with the interleaved activation, equal to transformers' eager experts, and following an
    in-place edit of the stored banks (nothing is kept between calls)."""
    block = gpt_oss_block()
    x = torch.randn(2, 7, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(run(block, "mcsmoe_fast", x), run(block, "eager", x), rtol=1e-5, atol=1e-5)
        assert activations_seen == [CLAMPED_SWIGLU_INTERLEAVED]
        block.experts.gate_up_proj.data.mul_(3.0)
        block.experts.down_proj_bias.data.add_(0.5)
        torch.testing.assert_close(run(block, "mcsmoe_fast", x), run(block, "eager", x), rtol=1e-5, atol=1e-5)
    with torch.inference_mode():
        torch.testing.assert_close(run(block, "mcsmoe_fast", x), run(block, "eager", x), rtol=1e-5, atol=1e-5)
    assert activations_seen == [CLAMPED_SWIGLU_INTERLEAVED] * 3


def test_training_runs_the_fused_op_and_its_gradients_reach_the_banks(activations_seen):
    """Gradients through the fused backward reach GPT-OSS's own parameters (through the views of its banks),
    equal to those of transformers' eager experts."""
    block = gpt_oss_block()
    x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(1))
    grads = []
    for impl in ("mcsmoe_fast", "eager"):
        block.zero_grad()
        run(block, impl, x).square().sum().backward()
        grads.append({n: p.grad.clone() for n, p in block.named_parameters()})
    assert activations_seen == [CLAMPED_SWIGLU_INTERLEAVED]
    assert set(grads[0]) >= {"experts.gate_up_proj", "experts.gate_up_proj_bias", "experts.down_proj", "experts.down_proj_bias"}
    for name, want in grads[1].items():
        torch.testing.assert_close(grads[0][name], want, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")
