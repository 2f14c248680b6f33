"""mcsmoe-fast finetune: fine-tune a model on a task or text, or recover a merged/compressed one with
knowledge distillation from its full model (--teacher). With --rank it runs the paper's MC-SMoE recipe:
decompose the merged experts into low-rank factors plus sparse rows, prune the rows during training on
the cubic schedule down to --keep-ratio, and save the finalized (compact) model."""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from .common import first_given, refuse_overwriting_input, subcommand
from .data_options import add_data_options, resolve_data


def add(sub):
    p = subcommand(
        sub, "finetune", "fine-tune on a task or text; with --teacher, KD recovery of a merged or compressed model",
        "mcsmoe-fast finetune --model ./switch-merged --teacher ./switch-aligned --task copa "
        "--data copa_train.jsonl --eval-data copa_val.jsonl --steps 500 --out ./runs/copa-kd")
    p.add_argument("--model", required=True, help="the model to train (plain, merged or compressed) or hub id")
    p.add_argument("--out", required=True, help="run directory: best/ and latest/ checkpoints (not --model)")
    p.add_argument("--teacher", default=None, help="KD recovery: the full model the student was merged from")
    add_data_options(p, training=True)
    p.add_argument("--steps", type=int, default=1000, help="optimizer steps (default 1000)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="per process (N processes: a global batch of N x this); default: the task's (paper) batch "
                        "size, else 16")
    p.add_argument("--lr", type=float, default=None, help="learning rate; default: the task's (paper), else 1e-4")
    p.add_argument("--warmup-steps", type=int, default=16, help="linear warm-up steps (default 16)")
    p.add_argument("--eval-every", type=int, default=100, help="steps between evaluations and checkpoints (default 100)")
    p.add_argument("--kd-lambda", type=float, default=None, help="with --teacher: weight of the KL term (default 0.2)")
    p.add_argument("--temperature", type=float, default=None, help="with --teacher: KD temperature (default 2)")
    p.add_argument("--hd-lambda", type=float, default=None,
                   help="with --teacher: weight of the hidden-state log-MSE term (default 0)")
    p.add_argument("--rank", type=int, default=None,
                   help="MC-SMoE: decompose the experts at this rank first and prune their sparse rows during "
                        "training (the paper's recipe; without it the model is trained as it is)")
    p.add_argument("--keep-ratio", type=float, default=None,
                   help="with --rank: final share of the sparse entries kept, one global threshold (default 0.1)")
    p.add_argument("--prune-initial-warmup", type=int, default=None,
                   help="with --rank: steps before the first row is pruned (default: --warmup-steps)")
    p.add_argument("--prune-final-warmup", type=int, default=None,
                   help="with --rank: last steps held at --keep-ratio (default: 4 x --warmup-steps)")
    p.add_argument("--train-routers", action="store_true",
                   help="train the routers too (default: frozen, as the paper does for fine-tuning and KD)")
    p.add_argument("--mixed-precision", choices=("no", "fp16", "bf16"), default="no",
                   help="accelerate's (fp16 needs a GPU: accelerate has no fp16 autocast or loss scaler on a CPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its latest checkpoint, with its settings (--steps and "
                        "--eval-every may change); without it, an --out that holds a run is refused")
    p.set_defaults(run=run)
    return p


def run(args) -> int:
    from ..calibration_data import load_tokenizer
    from ..checkpoint.atomic import check_writable_place
    from ..checkpoint.run_lock import run_lock
    from ..compress import CompressOptions
    from ..train import TrainConfig

    refuse_overwriting_input(args, checkpoint=False)  # --out holds the run's best/ and latest/
    if args.teacher is not None:
        refuse_overwriting_input(argparse.Namespace(model=args.teacher, out=args.out), checkpoint=False)
    kd = {"kd_lambda": args.kd_lambda, "temperature": args.temperature, "hd_lambda": args.hd_lambda}
    if args.teacher is None and any(v is not None for v in kd.values()):
        given = ", ".join("--" + k.replace("_", "-") for k, v in kd.items() if v is not None)
        raise ValueError(f"{given} weigh the distillation from --teacher: give --teacher or drop them")
    tokenizer = load_tokenizer(args.tokenizer or args.model)
    data = resolve_data(args, tokenizer, training=True)
    config = TrainConfig(
        steps=args.steps, batch_size=first_given(args.batch_size, data.batch_size, 16),
        learning_rate=first_given(args.lr, data.learning_rate, 1e-4), warmup_steps=args.warmup_steps,
        eval_every=args.eval_every, **{k: v for k, v in kd.items() if v is not None},
        metric=data.metric, greater_is_better=data.greater_is_better,
        keep_ratio=CompressOptions.keep_ratio if args.keep_ratio is None else args.keep_ratio,
        prune_initial_warmup=args.prune_initial_warmup,
        prune_final_warmup=args.prune_final_warmup, train_routers=args.train_routers,
        mixed_precision=args.mixed_precision, seed=args.seed)
    check_writable_place(Path(args.out).expanduser() / "latest")  # before the lock creates --out
    with run_lock(args.out):  # one run at a time in --out: refused before the model is loaded
        return _train(args, data, config, tokenizer)


