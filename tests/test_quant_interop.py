"""Quantized checkpoints other readers load as written (the second quantization audit, session 34):
transformers' FP8 loader reads what quantize_checkpoint keeps in float (modules_to_not_convert), fused expert banks
no FP8 reader takes and MXFP4 of per-expert families are refused, the streamed prune reports what the in-memory
prune reports, a source with uint8 exponent-byte scales is written back as it stores them, and an in-memory command
that fails at re-quantizing leaves --out as it was."""
from __future__ import annotations

import hashlib
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from mcsmoe_fast.cli import main
from mcsmoe_fast.quant import dequantize_fp8
from mcsmoe_fast.streaming.quantized import quantize_checkpoint
from mcsmoe_fast.tiny import tiny_mixtral, tiny_moe
from test_cli_merge import LINES, tiny_tokenizer

FP8 = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}
UE8M0 = dict(FP8, scale_fmt="ue8m0")


def _tensors(directory) -> dict[str, torch.Tensor]:
    return {n: t for f in sorted(directory.glob("*.safetensors")) for n, t in load_file(str(f)).items()}


def _tree(directory) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir()) if p.is_file()}


def _cli(args, capsys) -> tuple[int, str]:
    rc = main([str(a) for a in args])
    return rc, capsys.readouterr().err


# finding 1: the kept shared_expert_gate is listed, so transformers' FP8 (GPU) load keeps it a float nn.Linear


