"""The `mcsmoe-fast` command. Each subcommand adds its parser in a `add_<name>` function below and
runs in a `run_<name>` function; keep the work itself in the library modules."""
from __future__ import annotations

import argparse
import sys
import time


def refuse_overwriting_input(args) -> None:
    """Every subcommand that writes a model refuses to write it over the model it reads: a save replaces
    the target directory, which would delete the user's original weights."""
    from pathlib import Path

    out, model = Path(args.out).absolute().resolve(), Path(args.model).absolute().resolve()
    if out == model or (model.is_dir() and model in out.parents):
        raise ValueError(f"--out {args.out} would write into the input model's directory {args.model}; "
                         "choose another output directory")


def add_permute(sub) -> None:
    p = sub.add_parser("permute", help="align every MoE layer's expert neurons to a reference expert")
    p.add_argument("--model", required=True, help="model directory (or hub id where the network allows)")
    p.add_argument("--out", required=True, help="directory to save the aligned model to")
    p.add_argument("--reference", type=int, default=0, help="reference expert index in every layer (default 0)")
    p.set_defaults(run=run_permute)


def run_permute(args) -> int:
    import torch

    from .calibration_data import load_tokenizer
    from .models.loading import open_model
    from .permute import align_experts

    refuse_overwriting_input(args)
    model = open_model(args.model)
    start = time.perf_counter()
    perms = align_experts(model, reference=args.reference)
    elapsed = time.perf_counter() - start
    for name, perm in perms.items():
        moved = (perm != torch.arange(perm.shape[1])).sum().item()
        print(f"{name}: {moved} of {perm.numel()} neurons moved")
    print(f"aligned {len(perms)} layers in {elapsed:.2f} s")
    model.save_pretrained(args.out)
    try:  # the aligned model is usable on its own (merge reads the tokenizer beside the model)
        load_tokenizer(args.model).save_pretrained(args.out)
    except ValueError:
        print("no tokenizer beside the input model: none saved with the aligned model")
    print(f"saved to {args.out}")
    return 0


def add_demo(sub) -> None:
    p = sub.add_parser(
        "demo", help="train a small MoE language model here, merge and compress it, and show the quality",
        description="Train a byte-level Mixtral-style MoE (8 experts, top-2) on the Python standard library's "
                    "source, then M-SMoE 8 -> 4, KD recovery, MC-SMoE compression, KD recovery; print a table "
                    "(expert parameters, checkpoint MB, held-out perplexity, tokens/s) and write checkpoints, "
                    "results.json and plot.png into --out. No network; about 3 minutes on two CPU cores.",
        epilog="example: mcsmoe-fast demo --quick --out /tmp/mcsmoe-demo",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="mcsmoe-demo", help="output directory (default ./mcsmoe-demo)")
    p.add_argument("--quick", action="store_true", help="a smaller model and fewer steps: under a minute")
    p.add_argument("--tour", action="store_true",
                   help="instead: the pipeline's mechanics on random Switch and Mixtral models, in seconds")
    p.set_defaults(run=run_demo)


def run_demo(args) -> int:
    if args.tour:
        from .demo.tour import run_demo as tour

        tour()
        return 0
    from .demo import run_demo as demo

    demo(args.out, quick=args.quick)
    return 0


def add_calibration_options(p) -> None:
    """How calibration text becomes batches (merge, compress)."""
    p.add_argument("--num-samples", type=int, default=256, help="calibration samples (default 256)")
    p.add_argument("--batch-size", type=int, default=8, help="calibration batch size (default 8)")
    p.add_argument("--max-length", type=int, default=256, help="tokens per calibration sample (default 256)")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the model directory)")
    p.add_argument("--text-field", default="text", help="text field of .jsonl records and datasets (default text)")
    p.add_argument("--split", default="train", help="dataset split for a dataset name (default train)")


