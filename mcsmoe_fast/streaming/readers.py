"""What the layer-by-layer evaluation (perplexity.py) reads a checkpoint through, one module at a time: a plain
transformers checkpoint (source.py, quantized tensors dequantized) or this package's own, whose merged or compressed
layers get their slots (checkpoint.load.install_saved_layer, empty, of the saved shapes) just before their unit is
read; with the checkpoint's expert-parameter count (footprint.py's) from the stored shapes."""
from __future__ import annotations

import math
from pathlib import Path

import torch

from ..checkpoint import read_section
from ..checkpoint.load import install_saved_layer, open_weights
from ..checkpoint.weight_files import CheckpointError
from ..footprint import COMPRESSED_FIELDS, expert_parameters
from ..models import moe_layers
from ..quant import detect
from ..quant.files import QuantizedFiles
from .skeleton import build_skeleton, materialise, read_float32_as_skeleton, tensor_shapes
from .source import IN_MEMORY_HINT, SUPPORTED_TYPES, SourceCheckpoint


def open_reader(path, dtype: torch.dtype | None = None):
    """A reader of the checkpoint directory `path`, plain or this package's: .model (the skeleton), .dtype,
    .install(unit name) (a saved layer's slots, before its unit is read), .read(module, prefix) (its tensors),
    .expert_parameters() (footprint.py's count, from the stored shapes), .num_experts() (of the first MoE layer)."""
    path = Path(path)
    return PlainReader(path, dtype) if read_section(path) is None else SavedReader(path, dtype)


class PlainReader:
    """A plain transformers checkpoint (source.py reads it, quantized ones dequantized)."""

    def __init__(self, path, dtype):
        self.source = SourceCheckpoint(path, hint=IN_MEMORY_HINT)
        self.dtype = dtype or (torch.bfloat16 if self.source.quant is not None else torch.float32)
        self.model = build_skeleton(self.source.config, self.dtype)
        self.shapes, self.aliases = tensor_shapes(self.model)
        self.source.check(self.shapes)
        read_float32_as_skeleton(self.source, self.model)

    def install(self, unit: str) -> None:
        pass

    def expert_parameters(self) -> int:
        return expert_parameters(self.model)

    def num_experts(self) -> int:
        return moe_layers(self.model)[0].num_experts

    def read(self, module: torch.nn.Module, prefix: str) -> None:
        """The module's tensors (tied ones by their stored name) from the checkpoint."""
        stored = {n: self.aliases.get(n, n) for n in (f"{prefix}.{k}" for k in module.state_dict())}
        materialise(module, prefix, {n: self.source.read(s, self.shapes[s], self.dtype) for n, s in stored.items()})
        self.source.release()


class SavedReader:
    """This package's checkpoint (checkpoint/load.py's format): each merged or compressed layer gets its slots of
    the saved shapes just before its unit is read."""

    def __init__(self, path, dtype):
        from transformers import AutoConfig

        self.path, section = path, read_section(path)
        self.weights = open_weights(self.path, section, verify=False)
        config = AutoConfig.from_pretrained(str(path))
        if config.model_type not in SUPPORTED_TYPES:
            raise ValueError(f"{path}: the layer-by-layer forward runs model_type {', '.join(SUPPORTED_TYPES)}, got "
                             f"{config.model_type!r}; evaluate it in memory (from_pretrained, train.text.perplexity)")
        quantized = detect(getattr(config, "quantization_config", None))
        if quantized is not None:  # a merge of a block-FP8 / MXFP4 source: read dequantized
            self.weights = QuantizedFiles(self.weights, quantized)
            del config.quantization_config
        self.dtype = dtype or getattr(torch, section.get("dtype", "float32"))
        self.model = build_skeleton(config, self.dtype)
        self.entries, self.file = section["layers"], section["weights"]
        self.layers = {layer.name: layer for layer in moe_layers(self.model)}

    def num_experts(self) -> int:
        return next(iter(self.layers.values())).num_experts

    def expert_parameters(self) -> int:
        """footprint.expert_parameters of the model as loaded: slots and compressed factors by their stored shapes."""
        total = 0
        for layer in self.layers.values():
            entry = self.entries.get(layer.name, {})
            fields = COMPRESSED_FIELDS if "compressed" in entry else ("w_in", "w_out") if "expert_map" in entry else ()
            if fields:
                total += sum(math.prod(self.weights.shapes[f"{layer.name}.experts.{f}"]) for f in fields)
            else:
                total += sum(t.numel() for t in layer.expert_weights())
        return total

    def install(self, unit: str) -> None:
        for name, entry in self.entries.items():
            if name.startswith(unit + "."):
                install_saved_layer(self.layers[name], entry, self.weights, self.path, self.dtype, self.file)

    def read(self, module: torch.nn.Module, prefix: str) -> None:
        tensors = {}
        for key, like in module.state_dict().items():
            name = f"{prefix}.{key}"
            if name not in self.weights.shapes:
                raise CheckpointError(f"{self.path}: no tensor {name!r} for the model its config builds")
            tensor = self.weights.read_into(name, torch.empty(tuple(self.weights.shapes[name]), dtype=like.dtype))
            tensors[name] = tensor
        materialise(module, prefix, tensors)
        self.weights.release()
