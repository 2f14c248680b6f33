"""The quantized formats of released MoE checkpoints, in plain PyTorch: block-FP8 (fp8.py) and MXFP4
(mxfp4.py) dequantized into a working dtype and quantized back the way the releases were made, and
the format of a checkpoint read from its quantization_config (format.py)."""
from .format import QuantFormat, detect, fp8_scale_name
from .fp8 import dequantize_fp8, quantize_fp8, scale_grid
from .mxfp4 import dequantize_mxfp4, quantize_mxfp4

__all__ = ["QuantFormat", "detect", "fp8_scale_name", "dequantize_fp8", "quantize_fp8", "scale_grid",
           "dequantize_mxfp4", "quantize_mxfp4"]
