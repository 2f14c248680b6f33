"""`mcsmoe-fast merge` (and prune) on quantized checkpoints through the CLI entry point: the input's precision
by default, `--dtype` writes a dequantized checkpoint; the re-quantization error is printed and recorded."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from mcsmoe_fast.cli import main
from mcsmoe_fast.quant import dequantize_fp8
from mcsmoe_fast.streaming.quantized import quantize_checkpoint
from mcsmoe_fast.tiny import tiny_mixtral
from test_cli_merge import LINES, tiny_tokenizer

FP8 = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}
BANK = "model.layers.0.mlp.experts.w_in"


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("quant-cli")
    tiny_mixtral(num_experts=4, hidden_size=128, intermediate_size=128).save_pretrained(root / "plain")
    tiny_tokenizer().save_pretrained(root / "plain")
    quantize_checkpoint(root / "plain", root / "fp8", FP8)
    (root / "calib.txt").write_text("\n".join(LINES * 2) + "\n")
    return root


def _run(args, capsys):
    rc = main([str(a) for a in args])
    out = capsys.readouterr()
    return rc, out.out, out.err


def _merge(workspace, out, capsys, *extra):
    return _run(["merge", "--model", workspace / "fp8", "--calib", workspace / "calib.txt", "--num-groups", 2,
                 "--no-globally", "--out", out, *extra], capsys)


def _tensors(directory):
    return load_file(str(next(directory.glob("*.safetensors"))))


def test_merge_keeps_fp8_by_default_and_dequantizes_with_dtype(workspace, tmp_path, capsys):
    rc, out, err = _merge(workspace, tmp_path / "q", capsys)
    assert rc == 0, err
    assert "written in fp8: expert weights" in out and "layer outputs on calibration tokens" in out
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    assert config["quantization_config"] == FP8 and config["mcsmoe_merge"]["dtype"] == "bfloat16"
    report = config["mcsmoe_quantization"]
    assert set(report["layers"]) == {"model.layers.0.mlp", "model.layers.1.mlp"}
    assert 0 < report["max"]["w_in"] < 2.0 ** -4 and 0 < report["max"]["output"] < 0.1
    q = _tensors(tmp_path / "q")
    assert q[BANK].dtype == torch.float8_e4m3fn and q[BANK + "_scale_inv"].dtype == torch.float32

    rc, out, err = _merge(workspace, tmp_path / "d", capsys, "--dtype", "bfloat16")
    assert rc == 0, err
    assert "re-quantized" not in out
    config = json.loads((tmp_path / "d" / "config.json").read_text())
    assert "quantization_config" not in config and "mcsmoe_quantization" not in config
    assert config["mcsmoe_merge"]["dtype"] == "bfloat16"
    d = _tensors(tmp_path / "d")
    assert d[BANK].dtype == torch.bfloat16 and BANK + "_scale_inv" not in d
    assert not any(t.dtype == torch.float8_e4m3fn for t in d.values())
    # the same merge (same groups), one written dequantized: the FP8 output is its re-quantization
    assert torch.equal(q["model.layers.0.mlp.experts.expert_map"], d["model.layers.0.mlp.experts.expert_map"])
    deq, exact = dequantize_fp8(q[BANK], q[BANK + "_scale_inv"]), d[BANK].float()
    rel = ((deq.double() - exact.double()).norm() / exact.double().norm()).item()
    assert rel == pytest.approx(report["layers"]["model.layers.0.mlp"]["w_in"], rel=1e-6)


def test_merge_standard_format_of_fp8_is_written_in_fp8(workspace, tmp_path, capsys):
    """--format standard runs in memory (the checkpoint dequantized as read), then the family's checkpoint is
    re-quantized like the input: unchanged tensors byte for byte, the merged experts quantized afresh."""
    rc, out, err = _run(["merge", "--model", workspace / "fp8", "--calib", workspace / "calib.txt", "--num-groups", 2,
                         "--format", "standard", "--out", tmp_path / "s"], capsys)
    assert rc == 0, err
    assert "changed tensors to fp8" in out
    config = json.loads((tmp_path / "s" / "config.json").read_text())
    assert config["quantization_config"] == FP8 and config["num_local_experts"] == 2
    stored, source = _tensors(tmp_path / "s"), _tensors(workspace / "fp8")
    q_proj = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(stored[q_proj].view(torch.uint8), source[q_proj].view(torch.uint8))
    expert = "model.layers.1.block_sparse_moe.experts.1.w2.weight"
    assert stored[expert].dtype == torch.float8_e4m3fn and expert.replace(".1.w2", ".2.w2") not in stored
    errors = config["mcsmoe_quantization"]["tensors"]
    assert expert in errors and q_proj not in errors and 0 < max(errors.values()) < 2.0 ** -4
