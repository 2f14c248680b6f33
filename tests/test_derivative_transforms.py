"""The fused ops have a backward for ordinary autograd only: forward-mode AD (which dropped the tangent and gave
a zero derivative) and torch.func's grad transforms (which failed naming an autograd.Function) are refused by
the op's name; torch.vmap of the forward keeps working and equals a loop."""
import copy

import pytest
import torch
import torch.autograd.forward_ad as fwAD

import mcsmoe_fast
from mcsmoe_fast import ops
from mcsmoe_fast.tiny import tiny_mixtral

DT = torch.float64


def ffn_case():
    g = torch.Generator().manual_seed(0)
    T, d, ff, S, E, k = 6, 5, 4, 3, 6, 2
    return dict(hidden=torch.randn(T, d, dtype=DT, generator=g), w_in=torch.randn(S, 2 * ff, d, dtype=DT, generator=g),
                w_out=torch.randn(S, d, ff, dtype=DT, generator=g), expert_map=torch.tensor([0, 2, 1, 1, 0, 2]),
                top_k_index=torch.randint(0, E, (T, k), generator=g),
                top_k_weights=torch.rand(T, k, dtype=DT, generator=g))


def slr_case():
    g = torch.Generator().manual_seed(1)
    return dict(x=torch.randn(5, 7, dtype=DT, generator=g), U=torch.randn(6, 2, dtype=DT, generator=g),
                V=torch.randn(2, 7, dtype=DT, generator=g), S_rows=torch.randn(3, 7, dtype=DT, generator=g),
                row_idx=torch.tensor([4, 0, 5]))


def ffn(hidden, c):
    return ops.grouped_expert_ffn(hidden, c["w_in"], c["w_out"], c["expert_map"], c["top_k_index"],
                                  c["top_k_weights"], "swiglu")


def slr(x, c):
    return ops.sparse_lowrank_linear(x, c["U"], c["V"], c["S_rows"], c["row_idx"])


def slr_bank_case():
    g = torch.Generator().manual_seed(2)
    bank = lambda out, inn: [torch.randn(2, out, 2, dtype=DT, generator=g),  # noqa: E731
                             torch.randn(2, 2, inn, dtype=DT, generator=g), torch.randn(2, inn, dtype=DT, generator=g),
                             torch.tensor([0, 1]), torch.tensor([0, 1, 2])]
    return dict(ffn_case(), bank_in=bank(8, 5), bank_out=bank(5, 4))


def slr_bank(hidden, c):
    return ops.grouped_expert_ffn_slr(hidden, c["bank_in"], c["bank_out"], torch.tensor([0, 1, 1, 0, 1, 0]),
                                      c["top_k_index"], c["top_k_weights"], "swiglu")


CASES = {"grouped_expert_ffn": (ffn, ffn_case, "hidden"), "sparse_lowrank_linear": (slr, slr_case, "x"),
         "grouped_expert_ffn_slr": (slr_bank, slr_bank_case, "hidden")}


@pytest.mark.parametrize("op", CASES)
@pytest.mark.parametrize("transform", ["jvp", "jacfwd", "grad", "jacrev"])
def test_torch_func_derivatives_are_refused_by_the_ops_name(op, transform):
    fn, case, name = CASES[op]
    c = case()
    x = c[name]
    with pytest.raises(NotImplementedError, match=f"^{op}: torch.func's grad / jvp transforms"):
        if transform == "jvp":
            torch.func.jvp(lambda t: fn(t, c), (x,), (torch.ones_like(x),))
        elif transform == "grad":
            torch.func.grad(lambda t: fn(t, c).square().sum())(x)
        else:
            getattr(torch.func, transform)(lambda t: fn(t, c))(x)


@pytest.mark.parametrize("op", CASES)
def test_a_dual_tensor_is_refused_not_given_a_zero_tangent(op):
    fn, case, name = CASES[op]
    c = case()
    with fwAD.dual_level(), pytest.raises(NotImplementedError, match=f"^{op}: forward-mode AD"):
        fn(fwAD.make_dual(c[name], torch.ones_like(c[name])), c)


@pytest.mark.parametrize("op", ["grouped_expert_ffn", "sparse_lowrank_linear"])
def test_vmap_of_the_forward_still_equals_a_loop(op):
    fn, case, name = CASES[op]
    c = case()
    batch = torch.stack([c[name], 2 * c[name], -c[name]])
    got = torch.vmap(lambda t: fn(t, c))(batch)
    torch.testing.assert_close(got, torch.stack([fn(t, c) for t in batch]))


def test_a_jvp_through_an_optimized_model_is_refused_where_the_plain_model_gives_one():
    base = tiny_mixtral().double()
    base.set_attn_implementation("eager")
    base.set_experts_implementation("eager")
    emb = base.get_input_embeddings()(torch.randint(3, 128, (1, 7))).detach()
    torch.func.jvp(lambda e: base(inputs_embeds=e).logits, (emb,), (torch.ones_like(emb),))  # transformers' runs
    fast = mcsmoe_fast.optimize(copy.deepcopy(base))
    with pytest.raises(NotImplementedError, match="grouped_expert_ffn: torch.func's grad / jvp transforms"):
        torch.func.jvp(lambda e: fast(inputs_embeds=e).logits, (emb,), (torch.ones_like(emb),))


@pytest.mark.parametrize("op", ["grouped_expert_ffn", "sparse_lowrank_linear"])
@pytest.mark.parametrize("outer", ["jacfwd", "grad"])
def test_a_derivative_around_a_vmapped_forward_is_refused_by_name(op, outer):
    """The derivative transform is outside, vmap the innermost: every level is looked at, not the innermost."""
    fn, case, name = CASES[op]
    c = case()
    batch = torch.stack([c[name], 2 * c[name]])
    vmapped = lambda xx: torch.vmap(lambda t: fn(t, c))(xx)  # noqa: E731
    with pytest.raises(NotImplementedError, match=f"^{op}: torch.func's grad / jvp transforms"):
        if outer == "grad":
            torch.func.grad(lambda xx: vmapped(xx).sum())(batch)
        else:
            torch.func.jacfwd(vmapped)(batch)


@pytest.mark.parametrize("op", ["grouped_expert_ffn", "sparse_lowrank_linear"])
def test_vmap_of_the_forward_runs_inside_a_dual_level(op):
    """No dual tensor, only an open forward-AD level: vmap's batched tensors are not inspected for tangents."""
    fn, case, name = CASES[op]
    c = case()
    batch = torch.stack([c[name], -c[name]])
    with fwAD.dual_level():
        got = torch.vmap(lambda t: fn(t, c))(batch)
    torch.testing.assert_close(got, torch.stack([fn(t, c) for t in batch]))
