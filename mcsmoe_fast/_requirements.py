"""The oldest transformers this package runs on, checked at import. Older releases return some routers' outputs in
another order (Switch before 5.18; the experts-contract routers before 5.21, where Ernie 4.5's index and weights
are swapped: statistics, and so merges, silently wrong), name the causal mask's cache argument otherwise (before
5.24: every streamed step fails) or lack the experts contract (before 5.7). pyproject.toml states the same floor;
CI runs the family, merge and streaming tests on it."""
from __future__ import annotations

MIN_TRANSFORMERS = "5.24.0"


def check_transformers(version: str | None = None) -> None:
    """ImportError naming the installed and the required version when transformers is older than MIN_TRANSFORMERS."""
    from packaging.version import Version

    if version is None:
        import transformers

        version = transformers.__version__
    if Version(version) < Version(MIN_TRANSFORMERS):
        raise ImportError(f"mcsmoe_fast needs transformers>={MIN_TRANSFORMERS}, found {version} (older releases route "
                          f"some families differently): pip install -U 'transformers>={MIN_TRANSFORMERS}'")
