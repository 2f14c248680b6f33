"""streaming.prune_checkpoint: REAP / frequency pruning of a checkpoint one decoder layer at a time, through the
streamed standard writer, equal tensor for tensor and config for config to prune_experts -> save_pretrained in memory."""
import json

import pytest
import torch
from safetensors.torch import load_file

import mcsmoe_fast as mf
from mcsmoe_fast.prune import prune_experts
from mcsmoe_fast.streaming.prune import prune_checkpoint
from mcsmoe_fast.tiny import tiny_mixtral, tiny_moe
from merge_helpers import calibration


def tensors(directory):
    out = {}
    for path in sorted(directory.glob("*.safetensors")):
        out.update(load_file(str(path)))
    return out


@pytest.mark.parametrize("family, method, offload", [("mixtral", "reap", True), ("deepseek_v3", "reap", False),
                                                     ("gpt_oss", "frequency", False)])
def test_streamed_prune_equals_in_memory(tmp_path, family, method, offload):
    model = tiny_mixtral(num_layers=3, seed=1) if family == "mixtral" else tiny_moe(family, num_layers=3, seed=1)
    model.save_pretrained(tmp_path / "src", max_shard_size="50KB")
    batches = calibration(model, seed=3, batches=3, batch=2, length=9)
    loaded = mf.open_model(str(tmp_path / "src"))
    stats = mf.collect_routing_stats(loaded, batches, saliency="reap" if method == "reap" else None, progress=False)
    expected = mf.save_pretrained(prune_experts(loaded, stats, num_experts=4, method=method), tmp_path / "memory",
                                  format="standard")
    out = prune_checkpoint(tmp_path / "src", tmp_path / "streamed", batches, num_experts=4, method=method,
                           progress=False, max_shard_size="40KB", max_memory="1KB" if offload else None,
                           offload_dir=tmp_path / "acts" if offload else None)
    a, b = tensors(expected), tensors(out)
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    ca, cb = (json.loads((d / "config.json").read_text()) for d in (expected, out))
    assert ca == cb
    kept = [entry["kept"] for entry in cb["mcsmoe_prune"]["layers"].values()]
    assert any(k != [0, 1, 2, 3] for k in kept)  # not the first experts: the router slice and the experts matter


def test_streamed_prune_refusals_before_any_work(tmp_path):
    model = tiny_mixtral(num_layers=1)
    model.save_pretrained(tmp_path / "src")
    batches = calibration(model, batches=1)
    for kwargs, match in [(dict(num_experts=1), "top_k=2 experts but keeps only 1"),
                          (dict(num_experts=9), "exceeds the 8 experts"), (dict(), "give exactly one of"),
                          (dict(num_experts=4, method="best"), "method must be one of")]:
        with pytest.raises(ValueError, match=match):
            prune_checkpoint(tmp_path / "src", tmp_path / "out", batches, progress=False, **kwargs)
    deepseek = tiny_moe("deepseek_v3", num_layers=1)
    deepseek.save_pretrained(tmp_path / "deepseek")
    with pytest.raises(ValueError, match="choose a multiple of 2"):  # 2 routing groups keep the same count each
        prune_checkpoint(tmp_path / "deepseek", tmp_path / "out", batches, num_experts=3, progress=False)
    assert not (tmp_path / "out").exists()
