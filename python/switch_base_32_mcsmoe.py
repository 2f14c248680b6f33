"""MC-SMoE on switch-base-32 for one downstream task: fine-tune, merge (M-SMoE) + KD, compress (MC-SMoE) + KD.

What it reproduces: the paper's switch-base-32 pipeline (Li et al., "Merge, Then Compress", ICLR 2024; the
public recipe in UNITES-Lab/MC-SMoE), with the library's calls for every step:

1. "finetuned": fine-tune google/switch-base-32 on --task with the paper's batch size and learning rate
   for the task (docs/tasks.md), 20 epochs, warm-up 16; the best validation checkpoint is kept.
   With --finetune-steps 0, --model is taken as already fine-tuned.
2. "merged": M-SMoE, one shot. Routing statistics on 256 training examples (the decoder reads the
   targets), router-logits similarity, dominant experts by usage frequency, one global budget of
   8 groups per merged layer on average spread by usage (adaptive per-layer counts), each group's
   members aligned to its dominant expert (weight matching) and merged weighted by usage frequency.
   Merged: every MoE layer but the first encoder one (switch-base-32: encoder blocks 3,5,7,9,11 and
   decoder blocks 1,3,5,7,9,11).
3. "msmoe": the merged model recovered with knowledge distillation from the fine-tuned model (frozen
   routers; KL at T=2 weighted 0.2 plus the task loss), 10 epochs, warm-up 16.
4. "mcsmoe": the merged experts of the "msmoe" model compressed into rank-32 low-rank factors plus
   sparse rows, pruned during 50 epochs of KD from the same teacher: gradient importance with an EMA,
   no pruning for the first 50 steps, a cubic schedule down to 10% of S's rows kept, held there for
   the last 200 steps (the original's LoSparse schedule: 1x and 4x its 50 warm-up steps).

Every stage is evaluated on the task's validation split (training stages: their best checkpoint on
that split, as the original selected) and OUT/summary.json puts each stage's metrics, expert
parameters and checkpoint size next to the fine-tuned model's. Checkpoints: OUT/finetune/{best,latest},
OUT/merged, OUT/msmoe/{best,latest}, OUT/mcsmoe/{best,latest} (latest/ holds the optimizer state for
--resume; delete it once a run is done). Without --resume, an OUT whose stage directories hold a run is
refused before anything is written (summary.json and merged/ stay that run's).

Figures to compare with (fine-tuned switch-base-32, validation, percent, as the paper reports them):
SST-2 95.75, MRPC 90.20, MultiRC F1 76.19, COPA 68.0, WinoGrande 61.8, WikiQA 96.45,
HotpotQA EM/F1 67.55/84.60. The paper's claim for M-SMoE / MC-SMoE is "up to 80% memory and 20% FLOPs
reduction with virtually no loss in performance"; the reference files here give no per-task merged or
compressed figures, so summary.json compares each stage with this run's own fine-tuned model.
Our evaluation scores every answer choice by likelihood (docs/tasks.md), where the original took the
argmax of teacher-forced logits, so scores may differ slightly from the paper's for the same weights.

Expected resources (estimates, not measured here): switch-base-32 has ~2B parameters (8 GB in fp32).
Fine-tuning holds the model, its gradients and AdamW moments (~32 GB) plus activations; KD adds the
frozen teacher (8 GB): one 80 GB GPU (A100/H100), or several with `accelerate launch` (--batch-size is
per process, like the original's per_device_train_batch_size). Time grows with the training set:
minutes per stage for COPA (400 examples), up to about a day for SST-2 or MultiRC (50 compression
epochs over 67k / 27k examples). Disk: about 60 GB with every latest/ kept (8 GB per full checkpoint,
plus 16 GB of optimizer state in each latest/); the merged and compressed checkpoints are ~3 GB and less.
The data comes from the hub (nyu-mll/glue, aps/super_glue, ...) unless --data-dir has local files.

    python python/switch_base_32_mcsmoe.py --task copa --out runs/copa
    accelerate launch --multi_gpu --num_processes 4 python/switch_base_32_mcsmoe.py --task sst2 --out runs/sst2
    python python/switch_base_32_mcsmoe.py --model runs/copa/finetune/best --finetune-steps 0 --task copa \\
        --data-dir data/copa --out runs/copa-again      # data/copa/train.jsonl + validation.jsonl

Steps default to the paper's epochs over the training set (--finetune-steps, --merge-steps,
--compress-steps override them); --train-limit / --eval-limit cut the data for a quick run.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
from pathlib import Path

PAPER_FINETUNED = {  # the paper's fine-tuned switch-base-32 validation scores (percent)
    "sst2": "accuracy 95.75", "mrpc": "90.20", "multirc": "F1 76.19", "copa": "accuracy 68.0",
    "winogrande": "accuracy 61.8", "wikiqa": "96.45", "hotpotqa": "EM/F1 67.55/84.60",
}
EPOCHS = {"finetune": 20, "merge": 10, "compress": 50}  # the original's num_epochs per stage
WARMUP = {"finetune": 16, "merge": 16, "compress": 50}  # learning-rate warm-up steps per stage
RUN_DIRS = {"finetune": "finetune", "merge": "msmoe", "compress": "mcsmoe"}  # OUT/<dir>/{best,latest}
PRUNE_WARMUPS = (50, 200)  # LoSparse: no pruning for 1 x 50 steps, final keep ratio for the last 4 x 50
DATA_SUFFIXES = (".jsonl", ".json", ".csv")


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="google/switch-base-32", help="hub id or directory (default %(default)s)")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory or hub id (default: --model)")
    p.add_argument("--task", required=True, help="sst2, mrpc, multirc, copa, winogrande, squad, wikiqa, hotpotqa")
    p.add_argument("--data-dir", default=None,
                   help="local task files instead of the hub: DIR/train.jsonl and DIR/validation.jsonl "
                        "(.json/.csv too), in the hub dataset's columns (docs/tasks.md)")
    p.add_argument("--out", required=True, help="run directory: checkpoints of every stage and summary.json")
    p.add_argument("--finetune-steps", type=int, default=None,
                   help="fine-tuning steps (default: 20 epochs); 0: --model is already fine-tuned")
    p.add_argument("--merge-steps", type=int, default=None, help="KD steps after merging (default: 10 epochs)")
    p.add_argument("--compress-steps", type=int, default=None,
                   help="KD + pruning steps after compression (default: 50 epochs)")
    p.add_argument("--batch-size", type=int, default=None, help="per process (default: the task's, the paper's)")
    p.add_argument("--lr", type=float, default=None, help="learning rate (default: the task's, the paper's)")
    p.add_argument("--eval-every", type=int, default=100, help="steps between evaluations (default 100)")
    p.add_argument("--eval-batch-size", type=int, default=32)
    p.add_argument("--train-limit", type=int, default=None, help="use the first N training examples only")
    p.add_argument("--eval-limit", type=int, default=None, help="evaluate on the first N validation examples only")
    p.add_argument("--calib-samples", type=int, default=256, help="training examples for routing statistics")
    p.add_argument("--num-groups", type=int, default=8, help="average groups per merged layer (default 8)")
    p.add_argument("--layers", nargs="+", default=None,
                   help="MoE layers to merge and compress, names or positions (default: all but the first "
                        "encoder MoE layer)")
    p.add_argument("--rank", type=int, default=32, help="rank of the low-rank factors (default 32)")
    p.add_argument("--keep-ratio", type=float, default=0.1, help="final share of S's rows kept (default 0.1)")
    p.add_argument("--mixed-precision", choices=("no", "fp16", "bf16"), default="no", help="accelerate's")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue every stage's training from OUT/<stage>/latest")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p.parse_args([str(a) for a in argv] if argv is not None else None)


def task_files(data_dir) -> dict[str, Path | None]:
    """{"train": path, "validation": path} of DIR/<split>.jsonl|.json|.csv; None everywhere without DIR."""
    if data_dir is None:
        return {"train": None, "validation": None}
    found = {}
    for split in ("train", "validation"):
        paths = [Path(data_dir) / f"{split}{suffix}" for suffix in DATA_SUFFIXES]
        existing = [path for path in paths if path.is_file()]
        if not existing:
            raise FileNotFoundError(f"--data-dir {data_dir}: no {split} file ({', '.join(p.name for p in paths)})")
        found[split] = existing[0]
    return found


def check_options(args) -> None:
    """--batch-size and --lr, when given, are used as given: values out of range are refused by name (the
    step counts are derived from the batch size before TrainConfig sees it)."""
    if args.batch_size is not None and args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size} (leave it out for the task's)")
    if args.lr is not None and not args.lr > 0:
        raise ValueError(f"--lr must be > 0, got {args.lr} (leave it out for the task's)")


def load_examples(args, task, files: dict, tokenizer) -> tuple[list[dict], list[dict]]:
    """The training and validation examples (--data-dir's files, else the hub's splits), every one checked
    before any training: the first unlabelled one would otherwise stop a stage when a batch or the first
    evaluation reaches it, up to hours in."""
    from mcsmoe_fast.tasks import check_examples, check_labelled, load_task_data

    train = load_task_data(task, task.train_split, files["train"], args.train_limit)
    evaluation = load_task_data(task, task.eval_split, files["validation"], args.eval_limit)
    check_labelled(task, train, str(files["train"] or f"the hub's {task.train_split} split"), "training example")
    check_examples(task, tokenizer, evaluation, str(files["validation"] or f"the hub's {task.eval_split} split"))
    return train, evaluation


def default_steps(given: int | None, stage: str, num_train: int, batch_size: int, processes: int) -> int:
    if given is not None:
        return given
    return EPOCHS[stage] * max(1, num_train // (batch_size * processes))


def merged_layer_names(model, layers) -> list[str]:
    """Names of the MoE layers to merge: `layers` (names or positions), by default all but the first encoder one."""
    from mcsmoe_fast import moe_layers

    names = [layer.name for layer in moe_layers(model)]
    if layers is None:
        if not names[0].startswith("encoder."):
            raise ValueError(f"expected the first MoE layer to be an encoder layer, got {names[0]!r}")
        return names[1:]
    chosen = [names[int(x)] if x.lstrip("-").isdigit() else x for x in layers]
    unknown = [name for name in chosen if name not in names]
    if unknown:
        raise ValueError(f"--layers: no MoE layer {unknown}; the model's: {', '.join(names)}")
    return chosen


def prune_warmups(steps: int) -> tuple[int, int]:
    """The original's pruning warm-ups, scaled down to half of a run shorter than both together."""
    initial, final = PRUNE_WARMUPS
    if initial + final >= steps:
        initial, final = initial * steps // (2 * (initial + final)), final * steps // (2 * (initial + final))
    return initial, final


