"""Package-level behaviour: the quick-start job, the extension's build info, no silent fallback."""
import importlib

import pytest

from mcsmoe_fast import _ext


def test_demo_preserves_function():
    from mcsmoe_fast.demo import run_demo

    lines = []
    changes = run_demo(print_fn=lines.append)
    assert set(changes) == {"switch", "mixtral"}
    assert all(change <= 1e-5 for change in changes.values()), changes
    assert any("neurons moved" in line for line in lines)


def test_build_info():
    assert isinstance(_ext._C.cuda_enabled, bool)
    assert _ext._C.openmp_threads() >= 1


def test_missing_extension_says_how_to_build(monkeypatch):
    real = importlib.import_module

    def fake_import(name, *args):
        if name == "mcsmoe_fast._C":
            raise ImportError("simulated: no such file")
        return real(name, *args)

    monkeypatch.setattr(importlib, "import_module", fake_import)
    with pytest.raises(ImportError, match="pip install --no-build-isolation"):
        _ext.load()
