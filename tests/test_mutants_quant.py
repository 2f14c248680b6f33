"""Behaviours of quant/ that the format tests (test_quant_formats*.py, test_dequant.py, test_quant_edge_values.py)
left unchecked, found by mutation testing (benchmarks/mutation.sh quant; benchmarks/MUTATION.md): block_amax of a
bank (leading dims), the position a corrupt MXFP4 scale is named at, the shapes dequantize_mxfp4_into refuses for
its output, that the defaults take the extension's kernels, and how many files copy_into holds open."""
from __future__ import annotations

import re
from types import SimpleNamespace

import pytest
import torch

import mcsmoe_fast.quant.fp8 as fp8
import mcsmoe_fast.quant.mxfp4 as mxfp4
from mcsmoe_fast.quant.mxfp4 import BLOCK, dequantize_mxfp4, dequantize_mxfp4_into, quantize_mxfp4


def test_block_amax_of_a_bank_is_each_matrix_s():
    w = torch.randn(3, 2, 37, 45)
    got = fp8.block_amax(w, (16, 8))
    assert got.shape == (3, 2, 3, 6)
    for i in range(3):
        for j in range(2):
            for r in range(3):
                for c in range(6):
                    block = w[i, j, r * 16:(r + 1) * 16, c * 8:(c + 1) * 8]
                    assert got[i, j, r, c] == block.abs().max(), (i, j, r, c)


def _mx(rows=3, cols=70, lead=()):
    blocks, scales = quantize_mxfp4(torch.randn(*lead, rows, cols))
    return blocks, scales


@pytest.mark.parametrize("at", [(0, 0), (2, 1), (1, 2)])
def test_a_nan_scale_is_named_at_its_first_position(at):
    blocks, scales = _mx()
    scales[at] = 255
    scales[2, 2] = 255  # a later one: the first is named
    message = (f"scales: e8m0 byte 255 at {at}, NaN in the MXFP4 format (no quantizer writes it): the checkpoint's "
               "data is corrupt; re-download or re-export it")
    with pytest.raises(ValueError, match="^" + re.escape(message) + "$"):
        dequantize_mxfp4(blocks, scales)


def _refused(blocks, scales, out, transpose=False):
    with pytest.raises(ValueError, match=r"^out: expected \[\.\.\., (cols, rows|rows, cols)\] with "):
        dequantize_mxfp4_into(blocks, scales, out, transpose=transpose)


def test_outputs_of_the_wrong_shape_are_refused():
    blocks, scales = _mx(rows=3, cols=70)  # G = 3: 64 < cols <= 96
    for cols in (64, 97, 32):  # the lower bound is exclusive: (G - 1) * 32 columns fit in G - 1 blocks
        _refused(blocks, scales, torch.empty(3, cols))
        _refused(blocks[None], scales[None], torch.empty(1, cols, 3), transpose=True)
    _refused(blocks, scales, torch.empty(4, 70))  # the right number of dims, other rows
    _refused(blocks, scales, torch.empty(1, 3, 70))  # one dim too many
    _refused(blocks, scales, torch.tensor(0.0))  # a scalar
    _refused(blocks[None], scales[None], torch.tensor(0.0), transpose=True)
    bank, bank_scales = _mx(rows=3, cols=70, lead=(2,))
    _refused(bank, bank_scales, torch.empty(2, 70, 4), transpose=True)  # [E, cols, rows]: other rows
    _refused(bank, bank_scales, torch.empty(3, 70, 3), transpose=True)  # other experts
    _refused(bank, bank_scales, torch.empty(1, 2, 70, 3), transpose=True)  # one dim too many
    _refused(bank[0, 0], bank_scales[0, 0], torch.empty(70, 1), transpose=True)  # no rows dim to transpose
    ok = dequantize_mxfp4_into(bank, bank_scales, torch.empty(2, 70, 3), transpose=True)
    assert torch.equal(ok, dequantize_mxfp4(bank, bank_scales, cols=70).transpose(-1, -2))
    assert dequantize_mxfp4_into(blocks, scales, torch.empty(3, 65)).shape == (3, 65)  # 65 > 64: three blocks


class _Spy:
    """The extension module with its calls counted by name."""

    def __init__(self, module):
        self.module, self.calls = module, []

    def __getattr__(self, name):
        def call(*args):
            self.calls.append(name)
            return getattr(self.module, name)(*args)
        return call


