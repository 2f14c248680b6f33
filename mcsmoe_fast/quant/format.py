"""Which quantized format a checkpoint is in, from its config's `quantization_config`, and the names of
a quantized tensor's stored parts.

- "fp8" with weight_block_size [128, 128] (DeepSeek-V3, Qwen3 FP8, Kimi-K2; scale_fmt "ue8m0" for
  power-of-two scales): tensor X is stored as X (e4m3) plus its scales, named X_scale_inv, or
  <module>.weight_scale_inv for <module>.weight.
- "mxfp4" (GPT-OSS): tensor X is stored as X_blocks and X_scales.

Other quantization methods (GPTQ, AWQ, bitsandbytes, compressed-tensors, per-tensor FP8) are refused
with the reason, before any work.
"""
from __future__ import annotations

from dataclasses import dataclass, field

SUPPORTED = ("fp8", "mxfp4")


@dataclass(frozen=True)
class QuantFormat:
    method: str  # "fp8" or "mxfp4"
    block: tuple[int, int] = (128, 128)  # fp8's weight_block_size (rows, cols)
    scale_fmt: str = "float"  # fp8: "float" or "ue8m0"
    config: dict = field(default_factory=dict, compare=False)  # the quantization_config as read, written back as is

    def parts(self, name: str) -> tuple[str, ...]:
        """The stored names of tensor `name`: (weight, scale) for fp8, (blocks, scales) for mxfp4."""
        if self.method == "fp8":
            return name, fp8_scale_name(name)
        return f"{name}_blocks", f"{name}_scales"


def fp8_scale_name(name: str) -> str:
    """transformers' naming: <module>.weight -> <module>.weight_scale_inv, a fused bank X -> X_scale_inv."""
    return f"{name}_scale_inv"


def detect(quantization_config) -> QuantFormat | None:
    """The QuantFormat of a config's quantization_config (a dict or a transformers config object), None
    when there is none; ValueError naming the method for what is not supported."""
    if quantization_config is None:
        return None
    raw = quantization_config if isinstance(quantization_config, dict) else quantization_config.to_dict()
    method = raw.get("quant_method", "")
    method = str(getattr(method, "value", method)).lower()  # transformers' QuantizationMethod enum or a string
    if method not in SUPPORTED:
        raise ValueError(f"quantization_config.quant_method {method!r} is not supported: mcsmoe-fast reads block-FP8 "
                         "('fp8' with weight_block_size) and MXFP4 ('mxfp4') checkpoints; dequantize it with "
                         "transformers and save it in bf16 first")
    if method == "mxfp4":
        return QuantFormat("mxfp4", config=dict(raw))
    block = raw.get("weight_block_size")
    if not block or len(block) != 2 or min(block) < 1:
        raise ValueError(f"quantization_config: fp8 without a weight_block_size (per-tensor FP8, got {block!r}) is not "
                         "supported; block-FP8 checkpoints give weight_block_size [128, 128]")
    if raw.get("fmt", "e4m3") != "e4m3":
        raise ValueError(f"quantization_config.fmt {raw.get('fmt')!r}: only e4m3 FP8 weights are supported")
    scale_fmt = raw.get("scale_fmt") or "float"
    if scale_fmt not in ("float", "ue8m0"):
        raise ValueError(f"quantization_config.scale_fmt {scale_fmt!r}: expected 'float' or 'ue8m0'")
    return QuantFormat("fp8", tuple(int(b) for b in block), scale_fmt, dict(raw))
