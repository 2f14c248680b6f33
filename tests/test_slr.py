"""ops.sparse_lowrank_linear and ops.grouped_expert_ffn_slr (compressed experts: W = U V + S, S zero
outside the kept rows row_idx) against reference.sparse_lowrank_linear / reference.grouped_expert_ffn_slr."""
import pytest
import torch

from mcsmoe_fast import ops, reference
from mcsmoe_fast.activations import ACTIVATIONS, is_gated

TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float64: dict(rtol=1e-12, atol=1e-12),
       torch.float16: dict(rtol=2e-2, atol=2e-2), torch.bfloat16: dict(rtol=5e-2, atol=5e-2)}


# --- problems -----------------------------------------------------------------------------------------
def slr_factors(out, inn, r, K, gen, sort=False):
    """U [out, r], V [r, in], S_rows [K, in] (float64, O(1) outputs) and K distinct rows, unsorted."""
    U = torch.randn(out, r, generator=gen, dtype=torch.float64) / max(r, 1) ** 0.5
    V = torch.randn(r, inn, generator=gen, dtype=torch.float64) / max(inn, 1) ** 0.5
    S_rows = torch.randn(K, inn, generator=gen, dtype=torch.float64) / max(inn, 1) ** 0.5
    row_idx = torch.randperm(out, generator=gen)[:K]
    return U, V, S_rows, row_idx.sort().values if sort else row_idx


def linear_problem(lead, inn, out, r, K, bias, dtype=torch.float32, seed=0, sort=False):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, inn, generator=gen, dtype=torch.float64)
    U, V, S_rows, row_idx = slr_factors(out, inn, r, K, gen, sort)
    b = torch.randn(out, generator=gen, dtype=torch.float64) if bias else None
    cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    return cast(x), cast(U), cast(V), cast(S_rows), row_idx, cast(b)


def check_linear(args, **tol):
    out = ops.sparse_lowrank_linear(*args)
    x = args[0]
    # The reference in float64 on the very same (rounded) inputs.
    ref = reference.sparse_lowrank_linear(*(t.double() if t is not None and t.is_floating_point() else t for t in args))
    assert out.shape == ref.shape and out.dtype == x.dtype and out.device == x.device
    torch.testing.assert_close(out, ref.to(x.dtype), **(tol or TOL[x.dtype]))
    return out


def slr_bank(S, out, inn, r, counts, gen):
    """A bank [U [S, out, r], V [S, r, in], S_rows [K, in], row_idx [K], row_offsets [S+1]] (float64) with
    counts[s] kept rows in slot s; rows are distinct within a slot, unsorted, and may repeat across slots."""
    U = torch.randn(S, out, r, generator=gen, dtype=torch.float64) / max(r, 1) ** 0.5
    V = torch.randn(S, r, inn, generator=gen, dtype=torch.float64) / max(inn, 1) ** 0.5
    K = int(sum(counts))
    S_rows = torch.randn(K, inn, generator=gen, dtype=torch.float64) / max(inn, 1) ** 0.5
    rows = [torch.randperm(out, generator=gen)[:c] for c in counts]
    row_idx = torch.cat(rows) if rows else torch.empty(0, dtype=torch.int64)
    offsets = torch.zeros(S + 1, dtype=torch.int64)
    offsets[1:] = torch.tensor(list(counts), dtype=torch.int64).cumsum(0)
    return [U, V, S_rows, row_idx, offsets]


def kept_counts(S, out, gen, kept):
    """Kept rows per slot: "mixed" = different counts, slot 0 keeps none and the last keeps all `out`
    rows; "none" = no kept rows anywhere; "full" = every row of every slot."""
    if kept == "none":
        return [0] * S
    if kept == "full":
        return [out] * S
    counts = torch.randint(0, out + 1, (S,), generator=gen).tolist()
    if S > 1:
        counts[0], counts[-1] = 0, out
    return counts


def ffn_problem(T, d, ff, E, S, k, r, activation, dtype=torch.float32, drop=0.0, seed=0, emap=None, kept="mixed"):
    gen = torch.Generator().manual_seed(seed)
    F = 2 * ff if is_gated(activation) else ff
    hidden = torch.randn(T, d, generator=gen, dtype=torch.float64)
    w_in = slr_bank(S, F, d, r, kept_counts(S, F, gen, kept), gen)
    w_out = slr_bank(S, d, ff, r, kept_counts(S, d, gen, kept), gen)
    if emap is None:
        emap = torch.randint(0, S, (E,), generator=gen)
    idx = torch.stack([torch.randperm(E, generator=gen)[:k] for _ in range(T)]) if T else torch.empty(0, k, dtype=torch.int64)
    idx = torch.where(torch.rand(T, k, generator=gen) < drop, -1, idx)
    weights = torch.rand(T, k, generator=gen, dtype=torch.float64)
    cast = lambda bank: [t.to(dtype) if t.is_floating_point() else t for t in bank]  # noqa: E731
    wdtype = torch.float64 if dtype == torch.float64 else torch.float32
    return [hidden.to(dtype), cast(w_in), cast(w_out), emap, idx, weights.to(wdtype), activation]


def check_ffn(args, kw=None, **tol):
    """The op against the reference (float64, same rounded inputs); kw: alpha and limit, when given."""
    kw = kw or {}
    out = ops.grouped_expert_ffn_slr(*args, **kw)
    hidden = args[0]
    to64 = lambda bank: [t.double() if t.is_floating_point() else t for t in bank]  # noqa: E731
    ref = reference.grouped_expert_ffn_slr(hidden.double(), to64(args[1]), to64(args[2]), *args[3:5],
                                           args[5].double(), args[6], **kw)
    assert out.shape == ref.shape and out.dtype == hidden.dtype and out.device == hidden.device
    torch.testing.assert_close(out, ref.to(hidden.dtype), **(tol or TOL[hidden.dtype]))
    return out


