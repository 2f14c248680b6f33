"""The inputs a command reads, as they were when it began: a command reads its input directory more than once (the
tokenizer before or after the weights, the generation config at save time, a re-quantizing save that copies the
input's tensors byte for byte and takes its quantization_config, a streamed comparison that opens it for every
row). Were the input replaced in between (another command's output landing on it), the output would pair what was
read before with what was read after: two checkpoints in one.

`watching_inputs(paths)` records the files of every input directory among `paths` before anything is read; while it
is active, every output commit (`atomic_directory`, `write_text_atomic`) calls `check_inputs` first, which refuses
the commit, leaving the output as it was, when an input's files differ. The CLI watches --model, --teacher and
--tokenizer for the whole command, or until `done_reading_inputs` (training and the in-memory comparison, once
everything they read is in memory).
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .weight_files import CheckpointError, file_identity

SourceStamp = dict  # {file name: file_identity} of the files a model is read from

# files a model, its tokenizer and its generation settings are read from (others, a README, are not stamped)
MODEL_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
               "special_tokens_map.json", "added_tokens.json", "merges.txt", "tokenizer.model", "chat_template.jinja",
               "chat_template.json")
MODEL_SUFFIXES = (".safetensors", ".safetensors.index.json", ".bin", ".bin.index.json", ".tiktoken")

_watched: dict[Path, SourceStamp] = {}  # the inputs of the commands running in this process


def _read_from(name: str) -> bool:
    return name in MODEL_FILES or name.endswith(MODEL_SUFFIXES) or name.startswith("vocab.")


def source_stamp(directory) -> SourceStamp:
    """The identity (device, inode, size, modification time) of every file of the checkpoint directory that a model,
    its tokenizer or its generation settings are read from."""
    directory = Path(directory).expanduser()
    return {entry.name: file_identity(entry.stat()) for entry in os.scandir(directory)
            if _read_from(entry.name) and entry.is_file()}


def check_unchanged(directory, stamp: SourceStamp) -> None:
    """CheckpointError when the checkpoint directory no longer is what `stamp` (source_stamp) recorded: a file
    replaced, rewritten, added or removed."""
    try:
        now = source_stamp(directory)
    except OSError as exc:
        now, reason = None, f"it cannot be read any more ({exc})"
    else:
        changed = sorted(name for name in stamp.keys() | now.keys() if stamp.get(name) != now.get(name))
        reason = f"{', '.join(changed[:4])}{' ...' if len(changed) > 4 else ''} changed"
    if now != stamp:
        raise CheckpointError(f"{directory}: the input changed while this command was reading it ({reason}; another "
                              "command wrote it?): what was read before and after the change (weights, tokenizer, "
                              "settings, the tensors a save in the input's precision copies) would come from two "
                              "checkpoints. Nothing was written: run again once nothing writes it")


@contextmanager
def watching_inputs(*paths) -> Iterator[None]:
    """Within the block, check_inputs (which every output commit calls) refuses when an input directory among
    `paths` changed since the block began (None, hub ids and files are not watched). Blocks nest."""
    stamps = {}  # all taken before any is registered: a directory that cannot be read leaves nothing watched
    for path in paths:
        directory = Path(str(path)).expanduser().absolute() if path is not None else None
        if directory is not None and directory.is_dir() and directory not in _watched:
            stamps[directory] = source_stamp(directory)
    added = list(stamps)
    try:
        _watched.update(stamps)
        yield
    finally:
        for directory in added:
            _watched.pop(directory, None)


def check_inputs() -> None:
    """CheckpointError when an input watched by watching_inputs changed (an output is not committed then)."""
    for directory, stamp in list(_watched.items()):
        check_unchanged(directory, stamp)


def done_reading_inputs() -> None:
    """check_inputs, then no more watching: a long command (training, a comparison in memory) that has read all it
    reads from its inputs is not stopped by a later change to them, which its outputs no longer depend on."""
    check_inputs()
    _watched.clear()
