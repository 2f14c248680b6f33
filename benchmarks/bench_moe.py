"""One MoE layer, fp32 CPU: transformers' modules (eager; Mixtral also grouped_mm) against our fused
grouped expert FFN, original and merged. Merged anchors are what transformers runs for a merged
checkpoint: E full experts, where every member of a group holds its group's weights.

Run:  python -m pytest benchmarks/bench_moe.py --benchmark-only   (about 70 s on 2 cores)
The summary prints each candidate against the group's eager anchor, and, for ours, `vs_grouped_mm`
(grouped_mm median / ours) from the same run. Memory per candidate: `param_MB` (expert weights the
module holds) and `peak_MB` (peak resident-memory growth during one forward: activations and
workspace, from /proc/self VmHWM after malloc_trim and clear_refs; Linux/glibc only; page
granular, so a few MB of noise). `dense_gemm_floor` (Mixtral, T >= 128) is two plain GEMMs (the GEMM our
op calls: oneDNN for fp32 where torch has it) with the FLOPs of our merged layer (same rows, one
weight matrix): the speed limit of this machine. At T = 1
(Mixtral) `touched_MB` / `GB_per_s`: expert bytes the token reads (distinct slots for ours, distinct
experts for transformers) and the bandwidth that implies."""
from __future__ import annotations

import ctypes
import functools
import gc

import pytest
import torch

from mcsmoe_fast.modules import MoEExperts, SwitchMoE

TOKENS = [1, 16, 128, 1024]
MIXTRAL = dict(d=1024, ff=3584, E=8, k=2)
SWITCH = dict(d=768, ff=3072, E=32, capacity=64)
SEQ = 128  # Switch: T tokens as sequences of up to 128 (capacity is per sequence)


def group_map(E: int, G: int) -> torch.Tensor:
    return torch.arange(E) // (E // G)


@functools.lru_cache(maxsize=1)
def mixtral_layer(G: int):
    """(HF block with E experts holding the slot weights, our block with G slots)."""
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    gc.collect()
    cfg = MixtralConfig(hidden_size=MIXTRAL["d"], intermediate_size=MIXTRAL["ff"], num_local_experts=MIXTRAL["E"],
                        num_experts_per_tok=MIXTRAL["k"])
    cfg._experts_implementation = "eager"
    gen = torch.Generator().manual_seed(G)
    hf = MixtralSparseMoeBlock(cfg).eval().requires_grad_(False)
    emap = group_map(MIXTRAL["E"], G)
    d, ff = MIXTRAL["d"], MIXTRAL["ff"]
    slots_in = torch.randn(G, 2 * ff, d, generator=gen) * d**-0.5
    slots_out = torch.randn(G, d, ff, generator=gen) * ff**-0.5
    with torch.no_grad():
        hf.gate.weight.normal_(0, 0.05, generator=gen)
        hf.experts.gate_up_proj.copy_(slots_in[emap])
        hf.experts.down_proj.copy_(slots_out[emap])
    ours = MixtralSparseMoeBlock(cfg).eval().requires_grad_(False)
    ours.gate = hf.gate
    ours.experts = MoEExperts(slots_in, slots_out, emap, "swiglu").requires_grad_(False)
    return hf, ours


@functools.lru_cache(maxsize=1)
def switch_layer(G: int):
    from transformers import SwitchTransformersConfig
    from transformers.models.switch_transformers.modeling_switch_transformers import SwitchTransformersSparseMLP

    gc.collect()
    cfg = SwitchTransformersConfig(d_model=SWITCH["d"], d_ff=SWITCH["ff"], num_experts=SWITCH["E"],
                                   expert_capacity=SWITCH["capacity"])
    gen = torch.Generator().manual_seed(G)
    hf = SwitchTransformersSparseMLP(cfg).eval().requires_grad_(False)
    emap = group_map(SWITCH["E"], G)
    d, ff = SWITCH["d"], SWITCH["ff"]
    slots_in = torch.randn(G, ff, d, generator=gen) * d**-0.5
    slots_out = torch.randn(G, d, ff, generator=gen) * ff**-0.5
    with torch.no_grad():
        hf.router.classifier.weight.normal_(0, 0.05, generator=gen)
        for e in range(SWITCH["E"]):
            hf.experts[f"expert_{e}"].wi.weight.copy_(slots_in[emap[e]])
            hf.experts[f"expert_{e}"].wo.weight.copy_(slots_out[emap[e]])
    ours = SwitchMoE(hf.router, MoEExperts(slots_in, slots_out, emap, "relu")).eval().requires_grad_(False)
    return hf, ours


def inputs(T: int, d: int, seq: int | None = None) -> torch.Tensor:
    seq = seq or T
    return torch.randn(T // seq, seq, d, generator=torch.Generator().manual_seed(T))


def peak_rss_growth_mb(fn) -> float:
    """Peak resident memory above the current level while fn runs (Linux VmHWM after clear_refs)."""
    def status(key):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(key))
    try:
        gc.collect()
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap back, so re-used pages count again
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base = status("VmRSS:")
        fn()
        return round((status("VmHWM:") - base) / 1024, 1)
    except (OSError, AttributeError):
        return float("nan")


def expert_mb(module) -> float:
    experts = module.experts
    return round(sum(p.numel() * p.element_size() for p in experts.parameters()) / 2**20, 1)