def _train(args, data, config, tokenizer) -> int:
    from ..checkpoint.source_stamp import done_reading_inputs
    from ..loading import open_model
    from ..train import train
    from ..train.loop import check_output_dir
    from ..train.text import refuse_encoder_decoder

    check_output_dir(args.out, config, args.resume, distilling=args.teacher is not None,
                     names=("--out", "--resume", "--teacher"))
    if args.resume:
        check_resumed_rank(args.out, args.rank)
    model = open_model(args.model)
    if data.metric == "perplexity":  # --text trains a causal LM: refused for an encoder-decoder before any step
        refuse_encoder_decoder(model)
    decompose_for_pruning(model, args, config)
    teacher = open_model(args.teacher) if args.teacher else None
    done_reading_inputs()  # a change to the inputs during training no longer reaches the run
    try:
        result = train(model, data.train, config, collate_fn=data.collate, eval_fn=data.evaluate, teacher=teacher,
                       output_dir=args.out, resume=args.resume, tokenizer=tokenizer)
    except FloatingPointError as exc:  # a non-finite loss: one line, as the other refusals
        raise ValueError(str(exc)) from None
    if os.environ.get("RANK", "0") != "0":  # one summary for a run of N processes
        return 0
    last = result.history[-1] if result.history else {}
    print(f"trained to step {result.step}; last {data.metric} {last.get(data.metric, float('nan')):.4f}; "
          f"best {result.best_metric} at step {result.best_step}")
    print(f"checkpoints: {args.out}/best (best {data.metric}), {args.out}/latest (resumable)")
    return 0


def check_resumed_rank(out, rank: int | None) -> None:
    """Refuse resuming the run in `out` with another --rank than it was started with: its latest/ holds the pruner's
    state when the run pruned rows (--rank), and its compression section the rank the experts were decomposed at."""
    import json

    from ..sections import COMPRESS_SECTION, compression_methods
    from ..train.loop import LATEST
    from ..train.state import read_progress

    latest = Path(out) / LATEST
    if not (latest / "config.json").exists():
        return  # nothing to resume: the run starts
    pruned = "pruner" in read_progress(latest)
    section = json.loads((latest / "config.json").read_text(encoding="utf-8")).get(COMPRESS_SECTION) or {}
    ranks = sorted({m["rank"] for m in compression_methods(section).values() if m and "rank" in m})
    if pruned and rank is None:
        raise ValueError(f"resume: {latest} holds a run that pruned experts decomposed with --rank "
                         f"{', '.join(map(str, ranks)) or '?'}: give the same --rank")
    if not pruned and rank is not None:
        raise ValueError(f"resume: {latest} holds a run without --rank (no rows pruned): drop --rank {rank}")
    if pruned and ranks and ranks != [rank]:
        raise ValueError(f"resume: {latest} holds a run decomposed with --rank {', '.join(map(str, ranks))}, not "
                         f"{rank}: give the same --rank")


def decompose_for_pruning(model, args, config) -> None:
    """--rank: compress the experts with every sparse row kept, for the pruner to prune during training.
    Pruning options without --rank are refused: a saved compressed model is already finalized, so they
    would do nothing."""
    from ..compress import compress_experts

    if args.rank is not None:
        compress_experts(model, rank=args.rank, keep_ratio=config.keep_ratio, importance="gradient",
                         progress=False)
        return
    given = [f"--{name.replace('_', '-')}" for name in ("keep_ratio", "prune_initial_warmup", "prune_final_warmup")
             if getattr(args, name) is not None]
    if given:
        raise ValueError(f"{', '.join(given)} only apply when rows are pruned during training: pass --rank R to "
                         "decompose the merged experts and prune them on the paper's schedule")
