"""`compress --max-memory` (streaming/compress.py) on a merged checkpoint of a block-FP8 / MXFP4 source: the merged
slots are dequantized as they are read (before, their raw FP8 values were decomposed without their scales and the
scales were written next to the factors: a checkpoint that did not load), the other tensors are copied as stored
(still quantized), or all dequantized with --dtype. The reference is the in-memory pipeline on the same checkpoint:
from_pretrained (whose dequantization is checked against transformers' in test_quantized_merge.py) ->
compress_experts(importance="weight")."""
from __future__ import annotations

import json

import pytest
import torch

from mcsmoe_fast import compress_experts, from_pretrained
from mcsmoe_fast.cli import main
from mcsmoe_fast.streaming import merge_checkpoint
from mcsmoe_fast.streaming.quantized import quantize_checkpoint
from mcsmoe_fast.tiny import tiny_mixtral, tiny_moe
from merge_helpers import calibration
from test_quant_standard import _bytes, _tensors
from test_quantized_merge import FP8, MXFP4

Q_PROJ = "model.layers.1.self_attn.q_proj.weight"


def _merged(root, model, config):
    model.save_pretrained(root / "plain")
    quantize_checkpoint(root / "plain", root / "quantized", config)
    batches = calibration(model, seed=5, batches=2, batch=2, length=7)
    merge_checkpoint(root / "quantized", root / "merged", batches, 2, progress=False)
    return root / "merged"


@pytest.fixture(scope="module")
def fp8_merged(tmp_path_factory):
    return _merged(tmp_path_factory.mktemp("fp8"), tiny_mixtral(num_experts=4, hidden_size=128, intermediate_size=128,
                                                                seed=6), FP8)


def _compress(args, capsys):
    rc = main(["compress", "--rank", "8", "--keep-ratio", "0.2", *[str(a) for a in args]])
    out = capsys.readouterr()
    assert rc == 0, out.err
    return out.out


def _reference(merged, dtype=None):
    model = from_pretrained(merged, dtype=dtype)
    compress_experts(model, rank=8, keep_ratio=0.2, importance="weight", progress=False)
    return model.state_dict()


def _assert_same(got, want):
    assert sorted(got) == sorted(want)
    for name, tensor in want.items():
        assert got[name].dtype == tensor.dtype and torch.equal(got[name], tensor), name


def test_streamed_compress_of_fp8_keeps_the_precision_and_equals_the_in_memory_compress(fp8_merged, tmp_path, capsys):
    out = _compress(["--model", fp8_merged, "--out", tmp_path / "c", "--max-memory", "1KB"], capsys)
    assert "layer by layer" in out and "non-expert tensors kept in the input's precision (fp8)" in out
    config = json.loads((tmp_path / "c" / "config.json").read_text())
    assert config["quantization_config"] == FP8
    assert "mcsmoe_quantization" not in config  # the merge's report was about slots that are now factors
    got, merged = _tensors(tmp_path / "c"), _tensors(fp8_merged)
    for part in (Q_PROJ, Q_PROJ + "_scale_inv"):
        assert torch.equal(_bytes(got[part]), _bytes(merged[part])), part
    assert not [n for n in got if ".experts.w_" in n]  # no slot (nor its scales) left
    _assert_same(from_pretrained(tmp_path / "c").state_dict(), _reference(fp8_merged))


def test_streamed_compress_of_fp8_with_dtype_is_dequantized(fp8_merged, tmp_path, capsys):
    out = _compress(["--model", fp8_merged, "--out", tmp_path / "d", "--max-memory", "1KB", "--dtype", "float32"],
                    capsys)
    assert "layer by layer" in out and "input's precision" not in out
    config = json.loads((tmp_path / "d" / "config.json").read_text())
    assert "quantization_config" not in config and config["mcsmoe_merge"]["dtype"] == "float32"
    got = _tensors(tmp_path / "d")
    assert got[Q_PROJ].dtype == torch.float32 and Q_PROJ + "_scale_inv" not in got
    assert got["model.layers.0.mlp.experts.in_U"].dtype == torch.float32
    _assert_same(from_pretrained(tmp_path / "d").state_dict(), _reference(fp8_merged, torch.float32))


def test_streamed_compress_of_a_merged_mxfp4_gpt_oss(tmp_path, capsys):
    merged = _merged(tmp_path, tiny_moe("gpt_oss", num_experts=4, hidden_size=64, intermediate_size=64), MXFP4)
    _compress(["--model", merged, "--out", tmp_path / "c", "--max-memory", "1KB"], capsys)
    assert json.loads((tmp_path / "c" / "config.json").read_text())["quantization_config"] == MXFP4
    assert not [n for n in _tensors(tmp_path / "c") if ".experts.w_" in n]
    _assert_same(from_pretrained(tmp_path / "c").state_dict(), _reference(merged))
