"""Steps chained in the orders users try: what a chain records and how it refuses. A streamed prune of a merged
checkpoint is refused with advice for pruning, not merging; layers compressed in calls with different settings
each keep their own settings in the checkpoint's record; merge --help says a merged input keeps its dtype; a
merged block-FP8 checkpoint merged again keeps FP8 in the exact format, and what is written dequantized carries
no FP8 error report."""
import glob
import json
import random

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


@pytest.fixture(scope="module")
def fp8_merged(tmp_path_factory):
    """(directory, calibration options): a tiny block-FP8 Mixtral and its merge to 3 slots (m1), re-quantized."""
    from mcsmoe_fast.cli import main
    from mcsmoe_fast.streaming.quantized import quantize_checkpoint
    from mcsmoe_fast.tiny import TINY_WORDS, tiny_mixtral, tiny_tokenizer

    root = tmp_path_factory.mktemp("fp8")
    fp8 = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}
    tiny_mixtral(num_experts=4, hidden_size=128, intermediate_size=128).save_pretrained(root / "plain")
    quantize_checkpoint(root / "plain", root / "fp8", fp8)
    tiny_tokenizer().save_pretrained(root / "fp8")
    rng, words = random.Random(0), TINY_WORDS.split()
    (root / "c.txt").write_text("\n".join(" ".join(rng.choice(words) for _ in range(12)) for _ in range(16)))
    calib = ["--calib", str(root / "c.txt"), "--num-samples", "16", "--max-length", "16", "--no-globally"]
    assert main(["merge", "--model", str(root / "fp8"), *calib, "--num-groups", "3", "--out", str(root / "m1")]) == 0
    return root, calib


def stored(directory):
    """(config.json, the dtypes its safetensors store)."""
    from safetensors import safe_open

    dtypes = set()
    for file in glob.glob(str(directory / "*.safetensors")):
        with safe_open(file, "pt") as f:
            dtypes |= {f.get_slice(k).get_dtype() for k in f.keys()}
    return json.loads((directory / "config.json").read_text()), dtypes


def test_a_merged_fp8_checkpoint_merged_again_stays_fp8_in_the_exact_format(fp8_merged, capsys):
    from mcsmoe_fast.cli import main

    root, calib = fp8_merged
    assert main(["merge", "--model", str(root / "m1"), *calib, "--num-groups", "2", "--out", str(root / "m2")]) == 0
    assert "written in the input's precision (fp8)" in capsys.readouterr().out
    config, dtypes = stored(root / "m2")
    assert config["quantization_config"]["quant_method"] == "fp8" and "F8_E4M3" in dtypes
    assert 0 < config["mcsmoe_quantization"]["max"]["weights"] < 0.05, "the second merge's slots, quantized afresh"
    assert main(["merge", "--model", str(root / "m1"), *calib, "--num-groups", "2", "--dtype", "bfloat16",
                 "--out", str(root / "m2_bf16")]) == 0
    ids = torch.tensor([[3, 4, 5, 6, 7]])
    fp8, bf16 = (mf.from_pretrained(root / name)(ids).logits.float() for name in ("m2", "m2_bf16"))
    assert ((fp8 - bf16).norm() / bf16.norm()) < 0.03, "the same merge, at FP8 rounding"
    assert stored(root / "m2")[0]["mcsmoe_merge"]["layers"] == stored(root / "m2_bf16")[0]["mcsmoe_merge"]["layers"]


def test_a_merged_fp8_checkpoint_exported_dense_says_so_and_carries_no_fp8_report(fp8_merged, capsys):
    from mcsmoe_fast.cli import main

    root, calib = fp8_merged
    assert main(["merge", "--model", str(root / "m1"), *calib, "--num-groups", "2", "--export-dense",
                 "--out", str(root / "dense")]) == 0
    assert "the input's fp8 tensors written dequantized in bfloat16" in capsys.readouterr().out
    config, dtypes = stored(root / "dense")
    assert "quantization_config" not in config and "mcsmoe_quantization" not in config and "F8_E4M3" not in dtypes
    model = mf.from_pretrained(root / "m1")
    assert getattr(model.config, "mcsmoe_quantization", None) is None, "loaded dequantized: no FP8 report"
    mf.save_pretrained(model, root / "dense_api", export_dense=True)
    assert "mcsmoe_quantization" not in stored(root / "dense_api")[0]