def slr_apply(x, U, V, S_rows, row_idx):
    """x (U V + S)^T by plain PyTorch without W: (x V^T) U^T, kept rows added into their columns."""
    return (x @ V.T @ U.T).index_add(-1, row_idx, x @ S_rows.T)


# --- sparse_lowrank_linear ----------------------------------------------------------------------------
LINEAR_SHAPES = [  # leading dims of x, in, out, r, K
    ((5,), 7, 6, 3, 2), ((1,), 33, 17, 4, 5), ((0,), 9, 5, 2, 2), ((2, 3), 13, 11, 3, 0), ((4,), 8, 10, 2, 10),
    ((6,), 12, 9, 0, 3), ((3,), 0, 5, 2, 2), ((2, 3), 0, 4, 1, 1), ((7,), 10, 1, 2, 1), ((7,), 10, 1, 2, 0),
    ((), 9, 8, 2, 3), ((3, 0, 2), 5, 4, 1, 2), ((3,), 4, 0, 2, 0), ((40,), 64, 50, 50, 5), ((1, 1), 257, 3, 1, 3),
    ((300,), 20, 30, 4, 7), ((300,), 30, 20, 4, 7), ((2, 2, 129), 24, 17, 5, 9),  # row blocks (out <= in) or not
]


@pytest.mark.parametrize("shape", LINEAR_SHAPES, ids=str)
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_linear_matches_reference(shape, bias, dtype):
    lead, inn, out, r, K = shape
    check_linear(linear_problem(lead, inn, out, r, K, bias, dtype, seed=sum(lead) * 7 + inn + out + r + K))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [((5,), 24, 20, 4, 6), ((2, 150), 16, 12, 3, 12), ((1,), 40, 1, 2, 1)], ids=str)
def test_linear_half_precision_on_cpu(shape, dtype):
    lead, inn, out, r, K = shape
    check_linear(linear_problem(lead, inn, out, r, K, True, dtype, seed=3))


def test_linear_sorted_and_unsorted_rows_agree():
    args = linear_problem((9,), 16, 12, 3, 6, True, seed=4)
    order = torch.randperm(6, generator=torch.Generator().manual_seed(1))
    x, U, V, S_rows, row_idx, b = args
    assert not torch.equal(row_idx, row_idx.sort().values)  # the problem's rows are unsorted
    permuted = ops.sparse_lowrank_linear(x, U, V, S_rows[order], row_idx[order], b)
    torch.testing.assert_close(permuted, check_linear(args))


def test_linear_kept_rows_land_in_their_columns():
    # U = V = 0: y is S x, so each kept row's product must land in exactly its column.
    x = torch.randn(4, 6, dtype=torch.float64)
    S_rows = torch.randn(3, 6, dtype=torch.float64)
    row_idx = torch.tensor([5, 0, 2])
    y = ops.sparse_lowrank_linear(x, torch.zeros(7, 2, dtype=torch.float64), torch.zeros(2, 6, dtype=torch.float64),
                                  S_rows, row_idx)
    expected = torch.zeros(4, 7, dtype=torch.float64)
    expected[:, row_idx] = x @ S_rows.T
    torch.testing.assert_close(y, expected)


def test_linear_non_contiguous_inputs():
    x, U, V, S_rows, row_idx, b = linear_problem((2, 11), 12, 10, 3, 4, True)
    nc = (x.transpose(0, 1).contiguous().transpose(0, 1), U.t().contiguous().t(), V.t().contiguous().t(),
          S_rows.t().contiguous().t(), torch.stack([row_idx, row_idx])[0::2][0], torch.stack([b, b], 1)[:, 0])
    assert not (nc[0].is_contiguous() or nc[1].is_contiguous() or nc[3].is_contiguous() or nc[5].is_contiguous())
    torch.testing.assert_close(ops.sparse_lowrank_linear(*nc), ops.sparse_lowrank_linear(x, U, V, S_rows, row_idx, b))
    check_linear(nc)


@pytest.mark.parametrize("threads", [1, 2])
def test_linear_thread_strategies(threads):
    # One thread: one block up to 1024 rows, row blocks beyond; two: row blocks in parallel from 128 to
    # 1023 rows when the layer is no wider than its input, one block otherwise.
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for T in (127, 128, 257, 1023, 1024, 1100):
            check_linear(linear_problem((T,), 9, 14, 2, 5, T % 2 == 0, seed=T))
            check_linear(linear_problem((T,), 14, 9, 2, 5, T % 2 == 1, seed=T))
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("mode", ["0", "1"])
def test_linear_forced_thread_strategies(mode, monkeypatch):
    # MCSMOE_SLR_ROW_PARALLEL forces row blocks in parallel (1) or one block of threaded GEMMs (0).
    monkeypatch.setenv("MCSMOE_SLR_ROW_PARALLEL", mode)
    for T in (1, 63, 130, 700, 1100):
        check_linear(linear_problem((T,), 11, 13, 3, 4, T % 2 == 1, seed=T))


def test_linear_inference_mode():
    for lead in ((3,), (700,)):  # one block, and row blocks on worker threads (the mode must reach them)
        args = linear_problem(lead, 12, 10, 3, 4, True, seed=lead[0])
        with torch.inference_mode():
            out = check_linear(args)
        assert out.is_inference()


