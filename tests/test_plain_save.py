"""transformers' own save_pretrained is refused on models whose MoE layers are ours (it would write a
checkpoint that transformers reloads with random experts); ours and the dense export still work."""
import pytest
import torch

from mcsmoe_fast import compress_experts, from_pretrained, optimize, save_pretrained
from mcsmoe_fast.models.hub import load_model
from mcsmoe_fast.checkpoint.plain_save import PlainSaveRefused
from merge_helpers import build, calibration, forward


def refuses(model, tmp_path):
    with pytest.raises(PlainSaveRefused, match="mcsmoe_fast.save_pretrained"):
        model.save_pretrained(tmp_path / "plain")
    with pytest.raises(PlainSaveRefused):
        model.push_to_hub("someone/model")
    assert not (tmp_path / "plain").exists()


@pytest.mark.parametrize("family", ["switch", "mixtral"])
def test_optimized_and_compressed_models_refuse_plain_saves(family, tmp_path):
    model = build(family, tmp_path)
    batch = calibration(model)[0]
    expected = forward(model, batch)
    optimize(model)
    if family == "switch":  # SwitchMoE replaces the block
        refuses(model, tmp_path)
    else:  # the experts-contract families keep their modules under optimize: transformers' save just works
        model.save_pretrained(tmp_path / "optimized")
        torch.testing.assert_close(forward(load_model(str(tmp_path / "optimized")), batch), expected, rtol=1e-5, atol=1e-5)
    dense = save_pretrained(model, tmp_path / "dense", export_dense=True)
    torch.testing.assert_close(forward(load_model(str(dense)), batch), expected, rtol=1e-5, atol=1e-5)
    compress_experts(model, rank=4, keep_ratio=0.5, progress=False)
    refuses(model, tmp_path)
    reloaded = from_pretrained(save_pretrained(model, tmp_path / "ours"))
    refuses(reloaded, tmp_path)
    torch.testing.assert_close(forward(reloaded, batch), forward(model, batch))


def test_plain_models_still_save_with_transformers(tmp_path):
    model = build("mixtral", tmp_path)
    model.save_pretrained(tmp_path / "plain")  # untouched model: transformers' save as usual
    ours = from_pretrained(save_pretrained(model, tmp_path / "ours"))  # our format, nothing merged
    ours.save_pretrained(tmp_path / "plain-again")
    assert (tmp_path / "plain-again" / "config.json").is_file()


def test_merged_models_refuse_plain_saves(tmp_path):
    from mcsmoe_fast import collect_routing_stats, merge_experts

    model = build("switch", tmp_path)
    batches = calibration(model)
    merge_experts(model, collect_routing_stats(model, batches, progress=False), 2, progress=False)
    refuses(model, tmp_path)
