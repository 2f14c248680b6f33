"""`permute` and `compress` in memory on a block-FP8 / MXFP4 input write the input's precision unless --dtype is
given. permute: the aligned experts quantized afresh (a permutation of rows is not block-aligned), everything
else the input's bytes, the error reported; transformers loads it (dequantize=True) and it still computes the
input's function within the format's rounding. compress: the non-expert tensors (and the slots of layers left
uncompressed) stay quantized byte for byte, the low-rank factors and sparse rows, which have no quantized layout,
stay in the working dtype (streaming/requantize_merged.py); from_pretrained reads the mix as the --dtype bfloat16
output of the same run."""
from __future__ import annotations

import json

import pytest
import torch

from mcsmoe_fast import from_pretrained
from mcsmoe_fast.streaming.requantize_merged import requantize_merged
from mcsmoe_fast.cli import main
from mcsmoe_fast.loading import open_model
from mcsmoe_fast.permute import align_experts
from mcsmoe_fast.quant import dequantize_fp8, dequantize_mxfp4
from mcsmoe_fast.streaming import merge_checkpoint
from mcsmoe_fast.streaming.quantized import quantize_checkpoint
from mcsmoe_fast.tiny import tiny_mixtral, tiny_moe
from merge_helpers import calibration
from test_cli_merge import LINES, tiny_tokenizer
from test_quant_standard import _bytes, _tensors
from test_quantized_merge import FP8, MXFP4, _relative, _twin

Q_PROJ = "model.layers.1.self_attn.q_proj.weight"


def _cli(args, capsys):
    rc = main([str(a) for a in args])
    out = capsys.readouterr()
    assert rc == 0, out.err
    return out.out


@pytest.fixture(scope="module")
def fp8(tmp_path_factory):
    root = tmp_path_factory.mktemp("quant-permute")
    tiny_mixtral(num_experts=4, hidden_size=128, intermediate_size=128, seed=6).save_pretrained(root / "plain")
    tiny_tokenizer().save_pretrained(root / "plain")
    quantize_checkpoint(root / "plain", root / "fp8", FP8)
    (root / "calib.txt").write_text("\n".join(LINES * 2) + "\n")
    return root


def test_permute_keeps_fp8_and_the_function(fp8, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, FineGrainedFP8Config

    out = _cli(["permute", "--model", fp8 / "fp8", "--out", tmp_path / "p"], capsys)
    assert "written in the input's precision (fp8" in out and "changed tensors to fp8" in out
    config = json.loads((tmp_path / "p" / "config.json").read_text())
    assert config["quantization_config"] == FP8
    got, source = _tensors(tmp_path / "p"), _tensors(fp8 / "fp8")
    for part in (Q_PROJ, Q_PROJ + "_scale_inv", "model.layers.0.block_sparse_moe.experts.0.w1.weight"):
        assert torch.equal(_bytes(got[part]), _bytes(source[part])), part  # unchanged (expert 0: the reference)
    errors = config["mcsmoe_quantization"]["tensors"]
    expert = "model.layers.0.block_sparse_moe.experts.2.w2.weight"
    assert expert in errors and Q_PROJ not in errors and 0 < config["mcsmoe_quantization"]["max"]["weights"] < 2.0 ** -4
    # against the independent reference: transformers' dequantization of the input, aligned in float32
    twin = open_model(str(_twin(fp8 / "fp8", tmp_path / "twin", FP8)), torch.float32)
    perms = align_experts(twin)
    ref = twin.state_dict()
    w2 = dequantize_fp8(got[expert], got[expert + "_scale_inv"])
    exact = ref["model.layers.0.mlp.experts.down_proj"][2]
    assert ((w2 - exact).abs() <= exact.abs() * 2.0 ** -4 + 2.0 ** -3 * got[expert + "_scale_inv"].max()).all()
    assert any((p != torch.arange(p.shape[1])).any() for p in perms.values())  # something moved
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "p"), dtype=torch.float32,
                                                  quantization_config=FineGrainedFP8Config(dequantize=True)).eval()
    original = AutoModelForCausalLM.from_pretrained(str(tmp_path / "twin"), dtype=torch.float32).eval()
    for x in calibration(original, seed=2, batches=2, batch=2, length=7):
        with torch.no_grad():
            assert _relative(loaded(**x).logits, original(**x).logits) < 0.05  # function-preserving up to rounding


def test_permute_with_dtype_is_dequantized(fp8, tmp_path, capsys):
    out = _cli(["permute", "--model", fp8 / "fp8", "--out", tmp_path / "d", "--dtype", "bfloat16"], capsys)
    assert "written in the input's precision" not in out
    config = json.loads((tmp_path / "d" / "config.json").read_text())
    assert "quantization_config" not in config and "mcsmoe_quantization" not in config
    assert _tensors(tmp_path / "d")[Q_PROJ].dtype == torch.bfloat16


