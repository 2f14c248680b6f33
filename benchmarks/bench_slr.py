"""Compressed experts on the CPU, fp32 (and bf16 for (a) and (b), every candidate in bf16): sparse_lowrank_linear and grouped_expert_ffn_slr against the dense
weights they stand for (W = U V + S, rank 32, 10% of W's rows kept in S, sorted random rows).

Run:  python -m pytest benchmarks/bench_slr.py --benchmark-only   (about 45 s on 2 idle cores)
The summary prints each candidate against its group's anchor (anchor median / candidate median, same
run; > 1 is faster) and, for ours (the compressed layer in (b)), `vs_plain` / `vs_merged_dense` (that
candidate's median / ours). Every candidate runs in its own hot loop (its weights stay in the caches as
far as they fit). The medians are only worth comparing from a run on otherwise idle cores: with other
processes competing for them, every barrier of a threaded GEMM can wait out a scheduler time slice, and
medians swing by 2x and more (check the load before trusting a run; repeat it).

Goals (T >= 128):
  single linear: ours >= 5.5x faster than dense x W^T, and >= 1.25x faster than the plain PyTorch
                 composition of the same factors;
  MoE layer:     compressed slots >= 3x faster than the same slots merged-dense through our grouped op.

(a) test_linear: one linear layer, shapes 768->3072, 3072->768, 1024->3584, 3584->1024, T tokens.
    Anchor `dense`: F.linear(x, W) with W reconstructed. Candidates: `ours` (ops.sparse_lowrank_linear);
    `three_dense` (the original's three dense products: F.linear(F.linear(x, V), U) + F.linear(x, S_dense)
    with S a full [out, in] matrix, zero outside the kept rows); `plain` ((x V^T) U^T, then
    y.index_add_(1, row_idx, x S_rows^T)); `gemm_floor` (ours's GEMMs alone, one over the stacked [V; S_rows],
    then the low-rank product, no kept-row add: the FLOPs of ours at this CPU's library GEMM speed, about the
    fastest any implementation of the op can be here; timed only). extra_info: `weight_MB` (the bytes of
    weights the candidate reads: W, the factors, or the factors and S_dense) and at T = 1 `GB_per_s` (those
    bytes over the median).
(b) test_mixtral_layer: a Mixtral-shaped layer (d 1024, ff 3584, E 8, top-2) merged to 4 slots
    (expert_map = arange(8) // 2), each slot compressed (w_in and w_out both rank 32 / keep 10%).
    Only the experts are timed, for every candidate alike: the router's top-k (T x 8 logits, the same for
    all) is computed once outside the timed call. Anchor `hf_eager`: transformers' eager MixtralExperts
    whose 8 experts hold their slot's dense reconstructed weights (what transformers runs for the
    merged, decompressed checkpoint). Candidates: `merged_dense` (ops.grouped_expert_ffn on the 4 dense
    slots) and `compressed` (ops.grouped_expert_ffn_slr on the 4 compressed slots). extra_info:
    `param_MB` (expert weights held) and `peak_MB` (peak resident-memory growth during one call, as in
    bench_moe.py).
(c) test_gpt_oss_layer: a GPT-OSS-shaped layer (d 2880, ff 2880, E 32, top-4, expert biases, clamped
    SwiGLU) merged to 8 slots and compressed the same way; anchor `merged_dense` (our grouped op on the
    dense slots, biases included), candidate `compressed`.
"""
from __future__ import annotations

import copy
import functools
import gc

import pytest
import torch
import torch.nn.functional as F

from bench_moe import peak_rss_growth_mb, settle
from mcsmoe_fast import ops, reference

RANK, KEEP = 32, 0.1
LINEAR_SHAPES = [(768, 3072), (3072, 768), (1024, 3584), (3584, 1024)]
LINEAR_TOKENS = [1, 128, 512, 1024]
MIXTRAL = dict(d=1024, ff=3584, E=8, k=2, slots=4)
MOE_TOKENS = [1, 16, 128, 1024]


def factors(out: int, inn: int, gen: torch.Generator):
    """U [out, r], V [r, in], S_rows [K, in], row_idx [K] (sorted, K = out // 10): W = U V + S has
    entries of about 1/sqrt(in), like a trained layer's."""
    U = torch.randn(out, RANK, generator=gen) / RANK**0.5
    V = torch.randn(RANK, inn, generator=gen) / inn**0.5
    K = int(out * KEEP)
    S_rows = torch.randn(K, inn, generator=gen) / inn**0.5
    row_idx = torch.randperm(out, generator=gen)[:K].sort().values
    return U, V, S_rows, row_idx


def nbytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


# --- (a) one linear layer ---------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def linear_layer(inn: int, out: int):
    gen = torch.Generator().manual_seed(inn * 7 + out)
    U, V, S_rows, row_idx = factors(out, inn, gen)
    W = reference.slr_dense(U, V, S_rows, row_idx)
    S_dense = torch.zeros(out, inn).index_copy_(0, row_idx, S_rows)
    return U, V, S_rows, row_idx, W, S_dense


LINEAR_IMPLS = ["dense", "three_dense", "plain", "ours", "gemm_floor"]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# bf16: every candidate in bf16; fewer cells (on CPUs without native bf16 ATen's bf16 GEMMs are several times
# slower than fp32, and the anchors take long)
LINEAR_CASES = [("fp32", inn, out, T, impl) for inn, out in LINEAR_SHAPES for T in LINEAR_TOKENS for impl in LINEAR_IMPLS]
LINEAR_CASES += [("bf16", inn, out, T, impl) for inn, out in LINEAR_SHAPES[:2] for T in (128, 512) for impl in LINEAR_IMPLS]
_medians: dict[str, dict[str, object]] = {}


def record(benchmark, group: str, impl: str, versus: str):
    """Keep this candidate's result; on ours, `vs_<versus>`: that candidate's median (its own test) / ours."""
    seen = _medians.setdefault(group, {})
    seen[impl] = benchmark
    if benchmark.stats is None:  # --benchmark-disable: each candidate ran once, untimed
        return
    if impl == "ours" and versus in seen and seen[versus].stats is not None:
        benchmark.extra_info[f"vs_{versus}"] = f"{seen[versus].stats.stats.median / benchmark.stats.stats.median:.2f}x"


def gemm_floor(x, U, VS):
    """ours's GEMMs with nothing around them: x [V; S_rows]^T (stacked once, outside the timed call), then the
    first r columns times U^T; no kept-row add. The FLOPs of ours at this CPU's library GEMM speed."""
    zz = F.linear(x, VS)
    return torch.mm(zz[:, :U.shape[1]], U.t())


def rounds_for(T: int, dtype: torch.dtype) -> int:
    rounds = 200 if T == 1 else 40 if T <= 128 else 15
    return rounds if dtype == torch.float32 else min(rounds, 10)


@pytest.mark.parametrize("dt,inn,out,T,impl", LINEAR_CASES,
                         ids=[f"{dt}-{i}to{o}-T{T}-{m}" for dt, i, o, T, m in LINEAR_CASES])
def test_linear(benchmark, dt, inn, out, T, impl):
    dtype = DTYPES[dt]
    U, V, S_rows, row_idx, W, S_dense = (t.to(dtype) if t.is_floating_point() else t for t in linear_layer(inn, out))
    x = torch.randn(T, inn, generator=torch.Generator().manual_seed(T)).to(dtype)
    VS = torch.cat([V, S_rows])
    fns = {
        "dense": (lambda: F.linear(x, W), (W,)),
        "ours": (lambda: ops.sparse_lowrank_linear(x, U, V, S_rows, row_idx), (U, V, S_rows, row_idx)),
        "three_dense": (lambda: F.linear(F.linear(x, V), U) + F.linear(x, S_dense), (U, V, S_dense)),
        "plain": (lambda: F.linear(F.linear(x, V), U).index_add_(1, row_idx, F.linear(x, S_rows)), (U, V, S_rows, row_idx)),
        "gemm_floor": (lambda: gemm_floor(x, U, VS), (U, VS)),
    }
    fn, weights = fns[impl]
    group = f"linear {dt} {inn}->{out} T={T}"
    if impl == "gemm_floor":  # not the layer's output: timed only
        benchmark.group = group
        with torch.inference_mode():
            benchmark.pedantic(fn, rounds=rounds_for(T, dtype), iterations=1, warmup_rounds=2)
        return
    benchmark.group = group
    if impl == "dense":
        benchmark.extra_info["anchor"] = True
    with torch.inference_mode():
        if impl == "ours":
            settle(fn)
        y = benchmark.pedantic(fn, rounds=rounds_for(T, dtype), iterations=1, warmup_rounds=2)
        tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=5e-2, atol=5e-2)
        torch.testing.assert_close(y.float(), F.linear(x.float(), W.float()), **tol)
    benchmark.extra_info["weight_MB"] = round(nbytes(*weights) / 2**20, 2)
    if T == 1 and benchmark.stats is not None:
        benchmark.extra_info["GB_per_s"] = round(nbytes(*weights) / benchmark.stats.stats.median / 1e9, 1)
    record(benchmark, group, impl, "plain")


