"""One MoE layer on the CPU, fp32 and bf16 (every impl in the same dtype): transformers' modules against our fused
grouped expert FFN (ops.grouped_expert_ffn), original and merged, at T = 1, 16, 128, 1024 tokens. bf16 cells past
BF16_MAX_T_SLOW tokens run only on CPUs with native bf16 (avx512_bf16 or amx_bf16; skipped with the reason
elsewhere: transformers' bf16 GEMMs take minutes per cell there).

Layers (E experts, top-k; merged to G slots):
  mixtral   d 1024, ff 3584, E 8, top-2; G = 8, 4, 2          MixtralSparseMoeBlock
  switch    d 768, ff 3072, E 32, top-1 (capacity 64); G = 32, 8   SwitchTransformersSparseMLP
  qwen3     d 2048, ff 768 (moe_intermediate_size), E 128, top-8; G = 128, 32   Qwen3MoeSparseMoeBlock
  gpt-oss   d 2880, ff 2880, E 32, top-4, expert biases, clamped SwiGLU (alpha 1.702, limit 7); G = 32, 8
            GptOssMLP (GptOssExperts: gate_up_proj [E, d, 2 ff], gate/up columns interleaved)
Merged anchors are what transformers runs for a merged checkpoint: E full experts, where every member of a
group holds its group's weights. G = E is the original layer.

Candidates (one benchmark group per layer, G and T; all in the same run):
  eager, grouped_mm, batched_mm   transformers' experts implementations (config._experts_implementation);
                                  eager is the group's anchor; batched_mm for qwen3 and gpt-oss only
  mcsmoe_fast   ours: the original qwen3/gpt-oss layers run the HF block itself under our registered
                experts implementation "mcsmoe_fast" (GPT-OSS: the fused op on its stored interleaved,
                transposed banks, no copy); merged layers (and mixtral/switch) run MoEExperts with G
                slots. Its output is checked against transformers' (grouped_mm; switch: eager).
  dense_gemm_floor   (mixtral, T >= 128; the small block in fp32) two plain GEMMs through oneDNN's linear
                for fp32 where torch has it (one of the two GEMMs our op chooses between per shape by timing;
                at::mm is the other) with the FLOPs of our merged layer (same rows, one weight matrix): about
                the speed limit of this machine.
batched_mm gathers every (token, expert) pair's weights ([T*k, F, d] + [T*k, d, ff]); cells where that is over
4 GiB are skipped with a reason (qwen3 T >= 128: 18 GiB at T = 128; gpt-oss T >= 16: 5.9 GiB at T = 16).

Run:  python -m pytest benchmarks/bench_moe.py --benchmark-only   (5.3 min on 2 cores, idle machine;
      -k qwen3 / -k gpt_oss / -k mixtral / -k switch for one family). Measure on an idle machine: threaded
      GEMMs slow down several times when another process competes for the cores.
Memory: one layer is alive at a time (layer() frees the previous one before building the next); the largest,
the original gpt-oss layer, holds 3.0 GiB of expert weights (ours runs on them in place): about 3.5 GiB
resident at most (measured: the rss_MB column).

The summary prints each candidate against its group's eager anchor (anchor median / candidate median: > 1
is faster), then per candidate:
  param_MB      expert weights the module holds
  peak_MB       peak resident-memory growth during one forward: activations and workspace (what batched_mm
                gathers), from /proc/self VmHWM after malloc_trim and clear_refs; Linux/glibc only; page
                granular, so a few MB of noise
  rss_MB        (qwen3, gpt-oss) the process's peak resident memory during that forward, the layer included
  vs_grouped_mm grouped_mm median / ours
  vs_best_hf    the fastest transformers implementation's median / ours, and which one it was
  touched_MB / GB_per_s   (mixtral, T = 1) expert bytes the token reads (distinct slots for ours, distinct
                experts for transformers) and the bandwidth that implies
  rows          (dense_gemm_floor) the GEMMs' rows"""
from __future__ import annotations

import ctypes
import gc

import pytest
import torch

from cpu_info import native_bf16
from mcsmoe_fast.modules import MoEExperts, SwitchMoE

TOKENS = [1, 16, 128, 1024]
MIXTRAL = dict(d=1024, ff=3584, E=8, k=2)
SWITCH = dict(d=768, ff=3072, E=32, capacity=64)
SEQ = 128  # Switch: T tokens as sequences of up to 128 (capacity is per sequence)


