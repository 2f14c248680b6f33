"""optimize() keeps what the model was: a dropless Switch stays dropless, frozen experts stay frozen, parameters
keep their kind across the inference-mode boundary, and accelerate-offloaded experts are brought in (Llama-4) or
refused by name (Switch) instead of failing inside the op (session 31's audit; each test failed before its fix)."""
import copy

import pytest
import torch
from transformers import AutoModelForCausalLM, SwitchTransformersForConditionalGeneration

import mcsmoe_fast as mf
from mcsmoe_fast.tiny import tiny_moe, tiny_switch

IDS = torch.randint(3, 128, (2, 24), generator=torch.Generator().manual_seed(0))
SWITCH_INPUTS = dict(input_ids=IDS, decoder_input_ids=IDS[:, :7].contiguous())


def test_a_dropless_checkpoint_stays_dropless_when_optimized_again(tmp_path):
    torch.manual_seed(0)
    model = tiny_switch(num_experts=4, expert_capacity=2)  # capacity 2 binds on 24-token sequences
    fast = mf.optimize(copy.deepcopy(model), dropless=True)
    with torch.no_grad():
        want = fast(**SWITCH_INPUTS).logits
        assert not torch.allclose(model(**SWITCH_INPUTS).logits, want, atol=1e-3)  # dropless differs here
        again = mf.optimize(mf.from_pretrained(mf.save_pretrained(fast, tmp_path / "dropless")))  # the README's load
        assert all(layer.module.dropless for layer in mf.moe_layers(again))
        torch.testing.assert_close(again(**SWITCH_INPUTS).logits, want, rtol=1e-5, atol=1e-5)
        assert not any(layer.module.dropless for layer in mf.moe_layers(mf.optimize(again, dropless=False)))


@pytest.mark.parametrize("frozen", [True, False])
def test_frozen_switch_experts_stay_frozen(frozen):
    model = tiny_switch(num_experts=4)
    for name, p in model.named_parameters():
        if ".experts." in name:
            p.requires_grad_(not frozen)
    mf.optimize(model)
    flags = {p.requires_grad for name, p in model.named_parameters() if ".experts." in name}
    assert flags == {not frozen}


def test_llama4_built_under_inference_mode_runs_after_optimize():
    with torch.inference_mode():
        model = tiny_moe("llama4_text")
        want = model(input_ids=IDS).logits.clone()
    mf.optimize(model)
    with torch.inference_mode():
        torch.testing.assert_close(model(input_ids=IDS).logits, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["llama4_text", "switch"])
def test_a_model_optimized_under_inference_mode_still_trains(family):
    model = tiny_switch(num_experts=4, expert_capacity=3) if family == "switch" else tiny_moe(family)
    with torch.inference_mode():
        mf.optimize(model)
    model.train()
    batch = dict(SWITCH_INPUTS, labels=SWITCH_INPUTS["decoder_input_ids"]) if family == "switch" \
        else dict(input_ids=IDS, labels=IDS)
    model(**batch).loss.backward()
    assert all(p.grad is not None for name, p in model.named_parameters() if ".experts." in name and p.requires_grad)


def test_offloaded_experts_run_in_llama4_and_are_refused_by_name_in_switch(tmp_path):
    llama = tiny_moe("llama4_text")
    llama.save_pretrained(tmp_path / "l4")
    with torch.no_grad():
        want = llama(input_ids=IDS).logits
    device_map = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu",
                  "model.layers.1": "disk", "model.layers.2": "cpu", "model.layers.3": "disk", "model.norm": "cpu",
                  "lm_head": "cpu"}
    dispatched = AutoModelForCausalLM.from_pretrained(tmp_path / "l4", device_map=device_map,
                                                      offload_folder=tmp_path / "off").eval()
    with torch.no_grad():
        torch.testing.assert_close(mf.optimize(dispatched)(input_ids=IDS).logits, want, rtol=1e-5, atol=1e-5)
    tiny_switch(num_experts=4, expert_capacity=3).save_pretrained(tmp_path / "sw")
    dispatched = SwitchTransformersForConditionalGeneration.from_pretrained(
        tmp_path / "sw", device_map="auto", max_memory={"cpu": "60KB"}, offload_folder=tmp_path / "off2").eval()
    with pytest.raises(ValueError, match="its experts are offloaded by accelerate"):
        mf.optimize(dispatched)
