"""Perplexity of a checkpoint larger than memory: the embeddings, then each decoder layer read from the checkpoint's
files, run over every evaluation window (the cut forward of forward.py) and emptied again, then the final norm and
the head over the last hidden states in chunks of tokens. The same number as train.text.perplexity on the model in
memory (exp of the mean next-token cross-entropy over every window), one layer resident at a time.

Reads the decoder-only families the layer-by-layer forward runs (source.py): plain transformers checkpoints (the
input model, and the standard-form checkpoints `merge --format standard`, `prune` and REAM write) and this package's
own (merged or compressed slots: each MoE layer's slots installed as from_pretrained installs them, just before its
unit is read); block-FP8 / MXFP4 tensors are read dequantized. The hidden states of all windows are carried from
layer to layer, in memory or, past the budget, in a file (activations.py), as the streamed merge carries its
calibration tokens.
"""
from __future__ import annotations

import math
import tempfile
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..checkpoint import read_section
from ..checkpoint.atomic import scratch_directory
from ..checkpoint.load import install_saved_layer, open_weights
from ..checkpoint.weight_files import CheckpointError
from ..footprint import COMPRESSED_FIELDS, expert_parameters
from ..models import moe_layers
from ..quant import detect
from ..quant.files import QuantizedFiles
from .activations import ActivationStore
from .forward import ACCEPTED_KEYS, prepare_batches, run_layer
from .memory import plan_memory
from .skeleton import build_skeleton, decoder_layers, empty, layer_units, materialise, tensor_shapes
from .source import SUPPORTED_TYPES, SourceCheckpoint

HEAD_CHUNK_ELEMENTS = 1 << 24  # logits computed at a time (64 MB in float32)


def _module_name(model: torch.nn.Module, module: torch.nn.Module) -> str:
    return next(name for name, m in model.named_modules() if m is module)


@torch.no_grad()
def streamed_perplexity(path, windows: torch.Tensor, max_memory=None, offload_dir=None,
                        dtype: torch.dtype | None = None, batch_size: int = 32, progress: bool = True) -> float:
    """exp(mean next-token cross-entropy) of the checkpoint directory `path` over `windows` [N, L] of token ids,
    one decoder layer in memory at a time. max_memory: the resident budget (bytes or "8GB"; None: no limit) that
    decides whether the windows' hidden states stay in memory or go to a file under offload_dir (default: the
    system's temporary directory; removed at the end). dtype: the working dtype (default float32, bfloat16 for a
    quantized checkpoint, as the streamed merge). batch_size: windows per forward."""
    if windows.dim() != 2 or windows.shape[0] == 0 or windows.shape[1] < 2:
        raise ValueError(f"perplexity needs windows [N >= 1, L >= 2], got {tuple(windows.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    reader = open_reader(path, dtype)
    model, dtype, read = reader.model, reader.dtype, reader.read
    windows = windows.long()
    batches = prepare_batches([{"input_ids": windows[i: i + batch_size]} for i in range(0, len(windows), batch_size)],
                              model.config.vocab_size, ACCEPTED_KEYS)
    hidden_size = model.config.hidden_size
    plan = plan_memory(max_memory, 0, 0, windows.numel() * hidden_size * dtype.itemsize)
    scratch = offload_dir or tempfile.gettempdir()
    units = layer_units(model)
    with scratch_directory(scratch, ".mcsmoe-activations-") if plan.offload else nullcontext() as where:
        store = ActivationStore([(*b.input_ids.shape, hidden_size) for b in batches], dtype, where)
        try:
            embeddings = model.get_input_embeddings()
            read(embeddings, _module_name(model, embeddings))
            for b, batch in enumerate(batches):
                store.put(b, embeddings(batch.input_ids))
            empty(embeddings)
            for i, (name, unit) in enumerate(tqdm(units, desc="perplexity: layers", unit="layer",
                                                  disable=not progress)):
                reader.install(name)
                read(unit, name)
                try:
                    run_layer(model, unit, i, batches, store.get, store.put)
                finally:
                    empty(unit)
            return math.exp(_head_loss(model, batches, store, read))
        finally:
            store.close()


def open_reader(path, dtype: torch.dtype | None = None):
    """A reader of the checkpoint directory `path`, plain or this package's: .model (the skeleton), .dtype,
    .install(unit name) (a saved layer's slots, before its unit is read), .read(module, prefix) (its tensors),
    .expert_parameters() (footprint.py's count, from the stored shapes), .num_experts() (of the first MoE layer)."""
    path = Path(path)
    return PlainReader(path, dtype) if read_section(path) is None else SavedReader(path, dtype)


class PlainReader:
    """A plain transformers checkpoint (source.py reads it, quantized ones dequantized)."""

    def __init__(self, path, dtype):
        self.source = SourceCheckpoint(path)
        self.dtype = dtype or (torch.bfloat16 if self.source.quant is not None else torch.float32)
        self.model = build_skeleton(self.source.config, self.dtype)
        self.shapes, self.aliases = tensor_shapes(self.model)
        self.source.check(self.shapes)

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


def _head_loss(model: torch.nn.Module, batches, store: ActivationStore, read) -> float:
    """The mean next-token cross-entropy from the last hidden states: final norm, head, float32 loss (as the
    transformers causal-LM loss upcasts), chunk by chunk of tokens."""
    prefix, _ = decoder_layers(model)
    inner_name = prefix.rsplit(".", 1)[0]
    norm, head = model.get_submodule(inner_name).norm, model.get_output_embeddings()
    read(norm, f"{inner_name}.norm")
    read(head, _module_name(model, head))
    chunk = max(1, HEAD_CHUNK_ELEMENTS // head.out_features)
    total, count = 0.0, 0
    for b, batch in enumerate(batches):
        hidden = store.get(b)[:, :-1]
        hidden = hidden.reshape(-1, hidden.shape[-1])
        labels = batch.input_ids[:, 1:].reshape(-1)
        for s in range(0, labels.numel(), chunk):
            logits = head(norm(hidden[s: s + chunk])).float()
            total += F.cross_entropy(logits, labels[s: s + chunk], reduction="sum").item()
        count += labels.numel()
    empty(norm)
    empty(head)
    return total / count
