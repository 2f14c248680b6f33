"""Outputs that must not depend on the process that wrote them: the tokenizer a command saves is the input's,
without the settings transformers used to find its files; an output that is no longer quantized carries no
re-quantization report of the checkpoint it came from."""
import json

import torch

import mcsmoe_fast as mf
from mcsmoe_fast.calibration_data import load_tokenizer
from mcsmoe_fast.tiny import tiny_mixtral, tiny_tokenizer


def test_a_saved_tokenizer_config_is_the_inputs_whatever_hf_hub_offline_says(tmp_path, monkeypatch):
    tiny_tokenizer().save_pretrained(tmp_path / "m")
    written = []
    for offline in ("0", "1"):
        monkeypatch.setenv("HF_HUB_OFFLINE", offline)
        load_tokenizer(str(tmp_path / "m")).save_pretrained(tmp_path / f"out{offline}")
        written.append(json.loads((tmp_path / f"out{offline}" / "tokenizer_config.json").read_text()))
    source = json.loads((tmp_path / "m" / "tokenizer_config.json").read_text())
    assert written[0] == written[1] == source
    assert not {"is_local", "local_files_only"} & set(written[0])


def test_a_model_no_longer_quantized_drops_the_requantization_report(tmp_path):
    """A merged block-FP8 checkpoint loads dequantized: the report of its FP8 slots must not travel into what the
    model is saved as next (a dense export, a merge again), where no tensor is FP8 any more."""
    import random

    from mcsmoe_fast.cli import main
    from mcsmoe_fast.streaming.quantized import quantize_checkpoint
    from mcsmoe_fast.tiny import TINY_WORDS

    fp8 = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}
    tiny_mixtral(num_experts=4, hidden_size=128, intermediate_size=128).save_pretrained(tmp_path / "plain")
    quantize_checkpoint(tmp_path / "plain", tmp_path / "fp8", fp8)
    tiny_tokenizer().save_pretrained(tmp_path / "fp8")
    random.seed(0)
    words = TINY_WORDS.split()
    (tmp_path / "c.txt").write_text("\n".join(" ".join(random.choice(words) for _ in range(12)) for _ in range(16)))
    assert main(["merge", "--model", str(tmp_path / "fp8"), "--calib", str(tmp_path / "c.txt"), "--num-samples", "16",
                 "--max-length", "16", "--no-globally", "--num-groups", "3", "--out", str(tmp_path / "m")]) == 0
    assert "mcsmoe_quantization" in json.loads((tmp_path / "m" / "config.json").read_text()), "design: FP8 merged"
    model = mf.from_pretrained(tmp_path / "m")
    assert getattr(model.config, "mcsmoe_quantization", None) is None
    mf.save_pretrained(model, tmp_path / "dense", export_dense=True)
    config = json.loads((tmp_path / "dense" / "config.json").read_text())
    assert "quantization_config" not in config and "mcsmoe_quantization" not in config
    assert torch.isfinite(mf.from_pretrained(tmp_path / "dense")(torch.tensor([[3, 4, 5]])).logits).all()
