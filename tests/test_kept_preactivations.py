"""grouped_expert_ffn_keep_h: the forward that also returns the routed rows' pre-activations H, and the backward
that reads them instead of recomputing them (what ops.grouped_expert_ffn runs when autograd records it on the
CPU). H is checked row by row against x W_in[s]^T + b_in[s] in the alignment's order (ops.moe_align); the
backward with H against the backward without, and against autograd through the plain-PyTorch reference."""
import pytest
import torch

from mcsmoe_fast import ops, reference
from test_grouped_ffn import biases, problem
from test_grouped_ffn_backward import WITH_BIASES
from test_grouped_ffn_backward import leaves as leaves_of

keep_h = torch.ops.mcsmoe_fast.grouped_expert_ffn_keep_h

CASES = [  # T, d, ff, E, S, k, activation, drop
    (13, 8, 6, 8, 3, 2, "swiglu", 0.0),
    (7, 5, 3, 6, 6, 3, "gelu", 0.3),
    (11, 6, 5, 8, 2, 4, "clamped_swiglu", 0.2),  # k entries of a token on one slot: one summed pair
    (9, 7, 4, 5, 5, 2, "clamped_swiglu_interleaved", 0.0),
    (1, 3, 2, 4, 4, 1, "relu", 0.0),
    (6, 4, 3, 4, 2, 2, "silu", 1.0),  # nothing routed
    (0, 4, 3, 4, 2, 2, "swiglu", 0.0),  # no tokens
]


def args_of(case, dtype=torch.float32, with_biases=True):
    T, d, ff, E, S, k, activation, drop = case
    gated_as = "clamped_swiglu" if activation == "clamped_swiglu_interleaved" else activation  # the same shapes
    args = list(problem(T, d, ff, E, S, k, gated_as, dtype=dtype, drop=drop, seed=T + d))[:6] + [activation]
    b = biases(args) if with_biases else {}
    return args + [b.get("b_in"), b.get("b_out"), 1.3, 0.8]


def preactivations_by_hand(hidden, w_in, w_out, emap, idx, weights, activation, b_in, *_):
    """x W_in[s]^T + b_in[s] for each routed row, in moe_align's order (row i: token sorted[i] on its slot)."""
    sorted_tokens, offsets, _, _ = ops.moe_align(idx, weights, emap, w_in.shape[0])
    rows = []
    for s in range(w_in.shape[0]):
        for i in range(int(offsets[s]), int(offsets[s + 1])):
            h = hidden[sorted_tokens[i]].double() @ w_in[s].double().T
            rows.append(h + b_in[s].double() if b_in is not None else h)
    return torch.stack(rows) if rows else hidden.new_zeros((0, w_in.shape[1]), dtype=torch.float64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", CASES)
def test_kept_h_are_the_routed_rows_preactivations_and_the_output_is_unchanged(case, dtype):
    args = args_of(case, dtype)
    out, h_rows = keep_h(*args)
    torch.testing.assert_close(out, ops.grouped_expert_ffn(*args))
    T, k, F = args[4].shape[0], args[4].shape[1], args[1].shape[1]
    assert h_rows.shape == (T * k, F) and h_rows.dtype == dtype
    want = preactivations_by_hand(*args)
    torch.testing.assert_close(h_rows[:len(want)].double(), want, rtol=1e-5, atol=1e-5)
    assert not h_rows[len(want):].any()  # the rows of -1 entries and of pairs summed into one: zero


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_biases", [True, False])
@pytest.mark.parametrize("case", CASES)
def test_the_backward_reading_kept_h_equals_the_recomputing_one_and_leaves_them_as_they_were(case, with_biases,
                                                                                             dtype):
    args = args_of(case, dtype, with_biases=with_biases)
    _, h_rows = keep_h(*args)
    kept = h_rows.clone()
    g = torch.randn(args[0].shape, generator=torch.Generator().manual_seed(3)).to(dtype)
    for mask in ([True] * 6, [False, True, False, False, True, False], [True, False, False, True, False, False]):
        want = ops.grouped_expert_ffn_backward(g, *args[:7], mask, *args[7:])
        got = ops.grouped_expert_ffn_backward(g, *args[:7], mask, *args[7:], h_rows=h_rows)
        for a, b in zip(got, want):  # bf16: the GEMM backends may differ between the forward and a recompute
            torch.testing.assert_close(a, b, **({} if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)))
    torch.testing.assert_close(h_rows, kept, rtol=0, atol=0)


