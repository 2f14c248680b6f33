"""Batched linear assignment on the GPU vs scipy.optimize.linear_sum_assignment in a loop.

A batch of 31 problems (the other experts of a 32-expert layer aligned to one reference) at
n = 1024 and 3072, random costs and costs from correlated expert weights. The GPU solves the whole
batch in one call (one thread block per problem); scipy solves problems one after another. scipy
at n = 3072 takes about a second per problem, so by default it is timed on the first few problems
of each batch and its time for the whole batch is scaled from those (the output says so); the
objectives are compared on the problems scipy solved.

    python benchmarks/gpu_lap_bench.py [--sizes 1024 3072] [--batch 31] [--scipy-problems 31 4]
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from mcsmoe_fast import ops


def make_costs(kind: str, batch: int, n: int, gen: torch.Generator) -> torch.Tensor:
    """[batch, n, n] float32 on the GPU. 'random': uniform; 'weights': minus the similarity of a
    reference expert's neurons to each other expert's (noisy, permuted copies), as in alignment."""
    if kind == "random":
        return torch.rand(batch, n, n, generator=gen, device="cuda")
    d = 256
    ref = torch.randn(n, d, generator=gen, device="cuda")
    perm = torch.argsort(torch.rand(batch, n, generator=gen, device="cuda"), dim=1)
    experts = ref[perm] + 3.0 * torch.randn(batch, n, d, generator=gen, device="cuda")
    return -(ref @ experts.transpose(1, 2))


def objective(cost: np.ndarray, cols: np.ndarray) -> float:
    return float(cost[np.arange(cost.shape[0]), cols].astype(np.float64).sum())


def time_gpu(cost: torch.Tensor, repeats: int) -> tuple[float, torch.Tensor]:
    ops.linear_assignment(cost[:1])  # warm-up: module load, kernel attributes
    torch.cuda.synchronize()
    best, cols = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        cols = ops.linear_assignment(cost)
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best, cols


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 3072])
    parser.add_argument("--batch", type=int, default=31)
    parser.add_argument("--scipy-problems", type=int, nargs="+", default=[31, 4],
                        help="problems scipy solves per size (the rest is scaled); one value or one per size")
    parser.add_argument("--kinds", nargs="+", default=["random", "weights"], choices=["random", "weights"])
    parser.add_argument("--repeats", type=int, default=3, help="GPU timings per case (best is kept)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gpu_lap_bench.py needs a CUDA GPU")
    scipy_counts = args.scipy_problems * len(args.sizes) if len(args.scipy_problems) == 1 else args.scipy_problems
    if len(scipy_counts) != len(args.sizes):
        raise SystemExit("--scipy-problems takes one value or one per size")

    print(f"device: {torch.cuda.get_device_name()}; torch {torch.__version__}; batch {args.batch}; float32 costs")
    rows = []
    gen = torch.Generator(device="cuda").manual_seed(0)
    for n, k in zip(args.sizes, scipy_counts):
        k = max(1, min(k, args.batch))
        for kind in args.kinds:
            cost = make_costs(kind, args.batch, n, gen)
            gpu_s, cols = time_gpu(cost, args.repeats)
            cost_np, cols_np = cost[:k].cpu().numpy(), cols[:k].cpu().numpy()
            t0 = time.perf_counter()
            ref_cols = [linear_sum_assignment(c)[1] for c in cost_np]
            scipy_k = time.perf_counter() - t0
            scipy_s = scipy_k / k * args.batch
            rel = max(
                abs(objective(c, a) - objective(c, r)) / max(abs(objective(c, r)), 1e-300)
                for c, a, r in zip(cost_np, cols_np, ref_cols)
            )
            valid = all(np.unique(a).size == a.size for a in cols.cpu().numpy())
            rows.append((kind, n, k, scipy_k / k, scipy_s, gpu_s, scipy_s / gpu_s, rel, valid))
            print(f"  done: {kind} n={n}", flush=True)

    print()
    header = ("costs", "n", "scipy on", "scipy s/problem", f"scipy s/{args.batch}", f"GPU s/{args.batch}",
              "speedup", "max obj rel diff", "valid")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for kind, n, k, per, scipy_s, gpu_s, ratio, rel, valid in rows:
        scaled = "" if k == args.batch else " (scaled)"
        print(f"| {kind} | {n} | {k}/{args.batch} | {per:.4f} | {scipy_s:.3f}{scaled} | {gpu_s:.4f} | "
              f"{ratio:.1f}x | {rel:.2e} | {valid} |")
    if any(k < args.batch for _, _, k, *_ in rows):
        print(f"\nscipy was timed on the first k problems of each batch and scaled to {args.batch} problems "
              "(k/batch column); objectives are compared on those k problems.")
    if not all(r[-1] for r in rows) or max(r[-2] for r in rows) > 1e-6:
        raise SystemExit("FAILED: an assignment was invalid or not optimal")


if __name__ == "__main__":
    main()
