"""The streamed `--format standard` of a block-FP8 / MXFP4 checkpoint, kept in the input's precision: the same
bytes as the in-memory `merge --format standard` (open_model dequantized, merge, save, requantize_saved) of the
same input, its quantization_config kept, loadable by plain transformers (dequantize=True) with the in-memory
merged model's logits within the format's rounding, and the re-quantization error reported with the exact
format's keys, equal to an independent recomputation."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

import mcsmoe_fast as mf
from mcsmoe_fast.quant import dequantize_fp8
from mcsmoe_fast.streaming import merge_checkpoint
from mcsmoe_fast.streaming.quantized import quantize_checkpoint, requantize_saved
from mcsmoe_fast.tiny import tiny_mixtral, tiny_moe
from merge_helpers import calibration
from test_quantized_merge import FP8, MXFP4, _experts_inputs, _relative, _twin

LAYERS = ("model.layers.0.mlp", "model.layers.1.mlp")


def _tensors(directory):
    out = {}
    for path in sorted(directory.glob("*.safetensors")):
        out.update(load_file(str(path)))
    return out


def _bytes(t):
    return t.view(torch.uint8) if t.dtype.itemsize == 1 else t


def _in_memory(src, out, batches, groups=2):
    """What `merge --format standard` does in memory on a quantized input (cli/merge.py): bf16 dequantized load,
    statistics, per-layer merge within routing groups, save_pretrained(format="standard"), requantize_saved."""
    model = mf.open_model(str(src))
    stats = mf.collect_routing_stats(model, batches, bases=("router-logits", "feature"), progress=False)
    mf.merge_experts(model, stats, groups, globally=False, within_routing_groups=True, progress=False)
    mf.save_pretrained(model, out, format="standard", router="fitted", batches=batches)
    shutil.copytree(out, f"{out}-plain")  # the in-memory model's standard checkpoint before re-quantizing
    requantize_saved(out, src)
    return model


def _streamed(src, out, batches, **kwargs):
    return merge_checkpoint(src, out, batches, 2, format="standard", progress=False, max_memory="1KB",
                            max_shard_size="40KB", **kwargs)


def _dequantized_model(path, config):
    from transformers import AutoModelForCausalLM, FineGrainedFP8Config, Mxfp4Config

    q = Mxfp4Config(dequantize=True) if config["quant_method"] == "mxfp4" else FineGrainedFP8Config(dequantize=True)
    return AutoModelForCausalLM.from_pretrained(str(path), quantization_config=q, dtype=torch.float32).eval()


def _fp8_case(root, hidden, ff):
    tiny_mixtral(num_experts=4, hidden_size=hidden, intermediate_size=ff, seed=2).save_pretrained(root / "plain")
    quantize_checkpoint(root / "plain", root / "fp8", FP8)
    batches = calibration(tiny_mixtral(num_layers=1), seed=3, batches=3, batch=2, length=9)
    result = _streamed(root / "fp8", root / "s", batches)
    model = _in_memory(root / "fp8", root / "m", batches)
    return root, batches, result, model


@pytest.fixture(scope="module")
def ragged(tmp_path_factory):
    """A block-FP8 Mixtral with ragged blocks (d 160, ff 96: neither a multiple of 128), its streamed standard merge
    and the in-memory one. (transformers' Fp8Dequantize takes the block from the scale grid, wrong for such shapes:
    docs/quantized.md; its loads are checked on the aligned case.)"""
    return _fp8_case(tmp_path_factory.mktemp("fp8-ragged"), 160, 96)


@pytest.fixture(scope="module")
def fp8(tmp_path_factory):
    """Whole blocks (d 256, ff 128), as the released models' shapes are."""
    return _fp8_case(tmp_path_factory.mktemp("fp8-standard"), 256, 128)