def test_autograd_on_the_cpu_keeps_h_and_its_backward_reads_them():
    """Under autograd the op saves a [T k, F] tensor (H), and the backward's gradients depend on it: H changed on
    unpacking changes them; unchanged, they equal autograd through the reference. Twice over one graph
    (retain_graph) gives the same gradients: the backward works on a copy of H."""
    args = args_of(CASES[0])
    leaves = leaves_of(args, WITH_BIASES)
    T, k, F = args[4].shape[0], args[4].shape[1], args[1].shape[1]
    g = torch.randn(args[0].shape, generator=torch.Generator().manual_seed(4))
    inputs = [leaves[i] for i in WITH_BIASES]

    def gradients(shift):
        saved = []

        def unpack(t):
            return t + shift if t.shape == (T * k, F) else t
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, unpack):
            out = ops.grouped_expert_ffn(*leaves)
        assert (T * k, F) in saved
        first = torch.autograd.grad(out, inputs, g, retain_graph=True)
        second = torch.autograd.grad(out, inputs, g)
        for a, b in zip(first, second):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        return first

    want = torch.autograd.grad(reference.grouped_expert_ffn(*leaves), inputs, g)
    for a, b in zip(gradients(0.0), want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert any(not torch.allclose(a, b, rtol=1e-4, atol=1e-5) for a, b in zip(gradients(0.5), want))


def ops_run(fn):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return {e.name for e in prof.events() if e.name.startswith("mcsmoe_fast::grouped_expert_ffn")}


def test_h_are_kept_only_when_autograd_records_the_op():
    """The keeping forward runs when autograd records the op; under no_grad, or when nothing needs a gradient,
    the plain forward runs (no [T k, F] buffer, no copy)."""
    args = args_of(CASES[0])
    leaves = leaves_of(args, (1,))
    assert ops_run(lambda: ops.grouped_expert_ffn(*leaves)) == {"mcsmoe_fast::grouped_expert_ffn_keep_h"}
    with torch.no_grad():
        assert ops_run(lambda: ops.grouped_expert_ffn(*leaves)) == {"mcsmoe_fast::grouped_expert_ffn"}
    assert ops_run(lambda: ops.grouped_expert_ffn(*args)) == {"mcsmoe_fast::grouped_expert_ffn"}


def test_kept_h_of_the_wrong_shape_or_dtype_is_refused_by_name():
    args = args_of(CASES[0])
    g = torch.randn(args[0].shape)
    _, h_rows = keep_h(*args)
    with pytest.raises(RuntimeError, match=r"h_rows must be grouped_expert_ffn_keep_h's \[T k, F\] = \[26, 12\]"):
        ops.grouped_expert_ffn_backward(g, *args[:7], [True] * 6, *args[7:], h_rows=h_rows[1:])
    with pytest.raises(RuntimeError, match="h_rows must be"):
        ops.grouped_expert_ffn_backward(g, *args[:7], [True] * 6, *args[7:], h_rows=h_rows.double())


def test_opcheck_of_the_keeping_forward_and_the_reading_backward():
    args = args_of(CASES[2])
    leaves = leaves_of(args, WITH_BIASES)
    torch.library.opcheck(keep_h.default, tuple(leaves))
    _, h_rows = keep_h(*args)
    torch.library.opcheck(torch.ops.mcsmoe_fast.grouped_expert_ffn_backward.default,
                          (torch.randn(args[0].shape), *args[:7], [True] * 6, *args[7:], h_rows))


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_activation_checkpointing_gives_the_same_gradients(use_reentrant):
    """torch.utils.checkpoint reruns the forward in the backward (non-reentrant: the kept H are dropped and
    recomputed; reentrant: the first forward runs without autograd, the rerun keeps H): the same gradients."""
    from torch.utils.checkpoint import checkpoint

    args = args_of(CASES[3])
    leaves = leaves_of(args, WITH_BIASES)
    inputs = [leaves[i] for i in WITH_BIASES]
    g = torch.randn(args[0].shape, generator=torch.Generator().manual_seed(6))
    want = torch.autograd.grad(ops.grouped_expert_ffn(*leaves), inputs, g)
    out = checkpoint(lambda *a: ops.grouped_expert_ffn(*a), *leaves, use_reentrant=use_reentrant)
    out.backward(g)  # reentrant checkpointing takes .backward() only
    for leaf, b in zip(inputs, want):
        torch.testing.assert_close(leaf.grad, b)