def test_compress_keeps_the_non_expert_tensors_quantized(fp8, tmp_path, capsys):
    base = ["compress", "--model", fp8 / "fp8", "--rank", 8, "--keep-ratio", 0.2, "--layers", 0]
    out = _cli([*base, "--out", tmp_path / "c"], capsys)
    assert "non-expert tensors kept in the input's precision (fp8)" in out
    _cli([*base, "--out", tmp_path / "d", "--dtype", "bfloat16"], capsys)
    got, source, plain = _tensors(tmp_path / "c"), _tensors(fp8 / "fp8"), _tensors(tmp_path / "d")
    config = json.loads((tmp_path / "c" / "config.json").read_text())
    assert config["quantization_config"] == FP8 and "quantization_config" not in json.loads(
        (tmp_path / "d" / "config.json").read_text())
    for part in (Q_PROJ, Q_PROJ + "_scale_inv"):
        assert torch.equal(_bytes(got[part]), _bytes(source[part])), part
    factors = [n for n in got if ".experts.in_U" in n or ".experts.out_S_rows" in n]
    assert factors and all(got[n].dtype == torch.bfloat16 and torch.equal(got[n], plain[n]) for n in factors)
    assert plain[Q_PROJ].dtype == torch.bfloat16
    # the mix loads as the dequantized output of the same run: the same model, but for the layer left uncompressed,
    # whose experts (stored per expert in the input, as a fused bank by us) are quantized afresh and reported
    a, b = from_pretrained(tmp_path / "c").state_dict(), from_pretrained(tmp_path / "d").state_dict()
    assert sorted(a) == sorted(b)
    fresh = {"model.layers.1.mlp.experts.gate_up_proj", "model.layers.1.mlp.experts.down_proj"}
    assert set(config["mcsmoe_quantization"]["tensors"]) == fresh
    for name in b:
        if name in fresh:
            assert 0 < _relative(a[name], b[name]) < 2.0 ** -4 and got[name].dtype == torch.float8_e4m3fn, name
        else:
            assert torch.equal(a[name], b[name]), name


def test_compress_of_a_merged_mxfp4_gpt_oss(tmp_path, capsys):
    """A merged GPT-OSS MXFP4 checkpoint (the streamed merge's output) compressed in memory: the layer left
    uncompressed keeps its merged slots' MXFP4 bytes, the compressed one its factors in bf16."""
    tiny_moe("gpt_oss", num_experts=4, hidden_size=64, intermediate_size=64).save_pretrained(tmp_path / "plain")
    quantize_checkpoint(tmp_path / "plain", tmp_path / "mx", MXFP4)
    batches = calibration(tiny_moe("gpt_oss", num_layers=1), seed=5, batches=2, batch=2, length=7)
    merge_checkpoint(tmp_path / "mx", tmp_path / "merged", batches, 2, progress=False)
    _cli(["compress", "--model", tmp_path / "merged", "--rank", 4, "--keep-ratio", 0.2, "--layers", 1,
          "--out", tmp_path / "c"], capsys)
    got, merged = _tensors(tmp_path / "c"), _tensors(tmp_path / "merged")
    slots = "model.layers.0.mlp.experts.w_in"
    for part in (slots + "_blocks", slots + "_scales"):
        assert torch.equal(got[part], merged[part]), part
    assert got["model.layers.1.mlp.experts.in_U"].dtype == torch.bfloat16
    assert json.loads((tmp_path / "c" / "config.json").read_text())["quantization_config"] == MXFP4
    model = from_pretrained(tmp_path / "c")
    w_in = model.get_submodule("model.layers.0.mlp.experts").w_in
    expected = dequantize_mxfp4(merged[slots + "_blocks"], merged[slots + "_scales"]).transpose(-1, -2)
    assert torch.equal(w_in.float(), expected.to(w_in.dtype).float())


def test_requantize_merged_names_what_is_wrong(fp8, tmp_path):
    with pytest.raises(ValueError, match="not a block-FP8 or MXFP4 checkpoint"):
        requantize_merged(fp8 / "fp8", fp8 / "plain")
    with pytest.raises(ValueError, match="not an mcsmoe-fast checkpoint"):
        requantize_merged(fp8 / "plain", fp8 / "fp8")


def test_streamed_permute_of_fp8_keeps_the_precision_as_the_in_memory_permute(fp8, tmp_path, capsys):
    """permute --max-memory (layer by layer) writes the aligned checkpoint in the input's format, byte for byte what
    the in-memory permute writes (the aligned experts quantized afresh, the rest the input's bytes), with the same
    quantization_config and error report; with --dtype it is written dequantized, without quantization_config
    (before, the config kept it over bf16 tensors), and transformers loads it plainly."""
    from transformers import AutoModelForCausalLM

    _cli(["permute", "--model", fp8 / "fp8", "--out", tmp_path / "mem"], capsys)
    out = _cli(["permute", "--model", fp8 / "fp8", "--out", tmp_path / "q", "--max-memory", "1KB"], capsys)
    assert "layer by layer" in out and "written in the input's precision (fp8" in out
    mem, streamed = _tensors(tmp_path / "mem"), _tensors(tmp_path / "q")
    assert sorted(mem) == sorted(streamed) and not (tmp_path / "q" / ".dequantized").exists()
    for name in mem:
        assert torch.equal(mem[name].view(torch.uint8), streamed[name].view(torch.uint8)), name
    configs = [json.loads((tmp_path / d / "config.json").read_text()) for d in ("mem", "q")]
    assert configs[0]["quantization_config"] == configs[1]["quantization_config"] == FP8
    assert configs[0]["mcsmoe_quantization"] == configs[1]["mcsmoe_quantization"]
    _cli(["permute", "--model", fp8 / "fp8", "--out", tmp_path / "d", "--max-memory", "1KB", "--dtype", "bfloat16"],
         capsys)
    assert "quantization_config" not in json.loads((tmp_path / "d" / "config.json").read_text())
    AutoModelForCausalLM.from_pretrained(str(tmp_path / "d"))