@pytest.mark.parametrize("case", ["ragged", "fp8"])
def test_streamed_fp8_standard_is_the_in_memory_one_byte_for_byte(case, request):
    root, _, result, _ = request.getfixturevalue(case)
    s, m, source = _tensors(root / "s"), _tensors(root / "m"), _tensors(root / "fp8")
    assert sorted(s) == sorted(m)
    for name in m:
        assert s[name].dtype == m[name].dtype and torch.equal(_bytes(s[name]), _bytes(m[name])), name
    cs, cm = (json.loads((root / d / "config.json").read_text()) for d in ("s", "m"))
    assert cs["quantization_config"] == cm["quantization_config"] == FP8 and cs["num_local_experts"] == 2
    assert {k for k in set(cs) | set(cm) if cs.get(k) != cm.get(k)} == {"mcsmoe_quantization"}
    q_proj = "model.layers.1.self_attn.q_proj.weight"  # unchanged: the source's bytes and scales
    for part in (q_proj, q_proj + "_scale_inv"):
        assert torch.equal(_bytes(s[part]), _bytes(source[part])), part
    expert = "model.layers.0.block_sparse_moe.experts.1.w2.weight"
    # w2 [d, ff]: 160 rows in two blocks (the last 32 rows) and 96 columns in one ragged block; or 256 x 128
    assert s[expert].dtype == torch.float8_e4m3fn and s[expert + "_scale_inv"].shape == (2, 1)
    # the per-tensor errors are the in-memory report's; the streamed report adds the exact format's layer keys
    report, memory = cs["mcsmoe_quantization"], cm["mcsmoe_quantization"]
    assert report == json.loads(json.dumps(result.quantization_error))
    assert report["tensors"] == pytest.approx(memory["tensors"], rel=1e-12) and set(report["layers"]) == set(LAYERS)
    assert set(report["max"]) == {"w_in", "w_out", "output", "weights"}


