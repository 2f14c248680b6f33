"""The `mcsmoe-fast` command. Each subcommand adds its parser in a `add_<name>` function below and
runs in a `run_<name>` function; keep the work itself in the library modules."""
from __future__ import annotations

import argparse
import sys
import time


def add_permute(sub) -> None:
    p = sub.add_parser("permute", help="align every MoE layer's expert neurons to a reference expert")
    p.add_argument("--model", required=True, help="model directory (or hub id where the network allows)")
    p.add_argument("--out", required=True, help="directory to save the aligned model to")
    p.add_argument("--reference", type=int, default=0, help="reference expert index in every layer (default 0)")
    p.set_defaults(run=run_permute)


def run_permute(args) -> int:
    import torch

    from .models.loading import load_model
    from .permute import align_experts

    model = load_model(args.model)
    start = time.perf_counter()
    perms = align_experts(model, reference=args.reference)
    elapsed = time.perf_counter() - start
    for name, perm in perms.items():
        moved = (perm != torch.arange(perm.shape[1])).sum().item()
        print(f"{name}: {moved} of {perm.numel()} neurons moved")
    print(f"aligned {len(perms)} layers in {elapsed:.2f} s")
    model.save_pretrained(args.out)
    print(f"saved to {args.out}")
    return 0


def add_demo(sub) -> None:
    p = sub.add_parser("demo", help="build small Switch and Mixtral models locally and align their experts")
    p.set_defaults(run=run_demo)


def run_demo(args) -> int:
    from .demo import run_demo as demo

    demo()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mcsmoe-fast", description="Merge, then compress Mixture-of-Experts models.")
    sub = parser.add_subparsers(dest="command", required=True)
    add_demo(sub)
    add_permute(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, FileNotFoundError, OSError) as exc:
        print(f"mcsmoe-fast {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
