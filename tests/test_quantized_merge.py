"""The streamed merge of a quantized checkpoint (block-FP8, MXFP4) equals the merge of its dequantized twin
(the same checkpoint loaded by transformers with dequantize=True and saved): same groups, merged weights
within one rounding step of the format; non-expert tensors copied byte for byte; quantization_config kept."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from mcsmoe_fast import from_pretrained
from mcsmoe_fast.quant import dequantize_fp8, dequantize_mxfp4
from mcsmoe_fast.streaming import merge_checkpoint
from mcsmoe_fast.streaming.quantized import quantize_checkpoint
from mcsmoe_fast.tiny import tiny_mixtral, tiny_moe
from merge_helpers import calibration, forward

FP8 = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}
MXFP4 = {"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                                             "model.embed_tokens", "lm_head"]}
LAYERS = ("model.layers.0.mlp", "model.layers.1.mlp")


def _tensors(directory):
    return load_file(str(next(directory.glob("*.safetensors"))))


def _twin(quantized, out, config):
    """The dequantized twin: transformers' own dequantization of `quantized`, saved in float32."""
    from transformers import AutoModelForCausalLM, FineGrainedFP8Config, Mxfp4Config

    q = (FineGrainedFP8Config(dequantize=True, weight_block_size=config.get("weight_block_size"))
         if config["quant_method"] == "fp8" else Mxfp4Config(dequantize=True))
    model = AutoModelForCausalLM.from_pretrained(str(quantized), quantization_config=q, dtype=torch.float32)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    return out


def _merge(src, out, batches, **kwargs):
    return merge_checkpoint(src, out, batches, 2, progress=False, dtype=torch.float32, max_memory="1GB", **kwargs)


@pytest.fixture(scope="module")
def fp8(tmp_path_factory):
    root = tmp_path_factory.mktemp("fp8")
    tiny_mixtral(num_experts=4, hidden_size=256, intermediate_size=256).save_pretrained(root / "plain")
    quantize_checkpoint(root / "plain", root / "fp8", FP8)
    return root / "fp8", _twin(root / "fp8", root / "twin", FP8)


@pytest.fixture(scope="module")
def batches():
    return calibration(tiny_mixtral(num_layers=1), seed=3, batches=3, batch=2, length=9)