def test_linear_never_forms_the_dense_weight():
    # W would be 300k x 300k floats (360 GB); the factors are a few MB. Checked against W's rows rebuilt
    # for a few output columns (the kept ones and some others).
    gen = torch.Generator().manual_seed(5)
    n, r, K = 300_000, 2, 3
    x = torch.randn(2, n, generator=gen)
    U = torch.randn(n, r, generator=gen)
    V = torch.randn(r, n, generator=gen) / n**0.5
    S_rows = torch.randn(K, n, generator=gen) / n**0.5
    row_idx = torch.tensor([n - 1, 7, 123_456])
    y = ops.sparse_lowrank_linear(x, U, V, S_rows, row_idx)
    assert y.shape == (2, n)
    cols = torch.cat([row_idx, torch.tensor([0, 8, 250_000])])
    W_cols = (U[cols].double() @ V.double())  # [6, n]: the rows of W for these columns
    W_cols[:K] += S_rows.double()
    torch.testing.assert_close(y[:, cols].double(), x.double() @ W_cols.T, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(y, slr_apply(x, U, V, S_rows, row_idx), rtol=1e-4, atol=1e-4)


# --- autograd -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape,bias", [
    (((3,), 5, 4, 2, 2), True), (((2, 2), 6, 5, 3, 0), False), (((1,), 4, 3, 0, 3), True),
    (((2, 3), 5, 6, 2, 6), False), (((0,), 4, 3, 2, 1), True), (((), 5, 4, 2, 2), True), (((2, 3), 0, 4, 2, 1), True),
], ids=str)
def test_gradcheck(shape, bias):
    lead, inn, out, r, K = shape
    args = list(linear_problem(lead, inn, out, r, K, bias, torch.float64, seed=11))
    for i in (0, 1, 2, 3, 5):
        if args[i] is not None:
            args[i].requires_grad_()
    torch.autograd.gradcheck(ops.sparse_lowrank_linear, args)
    torch.autograd.gradgradcheck(ops.sparse_lowrank_linear, args)


def test_gradients_match_reference():
    args = list(linear_problem((3, 7), 13, 11, 3, 5, True, torch.float64, seed=12))
    for i in (0, 1, 2, 3, 5):
        args[i].requires_grad_()
    g = torch.randn(3, 7, 11, dtype=torch.float64)
    ours = torch.autograd.grad(ops.sparse_lowrank_linear(*args), [args[i] for i in (0, 1, 2, 3, 5)], g)
    ref = torch.autograd.grad(reference.sparse_lowrank_linear(*args), [args[i] for i in (0, 1, 2, 3, 5)], g)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("wanted", [(0,), (1,), (2,), (3,), (5,), (1, 3)])
def test_only_requested_gradients(wanted):
    # row_idx (int64) never takes a gradient; each differentiable input can be the only one that does.
    args = list(linear_problem((4,), 6, 5, 2, 3, True, torch.float64, seed=13))
    for i in wanted:
        args[i].requires_grad_()
    ops.sparse_lowrank_linear(*args).square().sum().backward()
    for i, t in enumerate(args):
        assert (t.grad is not None) == (i in wanted), i
    assert args[4].grad is None and not args[4].requires_grad


def test_row_idx_cannot_require_grad_and_gets_no_gradient():
    x, U, V, S_rows, row_idx, b = linear_problem((4,), 6, 5, 2, 3, False, torch.float64)
    with pytest.raises(RuntimeError, match="floating point"):
        row_idx.requires_grad_()
    U.requires_grad_()
    y = ops.sparse_lowrank_linear(x, U, V, S_rows, row_idx)
    (gU,) = torch.autograd.grad(y.sum(), [U])
    assert gU.shape == U.shape and row_idx.grad is None


def test_backward_kept_rows_only():
    # The gradient of S_rows is the output gradient of the kept columns only.
    x, U, V, S_rows, row_idx, _ = linear_problem((6,), 5, 8, 2, 3, False, torch.float64, seed=14)
    S_rows.requires_grad_()
    g = torch.randn(6, 8, dtype=torch.float64)
    (gS,) = torch.autograd.grad(ops.sparse_lowrank_linear(x, U, V, S_rows, row_idx), [S_rows], g)
    torch.testing.assert_close(gS, g[:, row_idx].T @ x)


# --- grouped_expert_ffn_slr ----------------------------------------------------------------------------
FFN_SHAPES = [  # T, d, ff, E, S, k, r, drop
    (1, 16, 24, 8, 8, 2, 4, 0.0), (1, 13, 7, 4, 2, 1, 3, 0.0), (5, 7, 11, 3, 3, 3, 2, 0.0), (37, 24, 40, 8, 3, 2, 5, 0.1),
    (64, 33, 17, 32, 8, 1, 0, 0.3), (100, 8, 8, 8, 1, 2, 2, 0.0), (19, 40, 9, 16, 16, 4, 3, 0.25), (0, 8, 8, 4, 2, 2, 2, 0.0),
    (200, 16, 16, 64, 5, 6, 3, 0.05), (7, 8, 0, 4, 2, 2, 2, 0.0), (6, 0, 8, 4, 2, 1, 2, 0.0), (300, 12, 20, 8, 2, 2, 3, 0.1),
]


