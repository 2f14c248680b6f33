"""Temporaries of the steps that touch a whole layer or bank: weight matching, the weight similarity,
the compression bank and activation matching hold a bounded multiple of what they need, and give the
same results as the whole-layer computation they replace."""
import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from mcsmoe_fast import compress, grouping, ops, permute
from mcsmoe_fast.activations import apply


class PeakBytes(TorchDispatchMode):
    """Peak bytes of the storages that ops allocate while the mode is on (storages made before it,
    and the views and in-place results on them, are not counted)."""

    def __init__(self):
        super().__init__()
        self.live, self.refs, self.now, self.peak = {}, {}, 0, 0

    def _release(self, ptr):
        self.refs[ptr] -= 1
        if self.refs[ptr] == 0:
            self.now -= self.live.pop(ptr)
            del self.refs[ptr]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {a.untyped_storage().data_ptr() for a in torch.utils._pytree.tree_leaves((args, kwargs))
                  if isinstance(a, torch.Tensor)}
        for t in torch.utils._pytree.tree_leaves(out):
            if not isinstance(t, torch.Tensor) or t.untyped_storage().nbytes() == 0:
                continue
            ptr = t.untyped_storage().data_ptr()
            if ptr not in self.live:
                if ptr in inputs:
                    continue  # a view of, or a result written into, a storage made before the mode
                self.live[ptr], self.refs[ptr] = t.untyped_storage().nbytes(), 0
                self.now += self.live[ptr]
                self.peak = max(self.peak, self.now)
            self.refs[ptr] += 1
            weakref.finalize(t, self._release, ptr)
        return out


def peak_bytes(fn, *args, **kwargs):
    with PeakBytes() as mode:
        result = fn(*args, **kwargs)
    return result, mode.peak


def layer(num_experts, ff, d, seed=0, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(num_experts, 2 * ff, d, generator=g).to(dtype),
            torch.randn(num_experts, d, ff, generator=g).to(dtype))


# --- 1. weight matching converts only the chunk's experts -----------------------------------------
def whole_block_costs(w_in, w_out, targets, refs):
    """The costs as weight matching built them from whole float32 blocks (SwiGLU)."""
    ff = w_out.shape[-1]
    blocks = [(w_in[:, :ff].float(), False), (w_in[:, ff:].float(), False), (w_out.float(), True)]
    out = None
    for block, transposed in blocks:
        ref, target = block[refs], block[targets]
        ref, target = (ref.transpose(1, 2), target) if transposed else (ref, target.transpose(1, 2))
        out = torch.bmm(ref, target) if out is None else out.baddbmm_(ref, target)
    return out


@pytest.mark.parametrize("refs", [[0] * 32, [0] * 16 + [16] * 16, [s % 3 for s in range(32)]])
def test_weight_matching_converts_only_the_chunks_experts(refs):
    E, ff, d, chunk = 32, 32, 64, 4
    w_in, w_out = layer(E, ff, d)
    refs = torch.tensor(refs)
    perm, peak = peak_bytes(permute.match_permutations, w_in, w_out, refs, "swiglu",
                            memory_budget=chunk * ff * ff * 4)
    # the cost buffer, and the chunk's targets and references of two blocks in float32 (the next
    # block's are made before the last one's are dropped) and a gathered copy; whole float32 blocks
    # are E / chunk times larger
    assert peak <= chunk * ff * ff * 4 + 5 * chunk * ff * d * 4, peak
    targets = (refs != torch.arange(E)).nonzero().squeeze(-1)
    cost = whole_block_costs(w_in, w_out, targets, refs[targets])
    expected = torch.arange(ff).repeat(E, 1)
    expected[targets] = ops.linear_assignment(cost, maximize=True)
    assert torch.equal(perm, expected)
    assert torch.equal(permute.weight_matching_cost(w_in, w_out, targets, refs[targets], "swiglu"), cost)


def test_weight_matching_keeps_its_memory_budget_with_the_weights_it_holds(monkeypatch):
    """The budget counts each problem's float32 target and reference weights with its cost matrix (a DeepSeek-V3
    layer's are 22x its cost matrix): chunks sized by the cost matrices alone held several times the budget."""
    monkeypatch.setattr(torch, "get_num_threads", lambda: 16)  # the CPU cap of a 16-core machine, not this one's
    E, ff, d = 32, 32, 64
    w_in, w_out = layer(E, ff, d)
    refs = torch.zeros(E, dtype=torch.int64)
    per_problem = ff * ff * 4 + 8 * (w_in[0].numel() + w_out[0].numel())
    budget = 4 * per_problem
    perm, peak = peak_bytes(permute.match_permutations, w_in, w_out, refs, "swiglu", memory_budget=budget)
    assert peak <= 1.25 * budget, peak / budget
    targets = torch.arange(1, E)
    expected = torch.arange(ff).repeat(E, 1)
    expected[targets] = ops.linear_assignment(whole_block_costs(w_in, w_out, targets, refs[targets]), maximize=True)
    assert torch.equal(perm, expected)


