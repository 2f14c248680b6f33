"""Mixtral-8x7B one shot: merge 8 -> 4 experts per layer (M-SMoE), compress the merged experts (MC-SMoE),
no training; held-out perplexity before and after each step, optional lm-eval-harness tasks.

What it reproduces: the original's Mixtral support (UNITES-Lab/MC-SMoE, mcsmoe/msmoe-merging-mixtral.py),
retraining-free: routing statistics on calibration text, router-logits similarity, dominant experts by
usage frequency, each group's members aligned to its dominant expert (SwiGLU weight matching: gate and up
rows with down columns; the original did not align Mixtral) and merged weighted by usage frequency, in
every one of the 32 layers. Differences from the original, all switchable: 4 groups in every layer
(--globally: the original's adaptive counts from one global budget, 4 per layer on average); calibration
and perplexity on text files you give (the original used MiniPile's validation split, 512-token blocks);
one-shot compression of the merged experts (rank-32 low-rank factors plus the most important 10% of the
sparse rows by weight x input-norm importance, --importance activation) that the original did not do
for Mixtral (its compression was trained with KD on switch-base-32; without KD expect perplexity to
rise; --keep-ratio 1 keeps every sparse row, --no-compress stops after merging).

The reference files give no Mixtral figures to compare with; summary.json puts each stage's perplexity
(and lm-eval scores) next to the full model's, measured the same way in the same run.

Expected resources (estimates, not measured here): Mixtral-8x7B has 46.7B parameters, 93 GB in bf16.
The model runs on one device: a GPU with >= 100 GB (H200 141 GB; sharding a model over several GPUs is
not supported by this recipe, so `accelerate launch` does not apply: nothing here trains) and >= 100 GB of
host memory to load it, or a CPU machine with >= 200 GB (float32; slow). Merging aligns 4 members in each
of 32 layers (assignment problems of size 14336): minutes on a GPU, much longer on a CPU. Disk: 93 GB for
the hub download, ~50 GB for OUT/merged (4 experts per layer), less for OUT/mcsmoe.

    python python/mixtral_one_shot.py --calib calib.txt --eval-text heldout.txt --out runs/mixtral
    python python/mixtral_one_shot.py --model DIR --calib calib.txt --eval-text heldout.txt --out runs/m \\
        --lm-eval-tasks arc_easy hellaswag --lm-eval-fewshot 5      # needs `pip install lm-eval`

Outputs: OUT/merged and OUT/mcsmoe (load with mcsmoe_fast.from_pretrained; the tokenizer is saved
alongside) and OUT/summary.json.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


LEAST = {"num_samples": 1, "max_length": 1, "calib_batch_size": 1, "length": 2, "eval_windows": 1,
         "eval_batch_size": 1, "lm_eval_fewshot": 0, "lm_eval_limit": 1, "lm_eval_batch_size": 1}  # per count option


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="mistralai/Mixtral-8x7B-v0.1", help="hub id or directory (default %(default)s)")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory or hub id (default: --model)")
    p.add_argument("--calib", required=True,
                   help="calibration text: a .txt file (one sample per line), a .jsonl file, or a dataset name")
    p.add_argument("--text-field", default="text", help="text field of .jsonl records and datasets (default text)")
    p.add_argument("--num-samples", type=int, default=256, help="calibration samples (default 256)")
    p.add_argument("--max-length", type=int, default=512, help="tokens per calibration sample (default 512)")
    p.add_argument("--calib-batch-size", type=int, default=4)
    p.add_argument("--eval-text", required=True, help="held-out UTF-8 text file for perplexity")
    p.add_argument("--length", type=int, default=512, help="tokens per perplexity window (default 512)")
    p.add_argument("--eval-windows", type=int, default=None, help="use the first N windows only")
    p.add_argument("--eval-batch-size", type=int, default=4)
    p.add_argument("--out", required=True, help="directory for OUT/merged, OUT/mcsmoe and OUT/summary.json")
    p.add_argument("--num-groups", type=int, default=4, help="merged experts per layer (default 4)")
    p.add_argument("--globally", action="store_true",
                   help="adaptive per-layer counts from one budget of --num-groups per layer on average")
    p.add_argument("--similarity", default="router-logits", help="similarity basis (default router-logits)")
    p.add_argument("--no-compress", dest="compress", action="store_false", help="stop after merging")
    p.add_argument("--rank", type=int, default=32, help="rank of the low-rank factors (default 32)")
    p.add_argument("--keep-ratio", type=float, default=0.1, help="share of sparse rows kept (default 0.1)")
    p.add_argument("--importance", choices=("activation", "weight"), default="activation",
                   help="row importance: |S| x input norms from calibration (activation) or |S| alone (weight)")
    p.add_argument("--dtype", choices=("auto", "bfloat16", "float16", "float32"), default="auto",
                   help="auto: bfloat16 on a GPU, float32 on a CPU")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--lm-eval-tasks", nargs="+", default=None,
                   help="lm-eval-harness tasks to run on every stage (needs `pip install lm-eval`)")
    p.add_argument("--lm-eval-fewshot", type=int, default=None, help="few-shot examples (the original used 5)")
    p.add_argument("--lm-eval-limit", type=int, default=None, help="examples per lm-eval task")
    p.add_argument("--lm-eval-batch-size", type=int, default=8)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p.parse_args([str(a) for a in argv] if argv is not None else None)


def lm_eval_installed() -> bool:
    """Whether the optional lm-evaluation-harness can be imported (it is not a dependency of mcsmoe-fast)."""
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        return False
    return True


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


def check_counts(args) -> None:
    """Refuse a count option below its least value (LEAST) before anything is loaded: a negative --eval-windows
    would slice windows off the end, and zero would fail only once the model is loaded."""
    for name, least in LEAST.items():
        value = getattr(args, name)
        if value is not None and value < least:
            raise ValueError(f"--{name.replace('_', '-')} must be >= {least}, got {value}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def run(args) -> int:
    check_counts(args)
    import torch

    from mcsmoe_fast import (collect_routing_stats, compress_experts, load_tokenizer, merge_experts, moe_layers,
                             open_model, read_calibration_texts, save_pretrained)
    from mcsmoe_fast.calibration_data import calibration_batches
    from mcsmoe_fast.demo.measure import expert_parameters
    from mcsmoe_fast.tasks.harness import harness_evaluate
    from mcsmoe_fast.train.text import perplexity, text_windows

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, args.dtype) if args.dtype != "auto" else (
        torch.bfloat16 if device.type == "cuda" else torch.float32)
    out = Path(args.out)
    progress = not args.quiet
    tokenizer = load_tokenizer(args.tokenizer or args.model)
    texts = read_calibration_texts(args.calib, args.num_samples, args.text_field)
    calibration = [{k: v.to(device) for k, v in batch.items()}
                   for batch in calibration_batches(texts, tokenizer, args.calib_batch_size, args.max_length)]
    windows = text_windows(args.eval_text, tokenizer, args.length).rows[: args.eval_windows].to(device)
    print(f"{len(texts)} calibration samples; {windows.shape[0]} held-out windows of {args.length} tokens")
    harness_tasks, harness_note = args.lm_eval_tasks, None
    if harness_tasks and not lm_eval_installed():
        print("lm-eval-harness is not installed: skipping --lm-eval-tasks (pip install lm-eval to run them)")
        harness_tasks, harness_note = None, "skipped: lm-eval is not installed"

    model = open_model(args.model, dtype=dtype).to(device)
    if model.config.model_type != "mixtral":
        print(f"note: {args.model} is a {model.config.model_type} model; this recipe was written for Mixtral")
    summary = {"recipe": "mixtral_one_shot", "model": args.model, "calibration": args.calib,
               "eval_text": args.eval_text, "settings": {
                   "num_groups": args.num_groups, "globally": args.globally, "similarity": args.similarity,
                   "rank": args.rank, "keep_ratio": args.keep_ratio, "importance": args.importance,
                   "calibration_samples": len(texts), "eval_windows": int(windows.shape[0]),
                   "window_length": args.length, "dtype": str(dtype).removeprefix("torch."),
                   "lm_eval_tasks": args.lm_eval_tasks, "lm_eval": harness_note},
               "stages": {}}

    def record(stage: str, checkpoint) -> None:
        entry = {"perplexity": perplexity(model, windows, args.eval_batch_size),
                 "expert_parameters": expert_parameters(model),
                 "parameters": sum(p.numel() for p in model.parameters()), "checkpoint": checkpoint}
        if checkpoint is not None:
            size = sum(f.stat().st_size for f in Path(checkpoint).glob("*.safetensors"))
            entry["checkpoint_mb"] = round(size / 1e6, 3)
        if harness_tasks:
            entry["lm_eval"] = harness_evaluate(model, tokenizer, harness_tasks, args.lm_eval_fewshot,
                                                args.lm_eval_limit, args.lm_eval_batch_size)
        full = summary["stages"].get("full", entry)["perplexity"]
        entry["perplexity_vs_full"] = entry["perplexity"] / full
        summary["stages"][stage] = entry
        write_json(out / "summary.json", summary)
        print(f"[{stage}] perplexity {entry['perplexity']:.3f} ({entry['perplexity_vs_full']:.3f}x the full model's); "
              f"expert parameters {entry['expert_parameters']:,}")

    out.mkdir(parents=True, exist_ok=True)
    record("full", None)

    # M-SMoE: routing statistics, group by router-logits similarity, align, frequency-weighted merge
    stats = collect_routing_stats(model, calibration, progress=progress)
    groupings = merge_experts(model, stats, args.num_groups, similarity=args.similarity, globally=args.globally,
                              permute=True, strategy="frequency", progress=progress)
    summary["settings"]["groups_per_layer"] = {name: g.num_groups for name, g in groupings.items()}
    save_pretrained(model, out / "merged", tokenizer=tokenizer)
    record("merged", str(out / "merged"))

    if args.compress:
        # MC-SMoE one shot: low-rank + sparse rows, rows ranked by |S| x the merged slots' input norms
        stats = collect_routing_stats(model, calibration, progress=progress,
                                      input_norms=True) if args.importance == "activation" else None
        compress_experts(model, rank=args.rank, keep_ratio=args.keep_ratio, importance=args.importance,
                         stats=stats, progress=progress)
        save_pretrained(model, out / "mcsmoe", tokenizer=tokenizer)
        record("mcsmoe", str(out / "mcsmoe"))

    print(f"{len(moe_layers(model))} MoE layers; summary: {out / 'summary.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