# --- (b) a Mixtral-shaped MoE layer, merged and compressed ---------------------------------------------
def compressed_bank(S: int, out: int, inn: int, gen: torch.Generator):
    """S compressed slots as a bank [U, V, S_rows, row_idx, row_offsets]."""
    slots = [factors(out, inn, gen) for _ in range(S)]
    K = slots[0][2].shape[0]
    return [torch.stack([f[0] for f in slots]), torch.stack([f[1] for f in slots]), torch.cat([f[2] for f in slots]),
            torch.cat([f[3] for f in slots]), torch.arange(S + 1) * K]


@functools.lru_cache(maxsize=1)
def mixtral_layer():
    """(HF block whose 8 experts hold their slot's dense weights, dense slots (w_in, w_out), banks, expert_map)."""
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    gc.collect()
    d, ff, E, S = MIXTRAL["d"], MIXTRAL["ff"], MIXTRAL["E"], MIXTRAL["slots"]
    cfg = MixtralConfig(hidden_size=d, intermediate_size=ff, num_local_experts=E, num_experts_per_tok=MIXTRAL["k"])
    cfg._experts_implementation = "eager"
    gen = torch.Generator().manual_seed(0)
    bank_in, bank_out = compressed_bank(S, 2 * ff, d, gen), compressed_bank(S, d, ff, gen)
    w_in, w_out = reference.slr_bank_dense(bank_in), reference.slr_bank_dense(bank_out)
    emap = torch.arange(E) // (E // S)
    hf = MixtralSparseMoeBlock(cfg).eval().requires_grad_(False)
    with torch.no_grad():
        hf.gate.weight.normal_(0, 0.05, generator=gen)
        hf.experts.gate_up_proj.copy_(w_in[emap])
        hf.experts.down_proj.copy_(w_out[emap])
    return hf, w_in, w_out, bank_in, bank_out, emap


MOE_IMPLS = ["hf_eager", "merged_dense", "compressed"]
MOE_CASES = [("fp32", T, impl) for T in MOE_TOKENS for impl in MOE_IMPLS]
MOE_CASES += [("bf16", T, impl) for T in (16, 128) for impl in MOE_IMPLS]


@pytest.mark.parametrize("dt,T,impl", MOE_CASES, ids=[f"{dt}-T{T}-{m}" for dt, T, m in MOE_CASES])
def test_mixtral_layer(benchmark, dt, T, impl):
    dtype = DTYPES[dt]
    hf, w_in, w_out, bank_in, bank_out, emap = mixtral_layer()
    cast = lambda ts: [t.to(dtype) if t.is_floating_point() else t for t in ts]  # noqa: E731
    hf = hf if dtype == torch.float32 else copy.deepcopy(hf).to(dtype)  # Module.to is in place: keep the cached fp32
    w_in, w_out, bank_in, bank_out = w_in.to(dtype), w_out.to(dtype), cast(bank_in), cast(bank_out)
    hidden = torch.randn(T, MIXTRAL["d"], generator=torch.Generator().manual_seed(T)).to(dtype)
    with torch.inference_mode():
        _, weights, index = hf.gate(hidden)  # the routing, once, outside the timed call
    fns = {
        "hf_eager": (lambda: hf.experts(hidden, index, weights), (w_in.nbytes + w_out.nbytes) * 2),
        "merged_dense": (lambda: ops.grouped_expert_ffn(hidden, w_in, w_out, emap, index, weights, "swiglu"),
                         w_in.nbytes + w_out.nbytes),
        "compressed": (lambda: ops.grouped_expert_ffn_slr(hidden, bank_in, bank_out, emap, index, weights, "swiglu"),
                       nbytes(*bank_in, *bank_out)),
    }
    fn, param_bytes = fns[impl]
    group = f"mixtral {dt} d1024 ff3584 E8 top2 -> 4 slots r32 keep10% T={T}"
    benchmark.group = group
    if impl == "hf_eager":
        benchmark.extra_info["anchor"] = True
    rounds = 5 if T >= 1024 else 10 if T >= 128 else 30
    with torch.inference_mode():
        if impl != "hf_eager":
            settle(fn)
        y = benchmark.pedantic(fn, rounds=rounds, iterations=1, warmup_rounds=1)
        benchmark.extra_info["param_MB"] = round(param_bytes / 2**20, 1)
        benchmark.extra_info["peak_MB"] = peak_rss_growth_mb(fn)
        if impl != "hf_eager":
            tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=5e-2, atol=5e-2)
            torch.testing.assert_close(y, hf.experts(hidden, index, weights), **tol)
    record(benchmark, group, "ours" if impl == "compressed" else impl, "merged_dense")


