"""Shared by the native-kernel tests (test_dequant.py, test_quantize_native.py): which extension functions a call
reaches."""
from __future__ import annotations

from mcsmoe_fast._ext import _C


def record_calls(monkeypatch, *modules) -> list[str]:
    """Replace `_C` in each module by a stand-in that records the name of every function called through it, then
    calls the real one; returns the list it records into."""
    calls: list[str] = []

    class Recording:
        def __getattr__(self, name):
            def call(*args):
                calls.append(name)
                return getattr(_C, name)(*args)
            return call

    for module in modules:
        monkeypatch.setattr(module, "_C", Recording())
    return calls
