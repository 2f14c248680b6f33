"""The quantized formats (mcsmoe_fast/quant) against transformers' own dequantization of tiny checkpoints
written in the official layouts: block-FP8 (float and ue8m0 scales) and MXFP4 (GPT-OSS); round trips,
error bounds of fresh weights, ragged shapes, the format detector."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from mcsmoe_fast.quant import (
    detect, dequantize_fp8, dequantize_mxfp4, quantize_fp8, quantize_mxfp4, scale_grid,
)
from mcsmoe_fast.quant.mxfp4 import e2m1_codes
from mcsmoe_fast.streaming.quantized import quantize_checkpoint
from mcsmoe_fast.tiny import tiny_mixtral, tiny_moe

FP8 = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}
MXFP4 = {"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                                             "model.embed_tokens", "lm_head"]}
E8M0 = torch.float8_e8m0fnu


def _bytes(t):
    return t.contiguous().view(torch.uint8)


def _fp8_bound(w, s, block=(128, 128)):
    """Half an e4m3 step at each value: 2^-4 relative (3 mantissa bits), 2^-10 * scale in the subnormals."""
    rows, cols = w.shape[-2:]
    full = s.float().repeat_interleave(block[0], -2)[..., :rows, :].repeat_interleave(block[1], -1)[..., :cols]
    return w.abs() * 2.0 ** -4 + full * 2.0 ** -10 + 1e-12


# --- against transformers' own dequantization ------------------------------------------------------
@pytest.mark.parametrize("scale", ["float", "ue8m0-float32", "ue8m0-e8m0"])
def test_fp8_checkpoint_dequantizes_as_transformers_does(tmp_path, scale):
    from transformers import AutoModelForCausalLM, FineGrainedFP8Config

    tiny_mixtral(num_experts=2, hidden_size=256, intermediate_size=256, num_layers=1).save_pretrained(tmp_path / "bf16")
    config = dict(FP8, scale_fmt="float" if scale == "float" else "ue8m0")
    quantize_checkpoint(tmp_path / "bf16", tmp_path / "fp8", config, E8M0 if scale == "ue8m0-e8m0" else torch.float32)
    stored = load_file(str(tmp_path / "fp8" / "model.safetensors"))
    assert json.loads((tmp_path / "fp8" / "config.json").read_text())["quantization_config"] == config
    q_proj = "model.layers.0.self_attn.q_proj.weight"
    assert stored[q_proj].dtype == torch.float8_e4m3fn and stored[q_proj + "_scale_inv"].shape == (2, 2)
    assert stored[q_proj + "_scale_inv"].dtype == (E8M0 if scale == "ue8m0-e8m0" else torch.float32)
    assert stored["model.layers.0.block_sparse_moe.gate.weight"].dtype == torch.float32  # routers stay
    ref = AutoModelForCausalLM.from_pretrained(str(tmp_path / "fp8"), dtype=torch.float32,
                                               quantization_config=FineGrainedFP8Config(dequantize=True)).state_dict()
    mine = {n: dequantize_fp8(stored[n], stored[n + "_scale_inv"]) for n in stored if n + "_scale_inv" in stored}
    assert len(mine) == 4 + 3 * 2
    for n in mine:
        if "experts" not in n:
            assert torch.equal(mine[n], ref[n]), n
    p = "model.layers.0.block_sparse_moe.experts.{}.{}.weight"
    for j in range(2):
        gate_up = torch.cat([mine[p.format(j, "w1")], mine[p.format(j, "w3")]])
        assert torch.equal(gate_up, ref["model.layers.0.mlp.experts.gate_up_proj"][j])
        assert torch.equal(mine[p.format(j, "w2")], ref["model.layers.0.mlp.experts.down_proj"][j])


def test_mxfp4_checkpoint_dequantizes_as_transformers_does(tmp_path):
    from transformers import AutoModelForCausalLM, Mxfp4Config

    tiny_moe("gpt_oss", num_experts=4, hidden_size=64, intermediate_size=96, num_layers=1).save_pretrained(tmp_path / "bf16")
    quantize_checkpoint(tmp_path / "bf16", tmp_path / "mx", MXFP4)
    stored, plain = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("mx", "bf16"))
    bank = "model.layers.0.mlp.experts.gate_up_proj"
    assert bank not in stored and stored[bank + "_blocks"].shape == (4, 192, 2, 16)  # [E, out, in/32, 16]
    assert stored[bank + "_scales"].shape == (4, 192, 2) and stored[bank + "_blocks"].dtype == torch.uint8
    ref = AutoModelForCausalLM.from_pretrained(str(tmp_path / "mx"), dtype=torch.float32,
                                               quantization_config=Mxfp4Config(dequantize=True)).state_dict()
    for name in (bank, "model.layers.0.mlp.experts.down_proj"):
        mine = dequantize_mxfp4(stored[name + "_blocks"], stored[name + "_scales"]).transpose(1, 2)
        assert torch.equal(mine, ref[name]), name
        assert (mine - plain[name]).norm() / plain[name].norm() < 0.15  # e2m1: a coarse grid


@pytest.mark.parametrize("shape", [(200, 300), (3, 129, 127), (1, 1), (2, 128, 256)])
@pytest.mark.parametrize("scale_fmt", ["float", "ue8m0"])
def test_fp8_ragged_blocks_match_transformers_block_dequantize(shape, scale_fmt):
    """transformers' from_pretrained dequantize derives the block from the scale grid (rows // scale rows),
    wrong for ragged edge blocks; its block-size-aware helper is the reference for those shapes."""
    from transformers.integrations.finegrained_fp8 import _dequantize_fp8_weight

    torch.manual_seed(0)
    w = torch.randn(shape) * 0.02
    q, s = quantize_fp8(w, scale_fmt=scale_fmt)
    assert tuple(s.shape) == scale_grid(shape) == (*shape[:-2], -(-shape[-2] // 128), -(-shape[-1] // 128))
    d = dequantize_fp8(q, s)
    assert torch.equal(d, _dequantize_fp8_weight(q, s, [128, 128], torch.float32))
    assert (d - w).abs().le(_fp8_bound(w, s)).all()


# --- round trips and bounds -------------------------------------------------------------------------
@pytest.mark.parametrize("scale_fmt,scale_dtype", [("float", torch.float32), ("ue8m0", torch.float32), ("ue8m0", E8M0)])
def test_fp8_requantizing_values_on_the_grid_gives_the_same_bytes(scale_fmt, scale_dtype):
    torch.manual_seed(1)
    w = torch.randn(3, 300, 260) * torch.logspace(-3, 1, 260)  # blocks of very different ranges
    q, s = quantize_fp8(w, scale_fmt=scale_fmt, scale_dtype=scale_dtype)
    if scale_fmt == "ue8m0":
        # power-of-two scales round up: a block whose largest value rounded down to 224 or less is re-encoded
        # once with its scale halved (the same values); from then on the bytes are stable
        q1, s1 = quantize_fp8(dequantize_fp8(q, s), scale_fmt=scale_fmt, scale_dtype=scale_dtype)
        assert torch.equal(dequantize_fp8(q1, s1), dequantize_fp8(q, s))
        q, s = q1, s1
    q2, s2 = quantize_fp8(dequantize_fp8(q, s), scale_fmt=scale_fmt, scale_dtype=scale_dtype)
    assert torch.equal(_bytes(q2), _bytes(q)) and torch.equal(_bytes(s2), _bytes(s))
    # a bf16 working copy rounds the values, not the e4m3 codes (scales move by a bf16 rounding)
    q3, s3 = quantize_fp8(dequantize_fp8(q, s, torch.bfloat16), scale_fmt=scale_fmt, scale_dtype=scale_dtype)
    assert torch.equal(_bytes(q3), _bytes(q))
    torch.testing.assert_close(s3.float(), s.float(), rtol=2.0 ** -8, atol=0)


@pytest.mark.parametrize("scale_fmt", ["float", "ue8m0"])
def test_fp8_scales_and_error_of_fresh_weights(scale_fmt):
    torch.manual_seed(2)
    w = torch.randn(2, 256, 384, dtype=torch.float64).float()
    w[0, :128, :128] = 0  # an all-zero block
    w[1, 5, 7] = 1e3  # an outlier: its block's scale grows, the others do not
    q, s = quantize_fp8(w, scale_fmt=scale_fmt)
    amax = w.abs().reshape(2, 2, 128, 3, 128).amax(dim=(2, 4))
    if scale_fmt == "float":
        assert torch.equal(s[amax > 0], amax[amax > 0] / 448)
    else:
        m, e = torch.frexp(s)
        assert (m == 0.5).all() and (amax / s <= 448).all() and (amax / s > 224).where(amax > 0, True).all()
    assert s[0, 0, 0] == 1 and not q[0, :128, :128].float().any()
    qmax = q.float().abs().reshape(2, 2, 128, 3, 128).amax(dim=(2, 4))[amax > 0]
    if scale_fmt == "float":  # the largest value of each block lands on the top of the grid
        assert (qmax == 448).all()
    else:  # or in its upper half
        assert (qmax >= 224).all() and (qmax <= 448).all()
    d = dequantize_fp8(q, s)
    assert (d - w).abs().le(_fp8_bound(w, s)).all()
    rel = ((d - w).norm() / w.norm()).item()
    assert rel < (0.03 if scale_fmt == "float" else 0.04)


def test_e2m1_rounding_is_to_nearest_with_ties_to_even_codes():
    x = torch.tensor([0, 0.25, 0.5, 0.75, 1, 1.25, 1.5, 1.75, 2, 2.5, 3, 3.5, 4, 5, 6, 7, -0.0, -1, -5, -0.2])
    expected = [0, 0, 1, 2, 2, 2, 3, 4, 4, 4, 5, 6, 6, 6, 7, 7, 8, 10, 14, 8]
    assert e2m1_codes(x).tolist() == expected


@pytest.mark.parametrize("cols", [64, 100, 31])
def test_mxfp4_round_trip_and_bound(cols):
    torch.manual_seed(3)
    w = torch.randn(3, 17, cols) * torch.logspace(-2, 1, cols)
    blocks, scales = quantize_mxfp4(w)
    groups = -(-cols // 32)
    assert blocks.shape == (3, 17, groups, 16) and scales.shape == (3, 17, groups)
    d = dequantize_mxfp4(blocks, scales, cols=cols)
    k = (scales.to(torch.int32) - 127).repeat_interleave(32, -1)[..., :cols]
    m = w.abs() / torch.ldexp(torch.ones_like(w), k)  # magnitude in the block's scale: at most 6
    assert m.max() <= 6
    half_step = torch.where(m < 2, 0.25, torch.where(m < 4, 0.5, 1.0))
    assert ((d - w).abs() <= half_step * torch.ldexp(torch.ones_like(w), k)).all()
    # a projection: the dequantized values are on the grid; their bytes are stable after one requantization
    b2, s2 = quantize_mxfp4(d)
    assert torch.equal(dequantize_mxfp4(b2, s2, cols=cols), d)
    b3, s3 = quantize_mxfp4(dequantize_mxfp4(b2, s2, cols=cols))
    assert torch.equal(b3, b2) and torch.equal(s3, s2)


def test_bf16_working_dtype_rounds_once():
    torch.manual_seed(4)
    q, s = quantize_fp8(torch.randn(2, 256, 128))
    assert torch.equal(dequantize_fp8(q, s, torch.bfloat16), dequantize_fp8(q, s).to(torch.bfloat16))
    b, e = quantize_mxfp4(torch.randn(4, 64))
    assert torch.equal(dequantize_mxfp4(b, e, torch.bfloat16), dequantize_mxfp4(b, e).to(torch.bfloat16))


# --- the format of a config, bad input --------------------------------------------------------------
def test_detect_reads_quantization_config():
    assert detect(None) is None
    fp8 = detect(FP8)
    assert (fp8.method, fp8.block, fp8.scale_fmt) == ("fp8", (128, 128), "float")
    assert detect(dict(FP8, scale_fmt="ue8m0")).scale_fmt == "ue8m0"
    assert fp8.parts("a.weight") == ("a.weight", "a.weight_scale_inv")
    assert detect(MXFP4).parts("x.gate_up_proj") == ("x.gate_up_proj_blocks", "x.gate_up_proj_scales")
    from transformers import FineGrainedFP8Config

    assert detect(FineGrainedFP8Config(weight_block_size=[128, 128])).method == "fp8"
    with pytest.raises(ValueError, match="quant_method 'gptq' is not supported"):
        detect({"quant_method": "gptq", "bits": 4})
    with pytest.raises(ValueError, match="per-tensor FP8"):
        detect({"quant_method": "fp8"})
    with pytest.raises(ValueError, match="scale_fmt 'e5m2'"):
        detect(dict(FP8, scale_fmt="e5m2"))


def test_bad_input_is_named():
    q, s = quantize_fp8(torch.randn(130, 260))
    with pytest.raises(ValueError, match=r"weight_scale_inv: expected shape \(2, 3\)"):
        dequantize_fp8(q, s[:, :2])
    with pytest.raises(ValueError, match="scale_fmt"):
        quantize_fp8(torch.randn(4, 4), scale_fmt="e8m0")
    with pytest.raises(ValueError, match="use scale_fmt='ue8m0'"):
        quantize_fp8(torch.randn(4, 4), scale_dtype=E8M0)
    b, e = quantize_mxfp4(torch.randn(4, 64))
    with pytest.raises(ValueError, match="do not match"):
        dequantize_mxfp4(b, e[:, :1])
