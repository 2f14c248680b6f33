"""Statistics and merges that drifted from the model in low or high precision: a bf16 / fp16 Switch router rounds
its probabilities to the model's dtype before its argmax (ties go to the lower index), so the calibration counts
must follow that choice, not the float32 logits'; and a float64 model's single-member groups must be copied
exactly (the merge accumulated in float32)."""
import copy

import pytest
import torch

from mcsmoe_fast import collect_routing_stats, merge_experts, moe_layers
from mcsmoe_fast.tiny import tiny_switch


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("dropped", [False, True], ids=["every-expert", "drop-baseline-masked"])
def test_switch_counts_are_the_routers_own_choice_in_half_precision(dtype, dropped):
    model = tiny_switch(num_experts=32, seed=0, expert_capacity=4096).to(dtype)
    g = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(3, 128, (8, 64), generator=g)} for _ in range(3)]
    for b in batches:
        b["attention_mask"] = torch.ones_like(b["input_ids"])
    layers = moe_layers(model)
    keep = torch.ones(32, dtype=torch.bool)
    keep[::3] = False
    if dropped:
        for layer in layers:
            layer.mask_router(keep)
    seen = {layer.name: torch.zeros(32, dtype=torch.int64) for layer in layers}

    def record(name):  # the router's one-hot expert_index (no token over capacity here)
        def hook(module, args, output):
            one_hot = output[0].reshape(-1, 32)
            assert bool((one_hot.sum(-1) == 1).all())
            seen[name] += torch.bincount(one_hot.argmax(-1), minlength=32)
        return hook

    handles = [layer.module.router.register_forward_hook(record(layer.name)) for layer in layers]
    try:
        with torch.no_grad():
            for b in batches:
                model(**b, decoder_input_ids=model._shift_right(b["input_ids"]))
    finally:
        for h in handles:
            h.remove()
    stats = collect_routing_stats(model, batches, progress=False)
    for layer in layers:
        assert torch.equal(stats[layer.name].counts.to(torch.int64), seen[layer.name]), layer.name
        assert not dropped or int(seen[layer.name][~keep].sum()) == 0


def test_a_float64_model_keeps_its_single_member_groups_exactly():
    model = tiny_switch(num_experts=4).double()
    with torch.no_grad():  # weights carrying float64 precision, not float32 values widened
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 1e-9)
    original = copy.deepcopy(model)
    ids = torch.randint(3, 128, (2, 8), generator=torch.Generator().manual_seed(1))
    stats = collect_routing_stats(model, [{"input_ids": ids, "decoder_input_ids": ids[:, :4]}], progress=False)
    merge_experts(model, stats, 4, globally=False, permute=False, progress=False)
    for a, b in zip(moe_layers(original), moe_layers(model)):
        for wa, wb in zip(a.expert_weights(), b.expert_weights()):
            assert wb.dtype == torch.float64 and torch.equal(wa, wb), a.name
