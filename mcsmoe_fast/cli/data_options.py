"""What finetune and eval train or evaluate on: a text-to-text task (`--task`, hub dataset or local
files) or plain text for a causal LM (`--text`, perplexity)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


def add_data_options(p, training: bool) -> None:
    p.add_argument("--task", default=None, help="a text-to-text task: sst2, mrpc, multirc, copa, winogrande, squad, "
                                                "wikiqa, hotpotqa (see docs/tasks.md)")
    if training:
        p.add_argument("--data", default=None, help="local training file of --task (.jsonl/.json/.csv; default: "
                                                    "the hub dataset's training split)")
    p.add_argument("--eval-data", default=None,
                   help="local evaluation file of --task (default: the hub dataset's validation split)")
    p.add_argument("--eval-limit", type=int, default=None,
                   help="evaluate on the first N examples only (with --eval-text: the first N perplexity windows)")
    if training:
        p.add_argument("--text", default=None, help="causal LM: a UTF-8 text file to train on")
    p.add_argument("--eval-text", default=None, help="causal LM: a UTF-8 text file to measure perplexity on")
    p.add_argument("--length", type=int, default=None, help="causal LM: tokens per window (default 256)")
    if not training:
        p.add_argument("--lm-eval", nargs="+", default=None, metavar="TASK",
                       help="causal LM: lm-evaluation-harness tasks, space- or comma-separated (needs the optional "
                            "package lm-eval)")
        p.add_argument("--num-fewshot", type=int, default=None, help="--lm-eval: few-shot examples per task")
        p.add_argument("--lm-eval-include", default=None, metavar="DIR",
                       help="--lm-eval: a directory of your own task YAML files (lm-eval's include_path)")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the model directory)")


@dataclass
class Data:
    train: object | None  # a dataset for train(), None for eval
    collate: Callable | None
    evaluate: Callable  # model -> {metric: value}
    metric: str
    greater_is_better: bool
    batch_size: int | None  # the task's (paper) default, None for text
    learning_rate: float | None


def resolve_data(args, tokenizer, training: bool) -> Data:
    text = getattr(args, "text", None)
    harness = getattr(args, "lm_eval", None)
    if args.eval_limit is not None and args.eval_limit < 1:
        raise ValueError(f"--eval-limit must be >= 1, got {args.eval_limit}")
    if [args.task is not None, text is not None or args.eval_text is not None, harness is not None].count(True) != 1:
        raise ValueError("give either --task (a text-to-text task) or --text/--eval-text (causal LM perplexity)"
                         + ("" if training else " or --lm-eval TASK..."))
    _refuse_stray_options(args, harness is not None)
    if harness is not None:
        return _harness_data(args, tokenizer)
    if args.task is not None:
        return _task_data(args, tokenizer, training)
    return _text_data(args, tokenizer, training)


def _refuse_stray_options(args, harness: bool) -> None:
    """Options of another kind of evaluation than the one chosen would be ignored: refused by name instead."""
    harness_only = (("--num-fewshot", "num_fewshot"), ("--lm-eval-include", "lm_eval_include"))
    stray = [] if harness else [f for f, k in harness_only if getattr(args, k, None) is not None]
    if stray:
        raise ValueError(f"{', '.join(stray)} need --lm-eval TASKS")
    stray = [] if args.task is not None else [f for f, k in (("--data", "data"), ("--eval-data", "eval_data"))
                                              if getattr(args, k, None) is not None]
    if stray:
        raise ValueError(f"{', '.join(stray)} are files of a --task; the evaluation chosen reads none")
    text = getattr(args, "text", None) is not None or args.eval_text is not None
    if args.length is not None and not text:
        raise ValueError("--length is the window of --text or --eval-text (causal LM perplexity); the evaluation "
                         "chosen reads no text windows: drop it")


def _vocab_size(args) -> int | None:
    """The --model's vocabulary size (None without --model: the texts are not checked)."""
    from .common import vocab_size

    return vocab_size(args.model) if getattr(args, "model", None) else None


def _task_data(args, tokenizer, training: bool) -> Data:
    from ..tasks import check_examples, check_labelled, encode_pairs, evaluate_task, get_task, load_task_data
    from ..tasks.evaluate import check_task_vocabulary

    task = get_task(args.task)
    examples = load_task_data(task, task.eval_split, args.eval_data, args.eval_limit)
    train = load_task_data(task, task.train_split, args.data) if training else None
    vocab_size = _vocab_size(args)
    if training:  # every example usable: fail before the model is loaded and trained, not when a run reaches it
        where = args.data or f"the hub's {task.train_split} split"
        check_labelled(task, train, where, "training example")
        check_task_vocabulary(task, tokenizer, train, vocab_size, where)
    where = args.eval_data or f"the hub's {task.eval_split} split"
    check_examples(task, tokenizer, examples, where)
    check_task_vocabulary(task, tokenizer, examples, vocab_size, where)
    return Data(
        train=train,
        collate=lambda rows: encode_pairs(tokenizer, [task.to_text(r) for r in rows]),
        evaluate=lambda model: evaluate_task(model, tokenizer, task, examples, progress=False),
        metric=task.primary_metric, greater_is_better=True, batch_size=task.batch_size,
        learning_rate=task.learning_rate,
    )


def _text_data(args, tokenizer, training: bool) -> Data:
    from ..train.text import lm_batch, perplexity, text_windows

    if training and args.text is None:
        raise ValueError("--text (the training text) is needed with --eval-text")
    eval_path = args.eval_text or getattr(args, "text", None)
    length = 256 if args.length is None else args.length
    vocab_size = _vocab_size(args)
    held_out = text_windows(eval_path, tokenizer, length, vocab_size).rows
    if args.eval_limit is not None:
        held_out = held_out[: args.eval_limit]
    return Data(
        train=text_windows(args.text, tokenizer, length, vocab_size) if training else None,
        collate=lm_batch, evaluate=lambda model: {"perplexity": perplexity(model, held_out)},
        metric="perplexity", greater_is_better=False, batch_size=None, learning_rate=None,
    )


def _harness_data(args, tokenizer) -> Data:
    from ..tasks import harness

    tasks = harness.check_tasks(args.lm_eval, args.lm_eval_include)  # before the model is loaded
    return Data(train=None, collate=None, metric="", greater_is_better=True, batch_size=None, learning_rate=None,
                evaluate=lambda model: harness.harness_evaluate(model, tokenizer, tasks, args.num_fewshot,
                                                                args.eval_limit, include_path=args.lm_eval_include))
