"""Loads the native extension; never falls back silently to Python."""
from __future__ import annotations

import importlib

_BUILD_HINT = (
    "the mcsmoe_fast native extension (mcsmoe_fast._C) is not built or failed to load. Build it with "
    "`pip install --no-build-isolation .` (or `python setup.py build_ext --inplace` in a source "
    "checkout) against the torch you run with; set MCSMOE_FAST_CUDA=1 to require the CUDA kernels."
)


def load():
    try:
        return importlib.import_module("mcsmoe_fast._C")
    except ImportError as exc:
        raise ImportError(f"{_BUILD_HINT} (cause: {exc})") from exc


_C = load()
