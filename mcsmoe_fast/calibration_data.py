"""Calibration text for routing statistics: a local .txt (one sample per line) or .jsonl file (a text
field per line), or a `datasets` dataset name; tokenised into model input batches.

Text-to-text tasks (SST-2, COPA, SQuAD, ...) calibrate on prompts and targets instead: see
mcsmoe_fast.tasks.calibration_batches."""
from __future__ import annotations

import copy
from contextlib import contextmanager
import itertools
import json
from pathlib import Path

import torch

DEFAULT_NUM_SAMPLES = 256  # the paper's calibration size


def read_calibration_texts(source: str, num_samples: int = DEFAULT_NUM_SAMPLES, text_field: str = "text",
                           split: str = "train") -> list[str]:
    """Up to num_samples non-empty texts from `source`, stripped, in order.

    source: a .txt file (one sample per line), a .jsonl file (one JSON object per line, text in
    `text_field`), or a local dataset directory or a dataset name for `datasets.load_dataset` ("name"
    or "name:config"), read from its `split`. A dataset name is streamed: only its first records are
    downloaded, never the whole split. Files are UTF-8, with or without a byte-order mark; a file has no
    split (and a .txt file no text field), so giving one is refused."""
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    path = Path(source)
    if path.is_dir():  # a local dataset directory (data files per split): datasets reads it like a hub name
        texts = _read_dataset(source, num_samples, text_field, split, streaming=False)
    elif path.suffix in (".txt", ".jsonl") or path.exists():
        texts = _read_file(path, num_samples, text_field, split)
    else:
        texts = _read_dataset(source, num_samples, text_field, split, streaming=True)
    if not texts:
        raise ValueError(f"calibration source {source!r} holds no non-empty text")
    return texts


def _read_file(path: Path, num_samples: int, text_field: str, split: str) -> list[str]:
    if not path.is_file():
        raise FileNotFoundError(f"calibration file {path} not found")
    if path.suffix not in (".txt", ".jsonl"):
        raise ValueError(f"calibration file {path}: expected a .txt (one sample per line) or .jsonl file")
    if split != "train":
        raise ValueError(f"split {split!r} is read for a dataset name or directory only; {path} is a file "
                         "(leave split / --split out)")
    if path.suffix == ".txt" and text_field != "text":
        raise ValueError(f"text_field {text_field!r} is read for .jsonl files and datasets only; {path} is a .txt "
                         "file, one sample per line (leave text_field / --text-field out)")
    texts = []
    with open(path, encoding="utf-8-sig") as f:  # a leading byte-order mark is no part of the first sample
        for lineno, line in enumerate(f, 1):
            if len(texts) >= num_samples:
                break
            line = line.strip()
            if not line:
                continue
            if path.suffix == ".jsonl":
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from exc
                if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
                    raise ValueError(f"{path}:{lineno}: no string field {text_field!r}")
                line = record[text_field].strip()
                if not line:
                    continue
            texts.append(line)
    return texts


def _read_dataset(name: str, num_samples: int, text_field: str, split: str, streaming: bool) -> list[str]:
    """The first num_samples non-empty texts of a dataset; streaming: records are fetched as they are read
    (a hub corpus such as allenai/c4 is hundreds of GB), so only those before the last text kept are."""
    try:
        import datasets
    except ImportError as exc:
        raise ValueError(f"calibration source {name!r} is neither a local .txt/.jsonl file nor loadable: "
                         "the `datasets` package is not installed (pip install datasets)") from exc
    dataset_name, _, config = name.partition(":")
    try:
        records = iter(datasets.load_dataset(dataset_name, config or None, split=split, streaming=streaming))
        first = next(records, None)  # a stream may only fail once it is read
    except Exception as exc:  # offline, unknown name, missing split: all surface as one clear error
        raise ValueError(f"could not load calibration dataset {name!r} (split {split!r}): {exc}") from exc
    if first is not None and text_field not in first:
        raise ValueError(f"calibration dataset {name!r} has no column {text_field!r}; columns: {sorted(first)}")
    texts = []
    for record in itertools.chain([first] if first is not None else [], records):
        text = record[text_field]
        if isinstance(text, str) and text.strip():
            texts.append(text.strip())
            if len(texts) >= num_samples:
                break
    return texts


def ensure_pad_token(tokenizer) -> None:
    """Give a tokenizer without a pad token its eos (else unk) token as pad token, or raise ValueError."""
    if tokenizer.pad_token is None:
        fallback = tokenizer.eos_token or tokenizer.unk_token
        if fallback is None:
            raise ValueError("the tokenizer has no pad, eos or unk token to pad calibration batches with")
        tokenizer.pad_token = fallback