def test_fp8_merge_equals_the_merge_of_its_dequantized_twin(fp8, batches, tmp_path):
    source, twin = fp8
    got, ref = _merge(source, tmp_path / "q", batches), _merge(twin, tmp_path / "t", batches)
    assert {n: g.expert_map for n, g in got.groupings.items()} == {n: g.expert_map for n, g in ref.groupings.items()}
    assert set(got.groupings) == set(LAYERS) and all(g.num_groups == 2 for g in got.groupings.values())
    q, t, stored = _tensors(tmp_path / "q"), _tensors(tmp_path / "t"), _tensors(source)
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    assert config["quantization_config"] == FP8
    # attention: the source's bytes and scales, untouched
    for name in ("model.layers.1.self_attn.q_proj.weight", "model.layers.0.self_attn.o_proj.weight"):
        for part in (name, name + "_scale_inv"):
            assert q[part].dtype == stored[part].dtype and torch.equal(q[part].view(torch.uint8),
                                                                       stored[part].view(torch.uint8)), part
    assert torch.equal(q["model.layers.0.mlp.gate.weight"], t["model.layers.0.mlp.gate.weight"])
    errors = []
    for layer in LAYERS:
        for bank in ("w_in", "w_out"):
            name = f"{layer}.experts.{bank}"
            assert q[name].dtype == torch.float8_e4m3fn and q[name + "_scale_inv"].shape[-2:] == (
                -(-t[name].shape[-2] // 128), -(-t[name].shape[-1] // 128))
            d, exact = dequantize_fp8(q[name], q[name + "_scale_inv"]), t[name]
            scale = q[name + "_scale_inv"].repeat_interleave(128, -2).repeat_interleave(128, -1)
            assert ((d - exact).abs() <= exact.abs() * 2.0 ** -4 + scale * 2.0 ** -10).all(), name  # one e4m3 step
            errors.append(((d - exact).norm() / exact.norm()).item())
    assert max(errors) < 0.03, errors  # the added quantization error, relative
    a, b = from_pretrained(tmp_path / "q"), from_pretrained(tmp_path / "t")
    for x in batches:
        ya, yb = forward(a, x), forward(b, x)
        assert ((ya - yb).norm() / yb.norm()).item() < 0.05


def test_fp8_merge_written_dequantized_equals_the_twin_merge(fp8, batches, tmp_path):
    source, twin = fp8
    _merge(source, tmp_path / "q", batches, keep_quantization=False)
    _merge(twin, tmp_path / "t", batches)
    q, t = _tensors(tmp_path / "q"), _tensors(tmp_path / "t")
    assert sorted(q) == sorted(t)
    for name in t:
        assert torch.equal(q[name], t[name]), name
    assert "quantization_config" not in json.loads((tmp_path / "q" / "config.json").read_text())


def test_ue8m0_exponent_scales_stay_ue8m0(tmp_path, batches):
    tiny_mixtral(num_experts=4, hidden_size=128, intermediate_size=128).save_pretrained(tmp_path / "plain")
    config = dict(FP8, scale_fmt="ue8m0")
    quantize_checkpoint(tmp_path / "plain", tmp_path / "fp8", config, scale_dtype=torch.float8_e8m0fnu)
    merge_checkpoint(tmp_path / "fp8", tmp_path / "q", batches, 2, progress=False)  # bf16 work by default
    q = _tensors(tmp_path / "q")
    scales = q["model.layers.0.mlp.experts.w_in_scale_inv"]
    assert scales.dtype == torch.float8_e8m0fnu and q["model.layers.0.mlp.experts.w_in"].dtype == torch.float8_e4m3fn
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())
    assert cfg["quantization_config"] == config and cfg["mcsmoe_merge"]["dtype"] == "bfloat16"


def test_mxfp4_gpt_oss_merges_without_a_dequantized_copy(tmp_path, batches):
    tiny_moe("gpt_oss", num_experts=4, hidden_size=64, intermediate_size=64).save_pretrained(tmp_path / "plain")
    quantize_checkpoint(tmp_path / "plain", tmp_path / "mx", MXFP4)
    twin = _twin(tmp_path / "mx", tmp_path / "twin", MXFP4)
    got, ref = _merge(tmp_path / "mx", tmp_path / "q", batches), _merge(twin, tmp_path / "t", batches)
    assert {n: g.expert_map for n, g in got.groupings.items()} == {n: g.expert_map for n, g in ref.groupings.items()}
    q, t = _tensors(tmp_path / "q"), _tensors(tmp_path / "t")
    assert json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]["quant_method"] == "mxfp4"
    for layer in LAYERS:
        for bank in ("w_in", "w_out"):
            name = f"{layer}.experts.{bank}"
            assert name not in q and q[name + "_blocks"].dtype == torch.uint8
            d = dequantize_mxfp4(q[name + "_blocks"], q[name + "_scales"]).transpose(-1, -2)
            assert d.shape == t[name].shape
            error = ((d.double() - t[name].double()).norm() / t[name].double().norm()).item()
            assert error < 0.15  # e2m1: one coarse rounding
            assert got.quantization_error["layers"][layer][bank] == pytest.approx(error, rel=1e-4)  # as reported
        assert 0 < got.quantization_error["layers"][layer]["output"] < 0.15
        assert torch.equal(q[f"{layer}.experts.b_in"], t[f"{layer}.experts.b_in"])  # biases stay as they are
    a, b = from_pretrained(tmp_path / "q"), from_pretrained(tmp_path / "t")
    for x in batches:
        ya, yb = forward(a, x), forward(b, x)
        assert ((ya - yb).norm() / yb.norm()).item() < 0.2


# --- the error re-quantizing adds (reported, recorded in config.json) ------------------------------
def _experts_inputs(model, batches):
    """{layer: (hidden, top-k index, top-k weights)} at each MoE layer's experts module over the batches' tokens
    (padding positions left out), as transformers' own forward of `model` computes them (an independent look at
    the calibration tokens)."""
    seen, handles, keep = {}, [], {}
    for layer in LAYERS:
        def take(_m, args, kwargs, layer=layer):
            rows = [t.detach().clone() for t in [*args, *kwargs.values()][:3]]
            seen.setdefault(layer, []).append([t[keep["rows"]] for t in rows])
        handles.append(model.get_submodule(f"{layer}.experts").register_forward_pre_hook(take, with_kwargs=True))
    with torch.no_grad():
        for x in batches:
            keep["rows"] = x["attention_mask"].reshape(-1).bool() if "attention_mask" in x else slice(None)
            model(**x)
    for h in handles:
        h.remove()
    return {k: [torch.cat(p) for p in zip(*v)] for k, v in seen.items()}


