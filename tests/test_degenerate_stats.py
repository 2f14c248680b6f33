"""Degenerate calibration that real runs produce: statistics of MoE layers no token reached are refused (every
choice made from them came from tie order), and a per-layer num_groups mapping may name only merged layers."""
import copy
import json
import re

import pytest
import torch

from mcsmoe_fast import collect_routing_stats, merge_experts
from mcsmoe_fast.streaming import merge_checkpoint
from mcsmoe_fast.tiny import tiny_moe, tiny_switch

MIXTRAL_LAYERS = ["model.layers.0.mlp", "model.layers.1.mlp"]


def ids(shape=(2, 6)):
    return torch.randint(3, 128, shape, generator=torch.Generator().manual_seed(0))


def all_padding():
    return [dict(input_ids=ids((2, 5)), attention_mask=torch.zeros(2, 5, dtype=torch.long))]


@pytest.mark.parametrize("options", [{}, dict(saliency="reap", input_norms=True)])
def test_statistics_of_padding_alone_are_refused(options):
    model = tiny_moe("mixtral", num_experts=4, top_k=2, num_layers=2)
    with pytest.raises(ValueError, match=re.escape(f"no calibration token reached MoE layers {MIXTRAL_LAYERS}")):
        collect_routing_stats(model, all_padding(), progress=False, **options)


def test_one_real_token_is_enough():
    model = tiny_moe("mixtral", num_experts=4, top_k=2, num_layers=2)
    mask = torch.zeros(2, 5, dtype=torch.long)
    mask[1, 3] = 1
    stats = collect_routing_stats(model, [dict(input_ids=ids((2, 5)), attention_mask=mask)], progress=False)
    assert [s.tokens for s in stats.values()] == [1, 1]


def switch_without_decoder_labels():
    model = tiny_switch(num_experts=4)
    x = ids((2, 8))
    batch = dict(input_ids=x, attention_mask=torch.ones_like(x), labels=torch.full((2, 4), -100))
    return model, collect_routing_stats(model, [batch], progress=False, input_norms=True)


DECODER = r"\['decoder\.block\.1\.layer\.2\.mlp', 'decoder\.block\.3\.layer\.2\.mlp'\]"


def test_the_unreached_layers_a_step_uses_are_named():
    """A Switch decoder whose labels are all -100 sees no token: merging it would collapse each decoder layer by
    tie order. Merging, pruning and activation compression name its layers."""
    from mcsmoe_fast import compress_experts
    from mcsmoe_fast.prune import prune_experts

    model, stats = switch_without_decoder_labels()
    assert [s.tokens for s in stats.values()] == [16, 16, 0, 0]
    with pytest.raises(ValueError, match=f"no calibration token reached MoE layers {DECODER}"):
        merge_experts(model, stats, 2, globally=False, progress=False)
    with pytest.raises(ValueError, match=r"no calibration token reached MoE layers \['decoder\.block\.1"):
        prune_experts(model, stats, num_experts=2, method="frequency")
    with pytest.raises(ValueError, match=r"no calibration token reached MoE layers \['decoder\.block\.1"):
        compress_experts(model, importance="activation", stats=stats, progress=False)


def test_merging_only_the_layers_the_batches_reached_still_works():
    model, stats = switch_without_decoder_labels()
    encoder = [name for name in stats if name.startswith("encoder")]
    groupings = merge_experts(model, stats, 2, globally=False, layers=encoder, progress=False)
    assert sorted(groupings) == encoder and all(g.num_groups == 2 for g in groupings.values())


def test_the_streamed_merge_refuses_padding_alone_and_writes_nothing(tmp_path):
    tiny_moe("mixtral", num_experts=4, top_k=2).save_pretrained(tmp_path / "src")
    with pytest.raises(ValueError, match="no calibration token reached MoE layers"):
        merge_checkpoint(tmp_path / "src", tmp_path / "out", all_padding(), 2, progress=False)
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"], "no temporary left beside the output"


@pytest.mark.parametrize("num_groups,layers,extra", [
    ({"model.layers.0.mlp": 2, "model.layers.1.mlp": 3, "model.layers.7.mlp": 1}, None, ["model.layers.7.mlp"]),
    ({"model.layers.0.mlp": 2, "model.layers.1.mlp": 3}, [0], ["model.layers.1.mlp"]),
])
def test_a_count_for_a_layer_that_is_not_merged_is_refused(num_groups, layers, extra):
    model = tiny_moe("mixtral", num_experts=4, top_k=2, num_layers=2)
    stats = collect_routing_stats(model, [dict(input_ids=ids())], progress=False)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=rf"num_groups: counts for layers that are not merged \['{extra[0]}'\]"):
        merge_experts(model, stats, num_groups, globally=False, layers=layers, progress=False)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "refused before any layer changed"


@pytest.mark.parametrize("layers,refused", [(None, True), ([0, 1], False)])
def test_the_device_map_merge_refuses_only_the_unreached_layers_it_merges(tmp_path, layers, refused):
    """Switch streams through accelerate's device map; its statistics pass checks the chosen layers alone."""
    tiny_switch(num_experts=4).save_pretrained(tmp_path / "src")
    x = ids((2, 8))
    batches = [dict(input_ids=x, attention_mask=torch.ones_like(x), labels=torch.full((2, 4), -100))]
    run = lambda: merge_checkpoint(tmp_path / "src", tmp_path / "out", batches, 2, globally=False,  # noqa: E731
                                   layers=layers, device_map="cpu", progress=False)
    if refused:
        with pytest.raises(ValueError, match=f"no calibration token reached MoE layers {DECODER}"):
            run()
        assert not (tmp_path / "out").exists()
    else:
        run()
        config = json.loads((tmp_path / "out" / "config.json").read_text())
        merged = sorted(config["mcsmoe_merge"]["layers"])
        assert merged == ["encoder.block.1.layer.1.mlp", "encoder.block.3.layer.1.mlp"]
