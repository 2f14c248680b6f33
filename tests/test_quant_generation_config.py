"""A block-FP8 input loaded in memory (open_model -> load_dequantized) keeps its generation_config.json (sampling
defaults, every eos id), and the outputs written from it carry it, as the streamed paths and a plain input's do:
it was rebuilt from config.json, so generation no longer stopped at the input's second eos id."""
from __future__ import annotations

import json

import pytest
from transformers import GenerationConfig

from mcsmoe_fast.cli import main
from mcsmoe_fast.loading import open_model
from mcsmoe_fast.streaming.quantized import quantize_checkpoint
from mcsmoe_fast.tiny import tiny_mixtral, tiny_tokenizer
from test_cli_merge import LINES
from test_quantized_merge import FP8

SETTINGS = dict(do_sample=True, temperature=0.3, top_p=0.5, eos_token_id=[2, 5], max_new_tokens=7)
CALIB = ["--num-samples", "4", "--max-length", "12"]


@pytest.fixture(scope="module")
def fp8(tmp_path_factory):
    root = tmp_path_factory.mktemp("genconfig")
    model = tiny_mixtral(num_experts=4)
    model.generation_config = GenerationConfig(**SETTINGS)
    model.save_pretrained(root / "plain")
    tiny_tokenizer().save_pretrained(root / "plain")
    quantize_checkpoint(root / "plain", root / "fp8", FP8)
    (root / "calib.txt").write_text("\n".join(LINES * 2) + "\n")
    assert json.loads((root / "fp8" / "generation_config.json").read_text())["eos_token_id"] == [2, 5]
    return root


def _settings(config: dict) -> dict:
    return {k: config.get(k) for k in SETTINGS}


def test_open_model_reads_the_generation_config(fp8):
    assert _settings(open_model(str(fp8 / "fp8")).generation_config.to_dict()) == SETTINGS


@pytest.mark.parametrize("argv", [["prune", "--ratio", "0.5", "--calib", "{calib}", *CALIB], ["permute"],
                                  ["merge", "--num-groups", "2", "--format", "standard", "--calib", "{calib}", *CALIB],
                                  ["compress", "--rank", "4"]], ids=["prune", "permute", "merge-standard", "compress"])
def test_outputs_carry_the_inputs_generation_config(fp8, tmp_path, argv):
    argv = [a.replace("{calib}", str(fp8 / "calib.txt")) for a in argv]
    assert main([argv[0], "--model", str(fp8 / "fp8"), *argv[1:], "--out", str(tmp_path / "out")]) == 0
    assert _settings(json.loads((tmp_path / "out" / "generation_config.json").read_text())) == SETTINGS
