"""`prune --max-memory` (streaming.prune_checkpoint, layer by layer) of a block-FP8 Mixtral and an MXFP4 GPT-OSS:
written back in the input's precision, tensor for tensor what the in-memory `prune` writes (the same kept experts,
the same bytes, the same quantization_config), with the error report's layer outputs; `--dtype` gives a
dequantized checkpoint without quantization_config."""
from __future__ import annotations

import json

import pytest
import torch

from mcsmoe_fast.cli import main
from mcsmoe_fast.streaming.quantized import quantize_checkpoint
from mcsmoe_fast.tiny import tiny_mixtral, tiny_moe
from test_cli_merge import LINES, tiny_tokenizer
from test_quant_standard import _tensors as tensors
from test_quantized_merge import FP8, MXFP4


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
def test_streamed_prune_keeps_the_precision_as_the_in_memory_prune_does(family, tmp_path, capsys):
    if family == "mixtral":
        model, fmt = tiny_mixtral(num_experts=4, hidden_size=128, intermediate_size=128), FP8
    else:
        model, fmt = tiny_moe("gpt_oss", num_experts=4, hidden_size=64, intermediate_size=64), MXFP4
    model.save_pretrained(tmp_path / "plain")
    tiny_tokenizer().save_pretrained(tmp_path / "plain")
    quantize_checkpoint(tmp_path / "plain", tmp_path / "q", fmt)
    tiny_tokenizer().save_pretrained(tmp_path / "q")
    (tmp_path / "calib.txt").write_text("\n".join(LINES * 2) + "\n")
    common = ["prune", "--model", tmp_path / "q", "--calib", tmp_path / "calib.txt", "--num-experts", 2]
    assert main([str(a) for a in common + ["--out", tmp_path / "mem"]]) == 0
    capsys.readouterr()
    assert main([str(a) for a in common + ["--max-memory", "1KB", "--out", tmp_path / "streamed"]]) == 0
    out = capsys.readouterr().out
    assert "layer by layer" in out and f"written in the input's precision ({fmt['quant_method']}" in out
    mem, streamed = tensors(tmp_path / "mem"), tensors(tmp_path / "streamed")
    assert sorted(mem) == sorted(streamed)
    for name in mem:
        assert mem[name].dtype == streamed[name].dtype, name
        assert torch.equal(mem[name].view(torch.uint8), streamed[name].view(torch.uint8)), name
    configs = [json.loads((tmp_path / d / "config.json").read_text()) for d in ("mem", "streamed")]
    assert configs[0]["quantization_config"] == configs[1]["quantization_config"] == fmt
    assert configs[0]["mcsmoe_prune"]["layers"] == configs[1]["mcsmoe_prune"]["layers"]
    report = configs[1]["mcsmoe_quantization"]
    assert report["layers"] and all(0 <= v["output"] < 0.1 for v in report["layers"].values())

    assert main([str(a) for a in common + ["--max-memory", "1KB", "--dtype", "bfloat16", "--out", tmp_path / "d"]]) == 0
    config = json.loads((tmp_path / "d" / "config.json").read_text())
    assert "quantization_config" not in config and "mcsmoe_quantization" not in config
    assert {t.dtype for t in tensors(tmp_path / "d").values()} <= {torch.bfloat16, torch.int64}
