"""Edges of the ops' contracts: a double backward through the fused grouped FFN is refused (its backward has no
derivative of its own: the gradient of a gradient came back silently disconnected); row_offsets of a compressed
bank are all checked before any slot's rows are read (an overshooting offset read row_idx past its end); and the
plain-PyTorch reference ignores the weight of a dropped (-1) entry as the op does (NaN * False is NaN)."""
import pytest
import torch

from mcsmoe_fast import ops, reference


def routed_case(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(5, 6, generator=g, dtype=torch.float64, requires_grad=True)
    w_in = torch.randn(3, 8, 6, generator=g, dtype=torch.float64, requires_grad=True)
    w_out = torch.randn(3, 6, 4, generator=g, dtype=torch.float64, requires_grad=True)
    index = torch.randint(0, 4, (5, 2), generator=g)
    weights = torch.rand(5, 2, generator=g, dtype=torch.float64)
    return x, w_in, w_out, torch.tensor([0, 1, 2, 1]), index, weights


def test_double_backward_is_refused_and_single_backward_matches_the_reference():
    x, w_in, w_out, emap, index, weights = routed_case()
    out = ops.grouped_expert_ffn(x, w_in, w_out, emap, index, weights, "swiglu")
    with pytest.raises(NotImplementedError, match="double backward .* not supported"):
        torch.autograd.grad(out.square().sum(), x, create_graph=True)
    got = torch.autograd.grad(ops.grouped_expert_ffn(x, w_in, w_out, emap, index, weights, "swiglu").square().sum(),
                              (x, w_in, w_out))
    want = torch.autograd.grad(reference.grouped_expert_ffn(x, w_in, w_out, emap, index, weights, "swiglu")
                               .square().sum(), (x, w_in, w_out))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_overshooting_row_offsets_are_named_before_any_row_is_read():
    S, d, ff, r = 2, 4, 3, 2
    row_idx = torch.arange(10)[:3]  # the memory after the view holds 3, 4, ...: read past its end, they would pass
    w_in = [torch.randn(S, ff, r), torch.randn(S, r, d), torch.randn(3, d), row_idx, torch.tensor([0, 5, 3])]
    w_out = [torch.randn(S, d, r), torch.randn(S, r, ff), torch.randn(0, ff), torch.zeros(0, dtype=torch.long),
             torch.tensor([0, 0, 0])]
    with pytest.raises(RuntimeError, match="w_in row_offsets must not decrease, got 5 then 3"):
        ops.grouped_expert_ffn_slr(torch.randn(3, d), w_in, w_out, torch.tensor([0, 1]),
                                   torch.tensor([[0], [1], [0]]), torch.ones(3, 1), "relu")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_the_reference_ignores_the_weight_of_a_dropped_entry_as_the_op_does(bad):
    x, w_in, w_out, emap = torch.randn(2, 4), torch.randn(2, 3, 4), torch.randn(2, 4, 3), torch.tensor([0, 1])
    index = torch.tensor([[0, -1], [1, 0]])
    weights = torch.tensor([[0.7, bad], [0.5, 0.5]])  # token 0's second entry is dropped
    op = ops.grouped_expert_ffn(x, w_in, w_out, emap, index, weights, "relu")
    ref = reference.grouped_expert_ffn(x, w_in, w_out, emap, index, weights, "relu")
    assert torch.isfinite(ref).all()
    torch.testing.assert_close(op, ref)
    torch.testing.assert_close(ops.moe_align(index, weights, emap, 2)[2], reference.moe_align(index, weights, emap, 2)[2])


def _compressed_bank(rows: int, cols: int) -> list[torch.Tensor]:
    """Two compressed slots of rank 1 with no kept rows (the op's list form)."""
    return [torch.randn(2, rows, 1), torch.randn(2, 1, cols), torch.randn(0, cols), torch.empty(0, dtype=torch.long),
            torch.zeros(3, dtype=torch.long)]


@pytest.mark.parametrize("bad", ["expert id", "expert_map"])
def test_routing_errors_name_the_op_called(bad):
    """A bad expert id or expert_map entry names the op the user called (it said `moe_align:` for all three)."""
    h, w = torch.randn(3, 4), torch.rand(3, 2)
    w_in, w_out = torch.randn(2, 5, 4), torch.randn(2, 4, 5)
    idx, emap = torch.tensor([[0, 1]] * 3), torch.tensor([0, 1])
    if bad == "expert id":
        idx = torch.tensor([[0, 5]] * 3)
    else:
        emap = torch.tensor([0, 7])
    calls = {
        "grouped_expert_ffn": lambda: ops.grouped_expert_ffn(h, w_in, w_out, emap, idx, w, "relu"),
        "grouped_expert_ffn_backward": lambda: ops.grouped_expert_ffn_backward(torch.randn(3, 4), h, w_in, w_out,
                                                                               emap, idx, w, "relu"),
        "grouped_expert_ffn_slr": lambda: ops.grouped_expert_ffn_slr(h, _compressed_bank(5, 4), _compressed_bank(4, 5),
                                                                     emap, idx, w, "relu"),
    }
    for op, call in calls.items():
        with pytest.raises(RuntimeError, match=rf"^{op}: (top_k_index|expert_map)\["):
            call()


def test_grouped_expert_ffn_docstring_lists_every_activation_it_takes():
    from mcsmoe_fast.activations import ACTIVATIONS

    for name in ACTIVATIONS:
        assert f'"{name}"' in ops.grouped_expert_ffn.__doc__, name