def _relative(got, ref):
    return ((got.double() - ref.double()).norm() / ref.double().norm()).item()


def test_fp8_requantization_error_is_reported_against_the_merged_weights(fp8, batches, tmp_path):
    """The recorded errors equal an independent computation: the re-quantized banks against the same merge
    written dequantized (the merged weights before quantization), and the merged experts' output on the
    calibration tokens (the original model's hidden states and routing) with both."""
    from transformers import AutoModelForCausalLM

    from mcsmoe_fast.modules import MoEExperts

    source, twin = fp8
    got = _merge(source, tmp_path / "q", batches)
    _merge(source, tmp_path / "d", batches, keep_quantization=False)
    q, d = _tensors(tmp_path / "q"), _tensors(tmp_path / "d")
    recorded = json.loads((tmp_path / "q" / "config.json").read_text())["mcsmoe_quantization"]
    assert recorded == json.loads(json.dumps(got.quantization_error)) and recorded["format"] == "fp8"
    assert "mcsmoe_quantization" not in json.loads((tmp_path / "d" / "config.json").read_text())
    inputs = _experts_inputs(AutoModelForCausalLM.from_pretrained(str(twin), dtype=torch.float32).eval(), batches)
    for layer in LAYERS:
        entry, banks = recorded["layers"][layer], {}
        for bank in ("w_in", "w_out"):
            name = f"{layer}.experts.{bank}"
            banks[bank] = dequantize_fp8(q[name], q[name + "_scale_inv"]), d[name]
            expected = _relative(*banks[bank])
            assert 0.005 < expected < 2.0 ** -4  # Gaussian weights: ~2.6%; never more than half a step
            assert entry[bank] == pytest.approx(expected, rel=1e-6), (layer, bank)
        hidden, index, weights = inputs[layer]
        tokens = sum(int(x["attention_mask"].sum()) for x in batches)  # padding left out
        assert entry["tokens"] == hidden.shape[0] == tokens < sum(x["input_ids"].numel() for x in batches)
        expert_map = q[f"{layer}.experts.expert_map"]
        out = [MoEExperts(banks["w_in"][k], banks["w_out"][k], expert_map, "swiglu")(hidden, index, weights)
               for k in (0, 1)]
        expected = _relative(out[0], out[1])
        assert 0.005 < expected < 0.1
        assert entry["output"] == pytest.approx(expected, rel=1e-3), layer
    assert recorded["max"]["output"] == max(recorded["layers"][n]["output"] for n in LAYERS)


def test_a_sharded_quantized_merge_loads_holding_few_files_open(fp8, batches, tmp_path, monkeypatch):
    """Loading a quantized merged checkpoint reads shard after shard: at most a tensor's values file and its scales
    file are open at once (it held every shard open until the end: more shards than the open-file limit could not
    load), and every file is closed when a read fails."""
    from mcsmoe_fast.quant.files import QuantizedFiles

    _merge(fp8[0], tmp_path / "q", batches, max_shard_size="64KB")
    assert len(list((tmp_path / "q").glob("*.safetensors"))) > 4
    open_counts, read_into = [], QuantizedFiles.read_into

    def counting(self, name, out):
        result = read_into(self, name, out)
        open_counts.append(len(self.files.handles))
        return result

    monkeypatch.setattr(QuantizedFiles, "read_into", counting)
    model = from_pretrained(tmp_path / "q")
    assert open_counts and max(open_counts) <= 2
    one_shard = from_pretrained(_merge(fp8[0], tmp_path / "one", batches).path).state_dict()  # the same merge
    assert all(torch.equal(t, one_shard[n]) for n, t in model.state_dict().items())
    seen = []

    def failing(self, name, out):
        seen.append(self)
        if len(seen) == 6:
            raise RuntimeError("read failed")
        return read_into(self, name, out)

    monkeypatch.setattr(QuantizedFiles, "read_into", failing)
    with pytest.raises(RuntimeError, match="read failed"):
        from_pretrained(tmp_path / "q")
    assert seen[-1].files.handles == {}
