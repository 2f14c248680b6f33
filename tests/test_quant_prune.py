"""GPT-OSS MXFP4 (and block-FP8) checkpoints prune without a prior dequantization step: the in-memory path
(open_model dequantizes the experts as they are read) keeps the same experts as the prune of the dequantized
twin, and the pruned checkpoint is written back in MXFP4 whose values are the twin's prune exactly (MXFP4 is a
projection: re-quantizing dequantized values gives them back); through the API and the CLI."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from mcsmoe_fast.calibrate import collect_routing_stats
from mcsmoe_fast.checkpoint import save_pretrained
from mcsmoe_fast.cli import main
from mcsmoe_fast.loading import open_model
from mcsmoe_fast.prune import kept_experts, prune_experts
from mcsmoe_fast.quant import dequantize_mxfp4
from mcsmoe_fast.streaming.quantized import quantize_checkpoint, requantize_saved
from mcsmoe_fast.tiny import tiny_mixtral, tiny_moe
from merge_helpers import calibration
from test_cli_merge import LINES, tiny_tokenizer
from test_quantized_merge import FP8, MXFP4, _twin

LAYERS = ("model.layers.0.mlp", "model.layers.1.mlp")


@pytest.fixture(scope="module")
def gpt_oss(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpt-oss")
    tiny_moe("gpt_oss", num_experts=4, hidden_size=64, intermediate_size=64).save_pretrained(root / "plain")
    tiny_tokenizer().save_pretrained(root / "plain")
    quantize_checkpoint(root / "plain", root / "mx", MXFP4)
    (root / "calib.txt").write_text("\n".join(LINES * 2) + "\n")
    return root, _twin(root / "mx", root / "twin", MXFP4)


def _dequantized_load(path, quant_config):
    from transformers import AutoModelForCausalLM, FineGrainedFP8Config, Mxfp4Config

    q = Mxfp4Config(dequantize=True) if quant_config["quant_method"] == "mxfp4" else FineGrainedFP8Config(dequantize=True)
    return AutoModelForCausalLM.from_pretrained(str(path), quantization_config=q, dtype=torch.float32).state_dict()


def _prune(path, batches):
    model = open_model(str(path), torch.float32)
    stats = collect_routing_stats(model, batches, saliency="reap")
    return kept_experts(model, stats, 2), prune_experts(model, stats, 2)


def test_open_model_dequantizes_mxfp4_as_transformers_does(gpt_oss):
    root, twin = gpt_oss
    got, ref = open_model(str(root / "mx"), torch.float32).state_dict(), _dequantized_load(root / "mx", MXFP4)
    assert sorted(got) == sorted(ref)
    for name in ref:
        assert torch.equal(got[name], ref[name]), name
    assert open_model(str(root / "mx")).model.layers[0].mlp.experts.gate_up_proj.dtype == torch.bfloat16


def test_mxfp4_prune_equals_the_prune_of_its_dequantized_twin(gpt_oss, tmp_path):
    root, twin = gpt_oss
    batches = calibration(tiny_moe("gpt_oss", num_layers=1), seed=5, batches=3, batch=2, length=9)
    kept, pruned = _prune(root / "mx", batches)
    kept_twin, pruned_twin = _prune(twin, batches)
    assert kept == kept_twin and set(kept) == set(LAYERS) and all(len(k) == 2 for k in kept.values())
    save_pretrained(pruned, tmp_path / "q", format="standard")
    requantize_saved(tmp_path / "q", root / "mx")
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    assert config["quantization_config"] == MXFP4 and config["num_local_experts"] == 2
    stored, source = load_file(str(tmp_path / "q" / "model.safetensors")), load_file(str(root / "mx" / "model.safetensors"))
    bank = "model.layers.0.mlp.experts.gate_up_proj"
    assert bank not in stored and stored[bank + "_blocks"].shape[0] == 2 and stored[bank + "_blocks"].dtype == torch.uint8
    # a kept expert's stored values are the source's (a block whose top code was 3 is re-encoded: same values)
    j = kept["model.layers.0.mlp"][1]
    assert torch.equal(dequantize_mxfp4(stored[bank + "_blocks"][1], stored[bank + "_scales"][1]),
                       dequantize_mxfp4(source[bank + "_blocks"][j], source[bank + "_scales"][j]))
    got, ref = _dequantized_load(tmp_path / "q", MXFP4), pruned_twin.state_dict()
    assert sorted(got) == sorted(ref)
    for name in ref:
        assert torch.equal(got[name], ref[name]), name


def test_fp8_prune_written_back_in_fp8(tmp_path):
    tiny_mixtral(num_experts=4, hidden_size=128, intermediate_size=128).save_pretrained(tmp_path / "plain")
    quantize_checkpoint(tmp_path / "plain", tmp_path / "fp8", FP8)
    twin = _twin(tmp_path / "fp8", tmp_path / "twin", FP8)
    batches = calibration(tiny_mixtral(num_layers=1), seed=3, batches=3, batch=2, length=9)
    kept, pruned = _prune(tmp_path / "fp8", batches)
    kept_twin, pruned_twin = _prune(twin, batches)
    assert kept == kept_twin
    save_pretrained(pruned, tmp_path / "q", format="standard")
    requantize_saved(tmp_path / "q", tmp_path / "fp8")
    stored, source = load_file(str(tmp_path / "q" / "model.safetensors")), load_file(str(tmp_path / "fp8" / "model.safetensors"))
    q_proj = "model.layers.1.self_attn.q_proj.weight"
    for part in (q_proj, q_proj + "_scale_inv"):  # unchanged tensors: the source's bytes
        assert torch.equal(stored[part].view(torch.uint8), source[part].view(torch.uint8)), part
    expert = "model.layers.{}.block_sparse_moe.experts.{}.{}.weight"  # transformers saves Mixtral per expert
    assert stored[expert.format(0, 1, "w1")].dtype == torch.float8_e4m3fn and expert.format(0, 2, "w1") not in stored
    # every kept expert, renumbered or not, is the source expert it was: its codes and scales byte for byte (they were
    # quantized afresh from the bfloat16 working copy: 0.1-0.4% off)
    renumbered = 0
    for layer, kept_here in kept.items():
        n = int(layer.split(".")[2])
        for i, j in enumerate(kept_here):
            renumbered += i != j
            for w in ("w1", "w2", "w3"):
                for part in ("", "_scale_inv"):
                    new, old = expert.format(n, i, w) + part, expert.format(n, j, w) + part
                    assert torch.equal(stored[new].view(torch.uint8), source[old].view(torch.uint8)), (new, old)
    assert renumbered > 0
    assert "mcsmoe_quantization" not in json.loads((tmp_path / "q" / "config.json").read_text())  # nothing afresh
    got, ref = _dequantized_load(tmp_path / "q", FP8), pruned_twin.state_dict()
    for name in ref:  # the twin holds the source's values, dequantized in float32
        assert torch.allclose(got[name], ref[name], rtol=2.0 ** -8, atol=0), name


@pytest.mark.parametrize("max_memory", [None, "1MB"])
def test_fp8_standard_merge_copies_its_one_expert_groups(tmp_path, capsys, max_memory):
    """A standard merge's one-expert group written at another index is the source expert it was, byte for byte with
    its scales (in memory and streamed alike); the merged groups are quantized afresh and reported."""
    tiny_mixtral(num_experts=4, hidden_size=128, intermediate_size=128).save_pretrained(tmp_path / "plain")
    tiny_tokenizer().save_pretrained(tmp_path / "plain")
    quantize_checkpoint(tmp_path / "plain", tmp_path / "fp8", FP8)
    (tmp_path / "calib.txt").write_text("\n".join(LINES * 2) + "\n")
    rc, _, err = _cli(["merge", "--model", tmp_path / "fp8", "--calib", tmp_path / "calib.txt", "--num-groups", 3,
                       "--format", "standard", "--out", tmp_path / "m", *(["--max-memory", max_memory] if max_memory
                                                                          else [])], capsys)
    assert rc == 0, err
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    stored = load_file(str(tmp_path / "m" / "model.safetensors"))
    source = load_file(str(tmp_path / "fp8" / "model.safetensors"))
    expert = "model.layers.{}.block_sparse_moe.experts.{}.{}.weight{}"
    moved = merged = 0
    for layer, entry in config["mcsmoe_standard"]["layers"].items():
        n = int(layer.split(".")[2])
        for i, group in enumerate(entry["groups"]):
            names = [expert.format(n, i, w, "") for w in ("w1", "w2", "w3")]
            if len(group) > 1:
                merged += 1
                assert all(name in config["mcsmoe_quantization"]["tensors"] for name in names)
                continue
            moved += group[0] != i
            for w in ("w1", "w2", "w3"):
                for part in ("", "_scale_inv"):
                    new, old = expert.format(n, i, w, part), expert.format(n, group[0], w, part)
                    assert torch.equal(stored[new].view(torch.uint8), source[old].view(torch.uint8)), (new, old)
    assert moved > 0 and merged > 0


def _cli(args, capsys):
    rc = main([str(a) for a in args])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_cli_prunes_and_merges_mxfp4_without_dequantizing_first(gpt_oss, tmp_path, capsys):
    root, _ = gpt_oss
    common = ["--model", root / "mx", "--calib", root / "calib.txt"]
    rc, out, err = _cli(["prune", *common, "--num-experts", 2, "--out", tmp_path / "p"], capsys)
    assert rc == 0, err
    assert "written in the input's precision (mxfp4" in out and "changed tensors to mxfp4" in out
    config = json.loads((tmp_path / "p" / "config.json").read_text())
    assert config["quantization_config"] == MXFP4 and config["num_local_experts"] == 2
    # the kept experts' banks, quantized afresh: MXFP4 is a projection, so re-quantizing adds nothing
    errors = config["mcsmoe_quantization"]["tensors"]
    assert "model.layers.1.mlp.experts.gate_up_proj" in errors and config["mcsmoe_quantization"]["max"]["weights"] == 0
    assert "model.layers.0.mlp.experts.down_proj_blocks" in load_file(str(tmp_path / "p" / "model.safetensors"))
    _dequantized_load(tmp_path / "p", MXFP4)  # transformers loads it

    rc, out, err = _cli(["prune", *common, "--num-experts", 2, "--dtype", "float32", "--out", tmp_path / "d"], capsys)
    assert rc == 0, err
    assert "quantization_config" not in json.loads((tmp_path / "d" / "config.json").read_text())
    d = load_file(str(tmp_path / "d" / "model.safetensors"))
    assert d["model.layers.0.mlp.experts.down_proj"].dtype == torch.float32

    rc, out, err = _cli(["merge", *common, "--num-groups", 2, "--out", tmp_path / "m"], capsys)
    assert rc == 0, err
    assert "written in mxfp4: expert weights" in out
    assert json.loads((tmp_path / "m" / "config.json").read_text())["quantization_config"] == MXFP4


def test_in_memory_steps_on_fp8_see_the_dequantized_twin(tmp_path):
    """open_model of a block-FP8 checkpoint is transformers' dequantize=True load, so permute (and merge,
    compress) in memory do on it what they do on the twin."""
    from mcsmoe_fast.permute import align_experts

    tiny_mixtral(num_experts=4, hidden_size=128, intermediate_size=128).save_pretrained(tmp_path / "plain")
    quantize_checkpoint(tmp_path / "plain", tmp_path / "fp8", dict(FP8, scale_fmt="ue8m0"))
    got, ref = open_model(str(tmp_path / "fp8"), torch.float32), _dequantized_load(tmp_path / "fp8", FP8)
    state = got.state_dict()
    assert sorted(state) == sorted(ref) and all(torch.equal(state[n], ref[n]) for n in ref)
    twin = _twin(tmp_path / "fp8", tmp_path / "twin", FP8)
    perms = align_experts(got)
    ref_perms = align_experts(open_model(str(twin), torch.float32))
    assert all(torch.equal(perms[n], ref_perms[n]) for n in ref_perms)


def test_the_expected_source_expert_is_tried_before_the_dropped_one_at_the_same_index(tmp_path):
    """A pruned bfloat16 working copy keeps source expert 1 at index 0; source expert 0 (dropped) has the same codes
    with scales 2^-10 smaller, so both dequantize to the same bfloat16 values: the kept expert's bytes are written,
    not those of the dropped expert whose name the written tensor has."""
    from safetensors.torch import save_file

    from mcsmoe_fast.prune import kept_model

    plain = tiny_mixtral(num_experts=4, hidden_size=128, intermediate_size=128, num_layers=1).to(torch.bfloat16)
    plain.save_pretrained(tmp_path / "plain")
    quantize_checkpoint(tmp_path / "plain", tmp_path / "fp8", FP8)
    file = tmp_path / "fp8" / "model.safetensors"
    source = load_file(str(file))
    expert = "model.layers.0.block_sparse_moe.experts.{}.{}.weight"
    for w in ("w1", "w2", "w3"):
        source[expert.format(1, w)] = source[expert.format(0, w)].clone()
        scale = expert.format(0, w) + "_scale_inv"
        source[scale] = torch.full_like(source[scale], 2.0 ** -12)
        source[expert.format(1, w) + "_scale_inv"] = source[scale] * (1 + 2 ** -10)
    save_file(source, str(file), metadata={"format": "pt"})
    model = open_model(str(tmp_path / "fp8"), torch.bfloat16)
    layer = "model.layers.0.mlp"
    pruned = kept_model(model, {layer: [1, 2]}, {"method": "reap", "layers": {layer: {"kept": [1, 2], "scores": []}}})
    save_pretrained(pruned, tmp_path / "q", format="standard")
    requantize_saved(tmp_path / "q", tmp_path / "fp8")
    stored = load_file(str(tmp_path / "q" / "model.safetensors"))
    for w in ("w1", "w2", "w3"):
        for part in ("", "_scale_inv"):
            assert torch.equal(stored[expert.format(0, w) + part].view(torch.uint8),
                               source[expert.format(1, w) + part].view(torch.uint8)), (w, part)
