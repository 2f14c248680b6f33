"""The paper's downstream tasks as text-to-text: data, prompts, batches, metrics and evaluation.

    from mcsmoe_fast.tasks import get_task, load_task_data, calibration_batches, evaluate_task
    task = get_task("copa")
    examples = load_task_data(task, "validation")            # or path="copa_val.jsonl"
    print(evaluate_task(model, tokenizer, task, examples))   # {"accuracy": ...}

docs/tasks.md lists every task's hub dataset, columns, prompt, metrics, batch size and learning rate.
"""
from __future__ import annotations

from .base import CLASSIFICATION, GENERATIVE, Column, Task
from .batches import (IGNORE_INDEX, add_decoder_inputs, calibration_batches, encode_pairs, shift_right,
                      training_batches)
from .data import check_labelled, load_task_data, read_task_file
from .evaluate import check_examples, evaluate_task, predict_task, score_predictions
from .registry import TASKS, get_task

__all__ = [
    "CLASSIFICATION", "GENERATIVE", "Column", "Task", "TASKS", "get_task",
    "load_task_data", "read_task_file", "check_labelled",
    "IGNORE_INDEX", "encode_pairs", "add_decoder_inputs", "shift_right", "training_batches", "calibration_batches",
    "predict_task", "score_predictions", "evaluate_task", "check_examples",
]
