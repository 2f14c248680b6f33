"""GPU benchmark of one MoE layer (bf16): our grouped expert FFN against transformers' grouped_mm
experts implementation (Mixtral-8x7B-shaped, original and merged) and its eager loop (Switch-shaped).

Run on a CUDA machine:  python benchmarks/gpu_moe_bench.py [--tokens 1,128,1024,4096,16384] [--quick]
Prints one table: median milliseconds (CUDA events) and the speed-up of ours, plus the max abs
difference of our output from the anchor's (a correctness check on real shapes)."""
from __future__ import annotations

import argparse
import statistics
import sys

import torch

from mcsmoe_fast.modules import MoEExperts, SwitchMoE


def time_ms(fn, reps: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def mixtral_pair(d, ff, E, G, k, dtype):
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    cfg = MixtralConfig(hidden_size=d, intermediate_size=ff, num_local_experts=E, num_experts_per_tok=k)
    cfg._experts_implementation = "grouped_mm"
    gen = torch.Generator(device="cuda").manual_seed(G)
    emap = (torch.arange(E) // (E // G)).cuda()
    slots_in = torch.randn(G, 2 * ff, d, generator=gen, device="cuda", dtype=dtype) * d**-0.5
    slots_out = torch.randn(G, d, ff, generator=gen, device="cuda", dtype=dtype) * ff**-0.5
    with torch.device("cuda"):
        hf = MixtralSparseMoeBlock(cfg).to(dtype).eval().requires_grad_(False)
    with torch.no_grad():
        hf.gate.weight.normal_(0, 0.05, generator=gen)
        hf.experts.gate_up_proj.copy_(slots_in[emap])
        hf.experts.down_proj.copy_(slots_out[emap])
    with torch.device("cuda"):
        ours = MixtralSparseMoeBlock(cfg).to(dtype).eval().requires_grad_(False)
    ours.gate = hf.gate
    ours.experts = MoEExperts(slots_in, slots_out, emap, "swiglu").requires_grad_(False)
    return hf, ours


def switch_pair(d, ff, E, G, dtype, capacity):
    from transformers import SwitchTransformersConfig
    from transformers.models.switch_transformers.modeling_switch_transformers import SwitchTransformersSparseMLP

    cfg = SwitchTransformersConfig(d_model=d, d_ff=ff, num_experts=E, expert_capacity=capacity)
    gen = torch.Generator(device="cuda").manual_seed(G)
    emap = (torch.arange(E) // (E // G)).cuda()
    slots_in = torch.randn(G, ff, d, generator=gen, device="cuda", dtype=dtype) * d**-0.5
    slots_out = torch.randn(G, d, ff, generator=gen, device="cuda", dtype=dtype) * ff**-0.5
    hf = SwitchTransformersSparseMLP(cfg).cuda().to(dtype).eval().requires_grad_(False)
    with torch.no_grad():
        hf.router.classifier.weight.normal_(0, 0.05, generator=gen)
        for e in range(E):
            hf.experts[f"expert_{e}"].wi.weight.copy_(slots_in[emap[e]])
            hf.experts[f"expert_{e}"].wo.weight.copy_(slots_out[emap[e]])
    ours = SwitchMoE(hf.router, MoEExperts(slots_in, slots_out, emap, "relu")).eval().requires_grad_(False)
    return hf, ours


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", default="1,16,128,1024,4096,16384")
    parser.add_argument("--quick", action="store_true", help="small shapes and few repetitions (a smoke test)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("gpu_moe_bench: no CUDA device; nothing to do")
        return 0
    dtype = torch.bfloat16
    tokens = [int(t) for t in args.tokens.split(",")]
    reps = 5 if args.quick else 20
    mix = dict(d=1024, ff=3584) if args.quick else dict(d=4096, ff=14336)  # Mixtral-8x7B
    print(f"\n{torch.cuda.get_device_name()}  bf16  (median ms over {reps} runs)")
    print(f"{'layer':<40} {'T':>6} {'anchor':>10} {'anchor ms':>10} {'ours ms':>9} {'speed-up':>9} {'max|diff|':>10}")

    def measure(name, anchor, hf, ours, inputs):
        """Time the anchor `hf` and `ours` on every T (inputs(T) -> x); each row printed as it is measured, so that
        a failing layer loses no earlier row."""
        for T in tokens:
            x = inputs(T)
            with torch.inference_mode():
                diff = (ours(x).float() - hf(x).float()).abs().max().item()
                t_hf, t_ours = time_ms(lambda: hf(x), reps), time_ms(lambda: ours(x), reps)
            print(f"{name:<40} {T:>6} {anchor:>10} {t_hf:>10.3f} {t_ours:>9.3f} {t_hf / t_ours:>8.2f}x {diff:>10.2e}",
                  flush=True)

    for G in (8, 4, 2):
        measure(f"mixtral d{mix['d']} ff{mix['ff']} E8 top2 G={G}", "grouped_mm",
                *mixtral_pair(mix["d"], mix["ff"], 8, G, 2, dtype),
                lambda T: torch.randn(1, T, mix["d"], device="cuda", dtype=dtype))
        torch.cuda.empty_cache()  # the pair is gone once measure returns
    for G in (32, 8):
        measure(f"switch d768 ff3072 E32 top1 G={G}", "eager", *switch_pair(768, 3072, 32, G, dtype, capacity=64),
                lambda T: torch.randn(T // min(T, 128), min(T, 128), 768, device="cuda", dtype=dtype))
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
