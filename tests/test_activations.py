"""Every expert activation a supported family can be configured with: optimize, alignment and merging
read it from the model (never assume ReLU / SwiGLU) and match transformers' own model; anything else
is refused with an error naming it."""
import pytest
import torch

from mcsmoe_fast import align_experts, collect_routing_stats, merge_experts, moe_layers, optimize
from mcsmoe_fast.activations import from_config
from mcsmoe_fast.models.hub import load_model
from mcsmoe_fast.tiny import tiny_mixtral, tiny_switch
from merge_helpers import calibration, forward

SWITCH_ACTS = {"relu": "relu", "gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
               "silu": "silu", "relu2": "relu2"}
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


@pytest.mark.parametrize("family,act,named", [("switch", "quick_gelu", "activation 'quick_gelu' is not supported"),
                                               ("mixtral", "relu2", "gated squared ReLU .* is not supported")])
def test_unsupported_activation_is_refused_by_name(family, act, named, tmp_path):
    """Refused by the function the model computes (Mixtral's relu2 gate is a gated squared ReLU)."""
    model = saved(family, act, tmp_path)
    for step in (optimize, align_experts):
        with pytest.raises(ValueError, match=named):
            step(model)


def test_from_config_maps_gated_and_plain_names():
    assert from_config("gelu_new", gated=True, where="x") == "geglu_tanh"
    assert from_config("swish", gated=False, where="x") == "silu"
    assert from_config("relu2", gated=False, where="x") == "relu2"
    with pytest.raises(ValueError, match="x: gated expert activation 'relu2' .* is not supported"):
        from_config("relu2", gated=True, where="x")


def test_clamped_swiglu_is_gpt_oss_gate():
    # transformers' GptOssExperts._apply_gate (interleaved gate/up columns) against ours (gate columns, then up)
    from types import SimpleNamespace

    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts

    from mcsmoe_fast.activations import apply

    gen = torch.Generator().manual_seed(0)
    for alpha, limit in ((1.702, 7.0), (1.0, 0.5)):
        gate, up = (torch.randn(40, 16, generator=gen, dtype=torch.float64) * 3 * limit for _ in range(2))
        gate, up = gate.requires_grad_(), up.requires_grad_()
        theirs = GptOssExperts._apply_gate(SimpleNamespace(alpha=alpha, limit=limit),
                                           torch.stack([gate, up], -1).flatten(-2))
        ours = apply(torch.cat([gate, up], -1), "clamped_swiglu", alpha, limit)
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
        g = torch.randn(40, 16, generator=gen, dtype=torch.float64)
        for a, b in zip(torch.autograd.grad(ours, [gate, up], g), torch.autograd.grad(theirs, [gate, up], g)):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_clamped_swiglu_is_listed_gated_and_other_activations_ignore_its_parameters():
    from mcsmoe_fast.activations import ACTIVATIONS, apply, is_gated

    assert "clamped_swiglu" in ACTIVATIONS and is_gated("clamped_swiglu")
    h = torch.randn(5, 12, generator=torch.Generator().manual_seed(1)) * 9
    for act in ("swiglu", "gelu"):
        assert torch.equal(apply(h, act, alpha=0.1, limit=0.2), apply(h, act))
    assert not torch.equal(apply(h, "clamped_swiglu", limit=1.0), apply(h, "clamped_swiglu"))
    assert from_config("silu", gated=True, where="x") == "swiglu"  # clamped_swiglu is never picked by name
