"""ops.moe_align (routing alignment: (token, slot) pairs sorted by slot) against reference.moe_align."""
import pytest
import torch

from mcsmoe_fast import ops, reference

cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def routing(T, k, E, S, drop=0.0, seed=0, device="cpu", wdtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    idx = torch.stack([torch.randperm(E, generator=gen)[:k] for _ in range(T)]) if T else torch.empty(0, k, dtype=torch.int64)
    idx = torch.where(torch.rand(T, k, generator=gen) < drop, -1, idx)
    w = torch.rand(T, k, generator=gen, dtype=wdtype)
    emap = torch.randint(0, S, (E,), generator=gen)
    return idx.to(device), w.to(device), emap.to(device)


def check_same(ours, ref):
    names = ("sorted_token_ids", "slot_offsets", "sorted_weights", "token_rows")
    for name, a, b in zip(names, ours, ref):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        if a.is_floating_point():
            torch.testing.assert_close(a.cpu(), b.cpu(), rtol=1e-6, atol=1e-7, msg=name)
        else:
            assert torch.equal(a.cpu(), b.cpu()), name


@pytest.mark.parametrize("T,k,E,S,drop", [
    (1, 1, 1, 1, 0.0), (1, 2, 8, 4, 0.0), (7, 2, 8, 2, 0.0), (33, 3, 8, 3, 0.2), (100, 1, 32, 8, 0.3),
    (64, 4, 16, 16, 0.0), (50, 2, 8, 1, 0.0), (17, 2, 8, 8, 1.0), (0, 2, 8, 4, 0.0), (129, 8, 64, 5, 0.1),
])
@pytest.mark.parametrize("wdtype", [torch.float32, torch.float64])
def test_matches_reference(T, k, E, S, drop, wdtype):
    idx, w, emap = routing(T, k, E, S, drop, seed=T * 31 + k, wdtype=wdtype)
    check_same(ops.moe_align(idx, w, emap, S), reference.moe_align(idx, w, emap, S))


def test_shared_slot_sums_weights_and_runs_once():
    idx = torch.tensor([[0, 1], [2, 3], [1, -1]])
    w = torch.tensor([[0.25, 0.5], [0.125, 1.0], [2.0, 7.0]])
    emap = torch.tensor([0, 0, 1, 2])  # experts 0 and 1 share slot 0
    tokens, offsets, weights, rows = ops.moe_align(idx, w, emap, 3)
    assert offsets.tolist() == [0, 2, 3, 4]
    assert tokens.tolist() == [0, 2, 1, 1, -1, -1]
    assert weights.tolist() == [0.75, 2.0, 0.125, 1.0, 0.0, 0.0]
    assert rows.tolist() == [[0, -1], [2, 3], [1, -1]]


def test_empty_slots_and_all_on_one_slot():
    idx, w, emap = routing(40, 2, 8, 5, seed=3)
    emap = torch.full_like(emap, 3)
    tokens, offsets, weights, rows = ops.moe_align(idx, w, emap, 5)
    assert offsets.tolist() == [0, 0, 0, 0, 40, 40]
    assert tokens[:40].tolist() == list(range(40))
    torch.testing.assert_close(weights[:40], w.sum(-1))
    check_same((tokens, offsets, weights, rows), reference.moe_align(idx, w, emap, 5))


def test_non_contiguous_inputs():
    idx, w, emap = routing(30, 4, 8, 3, seed=5)
    idx_t, w_t = idx.t().contiguous().t(), w.t().contiguous().t()
    check_same(ops.moe_align(idx_t, w_t, emap, 3), reference.moe_align(idx, w, emap, 3))


@pytest.mark.parametrize("bad,match", [
    (dict(idx=torch.tensor([[0, 8]])), r"top_k_index\[0, 1\] = 8"),
    (dict(idx=torch.tensor([[0, -2]])), r"top_k_index\[0, 1\] = -2"),
    (dict(emap=torch.tensor([0, 1, 2, 3, 4, 0, 1, 2])), r"expert_map\[4\] = 4"),
    (dict(emap=torch.tensor([0, 1, 2, 3, -1, 0, 1, 2])), r"expert_map\[4\] = -1"),
    (dict(idx=torch.tensor([[0, 1]], dtype=torch.int32)), "int64"),
    (dict(idx=torch.tensor([0, 1])), r"\[T, k\]"),
    (dict(w=torch.rand(1, 3)), "shape"),
    (dict(w=torch.tensor([[1, 2]])), "floating point"),
    (dict(emap=torch.zeros(8, 1, dtype=torch.int64)), r"\[E\]"),
    (dict(S=0), "at least one"),
])
def test_bad_inputs_raise(bad, match):
    args = dict(idx=torch.tensor([[0, 1]]), w=torch.rand(1, 2), emap=torch.arange(8) % 4, S=4)
    args.update(bad)
    with pytest.raises(RuntimeError, match=match):
        ops.moe_align(args["idx"], args["w"], args["emap"], args["S"])


def test_opcheck():
    for T, k, E, S in [(9, 2, 8, 3), (1, 1, 4, 4), (0, 2, 4, 2)]:
        idx, w, emap = routing(T, k, E, S, drop=0.2, seed=T)
        torch.library.opcheck(torch.ops.mcsmoe_fast.moe_align, (idx, w, emap, S))


@cuda_only
@pytest.mark.parametrize("T,k,E,S,drop", [(1, 2, 8, 4, 0.0), (333, 2, 8, 2, 0.1), (4097, 1, 32, 8, 0.3),
                                          (1000, 8, 64, 7, 0.0), (0, 2, 8, 2, 0.0)])
def test_cuda_matches_reference(T, k, E, S, drop):
    idx, w, emap = routing(T, k, E, S, drop, seed=T)
    check_same(ops.moe_align(idx.cuda(), w.cuda(), emap.cuda(), S), reference.moe_align(idx, w, emap, S))


@cuda_only
def test_cuda_bad_ids_raise():
    with pytest.raises(RuntimeError, match="top_k_index"):
        ops.moe_align(torch.tensor([[0, 9]], device="cuda"), torch.rand(1, 2, device="cuda"),
                      torch.arange(8, device="cuda") % 4, 4)
    with pytest.raises(RuntimeError, match="expert_map"):
        ops.moe_align(torch.tensor([[0, 1]], device="cuda"), torch.rand(1, 2, device="cuda"),
                      torch.arange(8, device="cuda"), 4)


@cuda_only
@pytest.mark.parametrize("bad", ["ids", "map", "both"])
def test_cuda_names_the_first_bad_entry_as_the_cpu_does(bad):
    """Many bad entries across blocks and warps: the GPU reports the one the CPU reports (bad map entries first, then
    top_k_index in flat order), not whichever thread got there first."""
    T, k, E, S = 3000, 2, 16, 4
    idx, w, emap = routing(T, k, E, S, 0.0, seed=5)
    if bad in ("ids", "both"):
        idx.view(-1)[[5000, 4001, 2999, 777]] = torch.tensor([-3, 17, 99, 16])
    if bad in ("map", "both"):
        emap[[15, 9, 11]] = torch.tensor([7, -2, 4])
    with pytest.raises(RuntimeError) as on_cpu:
        ops.moe_align(idx, w, emap, S)
    for _ in range(3):
        with pytest.raises(RuntimeError) as on_gpu:
            ops.moe_align(idx.cuda(), w.cuda(), emap.cuda(), S)
        assert str(on_gpu.value).splitlines()[0] == str(on_cpu.value).splitlines()[0]
