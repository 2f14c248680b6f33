"""The family registry (models/registry.py): every adapter module's FAMILIES collected by itself, each model
type owned once, the structural fallback last; a new adapter module is found without touching the registry."""
from __future__ import annotations

import sys

import pytest

import mcsmoe_fast.models as models
from mcsmoe_fast.models import registry
from mcsmoe_fast.models.experts import experts_layers
from mcsmoe_fast.models.llama4 import llama4_layers
from mcsmoe_fast.models.switch import switch_layers


def test_each_adapter_declares_its_families_and_the_fallback_comes_last():
    found = registry.families()
    owners = {t: f.find_layers for f in found for t in f.model_types}
    assert owners["switch_transformers"] is switch_layers and owners["llama4_text"] is llama4_layers
    assert owners["mixtral"] is experts_layers and owners["qwen3_next"] is experts_layers
    assert sum(len(f.model_types) for f in found) == len(owners)  # no type twice
    assert found[-1].model_types == () and all(f.model_types for f in found[:-1])
    assert registry.family_of("some_future_moe") is found[-1]
    assert registry.family_of("switch_transformers").seq2seq and not registry.family_of("mixtral").seq2seq


@pytest.fixture
def extra_adapters(tmp_path, monkeypatch):
    """A directory searched as part of mcsmoe_fast.models, and a fresh registry before and after."""
    monkeypatch.setattr(models, "__path__", [*models.__path__, str(tmp_path)])
    registry.families.cache_clear()
    yield tmp_path
    registry.families.cache_clear()
    for name in [n for n in sys.modules if n.startswith("mcsmoe_fast.models.zz_")]:
        del sys.modules[name]


def write_adapter(directory, name: str, model_types: tuple[str, ...]) -> None:
    (directory / f"{name}.py").write_text(
        "from .registry import Family\n\n"
        "def toy_layers(model):\n    return []\n\n"
        f"FAMILIES = (Family({name!r}, {model_types!r}, toy_layers, streaming='layers'),)\n")


def test_a_new_adapter_module_is_found_without_touching_the_registry(extra_adapters):
    write_adapter(extra_adapters, "zz_toy", ("toy_moe",))
    family = registry.family_of("toy_moe")
    assert family.name == "zz_toy" and family.find_layers(None) == []
    assert "toy_moe" in registry.tested_model_types()
    assert registry.families()[-1].model_types == ()  # still last


def test_two_families_claiming_one_model_type_are_refused_by_name(extra_adapters):
    write_adapter(extra_adapters, "zz_clash", ("mixtral",))
    with pytest.raises(RuntimeError, match="'mixtral' is claimed by two families: 'decoder experts contract' and 'zz_clash'"):
        registry.families()
