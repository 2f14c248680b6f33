"""GPU benchmark of the compressed experts (bf16): sparse_lowrank_linear against the dense x W^T and the plain
PyTorch composition of the same factors, and a Mixtral-shaped MoE layer over compressed slots
(grouped_expert_ffn_slr) against the same merged slots dense (grouped_expert_ffn).

Run on a CUDA machine:  python benchmarks/gpu_slr_bench.py [--tokens 1,128,512,1024] [--rank 32] [--keep 0.1]
Prints two tables: median milliseconds (CUDA events) and ratios (> 1: ours is faster), plus the max abs
difference of our output from the dense one (whose weights are the reconstruction U V + S, so the two agree
up to bf16 rounding)."""
from __future__ import annotations

import argparse
import sys

import torch

from gpu_moe_bench import time_ms  # CUDA-event median, shared with the MoE benchmark
from mcsmoe_fast import ops, reference


def compressed(out, inn, rank, keep, gen, dtype):
    """U [out, r], V [r, in], S_rows [K, in], row_idx [K] for K = keep * out rows (W = U V + S has O(1/sqrt(in))
    entries), and the dense W they stand for."""
    U = torch.randn(out, rank, generator=gen, device="cuda") / rank**0.5
    V = torch.randn(rank, inn, generator=gen, device="cuda") / inn**0.5
    K = int(keep * out)
    S_rows = torch.randn(K, inn, generator=gen, device="cuda") / inn**0.5
    row_idx = torch.randperm(out, generator=gen, device="cuda")[:K]
    W = reference.slr_dense(U, V, S_rows, row_idx)
    return [t.to(dtype) for t in (U, V, S_rows)] + [row_idx], W.to(dtype)


def bank(S, out, inn, rank, keep, gen, dtype):
    """S compressed slots as a bank [U, V, S_rows, row_idx, row_offsets], and their dense weights [S, out, in]."""
    slots = [compressed(out, inn, rank, keep, gen, dtype) for _ in range(S)]
    U = torch.stack([f[0] for f, _ in slots])
    V = torch.stack([f[1] for f, _ in slots])
    S_rows = torch.cat([f[2] for f, _ in slots])
    row_idx = torch.cat([f[3] for f, _ in slots])
    offsets = torch.arange(S + 1, device="cuda") * int(keep * out)
    return [U, V, S_rows, row_idx, offsets], torch.stack([W for _, W in slots])


def plain(x, U, V, S_rows, row_idx):
    """The same product in plain PyTorch: (x V^T) U^T with x S_rows^T added into the kept columns."""
    return (x @ V.T @ U.T).index_add_(1, row_idx, x @ S_rows.T)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", default="1,128,512,1024", help="T for the single linear")
    parser.add_argument("--moe-tokens", default="1,16,128,1024", help="T for the MoE layer")
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--keep", type=float, default=0.1, help="fraction of the rows kept in S")
    parser.add_argument("--quick", action="store_true", help="few repetitions (a smoke test)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("gpu_slr_bench: no CUDA device; nothing to do")
        return 0
    dtype = torch.bfloat16
    reps = 5 if args.quick else 30
    gen = torch.Generator(device="cuda").manual_seed(0)

    linear_rows = []
    for inn, out in [(768, 3072), (3072, 768), (1024, 3584), (3584, 1024)]:
        factors, W = compressed(out, inn, args.rank, args.keep, gen, dtype)
        for T in (int(t) for t in args.tokens.split(",")):
            x = torch.randn(T, inn, generator=gen, device="cuda", dtype=dtype)
            with torch.inference_mode():
                dense = torch.nn.functional.linear(x, W)
                diff = (ops.sparse_lowrank_linear(x, *factors).float() - dense.float()).abs().max().item()
                t_dense = time_ms(lambda: torch.nn.functional.linear(x, W), reps)
                t_ours = time_ms(lambda: ops.sparse_lowrank_linear(x, *factors), reps)
                t_plain = time_ms(lambda: plain(x, *factors), reps)
            linear_rows.append((f"{inn}->{out}", T, t_dense, t_plain, t_ours, diff))

    # Mixtral-shaped layer: d 1024, ff 3584, E 8, top-2, experts merged pairwise into 4 slots.
    d, ff, E, S, k = 1024, 3584, 8, 4, 2
    w_in, W_in = bank(S, 2 * ff, d, args.rank, args.keep, gen, dtype)
    w_out, W_out = bank(S, d, ff, args.rank, args.keep, gen, dtype)
    emap = torch.arange(E, device="cuda") // (E // S)
    moe_rows = []
    for T in (int(t) for t in args.moe_tokens.split(",")):
        hidden = torch.randn(T, d, generator=gen, device="cuda", dtype=dtype)
        logits = torch.randn(T, E, generator=gen, device="cuda")
        top_w, top_i = torch.softmax(logits, -1).topk(k, -1)
        with torch.inference_mode():
            dense = ops.grouped_expert_ffn(hidden, W_in, W_out, emap, top_i, top_w, "swiglu")
            ours = ops.grouped_expert_ffn_slr(hidden, w_in, w_out, emap, top_i, top_w, "swiglu")
            diff = (ours.float() - dense.float()).abs().max().item()
            t_dense = time_ms(lambda: ops.grouped_expert_ffn(hidden, W_in, W_out, emap, top_i, top_w, "swiglu"), reps)
            t_ours = time_ms(lambda: ops.grouped_expert_ffn_slr(hidden, w_in, w_out, emap, top_i, top_w, "swiglu"), reps)
        moe_rows.append((T, t_dense, t_ours, diff))

    print(f"\n{torch.cuda.get_device_name()}  bf16  rank {args.rank}  keep {args.keep:.0%}  (median ms over {reps} runs)")
    print("sparse_lowrank_linear: dense = x W^T with W = U V + S; plain = (x V^T) U^T + index_add of x S_rows^T")
    print(f"{'in->out':<10} {'T':>5} {'dense ms':>9} {'plain ms':>9} {'ours ms':>8} {'dense/ours':>10} "
          f"{'plain/ours':>10} {'max|diff|':>10}")
    for name, T, t_dense, t_plain, t_ours, diff in linear_rows:
        print(f"{name:<10} {T:>5} {t_dense:>9.3f} {t_plain:>9.3f} {t_ours:>8.3f} {t_dense / t_ours:>9.2f}x "
              f"{t_plain / t_ours:>9.2f}x {diff:>10.2e}")
    print(f"\nMoE layer d{d} ff{ff} E{E} top{k} merged to {S} slots, SwiGLU: compressed slots "
          "(grouped_expert_ffn_slr) vs the same slots dense (grouped_expert_ffn)")
    print(f"{'T':>5} {'dense ms':>9} {'compressed ms':>14} {'dense/compressed':>17} {'max|diff|':>10}")
    for T, t_dense, t_ours, diff in moe_rows:
        print(f"{T:>5} {t_dense:>9.3f} {t_ours:>14.3f} {t_dense / t_ours:>16.2f}x {diff:>10.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
