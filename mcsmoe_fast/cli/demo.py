"""mcsmoe-fast demo: the recipe with quality on a model trained here (or --tour: the mechanics)."""
from __future__ import annotations

from .common import subcommand


def add(sub):
    p = subcommand(
        sub, "demo", "train a small MoE language model here, merge and compress it, and show the quality",
        "mcsmoe-fast demo --quick --out /tmp/mcsmoe-demo",
        description="Train a byte-level Mixtral-style MoE (8 experts, top-2) on the Python standard library's "
                    "source, then M-SMoE 8 -> 4 on average (adaptive per-layer counts, as in the paper; the method "
                    "comparison keeps the same count in every layer), KD recovery, MC-SMoE compression, KD "
                    "recovery; print a table (expert parameters, checkpoint MB, held-out perplexity, tokens/s); then "
                    "compare M-SMoE (exact and standard form), HC-SMoE, REAM, REAP and frequency pruning at 25% and "
                    "50% fewer experts, one-shot and after the same KD budget; write checkpoints, results.json, "
                    "plot.png and methods/ into --out. No network; about 20-40 minutes on two CPU cores (README: "
                    "Quick start).")
    p.add_argument("--out", default=None,
                   help="output directory (default ./mcsmoe-demo): new, empty, or one the demo wrote before (it "
                        "writes a .mcsmoe-demo file there first); any other non-empty directory is refused")
    p.add_argument("--quick", action="store_true", help="a smaller model and fewer steps: about 7 minutes on two CPU cores")
    p.add_argument("--tour", action="store_true",
                   help="instead: the pipeline's mechanics on random Switch and Mixtral models, in seconds (no "
                        "--quick or --out: it keeps no files)")
    p.set_defaults(run=run)
    return p


def run(args) -> int:
    if args.tour:
        ignored = [flag for flag, given in (("--quick", args.quick), ("--out", args.out is not None)) if given]
        if ignored:
            raise ValueError(f"{' and '.join(ignored)} would be ignored: --tour runs the mechanics on random models "
                             f"in seconds and keeps no files; drop {'it' if len(ignored) == 1 else 'them'} or --tour")
        from ..demo.tour import run_demo as tour

        tour()
        return 0
    from ..demo import run_demo as demo

    demo(args.out or "mcsmoe-demo", quick=args.quick)
    return 0
