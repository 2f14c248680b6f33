"""Evaluating an encoder-decoder model (Switch Transformers, T5) on a task.

Classification tasks are scored by likelihood by default: every answer choice of an example (its label
words, or COPA's two alternatives) is scored as the sum of its tokens' log-probabilities (EOS included)
given the prompt, and the most likely choice is the prediction, so a model always answers with a valid
label. The encoder runs once per example; only the short decoder runs once per choice. Choices whose token
ids are the same (cut to max_target_length, or words the tokenizer does not know) are refused before the
model runs: a score cannot tell them apart. With label_scoring=False they are generated instead, like the
generative tasks.

Generative tasks (SQuAD, HotpotQA) and label_scoring=False: greedy decoding (model.generate, one beam, no
sampling, max_new_tokens), decoded without special tokens and stripped.

The original evaluated differently: it took the argmax of the teacher-forced logits (the decoder fed the
gold target), cut at the first EOS, and replaced answers outside the label set by a random label. Both
of ours read only the model's own outputs; a generated answer outside the choices is simply wrong.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from ..calibration_data import backend_settings_kept
from ..hooks import eval_mode
from .base import Task
from .registry import get_task
from .batches import IGNORE_INDEX, check_lengths, pad_labels, shift_right, target_token_ids
from .data import check_labelled
from .metrics import accuracy, binary_f1, multirc_scores, squad_scores


def _device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def _special_id(model, tokenizer, name: str) -> int:
    value = getattr(model.config, name, None)
    if value is None:
        value = getattr(tokenizer, name, None)
    if value is None:
        raise ValueError(f"neither the model config nor the tokenizer defines {name}")
    return int(value)


def _encode(tokenizer, sources: list[str], max_source_length: int):
    """The prompts padded on the right and cut to max_source_length; the tokenizer keeps the padding and
    truncation it had (a fast tokenizer would keep these, and a tokenizer saved after an evaluation cut every
    input)."""
    with backend_settings_kept(tokenizer):
        return tokenizer(sources, padding=True, padding_side="right", truncation=True, max_length=max_source_length,
                         return_tensors="pt", return_token_type_ids=False)


@torch.no_grad()
def _score_choices(model, tokenizer, sources: list[str], choices: list[tuple[str, ...]], max_source_length: int,
                   max_target_length: int) -> list[str]:
    device = _device(model)
    enc = _encode(tokenizer, sources, max_source_length).to(device)
    encoder_out = model.get_encoder()(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                                      return_dict=True)
    rows = torch.tensor([i for i, options in enumerate(choices) for _ in options], device=device)
    labels = pad_labels(target_token_ids(tokenizer, [c for options in choices for c in options],
                                         max_target_length)).to(device)
    start = _special_id(model, tokenizer, "decoder_start_token_id")
    pad = _special_id(model, tokenizer, "pad_token_id")
    out = model(encoder_outputs=type(encoder_out)(last_hidden_state=encoder_out.last_hidden_state[rows]),
                attention_mask=enc["attention_mask"][rows], decoder_input_ids=shift_right(labels, start, pad),
                return_dict=True)
    logprobs = torch.log_softmax(out.logits.float(), dim=-1)
    real = labels != IGNORE_INDEX
    token_scores = logprobs.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    scores = torch.where(real, token_scores, 0.0).sum(-1).tolist()
    predictions, at = [], 0
    for options in choices:
        best = max(range(len(options)), key=lambda j: scores[at + j])  # first choice on ties
        predictions.append(options[best])
        at += len(options)
    return predictions


def _check_choices_differ(tokenizer, task: Task, examples: Sequence[Mapping], max_target_length: int,
                          where: str = "") -> None:
    """Every example's choices have different token ids, or the label scoring could only answer the first.
    `where` (a file, ending in ": ") starts the message."""
    first: dict[tuple[str, ...], int] = {}  # each distinct set of choices, at the first example that has it
    for i, example in enumerate(examples):
        first.setdefault(task.choices(example), i)
    rows = iter(target_token_ids(tokenizer, [c for options in first for c in options], max_target_length))
    for options, i in first.items():
        ids = [next(rows) for _ in options]
        same = next(((j, k) for k in range(len(ids)) for j in range(k) if ids[j] == ids[k]), None)
        if same is not None:
            j, k = same
            raise ValueError(f"{where}{task.name} example {i}: the choices {options[j]!r}, {options[k]!r} have the "
                             f"same token ids {ids[j]} (cut to max_target_length={max_target_length}), so label "
                             "scoring cannot tell them apart: raise max_target_length, use a tokenizer that knows "
                             "these words, or generate the answers (label_scoring=False)")


@torch.no_grad()
def _generate(model, tokenizer, sources: list[str], max_source_length: int, max_new_tokens: int) -> list[str]:
    enc = _encode(tokenizer, sources, max_source_length).to(_device(model))
    out = model.generate(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], do_sample=False,
                         num_beams=1, max_new_tokens=max_new_tokens)
    return [text.strip() for text in tokenizer.batch_decode(out, skip_special_tokens=True)]


def predict_task(model, tokenizer, task: Task | str, examples: Sequence[Mapping], batch_size: int = 32,
                 max_new_tokens: int | None = None, max_source_length: int = 512, max_target_length: int = 128,
                 label_scoring: bool = True, progress: bool = True) -> list[str]:
    """The model's answer to every example, in order (see the module docstring for how; no examples: no
    answers). Examples are run longest prompt first so batches pad little; max_new_tokens defaults to
    task.max_new_tokens."""
    from tqdm.auto import tqdm

    task = get_task(task)
    if not getattr(model.config, "is_encoder_decoder", False):
        raise ValueError(f"the {task.name} task evaluates an encoder-decoder model (Switch Transformers, T5); "
                         f"{type(model).__name__} is not one (a causal LM's generate would return the prompt "
                         "with its answer): use perplexity (--eval-text) or lm-eval (--lm-eval) for causal LMs")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if max_new_tokens is not None and max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    check_lengths(max_source_length, max_target_length)
    if not examples:
        return []
    if task.is_classification and label_scoring:
        _check_choices_differ(tokenizer, task, examples, max_target_length)
    sources = [task.source(ex) for ex in examples]
    order = sorted(range(len(sources)), key=lambda i: -len(sources[i]))
    predictions: list[str | None] = [None] * len(sources)
    with eval_mode(model), tqdm(total=len(sources), desc=f"evaluate {task.name}", disable=not progress) as bar:
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            texts = [sources[i] for i in chunk]
            if task.is_classification and label_scoring:
                answers = _score_choices(model, tokenizer, texts, [task.choices(examples[i]) for i in chunk],
                                         max_source_length, max_target_length)
            else:
                answers = _generate(model, tokenizer, texts, max_source_length,
                                    max_new_tokens or task.max_new_tokens)
            for i, answer in zip(chunk, answers):
                predictions[i] = answer
            bar.update(len(chunk))
    return predictions


def _multirc_question(example: Mapping):
    idx = example.get("idx")
    if isinstance(idx, Mapping) and "paragraph" in idx and "question" in idx:
        return ("idx", idx["paragraph"], idx["question"])
    return ("text", example["paragraph"], example["question"])


def score_predictions(task: Task | str, predictions: Sequence[str], examples: Sequence[Mapping]) -> dict[str, float]:
    """The task's metrics (task.metrics, fractions in [0, 1]) of predicted answer strings against the
    examples' gold answers. Classification: a prediction outside the example's choices is wrong (and
    counts as not-positive for F1). Generative: SQuAD-style exact match and token F1, best over all golds."""
    task = get_task(task)
    if len(predictions) != len(examples):
        raise ValueError(f"{len(predictions)} predictions for {len(examples)} examples")
    if not task.is_classification:
        return squad_scores([p.strip() for p in predictions], [task.references(ex) for ex in examples])
    golds = [task.to_text(ex)[1] for ex in examples]
    predictions = [p.strip() for p in predictions]
    results: dict[str, float] = {}
    if "f1_m" in task.metrics:  # MultiRC: f1_a, f1_m and exact_match over its questions
        results.update(multirc_scores(predictions, golds, [_multirc_question(ex) for ex in examples],
                                      positive=task.positive_label))
    if "accuracy" in task.metrics:
        results["accuracy"] = accuracy(predictions, golds)
    if "f1" in task.metrics:
        results["f1"] = binary_f1(predictions, golds, task.positive_label)
    unknown = [name for name in task.metrics if name not in results]
    if unknown:
        raise ValueError(f"task {task.name!r}: no way to compute metric(s) {', '.join(unknown)}")
    return {name: float(results[name]) for name in task.metrics}


def check_examples(task: Task | str, tokenizer, examples: Sequence[Mapping], where: str = "",
                   max_target_length: int = 128, label_scoring: bool = True) -> None:
    """What evaluate_task refuses before the model runs, checked without a model: no examples, an unlabelled
    example, a label out of range or a prompt that cannot be rendered (check_labelled), and with label scoring
    choices whose token ids are the same. `where` (the file or split) starts the message. finetune / eval
    --task and the recipes call it before loading the model and training, so a bad evaluation file fails
    then, not at the first evaluation."""
    task = get_task(task)
    if max_target_length < 1:
        raise ValueError(f"max_target_length must be >= 1, got {max_target_length}")
    at = f"{where}: " if where else ""
    if not examples:
        raise ValueError(f"{at}no {task.name} examples to evaluate on")
    check_labelled(task, examples, where, "evaluation example")
    if task.is_classification and label_scoring:
        _check_choices_differ(tokenizer, task, examples, max_target_length, at)


def check_task_vocabulary(task: Task | str, tokenizer, examples: Sequence[Mapping], vocab_size: int,
                          where: str) -> None:
    """ValueError naming `where` when the tokenizer gives a labelled example's source, target or answer choices a
    token id past the model's vocabulary (another model's tokenizer: the embedding would fail on it)."""
    from ..train.text import check_vocabulary

    task = get_task(task)
    texts = [text for example in examples for text in task.to_text(example)]
    if task.is_classification:
        texts += sorted({choice for example in examples for choice in task.choices(example)})
    highest = [max(row) for row in tokenizer(texts)["input_ids"] if row] if texts else []
    check_vocabulary(torch.tensor(highest, dtype=torch.long), vocab_size, where)


def evaluate_task(model, tokenizer, task: Task | str, examples: Sequence[Mapping], batch_size: int = 32,
                  max_new_tokens: int | None = None, max_source_length: int = 512, max_target_length: int = 128,
                  label_scoring: bool = True, progress: bool = True) -> dict[str, float]:
    """{metric: value in [0, 1]} of `model` on `examples` (labelled raw examples of `task`, e.g. from
    load_task_data(task, "validation")): predict_task, then score_predictions."""
    task = get_task(task)
    check_lengths(max_source_length, max_target_length)
    check_examples(task, tokenizer, examples, label_scoring=False)  # labels; predict_task checks the choices
    predictions = predict_task(model, tokenizer, task, examples, batch_size=batch_size,
                               max_new_tokens=max_new_tokens, max_source_length=max_source_length,
                               max_target_length=max_target_length, label_scoring=label_scoring,
                               progress=progress)
    return score_predictions(task, predictions, examples)
