"""Tokenised text-to-text batches for Switch / T5 models: training batches and calibration batches.

A batch holds input_ids and attention_mask (the prompts, padded to the longest in the batch and cut to
max_source_length) and labels (the targets' token ids ending in EOS, -100 on padding, so the loss skips
it). Calibration batches also hold the decoder's inputs: the targets shifted right behind the decoder
start token (what the model builds from labels itself), with their padding mask.
"""
from __future__ import annotations

import random
from collections.abc import Iterable, Mapping, Sequence

import torch

from ..calibration_data import backend_settings_kept, ensure_pad_token
from .base import Task
from .registry import get_task

IGNORE_INDEX = -100  # label value the cross-entropy loss skips
DEFAULT_CALIBRATION_SAMPLES = 256  # the original calibrated on 256 training examples
CALIBRATION_SEED = 2333  # the seed the original shuffled the training set with before taking them


def check_lengths(max_source_length: int, max_target_length: int) -> None:
    """Prompts and targets are cut to at least one token: 0 or below is refused by name."""
    if max_source_length < 1 or max_target_length < 1:
        raise ValueError(f"max_source_length and max_target_length must be >= 1, got {max_source_length} "
                         f"and {max_target_length}")


def target_token_ids(tokenizer, targets: Sequence[str], max_length: int = 128) -> list[list[int]]:
    """Token ids of each target, ending in the tokenizer's EOS (T5 tokenizers add it; it is appended for
    tokenizers that do not), at most max_length ids."""
    with backend_settings_kept(tokenizer):
        rows = tokenizer(list(targets), truncation=True, max_length=max_length)["input_ids"]
    eos = tokenizer.eos_token_id
    if eos is None:
        return [list(r) for r in rows]
    return [list(r) if r and r[-1] == eos else list(r)[: max_length - 1] + [eos] for r in rows]


def pad_labels(rows: Sequence[Sequence[int]]) -> torch.Tensor:
    """[len(rows), longest] int64 labels, IGNORE_INDEX after the end of each row."""
    width = max((len(r) for r in rows), default=0)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    for i, row in enumerate(rows):
        labels[i, : len(row)] = torch.tensor(row, dtype=torch.long)
    return labels


def shift_right(labels: torch.Tensor, decoder_start_token_id: int, pad_token_id: int) -> torch.Tensor:
    """Decoder inputs for `labels`: the start token, then the labels but the last, padding as pad_token_id
    (what T5/Switch's `_shift_right` computes)."""
    decoder_input_ids = labels.new_full(labels.shape, pad_token_id)
    if labels.shape[-1]:
        decoder_input_ids[..., 1:] = labels[..., :-1]
        decoder_input_ids[..., 0] = decoder_start_token_id
    return decoder_input_ids.masked_fill(decoder_input_ids == IGNORE_INDEX, pad_token_id)


def encode_pairs(tokenizer, pairs: Iterable[tuple[str, str]], max_source_length: int = 512,
                 max_target_length: int = 128) -> dict[str, torch.Tensor]:
    """One batch from (source, target) pairs: input_ids, attention_mask, labels (IGNORE_INDEX on padding).
    Usable as a DataLoader collate_fn over task.to_text pairs (functools.partial for the lengths)."""
    check_lengths(max_source_length, max_target_length)
    pairs = list(pairs)
    if not pairs:
        raise ValueError("no (source, target) pairs to encode")
    ensure_pad_token(tokenizer)
    sources, targets = zip(*pairs)
    with backend_settings_kept(tokenizer):
        enc = tokenizer(list(sources), padding=True, padding_side="right", truncation=True,
                        max_length=max_source_length, return_tensors="pt", return_token_type_ids=False)
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
            "labels": pad_labels(target_token_ids(tokenizer, targets, max_target_length))}


