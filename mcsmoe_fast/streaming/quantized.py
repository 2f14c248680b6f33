"""Quantized checkpoints in the streamed path (block-FP8, MXFP4; quant/): read dequantized, written back in
the input's precision.

Reading: SourceCheckpoint sees the weight files through quant.files.QuantizedFiles, so every tensor a
layer needs arrives dequantized into the working dtype, one layer at a time, whatever its stored parts.
Writing (`QuantizingWriter`, in front of the output's ShardWriter):
- a tensor the source stores quantized under the same name (attention, dense and shared-expert
  projections, the experts of a layer left as it is) is copied through byte for byte, with its scales;
- the expert banks (the merged slots' w_in / w_out, a family's own fused banks) are quantized to the
  source's format: fp8 blocks with the source's block size, scale_fmt and scale dtype; mxfp4 as
  transformers stores GPT-OSS's banks, the transpose of the module's last two dims packed in blocks of 32
  (the merged slots' w_in [G, F, d] as w_in_blocks [G, d, F/32, 16]), so one rule reads every bank back;
- everything else (norms, routers, biases, expert_map) as it is.
The config keeps its quantization_config. `dequantized_config` drops it for a dequantized output.

`quantize_checkpoint` writes a plain transformers checkpoint in an official quantized layout (tests and
benchmarks build their inputs with it; it is also how a model gets FP8 for serving).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from ..checkpoint.weight_files import ShardWriter
from ..quant import QuantFormat, detect, quantize_fp8, quantize_mxfp4
from ..quant.files import QuantizedFiles

# tensors that stay unquantized in the releases: embeddings, norms, the head, routers
_KEEP = ("embed_tokens", "lm_head", "norm", ".gate.weight", ".router.weight", "e_score_correction_bias", "shared_expert_gate")
# fused expert banks (transformers 5 names)
_BANKS = ("experts.gate_up_proj", "experts.down_proj", "experts.up_proj")


def source_format(config: dict) -> QuantFormat | None:
    """The quantized format of a checkpoint's raw config.json (None: not quantized)."""
    return detect(config.get("quantization_config")) if isinstance(config, dict) else None


def quantize_tensor(name: str, tensor: torch.Tensor, fmt: QuantFormat, scale_dtype: torch.dtype = torch.float32,
                    transpose_mxfp4: bool = False) -> dict[str, torch.Tensor]:
    """{stored name: part} of `tensor` in format `fmt` (fp8: [..., out, in] blocks; mxfp4: packed along
    the last dim, after transposing the last two when transpose_mxfp4, GPT-OSS's [E, in, out] banks)."""
    if fmt.method == "fp8":
        q, s = quantize_fp8(tensor, fmt.block, fmt.scale_fmt, scale_dtype)
        return dict(zip(fmt.parts(name), (q, s)))
    blocks, scales = quantize_mxfp4(tensor.transpose(-1, -2) if transpose_mxfp4 else tensor)
    return dict(zip(fmt.parts(name), (blocks, scales)))


class QuantizingWriter:
    """A ShardWriter that writes quantized tensors in the source's format (module docstring)."""

    def __init__(self, writer: ShardWriter, files: QuantizedFiles, banks: set[str]):
        self.writer, self.files, self.banks = writer, files, banks
        self.names: set[str] = set()
        scales = [files.files.dtypes[p[1]] for p in files.parts.values()]
        self.scale_dtype = scales[0] if scales and files.format.method == "fp8" else torch.float32

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self.names:
            raise ValueError(f"tensor {name!r} written twice")
        self.names.add(name)
        if self.files.is_quantized(name) and name not in self.banks:  # unchanged: the stored bytes
            parts = self.files.raw(name)
        elif name in self.banks and tensor.is_floating_point():
            parts = quantize_tensor(name, tensor, self.files.format, self.scale_dtype, transpose_mxfp4=True)
        else:
            parts = {name: tensor}
        for n, t in parts.items():
            self.writer.add(n, t)

    def __getattr__(self, attr):  # finish, flush, bytes_written, ... of the ShardWriter
        return getattr(self.writer, attr)


def output_writer(writer: ShardWriter, source, views: dict, quantized_output: bool):
    """The writer a streamed run writes through: QuantizingWriter when the source is quantized and the
    output keeps its precision, else `writer` itself. Banks: each MoE layer's merged slots (w_in, w_out)
    and, when the source stores them fused and quantized under the model's names, its own banks."""
    if not quantized_output or not isinstance(source.files, QuantizedFiles):
        return writer
    banks = set()
    for view in views.values():
        banks.update((f"{view.name}.experts.w_in", f"{view.name}.experts.w_out"))
        layout = view.stored_tensors()
        banks.update(n for n in (*layout.w_in, *layout.w_out) if not source.files.is_quantized(n))
    return QuantizingWriter(writer, source.files, banks)


def dequantized_config(config) -> None:
    """A config for a dequantized output: without quantization_config."""
    if getattr(config, "quantization_config", None) is not None:
        del config.quantization_config


def _quantizable(name: str, tensor: torch.Tensor, fmt: QuantFormat) -> bool:
    if not tensor.is_floating_point() or any(k in name for k in _KEEP):
        return False
    if fmt.method == "mxfp4":
        return tensor.dim() == 3 and name.endswith(_BANKS)
    return (tensor.dim() == 2 and name.endswith(".weight")) or (tensor.dim() == 3 and name.endswith(_BANKS))


@torch.no_grad()
def quantize_checkpoint(src, dst, quantization_config: dict, scale_dtype: torch.dtype = torch.float32) -> Path:
    """Write the plain transformers checkpoint `src` (config.json + safetensors) to `dst` in the layout of
    the official quantized releases: fp8 (DeepSeek-V3 / Qwen3 FP8: every linear weight but the
    embeddings, norms, head and routers, weight_scale_inv per block; ue8m0 scales as float32 powers of
    two or, with scale_dtype=torch.float8_e8m0fnu, exponent bytes) or mxfp4 (GPT-OSS: the expert banks
    as *_blocks / *_scales of their [E, out, in] transpose). config.json gets `quantization_config`."""
    from .source import open_weight_files

    src, dst = Path(src), Path(dst)
    fmt = detect(quantization_config)
    if fmt is None:
        raise ValueError("quantization_config: expected a dict with quant_method 'fp8' or 'mxfp4'")
    files = open_weight_files(src)
    dst.mkdir(parents=True, exist_ok=True)
    writer = ShardWriter(dst, "model.safetensors", None, {"format": "pt"})
    for name in files.shapes:
        t = files.get(name)
        parts = (quantize_tensor(name, t, fmt, scale_dtype, transpose_mxfp4=True) if _quantizable(name, t, fmt)
                 else {name: t})
        for n, p in parts.items():
            writer.add(n, p)
    files.release()
    writer.finish()
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = dict(quantization_config)
    (dst / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for extra in ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (src / extra).is_file():
            shutil.copy(src / extra, dst / extra)
    return dst
