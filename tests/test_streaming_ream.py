"""REAM-style merging larger than memory: merge_checkpoint(grouping="ream", format="standard") collects REAP saliency
in its layer-by-layer statistics pass and caps the groups at max_group_size, writing the same standard checkpoint
as ream_experts -> to_standard(router="dominant") -> save_pretrained on the model in memory."""
from __future__ import annotations

import json

import pytest
import torch

import mcsmoe_fast as mf
from mcsmoe_fast.checkpoint import to_standard
from mcsmoe_fast.ream import ream_experts
from mcsmoe_fast.streaming import merge_checkpoint
from mcsmoe_fast.tiny import tiny_mixtral
from merge_helpers import calibration
from test_quant_standard import _tensors


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    path = tmp_path_factory.mktemp("ream") / "plain"
    tiny_mixtral(seed=4).save_pretrained(path, max_shard_size="60KB")
    return path


@pytest.fixture(scope="module")
def batches():
    return calibration(tiny_mixtral(num_layers=1), seed=5, batches=2, batch=2, length=7)


@pytest.mark.parametrize("cap", [16, 3])
def test_streamed_ream_equals_ream_experts_in_memory(source, batches, tmp_path, cap):
    merge_checkpoint(source, tmp_path / "streamed", batches, 3, similarity="expert-output", grouping="ream",
                     max_group_size=cap, format="standard", router="dominant", globally=False, max_memory="1KB",
                     progress=False)
    model = mf.open_model(str(source))
    stats = mf.collect_routing_stats(model, batches, bases=("expert-output",), saliency="reap", progress=False)
    groupings = ream_experts(model, stats, num_experts=3, max_group_size=cap, progress=False)
    assert max(len(m) for g in groupings.values() for m in g.groups) <= cap
    to_standard(model, router="dominant").save_pretrained(tmp_path / "in-memory")
    got, want = _tensors(tmp_path / "streamed"), _tensors(tmp_path / "in-memory")
    assert sorted(got) == sorted(want)
    assert all(torch.equal(got[n], want[n]) for n in want)
    layers = json.loads((tmp_path / "streamed" / "config.json").read_text())["mcsmoe_standard"]["layers"]
    assert {n: sorted(map(sorted, e["groups"])) for n, e in layers.items()} == {
        n: sorted(map(sorted, g.groups)) for n, g in groupings.items()}


def test_streamed_ream_options_are_checked_first(source, batches, tmp_path):
    with pytest.raises(ValueError, match="max_group_size caps REAM's groups"):
        merge_checkpoint(source, tmp_path / "a", batches, 3, max_group_size=3, progress=False)
    with pytest.raises(ValueError, match="does not run with a device_map"):
        merge_checkpoint(source, tmp_path / "b", batches, 3, similarity="expert-output", grouping="ream",
                         device_map="cpu", progress=False)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
