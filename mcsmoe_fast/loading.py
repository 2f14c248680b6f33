"""open_model: any model this package reads, from a local directory (a plain transformers checkpoint or
a merged or compressed one of ours) or a hub id. Above checkpoint/, which it calls: nothing below
imports it."""
from __future__ import annotations

from pathlib import Path

import torch

from .checkpoint import from_pretrained, read_section
from .checkpoint.weight_files import read_index
from .models.hub import (check_hub, check_model_source, checked_dtype, load_cached, load_model, local_directory,
                         snapshot_directory)


def open_model(spec: str, dtype: torch.dtype | str | None = None):
    """A model from a local directory (plain, merged or compressed checkpoint) or a hub id.

    A path that is not a directory fails at once; a hub id is read from the local cache first, and
    otherwise the Hub is asked once (no retries), failing in one line when it cannot be reached. A hub id of
    a merged, compressed or block-FP8 / MXFP4 checkpoint opens its snapshot directory in the cache as a local
    directory opens (own_snapshot).
    dtype: as from_pretrained takes it (None, "auto", a floating-point torch dtype or its name)."""
    dtype = checked_dtype(dtype)
    check_model_source(spec)
    path = Path(spec).expanduser()
    if not path.is_dir():
        path = own_snapshot(spec)
        if path is None:
            return open_hub_model(spec, dtype)
    if quantized_format(path) is not None:  # block-FP8 / MXFP4: dequantized as read (default bfloat16)
        from .streaming.quantized import load_dequantized

        return load_dequantized(path, None if dtype == "auto" else dtype)
    return from_pretrained(path, dtype=dtype)


def open_hub_model(spec: str, dtype):
    """A plain transformers checkpoint by hub id, from the cache first, else downloaded by transformers once the
    Hub has answered (check_hub). When transformers finds no weights it reads, the config.json it fetched may
    name one of ours (own_snapshot): that is opened from its snapshot directory."""
    try:
        return load_cached(spec, dtype)
    except OSError:  # not cached, or only in part
        pass
    check_hub(spec)
    try:
        return load_model(spec, dtype=dtype)
    except OSError:
        path = own_snapshot(spec)
        if path is None:
            raise
    return open_model(str(path), dtype)


def own_snapshot(spec: str) -> Path | None:
    """The snapshot directory of hub id `spec` when its cached config.json names a checkpoint this package reads
    itself (merged or compressed: an mcsmoe_merge section; block-FP8 / MXFP4), its weights downloaded when the
    cache lacks them; None for anything else (transformers' own loader fetches a plain checkpoint file by file)."""
    directory = local_directory(spec)
    if directory is None or (read_section(directory) is None and quantized_format(directory) is None):
        return None
    return snapshot_directory(spec, holds_weights)


def holds_weights(directory: Path) -> bool:
    """Whether every weights file the checkpoint directory names (its mcsmoe_merge section, else its safetensors
    index) is there: a cached snapshot may hold only the files read so far."""
    section = read_section(directory)
    if section is not None:
        names = [section["weights"], *section.get("shards", {})]
    elif (directory / "model.safetensors.index.json").is_file():
        names = sorted(set(read_index(directory / "model.safetensors.index.json").values()))
    else:
        names = ["model.safetensors"]
    return all((directory / name).is_file() for name in names)


def quantized_format(path):
    """The QuantFormat of a plain block-FP8 / MXFP4 checkpoint directory (None for anything else, including
    quantization methods this package does not read, which transformers' own loader then gets)."""
    from .streaming.quantized import checkpoint_format

    try:
        return checkpoint_format(path)
    except ValueError:
        return None
