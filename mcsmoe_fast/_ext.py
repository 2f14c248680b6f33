"""Loads the native extension; never falls back silently to Python."""
from __future__ import annotations

import importlib
from pathlib import Path

_BUILD_HINT = (
    "the mcsmoe_fast native extension (mcsmoe_fast._C) is not built or failed to load. Build it with "
    "`pip install --no-build-isolation .` (or `python setup.py build_ext --inplace` in a source "
    "checkout) against the torch you run with; set MCSMOE_FAST_CUDA=1 to require the CUDA kernels."
)


def _installed_elsewhere(package_dir: Path) -> Path | None:
    """The directory of an installed mcsmoe_fast with a built extension, other than package_dir."""
    from importlib import metadata

    try:
        files = metadata.distribution("mcsmoe-fast").files or []
    except metadata.PackageNotFoundError:
        return None
    for f in files:
        if f.name.startswith("_C") and f.parent.name == "mcsmoe_fast":
            where = Path(f.locate()).parent.resolve()
            if where != package_dir.resolve() and where.exists():
                return where
    return None


def _hint(exc: ImportError) -> str:
    package_dir = Path(__file__).parent
    if (package_dir.parent / "setup.py").is_file() and not list(package_dir.glob("_C*.so")):
        installed = _installed_elsewhere(package_dir)
        where = f" (an installed, built copy is at {installed})" if installed else ""
        return (f"mcsmoe_fast is being imported from the source tree {package_dir}, which has no built "
                f"extension{where}. Run from another directory to use the installed package, or build the "
                "extension in this tree: `pip install --no-build-isolation -e .` (editable install) or "
                f"`python setup.py build_ext --inplace`. (cause: {exc})")
    return f"{_BUILD_HINT} (cause: {exc})"


def load():
    try:
        return importlib.import_module("mcsmoe_fast._C")
    except ImportError as exc:
        raise ImportError(_hint(exc)) from exc


_C = load()