def test_the_defaults_take_the_extensions_kernels(monkeypatch):
    w = torch.randn(2, 40, 64)
    for module in (mxfp4, fp8):
        monkeypatch.setattr(module, "_C", _Spy(module._C))
    blocks, scales = quantize_mxfp4(w)
    got = dequantize_mxfp4(blocks, scales)
    assert mxfp4._C.calls.count("dequantize_mxfp4_into") == 1
    assert torch.equal(got, dequantize_mxfp4(blocks, scales, native=False))
    assert mxfp4._C.calls.count("dequantize_mxfp4_into") == 1  # native=False: plain PyTorch
    q, s = fp8.quantize_fp8(w, (16, 16))
    assert fp8._C.calls == ["fp8_block_amax_into", "quantize_fp8_into"]
    q2, s2 = fp8.quantize_fp8(w, (16, 16), native=False)
    assert torch.equal(q.view(torch.uint8), q2.view(torch.uint8)) and torch.equal(s, s2)
    assert len(fp8._C.calls) == 2


def test_copy_into_holds_at_most_a_tensor_s_two_files_open(tmp_path, monkeypatch):
    from safetensors.torch import save_file

    from mcsmoe_fast.checkpoint.weight_files import WeightFiles
    from mcsmoe_fast.quant import detect
    from mcsmoe_fast.quant.files import QuantizedFiles

    fmt = detect({"quant_method": "fp8", "weight_block_size": [16, 16]})
    weights = {f"w{i}": torch.randn(32, 32) for i in range(4)}
    files, weight_map = {}, {}
    for i, (name, w) in enumerate(weights.items()):  # values and scales in different files
        q, s = fp8.quantize_fp8(w, (16, 16))
        files.setdefault(f"v{i % 3}.safetensors", {})[f"{name}"] = q
        files.setdefault(f"s{(i + 1) % 3}.safetensors", {})[f"{name}_scale_inv"] = s
    for file, tensors in files.items():
        save_file(tensors, str(tmp_path / file))
        weight_map.update({n: file for n in tensors})
    source = QuantizedFiles(WeightFiles(tmp_path, weight_map=weight_map), fmt)
    most = []
    read_into = QuantizedFiles.read_into

    def counting(self, name, out):
        result = read_into(self, name, out)
        most.append(len(self.files.handles))
        return result
    monkeypatch.setattr(QuantizedFiles, "read_into", counting)
    targets = {name: torch.empty(32, 32) for name in weights}
    source.copy_into(targets)
    assert max(most) <= 2 and not source.files.handles
    for name, w in weights.items():
        assert torch.equal(targets[name], fp8.dequantize_fp8(*fp8.quantize_fp8(w, (16, 16)), block=(16, 16)))


# requantize.py (benchmarks/MUTATION.md, quant/requantize)
FP8_16 = {"quant_method": "fp8", "weight_block_size": [16, 16]}


def _checkpoint(tmp_path, tensors: dict, config: dict):
    """QuantizedFiles over one safetensors file holding `tensors` in format `config`."""
    from safetensors.torch import save_file

    from mcsmoe_fast.checkpoint.weight_files import WeightFiles
    from mcsmoe_fast.quant import detect
    from mcsmoe_fast.quant.files import QuantizedFiles

    save_file(tensors, str(tmp_path / "model.safetensors"))
    return QuantizedFiles(WeightFiles(tmp_path, single="model.safetensors"), detect(config))


def test_relative_and_squared_errors_by_their_definitions():
    from mcsmoe_fast.quant.requantize import relative_error, squared_error

    zero = torch.zeros(3, 4)
    assert relative_error(zero, zero) == 0.0
    assert relative_error(torch.ones(3, 4), zero) == float("inf")
    got, ref = torch.randn(5, 3, 4), torch.randn(5, 3, 4)
    diff, norm = squared_error(got, ref)  # every slice of the bank summed
    assert diff == pytest.approx((got - ref).square().sum().item(), rel=1e-5)
    assert norm == pytest.approx(ref.square().sum().item(), rel=1e-5)
    assert relative_error(got, ref) == pytest.approx(((got - ref).norm() / ref.norm()).item(), rel=1e-5)


def test_quantize_tensor_packs_the_last_dim_unless_told_to_transpose_and_dequantize_parts_reads_the_block():
    from mcsmoe_fast.quant import detect
    from mcsmoe_fast.quant.requantize import dequantize_parts, quantize_tensor

    bank = torch.randn(2, 64, 96)
    mx = detect({"quant_method": "mxfp4"})
    plain = quantize_tensor("experts.down_proj", bank, mx)
    assert [tuple(p.shape) for p in plain.values()] == [(2, 64, 3, 16), (2, 64, 3)]
    assert torch.equal(plain["experts.down_proj_blocks"], quantize_mxfp4(bank)[0])
    fp8_16 = detect(FP8_16)
    parts = quantize_tensor("w", bank[0], fp8_16)
    assert parts["w_scale_inv"].shape == (4, 6)  # 16 x 16 blocks
    assert torch.equal(dequantize_parts(parts, fp8_16, (64, 96)), fp8.dequantize_fp8(*parts.values(), block=(16, 16)))


