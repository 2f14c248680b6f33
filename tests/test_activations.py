"""Every expert activation a supported family can be configured with: optimize, alignment and merging
read it from the model (never assume ReLU / SwiGLU) and match transformers' own model; anything else
is refused with an error naming it."""
import pytest
import torch

from mcsmoe_fast import align_experts, collect_routing_stats, merge_experts, moe_layers, optimize
from mcsmoe_fast.activations import from_config
from mcsmoe_fast.models.loading import load_model
from mcsmoe_fast.tiny import tiny_mixtral, tiny_switch
from merge_helpers import calibration, forward

SWITCH_ACTS = {"relu": "relu", "gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
               "silu": "silu"}
MIXTRAL_ACTS = {"silu": "swiglu", "gelu": "geglu", "gelu_new": "geglu_tanh", "relu": "reglu"}


def saved(family, act, tmp_path):
    model = tiny_switch(dense_act_fn=act) if family == "switch" else tiny_mixtral(hidden_act=act)
    path = tmp_path / f"{family}-{act}"
    model.save_pretrained(path)
    return load_model(str(path))


CASES = [("switch", a) for a in SWITCH_ACTS] + [("mixtral", a) for a in MIXTRAL_ACTS]


@pytest.mark.parametrize("family,act", CASES)
def test_layers_read_the_activation_from_the_config(family, act, tmp_path):
    expected = (SWITCH_ACTS if family == "switch" else MIXTRAL_ACTS)[act]
    assert {layer.activation for layer in moe_layers(saved(family, act, tmp_path))} == {expected}


@pytest.mark.parametrize("family,act", CASES)
def test_optimize_matches_transformers(family, act, tmp_path):
    model = saved(family, act, tmp_path)
    batches = calibration(model)
    expected = [forward(model, b) for b in batches]
    optimize(model)
    for b, ref in zip(batches, expected):
        torch.testing.assert_close(forward(model, b), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family,act", [("switch", "gelu_new"), ("mixtral", "gelu")])
def test_alignment_and_merging_keep_using_the_activation(family, act, tmp_path):
    model = saved(family, act, tmp_path)
    batches = calibration(model)
    expected = [forward(model, b) for b in batches]
    if family == "mixtral":  # activation matching runs the activation (Switch: issue 9's decoder-input bug)
        align_experts(model, strategy="activation", batches=batches)
    else:
        align_experts(model)
    for b, ref in zip(batches, expected):
        torch.testing.assert_close(forward(model, b), ref, rtol=1e-5, atol=1e-5)
    stats = collect_routing_stats(model, batches, bases=("expert-output",), progress=False)
    merge_experts(model, stats, num_groups=8, globally=False, progress=False)  # G = E: function unchanged
    for b, ref in zip(batches, expected):
        torch.testing.assert_close(forward(model, b), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family,act", [("switch", "quick_gelu"), ("mixtral", "relu2")])
def test_unsupported_activation_is_refused_by_name(family, act, tmp_path):
    model = saved(family, act, tmp_path)
    with pytest.raises(ValueError, match=f"activation '{act}' is not supported"):
        optimize(model)
    with pytest.raises(ValueError, match=f"'{act}'"):
        align_experts(model)


def test_from_config_maps_gated_and_plain_names():
    assert from_config("gelu_new", gated=True, where="x") == "geglu_tanh"
    assert from_config("swish", gated=False, where="x") == "silu"
