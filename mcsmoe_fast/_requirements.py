"""The oldest transformers and torch this package runs on, checked at import.

transformers: older releases return some routers' outputs in another order (Switch before 5.18; the
experts-contract routers before 5.21, where Ernie 4.5's index and weights are swapped: statistics, and so merges,
silently wrong), name the causal mask's cache argument otherwise (before 5.24: every streamed step fails) or lack
the experts contract (before 5.7). CI runs the family, merge, streaming and training tests on the floor.

torch: float8_e8m0fnu (MXFP4 and ue8m0 FP8 scales) arrives in 2.7; torch 2.8 and 2.11 (the GPU machines') ran the
kernel, family, merge and compile tests by hand (CI runs 2.13 and compiles the CUDA build against 2.14).

pyproject.toml states the same floors."""
from __future__ import annotations

MIN_TRANSFORMERS = "5.24.0"
MIN_TORCH = "2.8"


def check_torch(version: str | None = None) -> None:
    """ImportError naming the installed and the required version when torch is older than MIN_TORCH."""
    from packaging.version import Version

    if version is None:
        import torch

        version = torch.__version__
    if Version(version).release < Version(MIN_TORCH).release:
        raise ImportError(f"mcsmoe_fast needs torch>={MIN_TORCH}, found {version}: pip install -U 'torch>={MIN_TORCH}'")


def check_transformers(version: str | None = None) -> None:
    """ImportError naming the installed and the required version when transformers is older than MIN_TRANSFORMERS."""
    from packaging.version import Version

    if version is None:
        import transformers

        version = transformers.__version__
    if Version(version) < Version(MIN_TRANSFORMERS):
        raise ImportError(f"mcsmoe_fast needs transformers>={MIN_TRANSFORMERS}, found {version} (older releases route "
                          f"some families differently): pip install -U 'transformers>={MIN_TRANSFORMERS}'")
