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