@pytest.mark.parametrize("shape", FFN_SHAPES, ids=str)
@pytest.mark.parametrize("activation", ["relu", "swiglu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_ffn_matches_reference(shape, activation, dtype):
    T, d, ff, E, S, k, r, drop = shape
    check_ffn(ffn_problem(T, d, ff, E, S, k, r, activation, dtype, drop, seed=int(sum(shape) * 10)))


@pytest.mark.parametrize("kept", ["none", "full"])
@pytest.mark.parametrize("activation", ["relu", "swiglu"])
def test_ffn_no_kept_rows_and_all_rows_kept(kept, activation):
    check_ffn(ffn_problem(29, 12, 10, 8, 4, 2, 3, activation, kept=kept, seed=21))


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_ffn_every_activation(activation):
    check_ffn(ffn_problem(31, 12, 10, 8, 4, 2, 3, activation, drop=0.1, seed=28))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_ffn_half_precision_on_cpu(dtype):
    check_ffn(ffn_problem(23, 16, 24, 8, 4, 2, 4, "swiglu", dtype, 0.1))


def test_ffn_empty_slots_and_all_tokens_on_one_slot():
    emap = torch.full((8,), 2, dtype=torch.int64)  # slots 0, 1, 3 never used
    args = ffn_problem(50, 16, 24, 8, 4, 2, 3, "swiglu", emap=emap, seed=22)
    out = check_ffn(args)
    hidden, w_in, w_out, _, _, weights, _ = args
    one = lambda bank: (bank[0][2], bank[1][2], bank[2][bank[4][2]:bank[4][3]], bank[3][bank[4][2]:bank[4][3]])  # noqa: E731
    h = slr_apply(hidden, *one(w_in))
    dense = slr_apply(torch.nn.functional.silu(h[:, :24]) * h[:, 24:], *one(w_out)) * weights.sum(-1, keepdim=True)
    torch.testing.assert_close(out, dense, rtol=1e-5, atol=1e-5)


def test_ffn_shared_slot_runs_once_with_summed_weight():
    args = ffn_problem(6, 12, 10, 4, 2, 2, 3, "relu", emap=torch.tensor([0, 0, 1, 1]), seed=23)
    args[4] = torch.tensor([[0, 1]] * 3 + [[1, 0]] * 3)  # both experts of each token in slot 0
    hidden, w_in, w_out, _, _, weights, _ = args
    W_in, W_out = reference.slr_bank_dense(w_in), reference.slr_bank_dense(w_out)
    expected = torch.relu(hidden @ W_in[0].T) @ W_out[0].T * weights.sum(-1, keepdim=True)
    torch.testing.assert_close(ops.grouped_expert_ffn_slr(*args), expected, rtol=1e-5, atol=1e-5)


def test_ffn_dropped_tokens_give_zero_rows():
    args = ffn_problem(9, 12, 10, 4, 2, 2, 3, "swiglu", seed=24)
    args[4] = args[4].clone()
    args[4][[1, 4]] = -1
    args[4][6, 1] = -1  # one of two experts dropped
    out = check_ffn(args)
    assert torch.all(out[[1, 4]] == 0) and torch.all(out[0] != 0) and torch.all(out[6] != 0)


def test_ffn_slots_differ_only_in_kept_rows():
    # Two slots with equal low-rank factors: outputs differ exactly by their kept rows.
    args = ffn_problem(12, 8, 6, 2, 2, 1, 2, "relu", emap=torch.tensor([0, 1]), seed=25)
    for bank in args[1:3]:
        bank[0][1], bank[1][1] = bank[0][0], bank[1][0]
    check_ffn(args)
    args[4] = torch.zeros_like(args[4])
    to_slot0 = ops.grouped_expert_ffn_slr(*args)
    args[4] = torch.ones_like(args[4])
    assert not torch.allclose(to_slot0, ops.grouped_expert_ffn_slr(*args))


def test_ffn_non_contiguous_inputs():
    hidden, w_in, w_out, emap, idx, w, act = ffn_problem(21, 16, 12, 8, 3, 2, 3, "swiglu", seed=26)
    nc = lambda b: [b[0].transpose(1, 2).contiguous().transpose(1, 2), b[1].transpose(0, 2).contiguous().transpose(0, 2),  # noqa: E731
                    b[2].t().contiguous().t(), b[3], b[4]]
    out = ops.grouped_expert_ffn_slr(hidden.t().contiguous().t(), nc(w_in), nc(w_out), emap, idx.t().contiguous().t(),
                                     w.t().contiguous().t(), act)
    torch.testing.assert_close(out, ops.grouped_expert_ffn_slr(hidden, w_in, w_out, emap, idx, w, act))


def test_ffn_inference_mode():
    for T in (3, 400):
        args = ffn_problem(T, 12, 10, 8, 4, 2, 3, "swiglu", seed=T)
        with torch.inference_mode():
            out = check_ffn(args)
        assert out.is_inference()


@pytest.mark.parametrize("mode", ["0", "1", "balanced"])
def test_ffn_every_thread_schedule(mode, monkeypatch):
    monkeypatch.setenv("MCSMOE_SLOT_PARALLEL", mode)
    for T in (1, 3, 70):
        check_ffn(ffn_problem(T, 24, 40, 8, 4, 2, 4, "swiglu", seed=T))


def test_ffn_never_forms_the_dense_weights():
    # Dense slots would be 2 x 100k x 100k floats per matrix (80 GB each); the factors take a few MB.
    gen = torch.Generator().manual_seed(27)
    d = ff = 100_000
    T, S, r = 3, 2, 2
    w_in = [t.float() for t in slr_bank(S, ff, d, r, [2, 3], gen)]
    w_out = [t.float() for t in slr_bank(S, d, ff, r, [4, 1], gen)]
    w_in[3], w_in[4], w_out[3], w_out[4] = w_in[3].long(), w_in[4].long(), w_out[3].long(), w_out[4].long()
    hidden = torch.randn(T, d, generator=gen)
    idx = torch.tensor([[0, 1], [1, -1], [1, 0]])
    weights = torch.rand(T, 2, generator=gen)
    emap = torch.tensor([0, 1])
    out = ops.grouped_expert_ffn_slr(hidden, w_in, w_out, emap, idx, weights, "relu")
    expected = torch.zeros(T, d, dtype=torch.float64)
    for t in range(T):
        for j in range(2):
            if idx[t, j] < 0:
                continue
            s = int(emap[idx[t, j]])
            part = lambda bank: (bank[0][s].double(), bank[1][s].double(),  # noqa: E731
                                 bank[2][bank[4][s]:bank[4][s + 1]].double(), bank[3][bank[4][s]:bank[4][s + 1]])
            h = torch.relu(slr_apply(hidden[t].double(), *part(w_in)))
            expected[t] += weights[t, j].double() * slr_apply(h, *part(w_out))
    torch.testing.assert_close(out.double(), expected, rtol=1e-4, atol=1e-4)


def test_ffn_grad_inputs_give_clear_backward_error():
    args = ffn_problem(4, 8, 8, 4, 2, 2, 2, "relu")
    args[1][0].requires_grad_()
    with pytest.raises(RuntimeError, match="without a backward"):
        ops.grouped_expert_ffn_slr(*args).sum().backward()


def clamped_problem(T, dtype, scale, seed=29, **kw):
    """A clamped_swiglu problem whose w_in bank is scaled by `scale` (U and S_rows): pre-activations of about
    +-scale."""
    args = ffn_problem(T, 16, 12, 8, 4, 2, 3, "clamped_swiglu", dtype, 0.1, seed=seed, **kw)
    args[1][0], args[1][2] = args[1][0] * scale, args[1][2] * scale
    return args


@pytest.mark.parametrize("alpha,limit,scale", [(1.702, 7.0, 9.0), (1.702, 0.6, 1.0), (0.8, 1.5, 2.0), (1.702, 0.0, 1.0)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_ffn_clamped_swiglu_straddles_the_limit(alpha, limit, scale, dtype):
    args = clamped_problem(41, dtype, scale)
    hidden, w_in, _, emap, idx = args[:5]
    W_in = reference.slr_bank_dense(w_in)
    h = torch.einsum("nd,nfd->nf", hidden[(idx >= 0).nonzero()[:, 0]], W_in[emap[idx[idx >= 0]]])
    gate, up = h.chunk(2, dim=-1)
    for clamped in (gate > limit, up > limit, up < -limit):  # both sides of +-limit
        assert 0.1 < clamped.double().mean() < 0.6
    kw = dict(alpha=alpha, limit=limit)
    out = check_ffn(args, kw, **(dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else {}))
    # the dense op on the reconstructed weights: the same function
    dense = ops.grouped_expert_ffn(hidden, W_in, reference.slr_bank_dense(args[2]), emap, idx, args[5], args[6], **kw)
    torch.testing.assert_close(out, dense, **(dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else TOL[dtype]))
    if (alpha, limit) != (1.702, 7.0):
        assert not torch.allclose(out, ops.grouped_expert_ffn_slr(*args))


@pytest.mark.parametrize("mode", ["0", "1", "balanced"])
def test_ffn_clamped_swiglu_thread_strategies_and_half_precision(mode, monkeypatch):
    monkeypatch.setenv("MCSMOE_SLOT_PARALLEL", mode)
    for T in (1, 70, 1100):
        check_ffn(clamped_problem(T, torch.float32, 2.0, seed=T), dict(limit=1.0), rtol=1e-4, atol=1e-4)
    for dtype in (torch.bfloat16, torch.float16):
        check_ffn(clamped_problem(23, dtype, 2.0), dict(limit=1.0), rtol=5e-2, atol=5e-2)


@pytest.mark.parametrize("activation", ["relu", "swiglu", "clamped_swiglu"])
@pytest.mark.parametrize("which", ["b_in", "b_out", "both"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_ffn_expert_biases(activation, which, dtype):
    """b_in [S, F] inside the activation, b_out [S, d] inside the routing weight, as in the dense op."""
    args = ffn_problem(41, 12, 10, 8, 4, 2, 3, activation, dtype, drop=0.1, seed=31)
    S, F, d = args[1][0].shape[0], args[1][0].shape[1], args[0].shape[1]
    gen = torch.Generator().manual_seed(5)
    kw = dict(b_in=torch.randn(S, F, generator=gen, dtype=dtype) if which != "b_out" else None,
              b_out=torch.randn(S, d, generator=gen, dtype=dtype) if which != "b_in" else None)
    if activation == "clamped_swiglu":
        kw.update(alpha=1.2, limit=1.5)
    out = check_ffn(args, kw)
    dense = ops.grouped_expert_ffn(args[0], reference.slr_bank_dense(args[1]), reference.slr_bank_dense(args[2]),
                                   *args[3:7], **kw)
    torch.testing.assert_close(out, dense, **TOL[dtype])
    assert not torch.allclose(out, ops.grouped_expert_ffn_slr(*args, **{k: v for k, v in kw.items() if "b_" not in k}))


@pytest.mark.parametrize("bias, match", [
    (dict(b_in=torch.zeros(4, 19)), r"b_in must be \[S, F\] = \[4, 20\]"),
    (dict(b_out=torch.zeros(3, 12)), r"b_out must be \[S, d\] = \[4, 12\]"),
    (dict(b_out=torch.zeros(4, 12, dtype=torch.float64)), "b_out must have the weights' dtype"),
])
def test_ffn_bad_biases_raise(bias, match):
    args = ffn_problem(9, 12, 10, 8, 4, 2, 3, "swiglu", seed=32)
    with pytest.raises(RuntimeError, match=match):
        ops.grouped_expert_ffn_slr(*args, **bias)


def test_ffn_bad_clamped_swiglu_limit_is_a_value_error():
    args = clamped_problem(5, torch.float32, 1.0)
    with pytest.raises(ValueError, match="grouped_expert_ffn_slr: clamped_swiglu needs a finite limit >= 0, got -2"):
        ops.grouped_expert_ffn_slr(*args, limit=-2.0)


# --- bad inputs -------------------------------------------------------------------------------------------
LINEAR_BAD = [  # edit of [x, U, V, S_rows, row_idx, bias], exception, message
    (lambda a: a.__setitem__(0, a[0][:, :5]), RuntimeError, r"V \[r, in\] has in = 6 but x has 5"),
    (lambda a: a.__setitem__(2, a[2][:1]), RuntimeError, r"U \[out, r\] has r = 2 but V \[r, in\] has 1 rows"),
    (lambda a: a.__setitem__(3, a[3][:, :5]), RuntimeError, r"S_rows \[K, in\] has in = 5"),
    (lambda a: a.__setitem__(3, a[3][:2]), RuntimeError, "row_idx has 3 entries but S_rows has 2 rows"),
    (lambda a: a.__setitem__(1, a[1][0]), RuntimeError, r"U must be \[out, r\]"),
    (lambda a: a.__setitem__(0, a[0][0, 0]), RuntimeError, "got a scalar"),
    (lambda a: a.__setitem__(0, a[0].long()), RuntimeError, "floating point"),
    (lambda a: a.__setitem__(1, a[1].double()), RuntimeError, "one dtype"),
    (lambda a: a.__setitem__(3, a[3].half()), RuntimeError, "one dtype"),
    (lambda a: a.__setitem__(4, a[4].int()), RuntimeError, "row_idx must be an int64 tensor"),
    (lambda a: a.__setitem__(4, a[4][None]), RuntimeError, "row_idx must be an int64 tensor"),
    (lambda a: a.__setitem__(5, a[5][:4]), RuntimeError, r"bias must be \[out\] = \[5\]"),
    (lambda a: a.__setitem__(5, a[5].double()), RuntimeError, "bias must be Float"),
    (lambda a: a.__setitem__(4, torch.tensor([0, 5, 1])), IndexError, r"row_idx\[1\] = 5 is not an output row in \[0, 5\)"),
    (lambda a: a.__setitem__(4, torch.tensor([0, 1, -1])), IndexError, r"row_idx\[2\] = -1 is not an output row"),
    (lambda a: a.__setitem__(4, torch.tensor([3, 1, 3])), ValueError, r"row_idx\[2\] = 3 repeats an earlier row"),
    (lambda a: a.__setitem__(0, a[0].to("meta")), RuntimeError, "one device"),
    (lambda a: a.__setitem__(1, a[1].to("meta")), RuntimeError, "one device"),
    (lambda a: a.__setitem__(4, a[4].to("meta")), RuntimeError, "one device"),
    (lambda a: a.__setitem__(5, a[5].to("meta")), RuntimeError, "one device"),
]


@pytest.mark.parametrize("edit,exc,match", LINEAR_BAD)
def test_linear_bad_inputs_raise(edit, exc, match):
    args = list(linear_problem((4,), 6, 5, 2, 3, True))
    edit(args)
    with pytest.raises(exc, match=match):
        ops.sparse_lowrank_linear(*args)


def set_bank(name, i, fn):
    def edit(a):
        bank = list(a[1 if name == "w_in" else 2])
        bank[i] = fn(bank[i])
        a[1 if name == "w_in" else 2] = bank
    return edit


FFN_BAD = [  # edit of a good problem (T 5, d 8, ff 6, swiglu, S 3 with kept rows [0, 5, 12] / [0, 4, 8])
    (lambda a: a.__setitem__(6, "quick_gelu"), ValueError, "unknown activation 'quick_gelu'"),
    (lambda a: a.__setitem__(6, "relu"), RuntimeError, "w_in has 12 output rows but relu with w_out's ff = 6 needs 6"),
    (lambda a: a.__setitem__(1, a[1][:4]), RuntimeError, r"w_in must be \[U, V, S_rows, row_idx, row_offsets\], got 4"),
    (lambda a: a.__setitem__(2, a[2] + [a[2][4]]), RuntimeError, r"w_out must be \[U, V, S_rows, row_idx, row_offsets\], got 6"),
    (set_bank("w_in", 4, lambda t: torch.tensor([0, 3, 2, 17])), RuntimeError, "w_in row_offsets must not decrease, got 3 then 2"),
    (set_bank("w_in", 4, lambda t: torch.tensor([0, 0, 5, 16])), RuntimeError, "w_in row_offsets must start at 0 and end at 17, got 0 and 16"),
    (set_bank("w_out", 4, lambda t: torch.tensor([1, 1, 5, 12])), RuntimeError, "w_out row_offsets must start at 0 and end at 12, got 1"),
    (set_bank("w_in", 4, lambda t: t[:3]), RuntimeError, r"w_in row_offsets must be int64 \[S \+ 1\] = \[4\]"),
    (set_bank("w_in", 4, lambda t: t.int()), RuntimeError, r"w_in row_offsets must be int64"),
    (set_bank("w_out", 3, lambda t: t.int()), RuntimeError, r"w_out row_idx must be int64 \[12\]"),
    (set_bank("w_in", 3, lambda t: t[:-1]), RuntimeError, r"w_in row_idx must be int64 \[17\]"),
    (set_bank("w_in", 3, lambda t: torch.cat([t[:-1], torch.tensor([12])])), IndexError,
     r"w_in row_idx of slot 2, entry \[11\] = 12 is not an output row in \[0, 12\)"),
    (set_bank("w_out", 3, lambda t: torch.cat([t[:4], torch.tensor([-2]), t[5:]])), IndexError,
     r"w_out row_idx of slot 2, entry \[0\] = -2 is not an output row in \[0, 8\)"),
    (set_bank("w_in", 3, lambda t: torch.cat([t[:5], t[5:6], t[5:16]])), ValueError,
     r"w_in row_idx of slot 2, entry \[1\] = \d+ repeats an earlier row"),
    (set_bank("w_in", 0, lambda t: t.double()), RuntimeError, "w_in U, V and S_rows must have hidden's dtype Float"),
    (set_bank("w_out", 2, lambda t: t.half()), RuntimeError, "w_out U, V and S_rows must have hidden's dtype Float"),
    (set_bank("w_in", 0, lambda t: t[0]), RuntimeError, r"w_in U must be \[S, out, r\]"),
    (set_bank("w_in", 1, lambda t: t[:, :1]), RuntimeError, "w_in U .* and V .* disagree on slots or rank"),
    (set_bank("w_out", 0, lambda t: t[:2]), RuntimeError, "w_out U .* and V .* disagree on slots or rank"),
    (set_bank("w_in", 2, lambda t: t[:, :7]), RuntimeError, r"w_in S_rows must be \[K, 8\]"),
    (lambda a: a.__setitem__(1, [a[1][0][:2], a[1][1][:2], a[1][2][:5], a[1][3][:5], a[1][4][:3]]), RuntimeError,
     "w_in has 2 slots but w_out has 3"),
    (lambda a: a.__setitem__(0, a[0][:, :7]), RuntimeError, "hidden size 7 must match"),
    (lambda a: a.__setitem__(0, a[0][None]), RuntimeError, r"hidden must be \[T, d\]"),
    (lambda a: a.__setitem__(0, a[0].long()), RuntimeError, "hidden must be floating point"),
    (lambda a: (a.__setitem__(4, a[4][:3]), a.__setitem__(5, a[5][:3])), RuntimeError, "top_k_index has 3 tokens but hidden has 5"),
    (lambda a: a.__setitem__(4, torch.full_like(a[4], 4)), RuntimeError, r"top_k_index\[0, 0\] = 4"),
    (lambda a: a.__setitem__(3, torch.tensor([0, 1, 3, 0])), RuntimeError, r"expert_map\[2\] = 3"),
    (lambda a: a.__setitem__(0, a[0].to("meta")), RuntimeError, "one device"),
    (set_bank("w_in", 0, lambda t: t.to("meta")), RuntimeError, "device"),
    (set_bank("w_out", 3, lambda t: t.to("meta")), RuntimeError, "device"),
]


def good_ffn_args():
    args = ffn_problem(5, 8, 6, 4, 3, 2, 2, "swiglu", emap=torch.tensor([0, 1, 2, 2]), seed=47)
    assert args[1][4].tolist() == [0, 0, 5, 17] and args[2][4].tolist() == [0, 0, 4, 12]  # the problem FFN_BAD edits
    return args


@pytest.mark.parametrize("edit,exc,match", FFN_BAD)
def test_ffn_bad_inputs_raise(edit, exc, match):
    args = good_ffn_args()
    edit(args)
    with pytest.raises(exc, match=match):
        ops.grouped_expert_ffn_slr(*args)


def test_ffn_rows_may_repeat_across_slots():
    args = good_ffn_args()
    w_in = list(args[1])
    slot1 = w_in[3][:5].tolist()
    slot2 = slot1 + [r for r in range(12) if r not in slot1]  # slot 2 keeps every row, slot 1's among them
    w_in[3] = torch.tensor(slot1 + slot2)
    args[1] = w_in
    check_ffn(args)


# --- torch.library and torch.compile ------------------------------------------------------------------------
def test_linear_opcheck():
    for lead, bias, grad in [((5,), True, True), ((2, 3), False, True), ((1,), True, False), ((0,), False, False)]:
        args = list(linear_problem(lead, 7, 6, 2, 3, bias, seed=31))
        if grad:
            for t in args[:4]:
                t.requires_grad_()
        torch.library.opcheck(torch.ops.mcsmoe_fast.sparse_lowrank_linear, args)


def test_ffn_opcheck():
    for T, act in [(7, "relu"), (1, "swiglu"), (0, "swiglu"), (9, "clamped_swiglu")]:
        torch.library.opcheck(torch.ops.mcsmoe_fast.grouped_expert_ffn_slr, ffn_problem(T, 8, 6, 4, 3, 2, 2, act, drop=0.2, seed=32))
    torch.library.opcheck(torch.ops.mcsmoe_fast.grouped_expert_ffn_slr,
                          ffn_problem(9, 8, 6, 4, 3, 2, 2, "clamped_swiglu", seed=33), dict(alpha=1.2, limit=0.4))
    torch.library.opcheck(torch.ops.mcsmoe_fast.grouped_expert_ffn_slr,
                          ffn_problem(9, 8, 6, 4, 3, 2, 2, "clamped_swiglu", seed=34),
                          dict(b_in=torch.randn(3, 12), b_out=torch.randn(3, 8), limit=0.4))


def test_torch_compile_linear_forward_and_backward():
    x, U, V, S_rows, row_idx, b = linear_problem((2, 5), 8, 7, 3, 4, True, seed=33)
    U.requires_grad_()
    S_rows.requires_grad_()

    def layer(x, U, V, S_rows, row_idx, b):
        return torch.relu(ops.sparse_lowrank_linear(x, U, V, S_rows, row_idx, b)) * 2

    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    out = compiled(x, U, V, S_rows, row_idx, b)
    expected = layer(x, U, V, S_rows, row_idx, b)
    torch.testing.assert_close(out, expected)
    grads = torch.autograd.grad(out.sum(), [U, S_rows])
    ref_grads = torch.autograd.grad(torch.relu(reference.sparse_lowrank_linear(x, U, V, S_rows, row_idx, b)).sum() * 2,
                                    [U, S_rows])
    for a, e in zip(grads, ref_grads):
        torch.testing.assert_close(a, e)


def test_torch_compile_ffn():
    args = ffn_problem(12, 8, 6, 4, 3, 2, 2, "swiglu", seed=34)

    def block(hidden, w_in, w_out, emap, idx, w):
        return hidden + ops.grouped_expert_ffn_slr(hidden, w_in, w_out, emap, idx, w, "swiglu")

    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    expected = args[0] + reference.grouped_expert_ffn_slr(*args)
    torch.testing.assert_close(compiled(*args[:6]), expected)


def test_torch_compile_ffn_clamped_swiglu():
    args = clamped_problem(12, torch.float32, 2.0, seed=35)

    def block(hidden, w_in, w_out, emap, idx, w):
        return hidden + ops.grouped_expert_ffn_slr(hidden, w_in, w_out, emap, idx, w, "clamped_swiglu", alpha=1.1, limit=0.9)

    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    expected = args[0] + reference.grouped_expert_ffn_slr(*args, alpha=1.1, limit=0.9)
    torch.testing.assert_close(compiled(*args[:6]), expected, rtol=1e-4, atol=1e-4)


# --- the compressed slots' training path (CompressedMoEExperts.forward with gradients) ---------------------
@pytest.mark.parametrize("activation", ["relu", "swiglu", "clamped_swiglu"])
@pytest.mark.parametrize("biases", [False, True])
def test_compressed_slots_training_gradients_match_reference(activation, biases):
    """Every gradient of the training path (input, U, V, S_rows, biases, routing weights) equals autograd through
    the reference's dense reconstruction; merged slots shared by a token's experts and dropped tokens included."""
    from mcsmoe_fast.modules import CompressedMoEExperts

    emap = torch.tensor([0, 0, 1, 2, 2, 1, 3, 0])  # token pairs such as (0, 1) share slot 0
    hidden, w_in, w_out, emap, idx, weights, act = ffn_problem(41, 12, 10, 8, 4, 2, 3, activation, torch.float64,
                                                               drop=0.15, seed=40, emap=emap)
    idx[:5] = torch.tensor([0, 1])  # both experts in one slot
    gen = torch.Generator().manual_seed(41)
    b = [torch.randn(4, w_in[0].shape[1], generator=gen, dtype=torch.float64),
         torch.randn(4, 12, generator=gen, dtype=torch.float64)] if biases else [None, None]
    module = CompressedMoEExperts(w_in, w_out, emap, act, *b)
    hidden, weights = hidden.requires_grad_(), weights.requires_grad_()
    module(hidden, idx, weights).square().sum().backward()
    ours = [hidden.grad, weights.grad, *(p.grad for p in module.parameters())]

    leaves = [hidden.detach().requires_grad_(), weights.detach().requires_grad_()]
    banks = [[t.detach().clone().requires_grad_(t.is_floating_point()) for t in bank] for bank in (w_in, w_out)]
    bias = [None if t is None else t.detach().clone().requires_grad_() for t in b]
    reference.grouped_expert_ffn_slr(leaves[0], *banks, emap, idx, leaves[1], act, *bias).square().sum().backward()
    named = {"in_U": banks[0][0], "in_V": banks[0][1], "in_S_rows": banks[0][2], "out_U": banks[1][0],
             "out_V": banks[1][1], "out_S_rows": banks[1][2], "b_in": bias[0], "b_out": bias[1]}
    expected = [leaves[0].grad, leaves[1].grad, *(named[n].grad for n, _ in module.named_parameters())]
    assert len(ours) == len(expected) == 2 + 6 + 2 * biases
    for got, want in zip(ours, expected):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


# --- bf16: the compressed layer ------------------------------------------------------------------------
def test_compressed_layer_in_bf16():
    """CompressedMoEExperts with bf16 banks: the inference op and the training path (sparse_lowrank_linear per
    slot, with its backward) against the float64 reference on the same rounded weights; bf16 out, bf16
    gradients. Tolerance: relative to the tensor's norm (bf16 rounds every GEMM output and activation once,
    accumulation is fp32)."""
    from mcsmoe_fast.modules import CompressedMoEExperts

    hidden, w_in, w_out, emap, idx, weights, act = ffn_problem(200, 48, 80, 8, 4, 2, 8, "swiglu", torch.bfloat16,
                                                               0.1, seed=6)
    layer = CompressedMoEExperts(w_in, w_out, emap, act)
    to64 = lambda bank: [t.double() if t.is_floating_point() else t for t in bank]  # noqa: E731
    ref = reference.grouped_expert_ffn_slr(hidden.double(), to64(w_in), to64(w_out), emap, idx, weights.double(), act)

    def close(got, want, rel=2e-2):
        assert (got.double() - want).norm() <= rel * want.norm() + 1e-6

    with torch.no_grad():
        out = layer(hidden, idx, weights)
    assert out.dtype == torch.bfloat16
    close(out, ref)
    x = hidden.clone().requires_grad_()
    out = layer(x, idx, weights)
    assert out.dtype == torch.bfloat16
    close(out, ref)
    out.float().square().sum().backward()
    x64 = hidden.double().requires_grad_()
    U64 = w_in[0].double().requires_grad_()
    ref = reference.grouped_expert_ffn_slr(x64, [U64, *to64(w_in)[1:]], to64(w_out), emap, idx, weights.double(), act)
    ref.square().sum().backward()
    assert x.grad.dtype == torch.bfloat16 and layer.in_U.grad.dtype == torch.bfloat16
    close(x.grad, x64.grad, 5e-2)
    close(layer.in_U.grad, U64.grad, 5e-2)
