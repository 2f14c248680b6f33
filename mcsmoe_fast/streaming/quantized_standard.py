"""The streamed standard checkpoint of a block-FP8 / MXFP4 source written in the source's precision
(merge_checkpoint(format="standard"), keep_quantization=True; standard.py's StandardOutput writes through it).

Every tensor leaves under the family's hub names (after transformers' revert_weight_conversion) by the rule
of the in-memory outputs (quant/requantize.py's LikeSource, which requantize_saved uses too): a tensor the
source stores quantized under the same name is copied byte for byte when its values are the source's, else
quantized afresh (the standard experts: Mixtral's per-expert w1/w2/w3, GPT-OSS's fused banks), the rest as
it is. So the streamed checkpoint is what the in-memory `merge --format standard` writes for the same merge.

The error report has the exact format's keys (quant/report.py): per merged layer the relative error of the
re-quantized banks against the merged banks (in the standard experts' order), and of the layer's
routed-expert output on the calibration tokens the ErrorProbe kept (the original model's hidden states and
routing, each original expert sent to the standard expert that took it over), merged weights against their
re-quantized values read back from the written hub tensors as the streamed reader reads a checkpoint;
plus "tensors", the error of every tensor quantized afresh, as the in-memory report has it.
"""
from __future__ import annotations

import torch

from ..checkpoint.weight_files import ShardWriter
from ..quant.files import QuantizedFiles
from ..quant.report import summarize
from ..quant.requantize import LikeSource, dequantize_parts, relative_error
from .layer_error import layer_error


class TensorFiles:
    """Tensors in memory behind WeightFiles' reading interface, so SourceCheckpoint.read assembles a model
    tensor from hub-named tensors (Mixtral's per-expert w1/w3 into gate_up_proj ...) as it reads a checkpoint."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.tensors = tensors
        self.shapes = {n: tuple(t.shape) for n, t in tensors.items()}
        self.dtypes = {n: t.dtype for n, t in tensors.items()}

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def read_into(self, name: str, out: torch.Tensor) -> torch.Tensor:
        return out.copy_(self.tensors[name])

    def file_of(self, name: str) -> str:
        return "<memory>"


def read_model_tensor(tensors: dict[str, torch.Tensor], name: str, shape) -> torch.Tensor:
    """Model tensor `name` (float32, `shape`) from hub-named `tensors`, as SourceCheckpoint reads a checkpoint."""
    from .source import SourceCheckpoint

    reader = SourceCheckpoint.__new__(SourceCheckpoint)  # its reading methods only need `files`
    reader.files = TensorFiles(tensors)
    return reader.read(name, tuple(shape), torch.float32)


def standard_routing(groups: list[list[int]], num_experts: int, sample):
    """(expert_map [E] -> standard expert, the sample with the weights of experts no standard expert took over
    set to zero), from a standard plan's groups."""
    expert_map = torch.zeros(num_experts, dtype=torch.int64)
    kept = torch.zeros(num_experts, dtype=torch.bool)
    for m, group in enumerate(groups):
        expert_map[group], kept[group] = m, True
    if sample is not None and not bool(kept.all()):
        hidden, index, weights = sample
        sample = (hidden, index, weights * kept[index.long()].to(weights.dtype))
    return expert_map, sample


class StandardRequantizer:
    """The ShardWriter of a streamed standard checkpoint that writes tensors in the source's format (module
    docstring); write_unit() per unit, report() at the end."""

    def __init__(self, writer: ShardWriter, files: QuantizedFiles, probe=None):
        self.writer, self.like, self.probe = writer, LikeSource(files), probe
        self.tensors: dict[str, float] = {}  # tensors quantized afresh -> their relative error
        self.layers: dict[str, dict] = {}  # merged layer -> its errors

    def add(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """Write `tensor` as the source would store it; returns the values written: float32 when stored quantized
        (afresh, or the source's parts copied byte for byte), as the in-memory report reads them back, else `tensor`."""
        parts, fresh = self.like.parts(name, tensor)
        for n, part in parts.items():
            self.writer.add(n, part)
        if set(parts) == {name}:
            return tensor
        values = dequantize_parts(parts, self.like.format, tensor.shape)
        if fresh:
            self.tensors[name] = relative_error(values, tensor)
        return values

    def write_unit(self, standard: torch.nn.Module, pending: dict[str, torch.Tensor], layers: dict) -> None:
        """pending: the unit's tensors under the standard model's names; layers: {name: (standard view, plan,
        original expert count, merged (w_in, w_out, b_in, b_out) in the plan's order)} of its merged layers."""
        from transformers.core_model_loading import revert_weight_conversion

        banks = {n for view, *_ in layers.values() for n in (*view.stored_tensors().w_in, *view.stored_tensors().w_out)}
        for name, (_, plan, *_) in layers.items():
            self.like.expect(name, plan.groups)
        for name, tensor in revert_weight_conversion(standard, {n: t for n, t in pending.items() if n not in banks}).items():
            self.add(name, tensor)
        for name, (view, plan, num_experts, merged) in layers.items():
            layout = view.stored_tensors()
            written = {}
            for n in (*layout.w_in, *layout.w_out):
                for hub, tensor in revert_weight_conversion(standard, {n: pending[n]}).items():
                    written[hub] = self.add(hub, tensor)
            get = lambda n: read_model_tensor(written, n, pending[n].shape) if n in banks else pending[n]  # noqa: E731
            requantized = layout.read(get)[:2]
            del written
            sample = self.probe.samples.pop(name, None) if self.probe is not None else None
            expert_map, sample = standard_routing(plan.groups, num_experts, sample)
            self.layers[name] = layer_error(merged, requantized, expert_map, view.activation, view.activation_args,
                                            sample)

    def report(self) -> dict | None:
        if self.probe is not None:
            self.probe.close()
        return summarize(self.like.format.method, self.layers, self.tensors)

    def __getattr__(self, attr):  # finish, names, ... of the ShardWriter
        return getattr(self.writer, attr)