# --- 3. the compression bank computes its residual one slot at a time --------------------------------
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_full_bank_holds_a_bounded_multiple_of_the_bank(dtype):
    S, out, inp, rank = 8, 256, 128, 8
    W = torch.randn(S, out, inp, generator=torch.Generator().manual_seed(0)).to(dtype)
    bank, peak = peak_bytes(compress.full_bank, W, rank, "auto")
    (U, V), factors_peak = peak_bytes(compress.lowrank_factors, W, rank, "auto")
    size = W.numel() * W.element_size()
    # the factorization's own peak (its float32 copy of a 16-bit bank), then the residual bank and
    # one slot's float32 temporaries
    assert peak <= max(factors_peak, 1.5 * size), (peak / size, factors_peak / size)
    residual = (W.float() - U.float() @ V.float()).to(dtype).reshape(S * out, inp)
    for got, want in zip(bank, [U, V, residual, torch.arange(out).repeat(S), torch.arange(S + 1) * out]):
        assert torch.equal(got, want)


# --- 2. the weight similarity builds its Gram matrix from column chunks ------------------------------
def test_weight_similarity_holds_no_copy_of_the_layer(monkeypatch):
    E, ff, d = 8, 64, 128
    g = torch.Generator().manual_seed(0)
    w_in = (torch.randn(E // 2, 2 * ff, d, generator=g).repeat_interleave(2, 0)
            + 0.7 * torch.randn(E, 2 * ff, d, generator=g)).bfloat16()
    w_out = (torch.randn(E // 2, d, ff, generator=g).repeat_interleave(2, 0)
             + 0.7 * torch.randn(E, d, ff, generator=g)).bfloat16()
    w_in[5], w_out[5] = 0, 0  # a zero expert: cosine 0 with everything
    chunk = 1 << 14
    monkeypatch.setattr(grouping, "WEIGHT_GRAM_CHUNK_BYTES", chunk, raising=False)
    sim, peak = peak_bytes(grouping.similarity_matrix, "weight", w_in=w_in, w_out=w_out)
    size = (w_in.numel() + w_out.numel()) * 2
    assert peak <= 3 * chunk <= size / 8, peak  # two float64 chunks at once, not copies of the layer
    assert peak <= grouping.weight_gram_bytes(E, 2 * ff * d), peak  # what memory plans count for it
    joined = torch.cat([w_in.reshape(E, -1), w_out.reshape(E, -1)], 1)
    before = grouping.cosine_similarity_matrix(joined)  # the whole-layer computation
    torch.testing.assert_close(sim, before, rtol=0, atol=1e-14)
    assert sim[5].eq(0.5).all() and sim[:, 5].eq(0.5).all()
    for k in range(1, E + 1):
        assert grouping.hierarchical_clusters(sim, k) == grouping.hierarchical_clusters(before, k)
        dominant = list(range(0, E, max(1, E // k)))[:k]
        freq = torch.arange(E, 0, -1).double()
        assert grouping.assign_to_dominant(sim, freq, dominant) == grouping.assign_to_dominant(before, freq, dominant)


# --- 4. activation matching counts its temporaries and computes each reference expert once -------------
def old_activation_costs(x, w_in, targets, refs):
    """Activation matching's costs as computed before: every target's reference expert recomputed."""
    def standardized(idx):
        h = apply(torch.einsum("nd,sfd->snf", x, w_in[idx].float()), "swiglu")
        h = h - h.mean(1, keepdim=True)
        return h / h.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return torch.bmm(standardized(refs).transpose(1, 2), standardized(targets))


@pytest.mark.parametrize("refs", [[0] * 16, [s % 3 for s in range(16)]])
def test_activation_matching_keeps_its_memory_budget(monkeypatch, refs):
    E, ff, d, N = 16, 16, 32, 256
    w_in, w_out = layer(E, ff, d)
    x = torch.randn(N, d, generator=torch.Generator().manual_seed(1))
    refs = torch.tensor(refs)
    monkeypatch.setattr(permute, "CPU_PROBLEMS_PER_THREAD", 1024)  # as many threads as a GPU: no cap
    budget = 512 << 10  # a few problems' activations, two hundred problems' cost matrices
    cost_fn = permute.activation_matching_cost(x, w_in, "swiglu")
    perm, peak = peak_bytes(permute.match_permutations, w_in, w_out, refs, "swiglu", cost_fn, memory_budget=budget)
    assert peak <= budget, peak / budget
    targets = (refs != torch.arange(E)).nonzero().squeeze(-1)
    # float32 rounding: torch's mean over tokens rounds differently for different batch sizes, so the
    # costs already depended on the chunk size (standardizing 1 or 2 reference experts differs in the last bit)
    for chunk in (targets[:4], targets[4:9], targets):
        got, want = cost_fn(chunk, refs[chunk]), old_activation_costs(x, w_in, chunk, refs[chunk])
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    expected = torch.arange(ff).repeat(E, 1)
    expected[targets] = ops.linear_assignment(old_activation_costs(x, w_in, targets, refs[targets]), maximize=True)
    assert torch.equal(perm, expected)