# --- merge (M-SMoE) ------------------------------------------------------------------------------
def add_merge(sub) -> None:
    from .grouping import GROUPING_METHODS, MERGE_STRATEGIES, SIMILARITY_BASES

    p = sub.add_parser("merge", help="merge each MoE layer's experts into groups (M-SMoE) and save the smaller model")
    p.add_argument("--model", required=True, help="model directory (plain or merged checkpoint) or hub id")
    p.add_argument("--calib", required=True,
                   help="calibration text: a .txt file (one sample per line), a .jsonl file, or a dataset name")
    p.add_argument("--num-groups", type=int, required=True,
                   help="groups per merged layer (the average per layer with --globally)")
    p.add_argument("--out", required=True, help="directory to save the merged model to")
    p.add_argument("--similarity", choices=SIMILARITY_BASES, default="router-logits", help="similarity basis")
    p.add_argument("--grouping", choices=GROUPING_METHODS, default="dominant",
                   help="dominant experts (paper) or hierarchical clustering (HC-SMoE)")
    p.add_argument("--globally", action=argparse.BooleanOptionalAction, default=True,
                   help="spread one budget of groups over the layers by usage frequency (default on)")
    p.add_argument("--no-permute", dest="permute", action="store_false",
                   help="do not align group members to their dominant expert before averaging")
    p.add_argument("--strategy", choices=MERGE_STRATEGIES, default="frequency",
                   help="frequency-weighted or uniform average, or drop non-dominant experts (baseline)")
    p.add_argument("--layers", nargs="+", default=None,
                   help="MoE layers to merge: names or positions in module order (default: all)")
    add_calibration_options(p)
    p.add_argument("--seed", type=int, default=0, help="seed of the random similarity basis")
    p.add_argument("--export-dense", action="store_true",
                   help="save a plain transformers checkpoint (every expert materialised) instead")
    p.set_defaults(run=run_merge)


def _parameter_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def _dir_bytes(path) -> int:
    from pathlib import Path

    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def run_merge(args) -> int:
    from .calibrate import collect_routing_stats
    from .calibration_data import calibration_batches, check_batches, load_tokenizer, read_calibration_texts
    from .checkpoint import save_pretrained
    from .merge import merge_experts
    from .models import moe_layers
    from .models.loading import open_model

    refuse_overwriting_input(args)
    if args.num_groups < 1:
        raise ValueError(f"--num-groups must be >= 1, got {args.num_groups}")
    tokenizer = load_tokenizer(args.tokenizer or args.model)
    texts = read_calibration_texts(args.calib, args.num_samples, args.text_field, args.split)
    batches = calibration_batches(texts, tokenizer, args.batch_size, args.max_length)
    model = open_model(args.model)
    experts = {layer.num_experts for layer in moe_layers(model)}
    if args.num_groups >= max(experts):
        raise ValueError(f"nothing would be merged: --num-groups {args.num_groups} is not below the number of "
                         f"experts per layer ({max(experts)})")
    check_batches(batches, tokenizer, model.config.vocab_size)
    before = _parameter_bytes(model)
    similarity_bases = (args.similarity,) if args.similarity == "expert-output" else ("router-logits", "feature")
    start = time.perf_counter()
    stats = collect_routing_stats(model, batches, bases=similarity_bases)
    layers = [int(x) if x.lstrip("-").isdigit() else x for x in args.layers] if args.layers else None
    groupings = merge_experts(model, stats, args.num_groups, similarity=args.similarity, globally=args.globally,
                              permute=args.permute, strategy=args.strategy, layers=layers,
                              grouping=args.grouping, seed=args.seed)
    elapsed = time.perf_counter() - start
    after = _parameter_bytes(model)
    width = max(len(name) for name in groupings)
    print(f"{'layer':<{width}}  experts  groups  dominant experts")
    for name, g in groupings.items():
        print(f"{name:<{width}}  {g.num_experts:>7}  {g.num_groups:>6}  {g.dominant}")
    total = sum(g.num_groups for g in groupings.values())
    print(f"{len(texts)} calibration samples; {total} groups over {len(groupings)} layers in {elapsed:.2f} s")
    out = save_pretrained(model, args.out, export_dense=args.export_dense, tokenizer=tokenizer)
    print(f"parameters: {before / 2**20:.2f} MiB before, {after / 2**20:.2f} MiB after merging "
          f"({before / max(after, 1):.2f}x smaller)")
    print(f"saved {'dense ' if args.export_dense else ''}checkpoint to {out} ({_dir_bytes(out) / 2**20:.2f} MiB on disk)")
    return 0