def test_which_tensors_a_release_stores_quantized():
    from mcsmoe_fast.quant import detect
    from mcsmoe_fast.quant.requantize import quantizable

    mx, f8 = detect({"quant_method": "mxfp4"}), detect(FP8_16)
    bank, matrix, vector = torch.empty(2, 4, 4), torch.empty(4, 4), torch.empty(4)
    assert quantizable("model.layers.0.mlp.experts.gate_up_proj", bank, mx)
    assert not quantizable("model.layers.0.mlp.experts.gate_up_proj", matrix, mx)  # a bank is 3-D
    assert not quantizable("model.layers.0.mlp.something", bank, mx)  # 3-D, not a bank
    assert quantizable("model.layers.0.self_attn.q_proj.weight", matrix, f8)
    assert not quantizable("model.layers.0.self_attn.sinks", matrix, f8)  # 2-D, not a weight
    assert not quantizable("model.layers.0.self_attn.q_proj.weight", vector, f8)  # a weight, not 2-D
    assert not quantizable("model.layers.0.mlp.something", bank, f8)  # 3-D, not a bank


def test_check_layout_refusals_in_full_and_our_own_banks_pass():
    from mcsmoe_fast.quant import detect
    from mcsmoe_fast.quant.requantize import check_layout

    meta = {"model.layers.0.mlp.experts.gate_up_proj": torch.empty(2, 4, 4, device="meta"),
            "model.layers.1.mlp.experts.gate_up_proj": torch.empty(2, 4, 4, device="meta")}
    message = ("block-FP8 of gpt_oss's fused expert banks (experts.gate_up_proj / down_proj, e.g. "
               "model.layers.0.mlp.experts.gate_up_proj): transformers' dequantizing load reads block-FP8 scales only "
               "as <module>.weight_scale_inv and its FP8 experts take neither GPT-OSS's biased banks nor Llama-4's "
               "[E, in, out] ones, so no reader but mcsmoe-fast would load them right; write this model as MXFP4 "
               "({'quant_method': 'mxfp4'}), which transformers reads")
    with pytest.raises(ValueError, match="^" + re.escape(message) + "$"):
        check_layout(meta, detect(FP8_16), "gpt_oss")
    check_layout({"model.layers.0.mlp.experts.w_in": torch.empty(2, 4, 4, device="meta")}, detect(FP8_16), "mixtral")
    message = ("MXFP4 is written for fused expert banks (GPT-OSS, Llama-4: experts.gate_up_proj / down_proj), but "
               "mixtral stores its experts per expert, so nothing would be quantized; write it as block-FP8 "
               "({'quant_method': 'fp8', 'weight_block_size': [128, 128]})")
    with pytest.raises(ValueError, match="^" + re.escape(message) + "$"):
        check_layout({"model.layers.0.mlp.experts.0.w1.weight": torch.empty(4, 4, device="meta")},
                     detect({"quant_method": "mxfp4"}), "mixtral")


def test_like_source_keeps_the_source_s_scale_dtype_and_its_unquantized_tensors(tmp_path):
    from mcsmoe_fast.quant.requantize import LikeSource, stored_scale_dtype

    w, kept = torch.randn(32, 32), torch.randn(32, 32)
    q, s = fp8.quantize_fp8(w, (16, 16), "ue8m0", torch.float8_e8m0fnu)
    source = _checkpoint(tmp_path, {"a.weight": q, "a.weight_scale_inv": s, "b.weight": kept},
                         {**FP8_16, "scale_fmt": "ue8m0"})
    assert stored_scale_dtype(source) == torch.float8_e8m0fnu
    like = LikeSource(source)
    parts, fresh = like.parts("a.weight", fp8.dequantize_fp8(q, s, block=(16, 16)))  # kept: the source's bytes
    assert not fresh and torch.equal(parts["a.weight"].view(torch.uint8), q.view(torch.uint8))
    parts, fresh = like.parts("a.weight", w * 3)  # changed: quantized afresh, scales in the source's dtype
    assert fresh and parts["a.weight_scale_inv"].dtype == torch.float8_e8m0fnu
    parts, fresh = like.parts("b.weight", kept)  # stored unquantized by the source: as it is
    assert not fresh and list(parts) == ["b.weight"] and parts["b.weight"] is kept


def test_stored_scale_dtype_of_an_mxfp4_source_is_float32(tmp_path):
    from mcsmoe_fast.quant.requantize import stored_scale_dtype

    blocks, scales = quantize_mxfp4(torch.randn(2, 8, 64))
    source = _checkpoint(tmp_path, {"experts.down_proj_blocks": blocks, "experts.down_proj_scales": scales},
                         {"quant_method": "mxfp4"})
    assert source.is_quantized("experts.down_proj") and stored_scale_dtype(source) == torch.float32
