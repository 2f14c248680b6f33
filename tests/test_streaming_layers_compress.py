"""merge_checkpoint with a subset of layers AND compression (and a memory budget): the layers left out
of `layers` are not merged but are still compressed (compress covers every MoE layer, as
compress_experts does on the merged model), and the checkpoint loads and equals the in-memory
pipeline open_model -> collect_routing_stats -> merge_experts(layers=...) -> compress_experts ->
save_pretrained."""
import json

import pytest

from mcsmoe_fast import from_pretrained, moe_layers
from mcsmoe_fast.modules.compressed import CompressedMoEExperts
from mcsmoe_fast.tiny import tiny_mixtral
from merge_helpers import calibration
from streaming_helpers import NUM_GROUPS, assert_same_checkpoint, in_memory, quiet_merge

COMPRESS = dict(rank=4, keep_ratio=0.3, svd="exact")
CHOSEN = [0, 2]
NAMES = [f"model.layers.{i}.mlp" for i in range(3)]


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A tiny 3-layer Mixtral saved by transformers in many shards."""
    path = tmp_path_factory.mktemp("layers-compress") / "mixtral-sharded"
    tiny_mixtral(num_layers=3, seed=1).save_pretrained(path, max_shard_size="50KB")
    return path


@pytest.fixture(scope="module")
def batches():
    return calibration(tiny_mixtral(num_layers=1), seed=3, batches=3, batch=2, length=9)


@pytest.mark.parametrize("globally", [True, False], ids=["global-two-passes", "per-layer-one-pass"])
@pytest.mark.parametrize("max_memory", [None, "1KB"], ids=["no-budget", "tiny-budget"])
def test_subset_of_layers_with_compression_equals_in_memory(source, batches, tmp_path, globally, max_memory):
    expected = in_memory(source, tmp_path / "expected", batches, compress=COMPRESS, layers=CHOSEN, globally=globally)
    result = quiet_merge(source, tmp_path / "streamed", batches, NUM_GROUPS, compress=COMPRESS, layers=CHOSEN,
                         globally=globally, max_memory=max_memory, offload_dir=tmp_path / "acts",
                         max_shard_size="20KB")
    assert set(result.groupings) == {NAMES[i] for i in CHOSEN}

    model = from_pretrained(result.path)  # loads: every layer's experts were written
    layers = {layer.name: layer for layer in moe_layers(model)}
    assert sorted(layers) == NAMES
    for name, layer in layers.items():
        assert isinstance(layer.module.experts, CompressedMoEExperts), f"{name} is not compressed"
        experts = layer.module.experts
        if name == NAMES[1]:  # left out of `layers`: its 8 experts unmerged, each its own slot
            assert experts.expert_map.tolist() == list(range(8)) and experts.num_slots == 8
        else:
            assert experts.num_slots < 8
    config = json.loads((result.path / "config.json").read_text())
    assert config["mcsmoe_compress"]["layers"] == NAMES
    assert sorted(config["mcsmoe_merge"]["layers"]) == NAMES

    assert_same_checkpoint(expected, result.path, batches)  # same tensors (kept rows included), same outputs
