"""Steps chained in the orders users try: what a chain records and how it refuses. A streamed prune of a merged
checkpoint is refused with advice for pruning, not merging; layers compressed in calls with different settings
each keep their own settings in the checkpoint's record; merge --help says a merged input keeps its dtype."""
import json

import pytest
import torch

import mcsmoe_fast as mf
from mcsmoe_fast.streaming.prune import prune_checkpoint
from mcsmoe_fast.tiny import tiny_moe

L0, L1 = "model.layers.0.mlp", "model.layers.1.mlp"


def merged_model():
    model = tiny_moe("mixtral", num_experts=4, seed=0)
    ids = torch.randint(3, 60, (2, 16), generator=torch.Generator().manual_seed(0))
    stats = mf.collect_routing_stats(model, [{"input_ids": ids}], progress=False)
    mf.merge_experts(model, stats, 2, globally=False, progress=False)
    return model, [{"input_ids": ids}]


def test_the_streamed_prune_of_a_merged_checkpoint_gives_pruning_advice(tmp_path):
    model, batches = merged_model()
    mf.save_pretrained(model, tmp_path / "merged")
    with pytest.raises(ValueError) as info:
        prune_checkpoint(tmp_path / "merged", tmp_path / "out", batches, num_experts=2, progress=False)
    message = str(info.value)
    assert "already a merged mcsmoe-fast checkpoint" in message and "prune and permute work on the original model" \
        in message and "streaming merges" not in message
    assert not (tmp_path / "out").exists()


def test_layers_compressed_in_two_calls_keep_their_own_settings(tmp_path):
    model, _ = merged_model()
    mf.compress_experts(model, rank=4, keep_ratio=0.2, layers=[0], progress=False)
    mf.compress_experts(model, rank=2, keep_ratio=0.3, layers=[1], progress=False)
    mf.save_pretrained(model, tmp_path / "mc")
    for section in (model.config.mcsmoe_compress, json.loads((tmp_path / "mc" / "config.json").read_text())[
            "mcsmoe_compress"], mf.from_pretrained(tmp_path / "mc").config.mcsmoe_compress):
        assert "method" not in section and section["layers"] == [L0, L1]
        assert (section["methods"][L0]["rank"], section["methods"][L0]["keep_ratio"]) == (4, 0.2)
        assert (section["methods"][L1]["rank"], section["methods"][L1]["keep_ratio"]) == (2, 0.3)


def test_one_setting_for_every_layer_stays_one_method():
    model, _ = merged_model()
    mf.compress_experts(model, rank=3, keep_ratio=0.2, layers=[0], progress=False)
    mf.compress_experts(model, rank=3, keep_ratio=0.2, layers=[1], progress=False)
    assert model.config.mcsmoe_compress == {
        "method": {"rank": 3, "keep_ratio": 0.2, "importance": "weight", "svd": "auto"}, "layers": [L0, L1]}


def test_the_section_of_the_layers_still_compressed_keeps_their_methods():
    from mcsmoe_fast.sections import compression_methods, compression_section

    a, b = {"rank": 4}, {"rank": 2}
    section = compression_section({L1: b, L0: a})
    assert section == {"methods": {L0: a, L1: b}, "layers": [L0, L1]}
    assert compression_methods(section) == {L0: a, L1: b}
    assert compression_section({L1: compression_methods(section)[L1]}) == {"method": b, "layers": [L1]}
    assert compression_methods({"method": a, "layers": [L0, L1]}) == {L0: a, L1: a}


def test_merge_help_says_a_merged_input_keeps_its_dtype():
    from mcsmoe_fast.cli import build_parser

    subparsers = next(a for a in build_parser()[0]._actions if a.choices and "merge" in a.choices).choices
    help_text = next(a.help for a in subparsers["merge"]._actions if "--dtype" in a.option_strings)
    assert "a merged or compressed input keeps the dtype it was saved in unless --dtype names one" in help_text
