"""The drop baseline masks a softmax top-k gate in place, so transformers still records its router logits:
with output_router_logits=True every MoE layer's logits come back (the masked ones at -inf) and the aux loss
counts every layer. A replacement module of another class was missed by transformers' output recorders: the
aux loss then covered the unmasked layers alone, or raised when every layer was masked."""
import copy

import pytest
import torch

from mcsmoe_fast import moe_layers
from mcsmoe_fast.modules.masked_router import MaskedTopKRouter
from mcsmoe_fast.tiny import tiny_moe


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe"])
def test_masked_gates_router_logits_are_recorded(family):
    reference = tiny_moe(family, num_layers=2, seed=0).eval()
    ids = torch.randint(3, 128, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = reference(input_ids=ids, output_router_logits=True)
    for masked_layers in ([0], [0, 1]):
        model = copy.deepcopy(reference)
        layers = moe_layers(model)
        for i in masked_layers:  # every expert kept: nothing may change
            layers[i].mask_router(torch.ones(layers[i].num_experts, dtype=torch.bool))
            assert isinstance(layers[i].module.gate, MaskedTopKRouter)
        with torch.no_grad():
            got = model(input_ids=ids, output_router_logits=True)
        assert len(got.router_logits) == len(want.router_logits) == 2
        for a, b in zip(got.router_logits, want.router_logits):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        torch.testing.assert_close(got.aux_loss, want.aux_loss, rtol=0, atol=0)
        torch.testing.assert_close(got.logits, want.logits, rtol=0, atol=0)
    keep = torch.ones(layers[1].num_experts, dtype=torch.bool)
    keep[1::2] = False
    layers[1].mask_router(keep)  # a second mask replaces the first on the same module
    with torch.no_grad():
        got = model(input_ids=ids, output_router_logits=True)
    assert torch.isneginf(got.router_logits[1][:, ~keep]).all() and torch.isfinite(got.router_logits[1][:, keep]).all()
    assert sorted(k for k in model.state_dict() if k.endswith(".gate.keep")) == [
        f"model.layers.{i}.mlp.gate.keep" for i in range(2)]
