"""Degenerate calibration that real runs produce: statistics of MoE layers no token reached are refused (every
choice made from them came from tie order), and a per-layer num_groups mapping may name only merged layers."""
import copy
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


def test_switch_decoder_layers_without_a_label_are_named():
    model = tiny_switch(num_experts=4)
    x = ids((2, 8))
    batch = dict(input_ids=x, attention_mask=torch.ones_like(x), labels=torch.full((2, 4), -100))
    with pytest.raises(ValueError, match=r"reached MoE layers \['decoder\.block\.1\.layer\.2\.mlp', "
                                         r"'decoder\.block\.3\.layer\.2\.mlp'\]"):
        collect_routing_stats(model, [batch], progress=False)


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
