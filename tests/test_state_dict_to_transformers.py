"""A state dict that transformers cannot run is never taken in silence: the state dict of a compressed model
(U, V and kept rows instead of the experts' weights) or of one with dropped experts (the router's `keep`
mask) loaded into the family's transformers class is reported by transformers' loading info (missing expert
weights; the unexpected mask). The way out to transformers is the standard format (docs/standard_format.md)."""
from __future__ import annotations

import pytest

from mcsmoe_fast import compress_experts, moe_layers
from mcsmoe_fast.drop import install_logit_mask
from mcsmoe_fast.tiny import tiny_mixtral, tiny_switch

BUILDERS = {"switch": tiny_switch, "mixtral": tiny_mixtral}


def load_into_transformers(model):
    """transformers' from_pretrained of `model`'s state dict into a fresh model of its class."""
    _, info = type(model).from_pretrained(None, config=model.config, state_dict=model.state_dict(),
                                          output_loading_info=True)
    return info


@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_compressed_state_dict_reports_every_expert_weight_missing(family):
    model = BUILDERS[family]()
    expected = {k for layer in moe_layers(model) for k in model.state_dict() if k.startswith(f"{layer.name}.experts.")}
    compress_experts(model, rank=2, progress=False)
    info = load_into_transformers(model)
    assert set(info["missing_keys"]) == expected
    assert any(k.endswith("experts.in_U") for k in info["unexpected_keys"])


@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_masked_router_state_dict_reports_the_mask_unexpected(family):
    model = BUILDERS[family]()
    layer = moe_layers(model)[0]
    install_logit_mask(layer, [True] * (layer.num_experts - 2) + [False] * 2)
    info = load_into_transformers(model)
    assert not info["missing_keys"]
    (unexpected,) = info["unexpected_keys"]
    assert unexpected.startswith(layer.name) and unexpected.endswith(".keep")
