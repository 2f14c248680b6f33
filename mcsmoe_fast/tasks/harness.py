"""lm-evaluation-harness tasks for causal LMs, when the user has `lm-eval` installed (an optional
extra: `pip install lm-eval`; never a hard dependency). The model is evaluated as it is in memory
(merged, compressed or optimized) through the harness' Hugging Face wrapper. `include_path` is a
directory of the user's own task YAML files (the harness' include_path), e.g. a task over local data."""
from __future__ import annotations

import copy

from ..hooks import eval_mode


def _task_manager(include_path=None):
    try:
        from lm_eval.tasks import TaskManager
    except ImportError as exc:
        raise ValueError("lm-evaluation-harness tasks need the optional package lm-eval: pip install lm-eval") from exc
    return TaskManager(include_path=None if include_path is None else str(include_path))


def check_tasks(tasks: list[str], include_path=None) -> list[str]:
    """The task names in `tasks` (an entry may hold several, comma-separated: "arc_easy,hellaswag") if
    lm-eval is installed and knows every one of them (with the YAML files in include_path); ValueError naming
    the unknown ones otherwise. Checked before any work, so a typo costs no calibration."""
    tasks = [name.strip() for entry in tasks for name in entry.split(",") if name.strip()]
    if not tasks:
        raise ValueError("name at least one lm-eval task (e.g. hellaswag, arc_easy)")
    known = set(_task_manager(include_path).all_tasks)
    unknown = [t for t in tasks if t not in known]
    if unknown:
        where = f" (nor in {include_path})" if include_path is not None else ""
        raise ValueError(f"lm-eval does not know the task(s) {unknown}{where}; `lm_eval ls tasks` lists them")
    return list(tasks)


def harness_evaluate(model, tokenizer, tasks: list[str], num_fewshot: int | None = None, limit: int | None = None,
                     batch_size: int = 8, include_path=None) -> dict[str, float]:
    """{"task/metric": value} for every numeric metric the harness reports on `tasks`. The model runs in eval
    mode and comes back with every module's training flag as it was; the harness reads a copy of the
    tokenizer (it gives a tokenizer without a pad token one), so the caller's is left as it was."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
    except ImportError as exc:
        raise ValueError("lm-evaluation-harness tasks need the optional package lm-eval: pip install lm-eval") from exc
    if isinstance(batch_size, int) and batch_size < 1:  # lm-eval would run every request as one batch
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if limit is not None and limit <= 0:
        raise ValueError(f"limit must be > 0 (examples per task, or a fraction of them below 1), got {limit}")
    if not tasks:
        raise ValueError("name at least one lm-eval task (e.g. hellaswag, arc_easy)")
    if getattr(model.config, "is_encoder_decoder", False):
        raise ValueError("lm-eval tasks run on causal LMs; for text-to-text models use --task")
    extra = {} if include_path is None else {"task_manager": _task_manager(include_path)}
    with eval_mode(model):  # HFLM calls model.eval() and never puts the flags back
        lm = HFLM(pretrained=model, tokenizer=copy.deepcopy(tokenizer), batch_size=batch_size)
        output = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), num_fewshot=num_fewshot, limit=limit, **extra)
    flat = {}
    for task, metrics in output["results"].items():
        for name, value in metrics.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and "stderr" not in name:
                metric, _, kept_by = name.partition(",")  # lm-eval's "metric,filter"
                flat[f"{task}/{metric}" if kept_by in ("", "none") else f"{task}/{name}"] = float(value)
    return flat
