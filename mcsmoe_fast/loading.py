"""open_model: any model this package reads, from a local directory (a plain transformers checkpoint or
a merged or compressed one of ours) or a hub id. Above checkpoint/, which it calls: nothing below
imports it."""
from __future__ import annotations

from pathlib import Path

import torch

from .checkpoint import from_pretrained
from .models.hub import check_hub, check_model_source, checked_dtype, load_cached, load_model


def open_model(spec: str, dtype: torch.dtype | str | None = None):
    """A model from a local directory (plain, merged or compressed checkpoint) or a hub id.

    A path that is not a directory fails at once; a hub id is read from the local cache first, and
    otherwise the Hub is asked once (no retries), failing in one line when it cannot be reached.
    dtype: as from_pretrained takes it (None, "auto", a floating-point torch dtype or its name)."""
    dtype = checked_dtype(dtype)
    check_model_source(spec)
    path = Path(spec).expanduser()
    if path.is_dir():
        if quantized_format(path) is not None:  # block-FP8 / MXFP4: dequantized as read (default bfloat16)
            from .streaming.quantized import load_dequantized

            return load_dequantized(path, None if dtype == "auto" else dtype)
        return from_pretrained(path, dtype=dtype)
    try:
        return load_cached(spec, dtype)
    except OSError:
        pass
    check_hub(spec)
    return load_model(spec, dtype=dtype)


def quantized_format(path):
    """The QuantFormat of a plain block-FP8 / MXFP4 checkpoint directory (None for anything else, including
    quantization methods this package does not read, which transformers' own loader then gets)."""
    from .streaming.quantized import checkpoint_format

    try:
        return checkpoint_format(path)
    except ValueError:
        return None