def test_fp8_keeps_shared_expert_gate_out_of_transformers_fp8_conversion(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM
    from transformers.quantizers.quantizer_finegrained_fp8 import FineGrainedFP8HfQuantizer

    model = tiny_moe("qwen2_moe", num_experts=4, hidden_size=128, intermediate_size=128, num_layers=2)
    model.save_pretrained(tmp_path / "plain")
    quantize_checkpoint(tmp_path / "plain", tmp_path / "fp8", FP8)
    # what a CUDA GPU with cc >= 8.9 does: no dequantize, nn.Linear modules replaced by FP8Linear
    monkeypatch.setattr(FineGrainedFP8HfQuantizer, "validate_environment", lambda self, *a, **k: None)
    loaded, info = AutoModelForCausalLM.from_pretrained(str(tmp_path / "fp8"), output_loading_info=True)
    assert not info["missing_keys"], sorted(info["missing_keys"])
    for name in ("model.layers.0.mlp.shared_expert_gate", "model.layers.1.mlp.shared_expert_gate", "lm_head"):
        module = loaded.get_submodule(name)
        assert type(module) is torch.nn.Linear, name
        assert torch.equal(module.weight, model.get_submodule(name).weight), name
    stored = _tensors(tmp_path / "fp8")
    assert stored["model.layers.0.mlp.shared_expert.down_proj.weight"].dtype == torch.float8_e4m3fn


def test_fp8_modules_to_not_convert_given_by_the_caller_are_kept_and_merged(tmp_path):
    tiny_mixtral(num_experts=4, hidden_size=128, intermediate_size=128).save_pretrained(tmp_path / "plain")
    q_proj = "model.layers.1.self_attn.q_proj"
    quantize_checkpoint(tmp_path / "plain", tmp_path / "fp8", dict(FP8, modules_to_not_convert=[q_proj]))
    stored, plain = _tensors(tmp_path / "fp8"), _tensors(tmp_path / "plain")
    assert stored[q_proj + ".weight"].dtype == torch.float32 and q_proj + ".weight_scale_inv" not in stored
    assert torch.equal(stored[q_proj + ".weight"], plain[q_proj + ".weight"])
    assert stored["model.layers.0.self_attn.q_proj.weight"].dtype == torch.float8_e4m3fn
    listed = json.loads((tmp_path / "fp8" / "config.json").read_text())["quantization_config"]["modules_to_not_convert"]
    assert listed == ["lm_head", "model.embed_tokens", "model.layers.0.block_sparse_moe.gate",
                      "model.layers.1.block_sparse_moe.gate", q_proj]


# finding 2: block-FP8 of fused hub banks (GPT-OSS, Llama-4) has no reader but ours: refused


@pytest.mark.parametrize("family", ["gpt_oss", "llama4_text"])
def test_fp8_of_fused_expert_banks_is_refused(family, tmp_path):
    tiny_moe(family, num_experts=4, hidden_size=128, intermediate_size=128).save_pretrained(tmp_path / "p")
    with pytest.raises(ValueError, match=rf"{family}.*fused expert banks.*experts\.gate_up_proj.*mxfp4"):
        quantize_checkpoint(tmp_path / "p", tmp_path / "fp8", FP8)
    assert not (tmp_path / "fp8").exists()


# finding 3: the streamed prune's report measures the written values, as the in-memory prune's does


def test_standard_requantizer_returns_the_values_written_for_a_copied_tensor(tmp_path):
    from mcsmoe_fast.checkpoint.weight_files import ShardWriter
    from mcsmoe_fast.quant.files import QuantizedFiles
    from mcsmoe_fast.streaming.quantized import checkpoint_format
    from mcsmoe_fast.streaming.quantized_standard import StandardRequantizer
    from mcsmoe_fast.streaming.source import open_weight_files

    tiny_mixtral(num_experts=4, hidden_size=128, intermediate_size=128, num_layers=1).save_pretrained(
        tmp_path / "plain")
    quantize_checkpoint(tmp_path / "plain", tmp_path / "fp8", FP8)
    files = QuantizedFiles(open_weight_files(tmp_path / "fp8"), checkpoint_format(tmp_path / "fp8"))
    (tmp_path / "out").mkdir()
    writer = ShardWriter(tmp_path / "out", "model.safetensors", None, {"format": "pt"})
    name = "model.layers.0.block_sparse_moe.experts.0.w1.weight"
    values = StandardRequantizer(writer, files).add(name, files.get(name, torch.bfloat16))
    writer.finish()
    written = _tensors(tmp_path / "out")
    assert torch.equal(written[name].view(torch.uint8), _tensors(tmp_path / "fp8")[name].view(torch.uint8))  # copied
    assert torch.equal(values, dequantize_fp8(written[name], written[name + "_scale_inv"], torch.float32))


def test_streamed_prune_reports_what_the_in_memory_prune_reports(tmp_path, capsys):
    tiny_moe("qwen2_moe", num_experts=4, hidden_size=128, intermediate_size=128, num_layers=2).save_pretrained(
        tmp_path / "plain")
    quantize_checkpoint(tmp_path / "plain", tmp_path / "q", FP8)
    tiny_tokenizer().save_pretrained(tmp_path / "q")
    (tmp_path / "calib.txt").write_text("\n".join(LINES * 2) + "\n")
    common = ["prune", "--model", tmp_path / "q", "--calib", tmp_path / "calib.txt", "--num-experts", 2]
    assert _cli([*common, "--out", tmp_path / "mem"], capsys)[0] == 0
    assert _cli([*common, "--max-memory", "1KB", "--out", tmp_path / "str"], capsys)[0] == 0
    configs = {d: json.loads((tmp_path / d / "config.json").read_text()) for d in ("mem", "str")}
    kept = configs["mem"]["mcsmoe_prune"]["layers"]
    assert any(v["kept"][0] == 0 for v in kept.values()), kept  # expert 0 keeps its name: copied byte for byte
    mem, streamed = configs["mem"]["mcsmoe_quantization"], configs["str"]["mcsmoe_quantization"]
    assert set(mem["layers"]) == set(streamed["layers"])
    for layer, entry in mem["layers"].items():
        for key in ("w_in", "w_out", "output"):
            assert streamed["layers"][layer][key] == pytest.approx(entry[key], rel=1e-4, abs=1e-7), (layer, key)


# finding 4: uint8 exponent-byte scales written back as stored; a failed re-quantization leaves --out as it was


def _ue8m0_sources(root):
    """The same ue8m0 FP8 Mixtral twice: scales as float8_e8m0fnu, and as raw uint8 exponent bytes."""
    tiny_mixtral(num_experts=4, hidden_size=128, intermediate_size=128, num_layers=2).save_pretrained(root / "plain")
    tiny_tokenizer().save_pretrained(root / "plain")
    quantize_checkpoint(root / "plain", root / "e8m0", UE8M0, torch.float8_e8m0fnu)
    quantize_checkpoint(root / "plain", root / "u8", UE8M0, torch.float8_e8m0fnu)
    weights = root / "u8" / "model.safetensors"
    tensors = load_file(str(weights))
    save_file({n: t.view(torch.uint8) if t.dtype == torch.float8_e8m0fnu else t for n, t in tensors.items()},
              str(weights), {"format": "pt"})
    (root / "calib.txt").write_text("\n".join(LINES * 2) + "\n")


def test_uint8_scales_are_written_back_as_uint8(tmp_path, capsys):
    _ue8m0_sources(tmp_path)
    for source in ("e8m0", "u8"):  # a standard merge: its merged experts are quantized afresh
        rc, err = _cli(["merge", "--model", tmp_path / source, "--calib", tmp_path / "calib.txt", "--num-groups", 2,
                        "--format", "standard", "--out", tmp_path / f"pruned-{source}"], capsys)
        assert rc == 0, err
    report = json.loads((tmp_path / "pruned-u8" / "config.json").read_text())["mcsmoe_quantization"]
    assert report["tensors"], report
    ref, got = _tensors(tmp_path / "pruned-e8m0"), _tensors(tmp_path / "pruned-u8")
    assert sorted(got) == sorted(ref)
    for name, tensor in ref.items():
        want = tensor.view(torch.uint8) if tensor.dtype == torch.float8_e8m0fnu else tensor
        assert got[name].dtype == want.dtype and torch.equal(got[name].view(torch.uint8), want.view(torch.uint8)), name


@pytest.mark.parametrize("command", ["prune", "merge", "permute"])
def test_a_failed_requantization_leaves_out_as_it_was(command, tmp_path, capsys, monkeypatch):
    import mcsmoe_fast.quant.requantize as requantize

    tiny_mixtral(num_experts=4, hidden_size=128, intermediate_size=128).save_pretrained(tmp_path / "plain")
    tiny_tokenizer().save_pretrained(tmp_path / "plain")
    quantize_checkpoint(tmp_path / "plain", tmp_path / "q", FP8)
    tiny_mixtral(num_experts=2, hidden_size=32, intermediate_size=32, num_layers=1).save_pretrained(tmp_path / "out")
    before = _tree(tmp_path / "out")
    (tmp_path / "calib.txt").write_text("\n".join(LINES * 2) + "\n")

    def refuse(*args, **kwargs):
        raise ValueError("re-quantizing failed (injected)")

    monkeypatch.setattr(requantize.LikeSource, "parts", refuse)  # a prune copies its kept experts: no quantize_tensor
    args = {"prune": ["--calib", tmp_path / "calib.txt", "--num-experts", 2],
            "merge": ["--calib", tmp_path / "calib.txt", "--num-groups", 2, "--format", "standard"],
            "permute": []}[command]
    rc, err = _cli([command, "--model", tmp_path / "q", *args, "--out", tmp_path / "out"], capsys)
    assert rc == 2 and "re-quantizing failed (injected)" in err
    assert _tree(tmp_path / "out") == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib.txt", "out", "plain", "q"]  # no scratch left


# finding 5: MXFP4 of a family that stores its experts per expert would quantize nothing: refused


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_mxfp4_of_per_expert_weights_is_refused(family, tmp_path):
    tiny_moe(family, num_experts=4, hidden_size=64, intermediate_size=64, num_layers=1).save_pretrained(tmp_path / "p")
    with pytest.raises(ValueError, match=rf"MXFP4.*fused expert banks.*{family} stores its experts per expert"):
        quantize_checkpoint(tmp_path / "p", tmp_path / "mx", {"quant_method": "mxfp4"})
    assert not (tmp_path / "mx").exists()
