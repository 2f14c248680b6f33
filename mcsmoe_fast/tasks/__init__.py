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
from .data import load_task_data, read_task_file
from .definitions import ALL_TASKS
from .evaluate import evaluate_task, predict_task, score_predictions

TASKS: dict[str, Task] = {task.name: task for task in ALL_TASKS}


def _key(name: str) -> str:
    return name.lower().replace("-", "").replace("_", "").replace(" ", "")


def get_task(name: str | Task) -> Task:
    """The task called `name` (case, "-" and "_" ignored: "SST-2", "wiki_qa" and "hotpot_qa" work); a Task is
    returned as is. Unknown names raise a ValueError listing the known tasks."""
    if isinstance(name, Task):
        return name
    if isinstance(name, str):
        for task in ALL_TASKS:
            if _key(task.name) == _key(name):
                return task
    raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}")


__all__ = [
    "CLASSIFICATION", "GENERATIVE", "Column", "Task", "TASKS", "get_task",
    "load_task_data", "read_task_file",
    "IGNORE_INDEX", "encode_pairs", "add_decoder_inputs", "shift_right", "training_batches", "calibration_batches",
    "predict_task", "score_predictions", "evaluate_task",
]