def add_decoder_inputs(batch: Mapping[str, torch.Tensor], decoder_start_token_id: int,
                       pad_token_id: int) -> dict[str, torch.Tensor]:
    """`batch` with decoder_input_ids (labels shifted right) and decoder_attention_mask (1 where a label is)."""
    labels = batch["labels"]
    return {**batch, "decoder_input_ids": shift_right(labels, decoder_start_token_id, pad_token_id),
            "decoder_attention_mask": (labels != IGNORE_INDEX).long()}


def _chunks(items: list, size: int) -> list[list]:
    if size < 1:
        raise ValueError(f"batch_size must be >= 1, got {size}")
    return [items[i : i + size] for i in range(0, len(items), size)]


def training_batches(task: Task | str, tokenizer, examples: Sequence[Mapping], batch_size: int | None = None,
                     shuffle: bool = False, seed: int = 0, max_source_length: int = 512,
                     max_target_length: int = 128) -> list[dict[str, torch.Tensor]]:
    """Batches of the task's (prompt, target) pairs; batch_size defaults to the paper's for the task.
    The model feeds its decoder the shifted labels itself (model(**batch) returns the loss)."""
    task = get_task(task)
    pairs = [task.to_text(ex) for ex in examples]
    if shuffle:
        random.Random(seed).shuffle(pairs)
    return [encode_pairs(tokenizer, chunk, max_source_length, max_target_length)
            for chunk in _chunks(pairs, task.batch_size if batch_size is None else batch_size)]


def original_subset(size: int, n: int, seed: int = CALIBRATION_SEED) -> list[int]:
    """The indices of the original's calibration subset, `dataset.shuffle(seed=seed).select(range(n))`
    (datasets shuffles with numpy's default_rng(seed).permutation), without needing datasets."""
    import numpy as np

    return np.random.default_rng(seed).permutation(size)[: min(n, size)].tolist()


def calibration_batches(task: Task | str, tokenizer, n: int = DEFAULT_CALIBRATION_SAMPLES, *,
                        examples: Sequence[Mapping] | None = None, path=None, split: str | None = None,
                        batch_size: int = 32, seed: int = CALIBRATION_SEED, max_source_length: int = 512,
                        max_target_length: int = 128,
                        decoder_start_token_id: int | None = None) -> list[dict[str, torch.Tensor]]:
    """Calibration batches for routing statistics on a text-to-text task, as the original built them: n
    training examples drawn as the original drew them (original_subset), the prompt into the encoder and the task's TARGET into the
    decoder (decoder_input_ids = labels shifted right), not the prompt shifted right.

    examples: the examples to draw from; when None they are loaded with
    load_task_data(task, split (default: the task's training split), path). examples= with path= or split=
    is refused (the examples would be used as given and the others ignored). decoder_start_token_id defaults
    to the tokenizer's pad token id (T5 and Switch start decoding with pad); pass
    model.config.decoder_start_token_id for other models. Every batch holds input_ids, attention_mask,
    labels, decoder_input_ids and decoder_attention_mask; fewer than n examples are all used."""
    from .data import load_task_data

    task = get_task(task)
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if examples is not None and (path is not None or split is not None):
        given = " and ".join(name for name, value in (("path=", path), ("split=", split)) if value is not None)
        raise ValueError(f"calibration_batches: give examples= or {given}, not both (the examples are used as "
                         "given, so the other would be ignored)")
    if examples is None:
        examples = load_task_data(task, split or task.train_split, path)
    if not examples:
        raise ValueError(f"no {task.name} examples to calibrate on")
    chosen = original_subset(len(examples), n, seed)
    pairs = [task.to_text(examples[i]) for i in chosen]
    ensure_pad_token(tokenizer)
    start = tokenizer.pad_token_id if decoder_start_token_id is None else decoder_start_token_id
    return [add_decoder_inputs(encode_pairs(tokenizer, chunk, max_source_length, max_target_length),
                               start, tokenizer.pad_token_id)
            for chunk in _chunks(pairs, batch_size)]
