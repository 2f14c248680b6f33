"""FP8 / MXFP4 at the edges of their ranges, and inputs they cannot hold: nothing silently wrong (session 31's
audit found each of these giving NaN, wrong magnitudes or raw values; each test failed before its fix)."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mcsmoe_fast.checkpoint.weight_files import CheckpointError
from mcsmoe_fast.quant import dequantize_fp8, dequantize_mxfp4, quantize_fp8, quantize_mxfp4
from mcsmoe_fast.streaming.quantized import load_dequantized, quantize_checkpoint
from mcsmoe_fast.tiny import tiny_mixtral, tiny_moe

E8M0 = torch.float8_e8m0fnu


@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("fmt,scale_dtype", [("float", torch.float32), ("ue8m0", torch.float32), ("ue8m0", E8M0)])
@pytest.mark.parametrize("amax", [1e-44, 1e-40, 1e-38, 1e-30])
def test_a_tiny_block_reads_back_within_half_a_step_of_its_stored_scale(amax, fmt, scale_dtype, native):
    """A float32 block of zeros and values down to 1e-44 (amax / 448 underflows; ue8m0 would need 2^k below
    e8m0's 2^-127): a nonzero scale, no NaN, each value within half an e4m3 step of its stored scale."""
    w = torch.zeros(8, 8)
    w[0, :4] = torch.tensor([amax, -amax / 2, amax / 3, amax / 7])
    q, s = quantize_fp8(w, (8, 8), fmt, scale_dtype, native=native)
    scale = s.float().item()
    assert scale > 0
    d = dequantize_fp8(q, s)
    assert not d.isnan().any()
    assert torch.equal(d[1:], torch.zeros(7, 8)) and torch.equal(d[0, 4:], torch.zeros(4))
    # e4m3: 3 mantissa bits (relative step 2^-3 above 2^-6), subnormal step 2^-9: half a step either way
    bound = torch.maximum(w.abs() * 2.0**-4, torch.full_like(w, 2.0**-10 * scale))
    assert ((d - w).abs() <= bound * (1 + 1e-6)).all()


def test_ue8m0_scales_stay_within_e8m0s_range():
    w = torch.full((4, 4), 1e-38)
    for scale_dtype in (torch.float32, E8M0):
        q, s = quantize_fp8(w, (4, 4), "ue8m0", scale_dtype)
        assert s.float().item() == 2.0**-127  # the smallest e8m0 power of two: codes computed with it
        torch.testing.assert_close(dequantize_fp8(q, s), w, rtol=2.0**-4, atol=0)


@pytest.mark.parametrize("shape", [(0, 128), (128, 0), (3, 0, 7), (0, 5, 5)])
@pytest.mark.parametrize("native", [True, False])
def test_fp8_of_an_empty_matrix(shape, native):
    q, s = quantize_fp8(torch.empty(shape), native=native)
    assert q.shape == shape and q.dtype == torch.float8_e4m3fn
    assert s.shape == (*shape[:-2], -(-shape[-2] // 128), -(-shape[-1] // 128)) and (s == 1).all()
    assert dequantize_fp8(q, s).shape == shape


@pytest.mark.parametrize("special", [float("nan"), float("inf"), -float("inf")])
def test_mxfp4_refuses_values_e2m1_cannot_hold(special):
    w = torch.linspace(-100, 100, 64).reshape(2, 32)
    w[1, 3] = special
    with pytest.raises(ValueError, match=r"NaN or inf at \(1, 3\)"):
        quantize_mxfp4(w)
    blocks, scales = quantize_mxfp4(torch.linspace(-100, 100, 64).reshape(2, 32))  # finite: accepted
    assert torch.isfinite(dequantize_mxfp4(blocks, scales)).all()


@pytest.mark.parametrize("dtype", [torch.float8_e5m2, torch.uint8, torch.bfloat16, torch.float32])
def test_dequantize_fp8_refuses_weights_that_are_not_e4m3(dtype):
    w = torch.tensor([[-256.0, -128.0, 80.0, -56.0]]).to(dtype)
    for native in (True, False):
        with pytest.raises(ValueError, match=f"expected float8_e4m3fn values .*got {dtype}"):
            dequantize_fp8(w, torch.ones(1, 1), block=(1, 4), native=native)


def test_raw_e8m0_bytes_read_as_the_format_defines_them():
    """Scales stored as uint8 exponent bytes equal the same bytes as float8_e8m0fnu: 2^(b - 127), 255 = NaN."""
    q = torch.tensor([[0x38, 0x00]], dtype=torch.uint8).view(torch.float8_e4m3fn)  # 1.0 and 0.0
    for byte in (0, 1, 100, 127, 200, 254, 255):
        scale = torch.tensor([[byte]], dtype=torch.uint8)
        got = dequantize_fp8(q, scale, block=(1, 2))
        want = dequantize_fp8(q, scale.view(E8M0), block=(1, 2))
        torch.testing.assert_close(got, want, equal_nan=True, rtol=0, atol=0)
        if byte == 255:
            assert got.isnan().all()
        else:
            assert got[0, 0].item() == 2.0 ** (byte - 127) and got[0, 1].item() == 0


def fp8_checkpoint(tmp_path: Path) -> tuple[Path, str]:
    tiny_mixtral(num_experts=2, hidden_size=32, intermediate_size=64, num_layers=1).save_pretrained(tmp_path / "plain")
    quantize_checkpoint(tmp_path / "plain", tmp_path / "fp8",
                        {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]})
    return tmp_path / "fp8", "model.layers.0.self_attn.q_proj.weight"


def test_an_fp8_weight_without_its_scale_is_refused(tmp_path):
    directory, name = fp8_checkpoint(tmp_path)
    load_dequantized(directory, torch.float32)  # complete: loads
    tensors = load_file(str(directory / "model.safetensors"))
    del tensors[name + "_scale_inv"]
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=f"{name}' is stored as torch.float8_e4m3fn with no scales"):
        load_dequantized(directory, torch.float32)


def test_fp8_weights_without_a_quantization_config_are_refused(tmp_path):
    directory, name = fp8_checkpoint(tmp_path)
    config = json.loads((directory / "config.json").read_text())
    del config["quantization_config"]
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="with no scales read with it.*quantization_config"):
        load_dequantized(directory, torch.float32)


def test_mxfp4_with_a_ragged_packed_dim_is_refused_before_anything_is_written(tmp_path):
    """GPT-OSS's down_proj bank is packed along ff: ff = 48 would need a ragged block, which the format cannot
    record (readers take 32 columns a block), so the checkpoint would load in no reader."""
    tiny_moe("gpt_oss", num_experts=4, hidden_size=32, intermediate_size=48, num_layers=1).save_pretrained(
        tmp_path / "plain")
    with pytest.raises(ValueError, match="down_proj: MXFP4 packs its dim of 48 in blocks of 32"):
        quantize_checkpoint(tmp_path / "plain", tmp_path / "mx", {"quant_method": "mxfp4"})
    assert not (tmp_path / "mx").exists()
    tiny_moe("gpt_oss", num_experts=4, hidden_size=32, intermediate_size=64, num_layers=1).save_pretrained(
        tmp_path / "plain64")
    quantize_checkpoint(tmp_path / "plain64", tmp_path / "mx64", {"quant_method": "mxfp4"})
    load_dequantized(tmp_path / "mx64", torch.float32)