def group_map(E: int, G: int) -> torch.Tensor:
    return torch.arange(E) // (E // G)


def gated_slots(G: int, d: int, ff: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random gated slots (w_in [G, 2 ff, d], w_out [G, d, ff]) with entries of about 1/sqrt(fan-in)."""
    return torch.randn(G, 2 * ff, d, generator=gen) * d**-0.5, torch.randn(G, d, ff, generator=gen) * ff**-0.5


_layer: dict[tuple, tuple] = {}


def layer(build, G, *args):
    """build(G), kept until another layer is asked for. Unlike lru_cache(maxsize=1), which evicts only
    after building the next entry, the previous layer is freed *before* the next is built, and one cache
    serves every family: at most one layer is alive (a GPT-OSS-shaped layer is 3.2 GB of fp32 experts)."""
    key = (build.__name__, G, *args)
    if key not in _layer:
        _layer.clear()
        gc.collect()
        malloc_trim()
        _layer[key] = build(G, *args)
    return _layer[key]


def malloc_trim():
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap back to the OS
    except (OSError, AttributeError):
        pass


def mixtral_layer(G: int, dtype: torch.dtype = torch.float32, d: int = MIXTRAL["d"], ff: int = MIXTRAL["ff"]):
    """(HF block with E experts holding the slot weights, our block with G slots), in `dtype`."""
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    cfg = MixtralConfig(hidden_size=d, intermediate_size=ff, num_local_experts=MIXTRAL["E"],
                        num_experts_per_tok=MIXTRAL["k"])
    cfg._experts_implementation = "eager"
    gen = torch.Generator().manual_seed(G)
    hf = MixtralSparseMoeBlock(cfg).eval().requires_grad_(False)
    emap = group_map(MIXTRAL["E"], G)
    slots_in, slots_out = gated_slots(G, d, ff, gen)
    with torch.no_grad():
        hf.gate.weight.normal_(0, 0.05, generator=gen)
        hf.experts.gate_up_proj.copy_(slots_in[emap])
        hf.experts.down_proj.copy_(slots_out[emap])
    ours = MixtralSparseMoeBlock(cfg).eval().requires_grad_(False)
    ours.gate = hf.gate
    ours.experts = MoEExperts(slots_in, slots_out, emap, "swiglu").requires_grad_(False)
    return hf.to(dtype), ours.to(dtype)


def switch_layer(G: int, dtype: torch.dtype = torch.float32):
    from transformers import SwitchTransformersConfig
    from transformers.models.switch_transformers.modeling_switch_transformers import SwitchTransformersSparseMLP

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
    return hf.to(dtype), ours.to(dtype)


def inputs(T: int, d: int, seq: int | None = None) -> torch.Tensor:
    seq = seq or T
    return torch.randn(T // seq, seq, d, generator=torch.Generator().manual_seed(T))


def peak_rss_mb(fn) -> tuple[float, float]:
    """(growth, total): peak resident memory above the current level while fn runs, and the process's
    peak resident memory then (Linux VmHWM after clear_refs); NaNs where /proc cannot tell."""
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
        hwm = status("VmHWM:")
        return round((hwm - base) / 1024, 1), round(hwm / 1024, 1)
    except (OSError, AttributeError, StopIteration):
        return float("nan"), float("nan")


def peak_rss_growth_mb(fn) -> float:
    """Peak resident memory above the current level while fn runs (Linux VmHWM after clear_refs)."""
    return peak_rss_mb(fn)[0]


def expert_mb(module) -> float:
    experts = module.experts
    return round(sum(p.numel() * p.element_size() for p in experts.parameters()) / 2**20, 1)


def settle(fn, limit: int = 80):
    """Call fn until the CPU ops' choices by measurement (csrc/ops/autotune.h) have settled for its shape
    classes (at most `limit` calls), so no timing trial lands in the timed rounds."""
    from mcsmoe_fast import ops

    for _ in range(limit):
        fn()
        if all(row["winner"] for row in ops.autotune_choices()):
            return


_medians: dict[str, dict[str, object]] = {}
HF_IMPLS = ("eager", "grouped_mm", "batched_mm")  # transformers' experts implementations


def run(benchmark, group: str, impl: str, fn, module, anchor: bool, rounds: int, rss: bool = False):
    benchmark.group = group
    if anchor:
        benchmark.extra_info["anchor"] = True
    with torch.inference_mode():
        if impl == "mcsmoe_fast":
            settle(fn)
        out = benchmark.pedantic(fn, rounds=rounds, iterations=1, warmup_rounds=1)
        benchmark.extra_info["param_MB"] = expert_mb(module)
        growth, total = peak_rss_mb(fn)
        benchmark.extra_info["peak_MB"] = growth
        if rss:
            benchmark.extra_info["rss_MB"] = total
    if benchmark.stats is None:  # --benchmark-disable: fn ran once, untimed
        return out
    seen = _medians.setdefault(group, {})
    seen[impl] = benchmark
    if impl == "mcsmoe_fast" and "grouped_mm" in seen:
        ratio = seen["grouped_mm"].stats.stats.median / benchmark.stats.stats.median
        benchmark.extra_info["vs_grouped_mm"] = f"{ratio:.2f}x"
    hf = {name: b.stats.stats.median for name, b in seen.items() if name in HF_IMPLS}
    if impl == "mcsmoe_fast" and len(hf) > 1:
        best = min(hf, key=hf.get)
        benchmark.extra_info["vs_best_hf"] = f"{hf[best] / benchmark.stats.stats.median:.2f}x ({best})"
    return out


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
TOLERANCE = {"fp32": dict(rtol=1e-4, atol=1e-4), "bf16": dict(rtol=3e-2, atol=3e-2)}  # ours against transformers
# bf16: every impl in bf16, transformers included, every family at every T. On CPUs without native bf16 (AVX2,
# AVX-512 without BF16) ATen's bf16 GEMMs, which transformers runs, are 10-100x slower than fp32 (a GPT-OSS
# eager call at T = 128 takes 100 s on 2 AVX2 cores), so there only the cells up to BF16_MAX_T_SLOW run.
BF16_MAX_T_SLOW = {"mixtral": 128, "switch": 16, "qwen3": 1, "gpt-oss": 1}
MIXTRAL_CASES = [(dt, G, T, impl) for dt in DTYPES for G in (8, 4, 2) for T in TOKENS
                 for impl in ("eager", "grouped_mm", "mcsmoe_fast") + (("dense_gemm_floor",) if T >= 128 and dt == "fp32" else ())]


def skip_slow_bf16(family: str, dt: str, T: int):
    """Skip, with the reason, a bf16 cell past BF16_MAX_T_SLOW[family] tokens on a CPU without native bf16."""
    if dt == "bf16" and T > BF16_MAX_T_SLOW[family] and not native_bf16():
        pytest.skip(f"bf16 {family} at T = {T} on a CPU without native bf16 (no avx512_bf16, no amx_bf16): "
                    f"transformers' bf16 cells run ATen's slow bf16 GEMMs (minutes per cell); run on a bf16 CPU")


def dense_gemm_floor(ours, x):
    """Two dense GEMMs (+ SwiGLU) over as many rows as our op runs (distinct token-slot pairs)."""
    from mcsmoe_fast import ops

    hidden = x.reshape(-1, x.shape[-1])
    _, weights, index = ours.gate(hidden)
    pairs = int(ops.moe_align(index, weights, ours.experts.expert_map, ours.experts.num_slots)[1][-1])
    rows = hidden.repeat(2, 1)[:pairs].contiguous()
    w_in, w_out = ours.experts.w_in[0], ours.experts.w_out[0]

    def linear(a, w):  # oneDNN's linear where present (fp32; our op times it against at::mm per shape), else MKL
        if hasattr(torch.ops.mkldnn, "_linear_pointwise"):
            return torch.ops.mkldnn._linear_pointwise(a, w, None, "none", [None], "")
        return torch.mm(a, w.t())

    def fn():
        h = linear(rows, w_in)
        gate, up = h.chunk(2, dim=-1)
        return linear(torch.nn.functional.silu(gate) * up, w_out)
    return fn, pairs


@pytest.mark.parametrize("dt,G,T,impl", MIXTRAL_CASES, ids=[f"{dt}-G{G}-T{T}-{i}" for dt, G, T, i in MIXTRAL_CASES])
def test_mixtral_layer(benchmark, dt, G, T, impl):
    skip_slow_bf16("mixtral", dt, T)
    dtype = DTYPES[dt]
    hf, ours = layer(mixtral_layer, G, dtype)
    x = inputs(T, MIXTRAL["d"]).to(dtype)
    rounds = 5 if T >= 1024 else 10
    group = f"mixtral {dt} d1024 ff3584 E8 top2 G={G} T={T}"
    if impl == "dense_gemm_floor":
        with torch.inference_mode():
            fn, pairs = dense_gemm_floor(ours, x)
        benchmark.extra_info["rows"] = pairs
        run(benchmark, group, impl, fn, ours, False, rounds)
    elif impl == "mcsmoe_fast":
        out = run(benchmark, group, impl, lambda: ours(x), ours, False, rounds)
        hf.experts.config._experts_implementation = "grouped_mm"
        with torch.inference_mode():
            torch.testing.assert_close(out, hf(x), **TOLERANCE[dt])
    else:
        hf.experts.config._experts_implementation = impl
        run(benchmark, group, impl, lambda: hf(x), hf, impl == "eager", rounds)
    if T == 1 and benchmark.stats is not None:  # decode: time should track the bytes of the distinct experts read
        touched = decode_bytes(ours, x, per_slot=impl == "mcsmoe_fast")
        benchmark.extra_info["touched_MB"] = round(touched / 2**20, 1)
        benchmark.extra_info["GB_per_s"] = round(touched / benchmark.stats.stats.median / 1e9, 1)


# The issue's merged block: Mixtral-shaped at an eighth of its width (d 512, ff 1792), merged 8 -> 4, against
# transformers' grouped_mm and eager on the original 8 experts, T = 128 and 512, fp32 and bf16.
SMALL_CASES = [(dt, T, impl) for dt in DTYPES for T in (128, 512)
               for impl in ("eager", "grouped_mm", "mcsmoe_fast") + (("dense_gemm_floor",) if dt == "fp32" else ())]


def mixtral_small_layer(dtype):
    return mixtral_layer(4, dtype, d=512, ff=1792)


@pytest.mark.parametrize("dt,T,impl", SMALL_CASES, ids=[f"{dt}-T{T}-{i}" for dt, T, i in SMALL_CASES])
def test_mixtral_small_block(benchmark, dt, T, impl):
    dtype = DTYPES[dt]
    hf, ours = layer(mixtral_small_layer, dtype)
    x = inputs(T, 512).to(dtype)
    group = f"mixtral {dt} d512 ff1792 E8 top2 8->4 T={T}"
    if impl == "dense_gemm_floor":
        with torch.inference_mode():
            fn, benchmark.extra_info["rows"] = dense_gemm_floor(ours, x)
        run(benchmark, group, impl, fn, ours, False, 10)
    elif impl == "mcsmoe_fast":
        out = run(benchmark, group, impl, lambda: ours(x), ours, False, 10)
        hf.experts.config._experts_implementation = "grouped_mm"
        with torch.inference_mode():
            torch.testing.assert_close(out, hf(x), **TOLERANCE[dt])
    else:
        hf.experts.config._experts_implementation = impl
        run(benchmark, group, impl, lambda: hf(x), hf, impl == "eager", 10)


def decode_bytes(ours, x, per_slot: bool) -> int:
    """Expert weight bytes one token reads: its distinct slots (ours) or its distinct experts (HF)."""
    with torch.inference_mode():
        _, _, index = ours.gate(x.reshape(-1, x.shape[-1]))
    ids = ours.experts.expert_map[index[0]] if per_slot else index[0]
    w_in, w_out = ours.experts.w_in, ours.experts.w_out
    per_expert = (w_in[0].numel() + w_out[0].numel()) * w_in.element_size()
    return int(ids.unique().numel()) * per_expert


SWITCH_CASES = [(dt, G, T, impl) for dt in DTYPES for G in (32, 8) for T in TOKENS for impl in ("eager", "mcsmoe_fast")]


@pytest.mark.parametrize("dt,G,T,impl", SWITCH_CASES, ids=[f"{dt}-G{G}-T{T}-{i}" for dt, G, T, i in SWITCH_CASES])
def test_switch_layer(benchmark, dt, G, T, impl):
    skip_slow_bf16("switch", dt, T)
    hf, ours = layer(switch_layer, G, DTYPES[dt])
    x = inputs(T, SWITCH["d"], min(T, SEQ)).to(DTYPES[dt])
    rounds = 5 if T >= 1024 else 10
    group = f"switch {dt} d768 ff3072 E32 top1 G={G} T={T}"
    if impl == "mcsmoe_fast":
        out = run(benchmark, group, impl, lambda: ours(x), ours, False, rounds)
        with torch.inference_mode():
            torch.testing.assert_close(out, hf(x), **TOLERANCE[dt])
    else:
        run(benchmark, group, impl, lambda: hf(x), hf, True, rounds)


# --- many small experts (Qwen3-MoE) and few large ones with biases (GPT-OSS), original and merged to E/4 ---
QWEN3 = dict(d=2048, ff=768, E=128, k=8)  # Qwen3-30B-A3B's MoE layer: moe_intermediate_size 768
GPT_OSS = dict(d=2880, ff=2880, E=32, k=4, alpha=1.702, limit=7.0)  # gpt-oss-20b's MoE layer
# batched_mm gathers every (token, expert) pair's weights, [T*k, F, d] + [T*k, d, ff]: a cell that would
# gather more than this is skipped (Qwen3 T >= 128: 18 GiB at T = 128; GPT-OSS T >= 16: 5.9 GiB at T = 16).
BATCHED_MM_MAX_BYTES = 4 * 2**30


def qwen3_layer(G: int, dtype: torch.dtype = torch.float32):
    """(HF Qwen3MoeSparseMoeBlock whose E experts hold their group's weights, our block with G slots);
    G = E: (the HF block, None): ours is then the HF block under the "mcsmoe_fast" experts implementation."""
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    d, ff, E = QWEN3["d"], QWEN3["ff"], QWEN3["E"]
    cfg = Qwen3MoeConfig(hidden_size=d, moe_intermediate_size=ff, num_experts=E, num_experts_per_tok=QWEN3["k"],
                         norm_topk_prob=True)
    cfg._experts_implementation = "eager"
    gen = torch.Generator().manual_seed(G)
    hf = Qwen3MoeSparseMoeBlock(cfg).eval().requires_grad_(False)
    emap = group_map(E, G)
    slots_in, slots_out = gated_slots(G, d, ff, gen)
    with torch.no_grad():
        hf.gate.weight.normal_(0, 0.05, generator=gen)
        for e in range(E):  # one expert at a time: no [E, F, d] temporary
            hf.experts.gate_up_proj[e].copy_(slots_in[emap[e]])
            hf.experts.down_proj[e].copy_(slots_out[emap[e]])
    if G == E:
        return hf.to(dtype), None
    ours = Qwen3MoeSparseMoeBlock(cfg).eval().requires_grad_(False)
    ours.gate = hf.gate
    ours.experts = MoEExperts(slots_in, slots_out, emap, "swiglu").requires_grad_(False)
    return hf.to(dtype), ours.to(dtype)


def gpt_oss_layer(G: int, dtype: torch.dtype = torch.float32):
    """As qwen3_layer, for a GPT-OSS-shaped GptOssMLP: GptOssExperts store gate_up_proj [E, d, 2 ff]
    (transposed, gate and up columns interleaved), down_proj [E, ff, d] and biases; ours holds G slots
    in the canonical layout (w_in [G, 2 ff, d] gate rows then up rows, w_out [G, d, ff], b_in, b_out)."""
    from transformers import GptOssConfig
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssMLP

    d, ff, E = GPT_OSS["d"], GPT_OSS["ff"], GPT_OSS["E"]
    cfg = GptOssConfig(hidden_size=d, intermediate_size=ff, num_local_experts=E, num_experts_per_tok=GPT_OSS["k"],
                       swiglu_alpha=GPT_OSS["alpha"], swiglu_limit=GPT_OSS["limit"])
    cfg._experts_implementation = "eager"
    gen = torch.Generator().manual_seed(G)
    hf = GptOssMLP(cfg).eval().requires_grad_(False)
    emap = group_map(E, G)
    w_in, w_out = gated_slots(G, d, ff, gen)
    b_in = torch.randn(G, 2 * ff, generator=gen) * 0.1
    b_out = torch.randn(G, d, generator=gen) * 0.1
    experts = hf.experts
    with torch.no_grad():
        hf.router.weight.normal_(0, 0.05, generator=gen)
        hf.router.bias.normal_(0, 0.05, generator=gen)
        for e in range(E):  # GptOssExperts' layout, written by hand (ours is checked against theirs)
            g = int(emap[e])
            experts.gate_up_proj[e, :, 0::2].copy_(w_in[g, :ff].t())
            experts.gate_up_proj[e, :, 1::2].copy_(w_in[g, ff:].t())
            experts.gate_up_proj_bias[e, 0::2].copy_(b_in[g, :ff])
            experts.gate_up_proj_bias[e, 1::2].copy_(b_in[g, ff:])
            experts.down_proj[e].copy_(w_out[g].t())
            experts.down_proj_bias[e].copy_(b_out[g])
    if G == E:
        return hf.to(dtype), None
    ours = GptOssMLP(cfg).eval().requires_grad_(False)
    ours.router = hf.router
    ours.experts = MoEExperts(w_in, w_out, emap, "clamped_swiglu", b_in, b_out,
                              dict(alpha=GPT_OSS["alpha"], limit=GPT_OSS["limit"])).requires_grad_(False)
    return hf.to(dtype), ours.to(dtype)


def batched_mm_bytes(shape: dict, T: int, dtype: torch.dtype = torch.float32) -> int:
    F = 2 * shape["ff"]
    return T * shape["k"] * (F * shape["d"] + shape["d"] * shape["ff"]) * dtype.itemsize


def first(out):  # GptOssMLP returns (hidden, router_scores)
    return out[0] if isinstance(out, tuple) else out


def family_case(benchmark, build, shape: dict, name: str, dt: str, G: int, T: int, impl: str):
    E, dtype = shape["E"], DTYPES[dt]
    skip_slow_bf16(name, dt, T)
    if impl == "batched_mm" and batched_mm_bytes(shape, T, dtype) > BATCHED_MM_MAX_BYTES:
        pytest.skip(f"batched_mm at large T: it would gather {batched_mm_bytes(shape, T, dtype) / 2**30:.1f} GiB of expert "
                    f"weights ([T*k, F, d] + [T*k, d, ff], T*k = {T * shape['k']}) per call, over the "
                    f"{BATCHED_MM_MAX_BYTES / 2**30:.0f} GiB this benchmark allows")
    hf, ours = layer(build, G, dtype)
    x = inputs(T, shape["d"]).to(dtype)
    rounds = 5 if T >= 1024 else 10
    group = f"{name} {dt} d{shape['d']} ff{shape['ff']} E{E} top{shape['k']} G={G} T={T}"
    experts_config = hf.experts.config
    if impl == "mcsmoe_fast":
        if ours is None:  # the original layer: the HF block itself, under our experts implementation
            experts_config._experts_implementation = "mcsmoe_fast"
            out = run(benchmark, group, impl, lambda: hf(x), hf, False, rounds, rss=True)
        else:
            out = run(benchmark, group, impl, lambda: ours(x), ours, False, rounds, rss=True)
        experts_config._experts_implementation = "grouped_mm"
        with torch.inference_mode():
            torch.testing.assert_close(first(out), first(hf(x)), **FAMILY_TOLERANCE[dt])
    else:
        experts_config._experts_implementation = impl
        run(benchmark, group, impl, lambda: hf(x), hf, impl == "eager", rounds, rss=True)


FAMILY_IMPLS = HF_IMPLS + ("mcsmoe_fast",)
FAMILY_TOLERANCE = {"fp32": dict(rtol=1e-4, atol=2e-4), "bf16": TOLERANCE["bf16"]}
QWEN3_CASES = [(dt, G, T, impl) for dt in DTYPES for G in (QWEN3["E"], QWEN3["E"] // 4) for T in TOKENS
               for impl in FAMILY_IMPLS]
GPT_OSS_CASES = [(dt, G, T, impl) for dt in DTYPES for G in (GPT_OSS["E"], GPT_OSS["E"] // 4) for T in TOKENS
                 for impl in FAMILY_IMPLS]


@pytest.mark.parametrize("dt,G,T,impl", QWEN3_CASES, ids=[f"{dt}-G{G}-T{T}-{i}" for dt, G, T, i in QWEN3_CASES])
def test_qwen3_layer(benchmark, dt, G, T, impl):
    family_case(benchmark, qwen3_layer, QWEN3, "qwen3", dt, G, T, impl)


@pytest.mark.parametrize("dt,G,T,impl", GPT_OSS_CASES, ids=[f"{dt}-G{G}-T{T}-{i}" for dt, G, T, i in GPT_OSS_CASES])
def test_gpt_oss_layer(benchmark, dt, G, T, impl):
    family_case(benchmark, gpt_oss_layer, GPT_OSS, "gpt-oss", dt, G, T, impl)