@contextmanager
def backend_settings_kept(tokenizer):
    """A fast tokenizer's backend keeps the truncation and padding of its last call, and its save_pretrained writes
    them into tokenizer.json: the settings the tokenizer had are put back when the block ends (a copy per call would
    cost a training step's collate function far more)."""
    backend = getattr(tokenizer, "_tokenizer", None)
    if backend is None or not hasattr(backend, "truncation"):
        yield tokenizer
        return
    truncation, padding = backend.truncation, backend.padding
    try:
        yield tokenizer
    finally:
        if truncation is None:
            backend.no_truncation()
        else:
            backend.enable_truncation(**truncation)
        if padding is None:
            backend.no_padding()
        else:
            backend.enable_padding(**padding)


def calibration_batches(texts: list[str], tokenizer, batch_size: int = 8, max_length: int = 256) -> list[dict]:
    """Padded, truncated input dicts (input_ids, attention_mask) of batch_size texts each.

    The text is tokenised by a copy of `tokenizer` (padded with its eos token when it has no pad token): a fast
    tokenizer called with truncation and padding keeps them, and the caller's is the one a save writes beside the
    model, which must encode as the input model's does.

    These feed an encoder-decoder model's decoder its own input text; for a text-to-text task's calibration
    (the decoder reads the task's targets, as the original did) use mcsmoe_fast.tasks.calibration_batches."""
    if isinstance(texts, str):  # slicing a string would cut it into characters
        raise ValueError("texts must be a list of strings, one calibration text each: wrap a single text in a list")
    if batch_size < 1 or max_length < 1:
        raise ValueError(f"batch_size and max_length must be >= 1, got {batch_size} and {max_length}")
    tokenizer = copy.deepcopy(tokenizer)
    ensure_pad_token(tokenizer)
    batches = []
    for start in range(0, len(texts), batch_size):
        enc = tokenizer(texts[start : start + batch_size], padding=True, padding_side="right", truncation=True,
                        max_length=max_length, return_tensors="pt", return_token_type_ids=False)
        batches.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})
    return batches


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "spiece.model", "vocab.json",
                   "vocab.txt", "sentencepiece.bpe.model")


def load_tokenizer(path: str):
    """AutoTokenizer from `path`, or a ValueError that says how to provide one.

    A local directory must hold tokenizer files: transformers would otherwise build an empty tokenizer
    from the model config alone, which maps every word to the unknown token. A hub id is read from the
    cache first; otherwise it is checked like a model (models.hub.check_model_source: one short
    request, no retries) before transformers downloads it."""
    from transformers import AutoTokenizer

    from .models.hub import check_model_source

    local = Path(path).expanduser()
    if local.is_dir() and not any((local / name).is_file() for name in TOKENIZER_FILES):
        raise ValueError(f"no tokenizer files in {path!r} (looked for {', '.join(TOKENIZER_FILES)}); "
                         "pass --tokenizer DIR with a tokenizer for this model")
    if not local.is_dir():
        try:
            check_model_source(path, what="tokenizer")
        except FileNotFoundError as exc:  # this function's one error type
            raise ValueError(str(exc)) from None
        try:
            return _without_loading_settings(AutoTokenizer.from_pretrained(path, local_files_only=True))
        except Exception:  # not cached (or only partly): transformers fetches it below
            pass
    try:
        return _without_loading_settings(AutoTokenizer.from_pretrained(local if local.is_dir() else path))
    except Exception as exc:  # transformers raises OSError, ValueError or others depending on what is missing
        raise ValueError(f"no tokenizer could be loaded from {path!r} ({type(exc).__name__}: {exc}); "
                         "pass --tokenizer DIR with a tokenizer for this model") from exc


LOADING_SETTINGS = ("is_local", "local_files_only")  # how transformers found the files, not the tokenizer


def _without_loading_settings(tokenizer):
    """The tokenizer without the loading settings transformers keeps in init_kwargs, which save_pretrained would
    write into every output's tokenizer_config.json (local_files_only: true under HF_HUB_OFFLINE=1 or from the
    cache, false otherwise: two identical runs wrote different files)."""
    for key in LOADING_SETTINGS:
        tokenizer.init_kwargs.pop(key, None)
    return tokenizer


def check_batches(batches: list[dict], tokenizer, vocab_size: int) -> None:
    """Fail clearly when the tokenizer does not fit the model or reads the text as unknown tokens only."""
    ids = torch.cat([b["input_ids"][b["attention_mask"].bool()] for b in batches])
    if ids.numel() and int(ids.max()) >= vocab_size:
        raise ValueError(f"the tokenizer produces token id {int(ids.max())} but the model's vocabulary has "
                         f"{vocab_size} entries; is --tokenizer the model's own tokenizer?")
    special = set(tokenizer.all_special_ids)
    if ids.numel() and all(int(i) in special for i in ids.unique()):
        raise ValueError("the tokenizer reads the calibration text as special/unknown tokens only; "
                         "is --tokenizer the model's own tokenizer?")
