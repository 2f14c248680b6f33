"""The task registry: every task by name."""
from __future__ import annotations

from .base import Task
from .definitions import ALL_TASKS

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