# --- (c) a GPT-OSS-shaped MoE layer, merged and compressed (expert biases, clamped SwiGLU) ---------------
GPT_OSS = dict(d=2880, ff=2880, E=32, k=4, slots=8)
GPT_OSS_TOKENS = [128, 1024]


@functools.lru_cache(maxsize=1)
def gpt_oss_layer():
    """(dense slots (w_in, w_out), banks, biases (b_in, b_out), expert_map): 32 experts merged to 8 slots,
    every slot compressed at rank 32 / keep 10%, biases dense."""
    gc.collect()
    d, ff, E, S = GPT_OSS["d"], GPT_OSS["ff"], GPT_OSS["E"], GPT_OSS["slots"]
    gen = torch.Generator().manual_seed(1)
    bank_in, bank_out = compressed_bank(S, 2 * ff, d, gen), compressed_bank(S, d, ff, gen)
    w_in, w_out = reference.slr_bank_dense(bank_in), reference.slr_bank_dense(bank_out)
    b_in, b_out = torch.randn(S, 2 * ff, generator=gen) * 0.1, torch.randn(S, d, generator=gen) * 0.1
    return w_in, w_out, bank_in, bank_out, b_in, b_out, torch.arange(E) // (E // S)


GPT_OSS_IMPLS = ["merged_dense", "compressed"]
GPT_OSS_CASES = [(T, impl) for T in GPT_OSS_TOKENS for impl in GPT_OSS_IMPLS]


@pytest.mark.parametrize("T,impl", GPT_OSS_CASES, ids=[f"T{T}-{m}" for T, m in GPT_OSS_CASES])
def test_gpt_oss_layer(benchmark, T, impl):
    """Anchor `merged_dense`: ops.grouped_expert_ffn on the 8 dense slots with their biases; `compressed`:
    ops.grouped_expert_ffn_slr on the compressed slots with the same biases. Routing: top-4 of random
    logits with GPT-OSS's softmax over the chosen four, computed once outside the timed call."""
    w_in, w_out, bank_in, bank_out, b_in, b_out, emap = gpt_oss_layer()
    gen = torch.Generator().manual_seed(T)
    hidden = torch.randn(T, GPT_OSS["d"], generator=gen)
    top, index = torch.randn(T, GPT_OSS["E"], generator=gen).topk(GPT_OSS["k"], dim=-1)
    weights = top.softmax(dim=-1)
    fns = {
        "merged_dense": (lambda: ops.grouped_expert_ffn(hidden, w_in, w_out, emap, index, weights, "clamped_swiglu",
                                                        b_in, b_out), nbytes(w_in, w_out, b_in, b_out)),
        "compressed": (lambda: ops.grouped_expert_ffn_slr(hidden, bank_in, bank_out, emap, index, weights,
                                                          "clamped_swiglu", b_in, b_out),
                       nbytes(*bank_in, *bank_out, b_in, b_out)),
    }
    fn, param_bytes = fns[impl]
    group = f"gpt-oss d2880 ff2880 E32 top4 -> 8 slots r32 keep10% biases T={T}"
    benchmark.group = group
    if impl == "merged_dense":
        benchmark.extra_info["anchor"] = True
    with torch.inference_mode():
        settle(fn)
        y = benchmark.pedantic(fn, rounds=5 if T >= 1024 else 10, iterations=1, warmup_rounds=1)
        benchmark.extra_info["param_MB"] = round(param_bytes / 2**20, 1)
        if impl == "compressed":
            torch.testing.assert_close(y, fns["merged_dense"][0](), rtol=1e-4, atol=1e-4)
    record(benchmark, group, "ours" if impl == "compressed" else impl, "merged_dense")
