"""lm-evaluation-harness tasks for causal LMs, when the user has `lm-eval` installed (an optional
extra: `pip install lm-eval`; never a hard dependency). The model is evaluated as it is in memory
(merged, compressed or optimized) through the harness' Hugging Face wrapper."""
from __future__ import annotations


def harness_evaluate(model, tokenizer, tasks: list[str], num_fewshot: int | None = None, limit: int | None = None,
                     batch_size: int = 8) -> dict[str, float]:
    """{"task/metric": value} for every numeric metric the harness reports on `tasks`."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
    except ImportError as exc:
        raise ValueError("lm-evaluation-harness tasks need the optional package lm-eval: pip install lm-eval") from exc
    if not tasks:
        raise ValueError("name at least one lm-eval task (e.g. hellaswag, arc_easy)")
    if getattr(model.config, "is_encoder_decoder", False):
        raise ValueError("lm-eval tasks run on causal LMs; for text-to-text models use --task")
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    output = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), num_fewshot=num_fewshot, limit=limit)
    flat = {}
    for task, metrics in output["results"].items():
        for name, value in metrics.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and "stderr" not in name:
                flat[f"{task}/{name.split(',')[0]}"] = float(value)
    return flat