# --- compress (MC-SMoE) ----------------------------------------------------------------------------
def add_compress(sub) -> None:
    from .compress import IMPORTANCE, SVD_METHODS

    p = sub.add_parser("compress", help="compress every expert slot into low-rank factors plus kept rows (one-shot)")
    p.add_argument("--model", required=True, help="model directory (merged or plain checkpoint) or hub id")
    p.add_argument("--out", required=True, help="directory to save the compressed model to (not --model)")
    p.add_argument("--rank", type=int, default=32, help="rank of the low-rank factors (default 32)")
    p.add_argument("--keep-ratio", type=float, default=0.1,
                   help="share of the sparse part's entries kept, one threshold over all experts (default 0.1)")
    one_shot = [i for i in IMPORTANCE if i != "gradient"]
    p.add_argument("--importance", choices=one_shot, default="weight",
                   help="row scores: |S| (weight) or |S| times input norms from --calib (activation)")
    p.add_argument("--svd", choices=SVD_METHODS, default="auto", help="truncated SVD method (default auto)")
    p.add_argument("--layers", nargs="+", default=None,
                   help="MoE layers to compress: names or positions in module order (default: all)")
    p.add_argument("--calib", default=None, help="calibration text for --importance activation (as for merge)")
    add_calibration_options(p)
    p.set_defaults(run=run_compress)


def run_compress(args) -> int:
    from .calibrate import collect_routing_stats
    from .calibration_data import calibration_batches, check_batches, load_tokenizer, read_calibration_texts
    from .checkpoint import save_pretrained
    from .compress import compress_experts
    from .models.loading import open_model

    refuse_overwriting_input(args)
    if args.rank < 1 or not 0 < args.keep_ratio <= 1:
        raise ValueError(f"need --rank >= 1 and 0 < --keep-ratio <= 1, got {args.rank} and {args.keep_ratio}")
    if args.importance == "activation" and args.calib is None:
        raise ValueError("--importance activation needs --calib (calibration text)")
    tokenizer = None
    try:
        tokenizer = load_tokenizer(args.tokenizer or args.model)
    except (OSError, ValueError):
        if args.calib is not None:
            raise
    model = open_model(args.model)
    stats = None
    start = time.perf_counter()
    if args.importance == "activation":
        texts = read_calibration_texts(args.calib, args.num_samples, args.text_field, args.split)
        batches = calibration_batches(texts, tokenizer, args.batch_size, args.max_length)
        check_batches(batches, tokenizer, model.config.vocab_size)
        stats = collect_routing_stats(model, batches, input_norms=True)
    before = _parameter_bytes(model)
    layers = [int(x) if x.lstrip("-").isdigit() else x for x in args.layers] if args.layers else None
    modules = compress_experts(model, rank=args.rank, keep_ratio=args.keep_ratio, layers=layers,
                               importance=args.importance, stats=stats, svd=args.svd)
    elapsed = time.perf_counter() - start
    width = max(len(name) for name in modules)
    print(f"{'layer':<{width}}  slots  rank in/out  kept rows in/out")
    for name, m in modules.items():
        print(f"{name:<{width}}  {m.num_slots:>5}  {m.in_U.shape[2]:>4}/{m.out_U.shape[2]:<4}  "
              f"{m.in_S_rows.shape[0]}/{m.out_S_rows.shape[0]}")
    after = _parameter_bytes(model)
    print(f"compressed {len(modules)} layers in {elapsed:.2f} s")
    out = save_pretrained(model, args.out, tokenizer=tokenizer)
    print(f"parameters: {before / 2**20:.2f} MiB before, {after / 2**20:.2f} MiB after compressing "
          f"({before / max(after, 1):.2f}x smaller)")
    print(f"saved checkpoint to {out} ({_dir_bytes(out) / 2**20:.2f} MiB on disk)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="mcsmoe-fast", description="Merge, then compress Mixture-of-Experts models.")
    parser.add_argument("--version", action="version", version=f"mcsmoe-fast {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    add_demo(sub)
    add_permute(sub)
    add_merge(sub)
    add_compress(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one progress bar per step of ours, not transformers' loading/writing bars
    try:
        return args.run(args)
    except (ValueError, FileNotFoundError, OSError) as exc:
        print(f"mcsmoe-fast {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
