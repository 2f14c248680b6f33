"""A checkpoint's weight files seen dequantized: the tensors of a block-FP8 or MXFP4 checkpoint under the
names of the model they load into, read into any working dtype, and their stored parts read as they are.

Wraps anything with WeightFiles' reading interface (checkpoint/weight_files.py): `shapes`, `dtypes`,
`read_into`, `get`, `release`, `bytes_read`, `file_of`, `nbytes`. A tensor X is quantized when its sibling
parts are stored (format.py): X plus X_scale_inv (fp8), or X_blocks plus X_scales (mxfp4: they hold X's
transpose, [E, out, in/32, 16] for a bank X [E, in, out], as transformers reads GPT-OSS, and as
mcsmoe-fast writes every MXFP4 bank). Scale tensors are hidden.
Dequantization goes one expert (leading slice) at a time, so its float32 temporaries stay one matrix.
"""
from __future__ import annotations

import torch

from .format import QuantFormat
from .fp8 import dequantize_fp8
from .mxfp4 import BLOCK, dequantize_mxfp4_into


class QuantizedFiles:
    def __init__(self, files, fmt: QuantFormat, transpose_mxfp4: bool = True):
        self.files, self.format, self.transpose_mxfp4 = files, fmt, transpose_mxfp4
        self.parts: dict[str, tuple[str, str]] = {}  # dequantized name -> (stored values, stored scales)
        for name in files.shapes:
            stored = fmt.parts(name.removesuffix("_blocks") if fmt.method == "mxfp4" else name)
            if all(p in files.shapes for p in stored) and (fmt.method == "fp8" or name.endswith("_blocks")):
                self.parts[stored[0].removesuffix("_blocks") if fmt.method == "mxfp4" else name] = stored
        hidden = {p for parts in self.parts.values() for p in parts}
        self.shapes = {n: s for n, s in files.shapes.items() if n not in hidden}
        self.dtypes = {n: d for n, d in files.dtypes.items() if n not in hidden}
        for name, (values, _) in self.parts.items():
            self.shapes[name] = self._shape(files.shapes[values])
            self.dtypes[name] = torch.bfloat16  # a floating dtype: read into the working dtype

    def _shape(self, stored: tuple[int, ...]) -> tuple[int, ...]:
        if self.format.method == "fp8":
            return tuple(stored)
        *lead, rows, groups, _ = stored
        return (*lead, groups * BLOCK, rows) if self.transpose_mxfp4 else (*lead, rows, groups * BLOCK)

    @property
    def bytes_read(self) -> int:
        return self.files.bytes_read

    def __contains__(self, name: str) -> bool:
        return name in self.shapes

    def is_quantized(self, name: str) -> bool:
        return name in self.parts

    def file_of(self, name: str) -> str:
        return self.files.file_of(self.parts[name][0] if name in self.parts else name)

    def raw(self, name: str) -> dict[str, torch.Tensor]:
        """The stored parts of `name` as they are {stored name: tensor} ({name: tensor} when not quantized)."""
        return {p: self.files.get(p) for p in self.parts.get(name, (name,))}

    def read_into(self, name: str, out: torch.Tensor) -> torch.Tensor:
        """Tensor `name` dequantized into `out` (its shape, any floating dtype)."""
        if name not in self.parts:
            return self.files.read_into(name, out)
        if tuple(out.shape) != tuple(self.shapes[name]):
            raise ValueError(f"{name}: shape {tuple(self.shapes[name])}, expected {tuple(out.shape)}")
        values, scales = (self.files.get(p) for p in self.parts[name])
        with torch.no_grad():
            if self.format.method == "fp8":
                return dequantize_fp8(values, scales, out.dtype, self.format.block, out=out)
            flat_v, flat_s = values.reshape(-1, *values.shape[-3:]), scales.reshape(-1, *scales.shape[-2:])
            flat_o = out.view(-1, *out.shape[-2:])
            for k in range(flat_v.shape[0]):  # one expert at a time
                try:
                    dequantize_mxfp4_into(flat_v[k], flat_s[k], flat_o[k], transpose=self.transpose_mxfp4)
                except ValueError as exc:  # e.g. a scale byte 255 (NaN): name the checkpoint's tensor
                    raise ValueError(f"{self.parts[name][1]} (expert {k}): {exc}") from exc
        return out

    def get(self, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Tensor `name`: as stored when not quantized, else dequantized in `dtype`."""
        if name not in self.parts:
            return self.files.get(name)
        return self.read_into(name, torch.empty(self.shapes[name], dtype=dtype))

    def release(self, files=None) -> None:
        self.files.release(files)

    @torch.no_grad()
    def copy_into(self, targets: dict[str, torch.Tensor]) -> None:
        """targets[name] <- tensor `name` for every name, file after file, with at most one file open besides
        the one a tensor's scales are in (any number of shards loads under the open-file limit); all files are
        closed at the end, also when a read fails."""
        try:
            for name in sorted(targets, key=self.file_of):
                self.release([f for f in self.files.handles if f != self.file_of(name)])
                self.read_into(name, targets[name])
        finally:
            self.release()