_medians: dict[str, dict[str, object]] = {}


def run(benchmark, group: str, impl: str, fn, module, anchor: bool, rounds: int):
    benchmark.group = group
    if anchor:
        benchmark.extra_info["anchor"] = True
    with torch.inference_mode():
        out = benchmark.pedantic(fn, rounds=rounds, iterations=1, warmup_rounds=1)
        benchmark.extra_info["param_MB"] = expert_mb(module)
        benchmark.extra_info["peak_MB"] = peak_rss_growth_mb(fn)
    seen = _medians.setdefault(group, {})
    seen[impl] = benchmark
    if impl == "mcsmoe_fast" and "grouped_mm" in seen:
        ratio = seen["grouped_mm"].stats.stats.median / benchmark.stats.stats.median
        benchmark.extra_info["vs_grouped_mm"] = f"{ratio:.2f}x"
    return out


MIXTRAL_CASES = [(G, T, impl) for G in (8, 4, 2) for T in TOKENS
                 for impl in ("eager", "grouped_mm", "mcsmoe_fast") + (("dense_gemm_floor",) if T >= 128 else ())]


def dense_gemm_floor(ours, x):
    """Two dense GEMMs (+ SwiGLU) over as many rows as our op runs (distinct token-slot pairs)."""
    from mcsmoe_fast import ops

    hidden = x.reshape(-1, x.shape[-1])
    _, weights, index = ours.gate(hidden)
    pairs = int(ops.moe_align(index, weights, ours.experts.expert_map, ours.experts.num_slots)[1][-1])
    rows = hidden.repeat(2, 1)[:pairs].contiguous()
    w_in, w_out = ours.experts.w_in[0], ours.experts.w_out[0]

    def linear(a, w):  # the GEMM our op uses: torch's oneDNN linear where present (fp32), else MKL
        if hasattr(torch.ops.mkldnn, "_linear_pointwise"):
            return torch.ops.mkldnn._linear_pointwise(a, w, None, "none", [None], "")
        return torch.mm(a, w.t())

    def fn():
        h = linear(rows, w_in)
        gate, up = h.chunk(2, dim=-1)
        return linear(torch.nn.functional.silu(gate) * up, w_out)
    return fn, pairs


@pytest.mark.parametrize("G,T,impl", MIXTRAL_CASES, ids=[f"G{G}-T{T}-{i}" for G, T, i in MIXTRAL_CASES])
def test_mixtral_layer(benchmark, G, T, impl):
    hf, ours = mixtral_layer(G)
    x = inputs(T, MIXTRAL["d"])
    rounds = 5 if T >= 1024 else 10
    group = f"mixtral d1024 ff3584 E8 top2 G={G} T={T}"
    if impl == "dense_gemm_floor":
        with torch.inference_mode():
            fn, pairs = dense_gemm_floor(ours, x)
        benchmark.extra_info["rows"] = pairs
        run(benchmark, group, impl, fn, ours, False, rounds)
    elif impl == "mcsmoe_fast":
        out = run(benchmark, group, impl, lambda: ours(x), ours, False, rounds)
        hf.experts.config._experts_implementation = "grouped_mm"
        with torch.inference_mode():
            torch.testing.assert_close(out, hf(x), rtol=1e-4, atol=1e-4)
    else:
        hf.experts.config._experts_implementation = impl
        run(benchmark, group, impl, lambda: hf(x), hf, impl == "eager", rounds)
    if T == 1:  # decode: time should track the bytes of the distinct experts (ours: slots) read
        touched = decode_bytes(ours, x, per_slot=impl == "mcsmoe_fast")
        benchmark.extra_info["touched_MB"] = round(touched / 2**20, 1)
        benchmark.extra_info["GB_per_s"] = round(touched / benchmark.stats.stats.median / 1e9, 1)


def decode_bytes(ours, x, per_slot: bool) -> int:
    """Expert weight bytes one token reads: its distinct slots (ours) or its distinct experts (HF)."""
    with torch.inference_mode():
        _, _, index = ours.gate(x.reshape(-1, x.shape[-1]))
    ids = ours.experts.expert_map[index[0]] if per_slot else index[0]
    w_in, w_out = ours.experts.w_in, ours.experts.w_out
    per_expert = (w_in[0].numel() + w_out[0].numel()) * w_in.element_size()
    return int(ids.unique().numel()) * per_expert


SWITCH_CASES = [(G, T, impl) for G in (32, 8) for T in TOKENS for impl in ("eager", "mcsmoe_fast")]


@pytest.mark.parametrize("G,T,impl", SWITCH_CASES, ids=[f"G{G}-T{T}-{i}" for G, T, i in SWITCH_CASES])
def test_switch_layer(benchmark, G, T, impl):
    hf, ours = switch_layer(G)
    x = inputs(T, SWITCH["d"], min(T, SEQ))
    rounds = 5 if T >= 1024 else 10
    group = f"switch d768 ff3072 E32 top1 G={G} T={T}"
    if impl == "mcsmoe_fast":
        out = run(benchmark, group, impl, lambda: ours(x), ours, False, rounds)
        with torch.inference_mode():
            torch.testing.assert_close(out, hf(x), rtol=1e-4, atol=1e-4)
    else:
        run(benchmark, group, impl, lambda: hf(x), hf, True, rounds)