def stage_checkpoint(run_dir: Path) -> Path:
    """The checkpoint a training stage hands on: its best (by the task's metric), else its latest."""
    return run_dir / "best" if (run_dir / "best" / "config.json").exists() else run_dir / "latest"


def describe(model, metrics: dict, checkpoint, steps: int) -> dict:
    from mcsmoe_fast.demo.measure import expert_parameters

    path = Path(checkpoint)
    size = sum(f.stat().st_size for f in path.glob("*.safetensors")) if path.is_dir() else None
    return {"metrics": metrics, "checkpoint": str(checkpoint), "steps": steps,
            "expert_parameters": expert_parameters(model), "parameters": sum(p.numel() for p in model.parameters()),
            "checkpoint_mb": None if size is None else round(size / 1e6, 3)}


def compare(stages: dict, metric_names) -> None:
    """Each stage's metrics minus the fine-tuned model's, in place (key "vs_finetuned")."""
    base = stages.get("finetuned", {}).get("metrics", {})
    for record in stages.values():
        record["vs_finetuned"] = {m: record["metrics"][m] - base[m] for m in metric_names
                                  if m in base and m in record["metrics"]}


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def run(args) -> int:
    from accelerate import PartialState

    from mcsmoe_fast import (collect_routing_stats, compress_experts, from_pretrained, load_tokenizer,
                             merge_experts, open_model, save_pretrained)
    from mcsmoe_fast.tasks import calibration_batches, encode_pairs, evaluate_task, get_task
    from mcsmoe_fast.train import TrainConfig, train
    from mcsmoe_fast.train.loop import check_output_dir

    check_options(args)
    state = PartialState()
    say = print if state.is_main_process else (lambda *a, **k: None)
    task = get_task(args.task)
    out = Path(args.out)
    files = task_files(args.data_dir)
    tokenizer = load_tokenizer(args.tokenizer or args.model)
    train_examples, eval_examples = load_examples(args, task, files, tokenizer)
    batch_size = task.batch_size if args.batch_size is None else args.batch_size
    lr = task.learning_rate if args.lr is None else args.lr
    steps = {stage: default_steps(given, stage, len(train_examples), batch_size, state.num_processes)
             for stage, given in (("finetune", args.finetune_steps), ("merge", args.merge_steps),
                                  ("compress", args.compress_steps))}
    say(f"{task.name}: {len(train_examples)} training, {len(eval_examples)} validation examples; batch size "
        f"{batch_size} x {state.num_processes} process(es), lr {lr}; steps {steps}")

    def evaluate(model, progress=False) -> dict:
        return evaluate_task(model, tokenizer, task, eval_examples, batch_size=args.eval_batch_size,
                             progress=progress)

    initial, final = prune_warmups(steps["compress"])
    settings = {"finetune": {}, "merge": {}, "compress": {"keep_ratio": args.keep_ratio,
                                                          "prune_initial_warmup": initial, "prune_final_warmup": final}}
    configs = {stage: TrainConfig(steps=steps[stage], batch_size=batch_size, learning_rate=lr,
                                  warmup_steps=WARMUP[stage], eval_every=args.eval_every, metric=task.primary_metric,
                                  greater_is_better=True, mixed_precision=args.mixed_precision, seed=args.seed,
                                  **settings[stage])
               for stage in (RUN_DIRS if steps["finetune"] > 0 else ("merge", "compress"))}
    for stage, config in configs.items():  # before anything is written (summary.json, merged/ come before msmoe/)
        check_output_dir(out / RUN_DIRS[stage], config, args.resume, names=("--out", "--resume"))

    def fit(model, stage: str, teacher=None):
        run_dir = out / RUN_DIRS[stage]
        train(model, train_examples, configs[stage], teacher=teacher, output_dir=run_dir, resume=args.resume,
              collate_fn=lambda rows: encode_pairs(tokenizer, [task.to_text(r) for r in rows]),
              eval_fn=evaluate, progress=not args.quiet, tokenizer=tokenizer)
        return stage_checkpoint(run_dir)

    summary = {"recipe": "switch_base_32_mcsmoe", "model": args.model, "task": task.name,
               "metric": task.primary_metric, "paper_finetuned": PAPER_FINETUNED.get(task.name),
               "settings": {"batch_size": batch_size, "learning_rate": lr, "steps": steps,
                            "num_groups": args.num_groups, "rank": args.rank, "keep_ratio": args.keep_ratio,
                            "calibration_examples": args.calib_samples,
                            "train_examples": len(train_examples), "eval_examples": len(eval_examples)},
               "stages": {}}

    def record(stage: str, model, checkpoint, stage_steps: int) -> None:
        metrics = evaluate(model, progress=not args.quiet)
        summary["stages"][stage] = describe(model, metrics, checkpoint, stage_steps)
        compare(summary["stages"], task.metrics)
        say(f"[{stage}] " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()) + f"  ({checkpoint})")
        if state.is_main_process:
            write_json(out / "summary.json", summary)

    out.mkdir(parents=True, exist_ok=True)
    # 1. the fine-tuned full model: the teacher of both KD stages
    if steps["finetune"] > 0:
        say("== fine-tuning")
        finetuned = fit(open_model(args.model), "finetune")
    else:
        finetuned = args.model
    teacher = open_model(str(finetuned)).to(state.device)
    if teacher.config.model_type != "switch_transformers":
        raise ValueError(f"{args.model} is a {teacher.config.model_type} model; this recipe is for Switch Transformers")
    layers = merged_layer_names(teacher, args.layers)
    summary["settings"]["merged_layers"] = layers
    record("finetuned", teacher, finetuned, steps["finetune"])

    # 2. M-SMoE: routing statistics on training examples, group, align, merge
    say(f"== merging {len(layers)} MoE layers into {args.num_groups} groups each on average")
    student = copy.deepcopy(teacher)
    calibration = calibration_batches(task, tokenizer, n=args.calib_samples, examples=train_examples,
                                      decoder_start_token_id=student.config.decoder_start_token_id)
    calibration = [{k: v.to(state.device) for k, v in batch.items()} for batch in calibration]
    stats = collect_routing_stats(student, calibration, progress=not args.quiet)
    groupings = merge_experts(student, stats, args.num_groups, similarity="router-logits", globally=True,
                              permute=True, strategy="frequency", layers=layers, progress=not args.quiet)
    summary["settings"]["groups_per_layer"] = {name: g.num_groups for name, g in groupings.items()}
    if state.is_main_process:
        save_pretrained(student, out / "merged", tokenizer=tokenizer)
    state.wait_for_everyone()
    record("merged", student, out / "merged", 0)

    # 3. KD recovery of the merged model
    say("== KD recovery of the merged model")
    msmoe = fit(student, "merge", teacher=teacher)
    del student
    student = from_pretrained(msmoe).to(state.device)
    record("msmoe", student, msmoe, steps["merge"])

    # 4. MC-SMoE: compress the merged experts, prune S's rows during KD
    say(f"== compressing: rank {args.rank}, keeping {args.keep_ratio:.0%} of the sparse rows")
    compress_experts(student, rank=args.rank, keep_ratio=args.keep_ratio, layers=layers, importance="gradient",
                     progress=not args.quiet)
    mcsmoe = fit(student, "compress", teacher=teacher)
    del student
    student = from_pretrained(mcsmoe).to(state.device)
    record("mcsmoe", student, mcsmoe, steps["compress"])

    say(f"\n{'stage':<10} {task.primary_metric:>10} {'vs finetuned':>13} {'expert params':>14} {'MB':>9}")
    for name, r in summary["stages"].items():
        mb = f"{r['checkpoint_mb']:.1f}" if r["checkpoint_mb"] is not None else "-"
        say(f"{name:<10} {r['metrics'][task.primary_metric]:>10.4f} "
            f"{r['vs_finetuned'].get(task.primary_metric, 0.0):>+13.4f} {r['expert_parameters']:>14,} {mb:>9}")
    say(f"summary: {out / 'summary.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
