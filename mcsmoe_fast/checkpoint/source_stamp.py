"""What a model was read from, as it was then: a save in the input's precision (a block-FP8 / MXFP4 input pruned,
merged, compressed or aligned, then written in its format) opens the input again to copy the tensors the model kept
byte for byte with their scales, and takes its quantization_config. Were the input replaced meanwhile (another
command's output landing on it), the copy would come from a checkpoint the model was never read from: the stamp
taken before the load is compared with the input as the save leaves it, and a difference refuses the save before
the output replaces anything.
"""
from __future__ import annotations

import os
from pathlib import Path

from .weight_files import CheckpointError, file_identity

SourceStamp = dict  # {file name: file_identity} of config.json and the weights files (and their index)


def _holds_model(name: str) -> bool:
    return name == "config.json" or name.endswith((".safetensors", ".safetensors.index.json"))


def source_stamp(directory) -> SourceStamp:
    """The identity (device, inode, size, modification time) of every file of the checkpoint directory that the
    model is read from: config.json, the safetensors files and their index."""
    directory = Path(directory).expanduser()
    return {entry.name: file_identity(entry.stat()) for entry in os.scandir(directory)
            if _holds_model(entry.name) and entry.is_file()}


def check_unchanged(directory, stamp: SourceStamp) -> None:
    """CheckpointError when the checkpoint directory no longer is what `stamp` (source_stamp, taken before the
    model was loaded) recorded: a file replaced, rewritten, added or removed."""
    try:
        now = source_stamp(directory)
    except OSError as exc:
        now = {}
        reason = f"it cannot be read any more ({exc})"
    else:
        changed = sorted(name for name in stamp.keys() | now.keys() if stamp.get(name) != now.get(name))
        reason = f"{', '.join(changed[:4])}{' ...' if len(changed) > 4 else ''} changed"
    if now != stamp:
        raise CheckpointError(f"{directory}: the input changed since the model was loaded from it ({reason}; another "
                              "command wrote it?); writing in its precision copies its tensors and takes its "
                              "quantization_config, which would now come from another checkpoint. Nothing was "
                              "written: run again once nothing writes it")