def test_streamed_fp8_standard_error_equals_an_independent_recomputation(fp8, tmp_path):
    """The bank errors against the same merge written dequantized (keep_quantization=False, bf16), the output error
    with the twin's own transformers forward's expert inputs, each original expert sent to its standard expert."""
    root, batches, _, _ = fp8
    result = _streamed(root / "fp8", tmp_path / "q", batches, dtype=torch.float32)  # float32 work, as the twin runs
    _streamed(root / "fp8", tmp_path / "d", batches, keep_quantization=False, dtype=torch.float32)
    config = json.loads((tmp_path / "d" / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "float32"  # the dequantized standard output
    inputs = _experts_inputs(mf.open_model(str(_twin(root / "fp8", tmp_path / "twin", FP8)), torch.float32), batches)
    check_layer_errors(result.quantization_error, tmp_path / "q", tmp_path / "d", inputs)


def check_layer_errors(report, quantized, plain, inputs, groups=None, floor=0.005):
    """The report's layer entries equal an independent recomputation: the standard checkpoint `quantized`'s experts
    dequantized against the same merge written dequantized (`plain`), per bank and on the expert inputs `inputs`
    (the twin's own forward), each original expert sent to its standard expert (`groups` {layer: [[expert, ...]
    per standard expert]}, default config's mcsmoe_standard groups; an expert in none: its routing weight zeroed)."""
    from mcsmoe_fast.modules import MoEExperts

    q, d = _tensors(quantized), _tensors(plain)
    if groups is None:
        groups = {n: e["groups"] for n, e in json.loads((quantized / "config.json").read_text())["mcsmoe_standard"]["layers"].items()}
    for i, layer in enumerate(LAYERS):
        name = f"model.layers.{i}.block_sparse_moe.experts.{{}}.{{}}.weight"
        deq = {(m, w): dequantize_fp8(q[name.format(m, w)], q[name.format(m, w) + "_scale_inv"]) for m in (0, 1)
               for w in ("w1", "w2", "w3")}
        ref = {k: d[name.format(*k)].float() for k in deq}
        banks = {}
        for bank, parts in (("w_in", ("w1", "w3")), ("w_out", ("w2",))):
            banks[bank] = [torch.stack([torch.cat([t[(m, w)] for w in parts]) for m in (0, 1)]) for t in (ref, deq)]
            expected = _relative(banks[bank][1], banks[bank][0])
            assert floor < report["layers"][layer][bank] == pytest.approx(expected, rel=1e-6)
        expert_map, kept = torch.zeros(4, dtype=torch.long), torch.zeros(4, dtype=torch.bool)
        for m, group in enumerate(groups[layer]):
            expert_map[group], kept[group] = m, True
        hidden, index, weights = inputs[layer]
        weights = torch.where(kept[index], weights, torch.zeros_like(weights))
        out = [MoEExperts(banks["w_in"][k], banks["w_out"][k], expert_map, "swiglu")(hidden.float(), index, weights.float())
               for k in (0, 1)]
        entry = report["layers"][layer]
        assert entry["tokens"] == inputs[layer][0].shape[0]
        assert floor < entry["output"] == pytest.approx(_relative(out[1], out[0]), rel=1e-3) and entry["output"] < 0.1


def _logits_error(quantized, plain, config, batches) -> float:
    """transformers' dequantize=True load of `quantized` against its plain load of `plain`, worst batch."""
    from transformers import AutoModelForCausalLM

    got = _dequantized_model(quantized, config)
    ref = AutoModelForCausalLM.from_pretrained(str(plain), dtype=torch.float32).eval()
    with torch.no_grad():
        return max(_relative(got(**x).logits, ref(**x).logits) for x in batches)


def test_transformers_loads_it_with_the_in_memory_models_logits(fp8):
    root, batches, _, _ = fp8
    assert 0 < _logits_error(root / "s", root / "m-plain", FP8, batches) < 0.05  # one e4m3 rounding of the experts


def test_mxfp4_gpt_oss_streamed_standard_equals_in_memory(tmp_path):
    tiny_moe("gpt_oss", num_experts=4, hidden_size=64, intermediate_size=64).save_pretrained(tmp_path / "plain")
    quantize_checkpoint(tmp_path / "plain", tmp_path / "mx", MXFP4)
    batches = calibration(tiny_moe("gpt_oss", num_layers=1), seed=5, batches=3, batch=2, length=9)
    result = _streamed(tmp_path / "mx", tmp_path / "s", batches)
    _in_memory(tmp_path / "mx", tmp_path / "m", batches)
    s, m = _tensors(tmp_path / "s"), _tensors(tmp_path / "m")
    assert sorted(s) == sorted(m) and all(torch.equal(s[n], m[n]) for n in m)
    bank = "model.layers.0.mlp.experts.gate_up_proj"
    assert bank not in s and s[bank + "_blocks"].shape[0] == 2 and s[bank + "_blocks"].dtype == torch.uint8
    config = json.loads((tmp_path / "s" / "config.json").read_text())
    assert config["quantization_config"] == MXFP4 and config["num_local_experts"] == 2
    report = result.quantization_error
    assert set(report["layers"]) == set(LAYERS) and 0 < report["max"]["output"] < 0.15
    assert 0 < report["max"]["w_in"] < 0.2  # e2m1: one coarse rounding of the merged banks
    assert 0 < _logits_error(tmp_path / "s", tmp_path / "m-plain", MXFP4, batches) < 0.2


def test_cli_streamed_standard_keeps_fp8_unless_dtype(tmp_path, capsys):
    from mcsmoe_fast.cli import main
    from test_cli_merge import LINES, tiny_tokenizer

    tiny_mixtral(num_experts=4, hidden_size=128, intermediate_size=128).save_pretrained(tmp_path / "plain")
    tiny_tokenizer().save_pretrained(tmp_path / "plain")
    quantize_checkpoint(tmp_path / "plain", tmp_path / "fp8", FP8)
    (tmp_path / "calib.txt").write_text("\n".join(LINES * 2) + "\n")
    base = ["merge", "--model", tmp_path / "fp8", "--calib", tmp_path / "calib.txt", "--num-groups", 2, "--format",
            "standard", "--max-memory", "1KB"]
    assert main([str(a) for a in [*base, "--out", tmp_path / "q"]]) == 0
    out = capsys.readouterr().out
    assert "streamed 2 layers" in out and "written in fp8: expert weights" in out and "changed tensors" in out
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    assert config["quantization_config"] == FP8 and "layers" in config["mcsmoe_quantization"]
    expert = "model.layers.0.block_sparse_moe.experts.1.w1.weight"
    assert _tensors(tmp_path / "q")[expert].dtype == torch.float8_e4m3fn
    assert main([str(a) for a in [*base, "--dtype", "bfloat16", "--out", tmp_path / "d"]]) == 0
    assert "re-quantized" not in capsys.readouterr().out
    config = json.loads((tmp_path / "d" / "config.json").read_text())
    assert "quantization_config" not in config and "mcsmoe_quantization" not in config
    assert _tensors(tmp_path / "d")[expert].dtype == torch.bfloat16
    _dequantized_model(tmp_path / "q", FP8)  # transformers loads both
    _dequantized_model(tmp_path / "d", FP8)
