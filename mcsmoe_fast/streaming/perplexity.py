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

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..checkpoint.atomic import scratch_directory
from .activations import ActivationStore, check_offload_dir
from .forward import ACCEPTED_KEYS, prepare_batches, run_layer
from .memory import forward_bytes, largest_unit_bytes, plan_memory, token_forward_bytes, warn_below_floor
from .readers import open_reader
from .skeleton import decoder_layers, empty, layer_units, tensor_shapes

HEAD_CHUNK_ELEMENTS = 1 << 24  # logits computed at a time without a budget (64 MB in float32)


def _module_name(model: torch.nn.Module, module: torch.nn.Module) -> str:
    return next(name for name, m in model.named_modules() if m is module)


@torch.no_grad()
def streamed_perplexity(path, windows: torch.Tensor, max_memory=None, offload_dir=None,
                        dtype: torch.dtype | None = None, batch_size: int = 32, progress: bool = True) -> float:
    """exp(mean next-token cross-entropy) of the checkpoint directory `path` over `windows` [N, L] of token ids,
    one decoder layer in memory at a time. max_memory: the resident budget (bytes or "8GB"; None: no limit) that
    decides, next to the largest decoder layer, whether the windows' hidden states stay in memory or go to a file
    under offload_dir (default: the system's temporary directory; removed at the end). dtype: the working dtype
    (default float32, bfloat16 for a quantized checkpoint, as the streamed merge). batch_size: windows per forward
    (under a budget fewer where one forward's temporaries would not fit: memory.forward_bytes)."""
    if windows.dim() != 2 or windows.shape[0] == 0 or windows.shape[1] < 2:
        raise ValueError(f"perplexity needs windows [N >= 1, L >= 2], got {tuple(windows.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    check_offload_dir(offload_dir)
    reader = open_reader(path, dtype)
    model, dtype, read = reader.model, reader.dtype, reader.read
    windows = windows.long()
    hidden_size = model.config.hidden_size
    units = layer_units(model)
    length, layer_bytes = windows.shape[1], largest_unit_bytes(tensor_shapes(model)[0], units, dtype)
    activations = windows.numel() * hidden_size * dtype.itemsize
    batch_size = _batch_size(max_memory, batch_size, layer_bytes, activations, model.config, length, dtype)
    plan = plan_memory(max_memory, layer_bytes, 0, activations, writes=False,
                       forward_bytes=forward_bytes(model.config, [(batch_size, length)], dtype))
    warn_below_floor(plan, "a forward through")
    batches = prepare_batches([{"input_ids": windows[i: i + batch_size]} for i in range(0, len(windows), batch_size)],
                              model.config.vocab_size, ACCEPTED_KEYS)
    scratch = offload_dir or tempfile.gettempdir()
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
            elements = HEAD_CHUNK_ELEMENTS if plan.budget is None else min(HEAD_CHUNK_ELEMENTS, plan.forward_bytes // 12)
            return math.exp(_head_loss(model, batches, store, read, elements))
        finally:
            store.close()


def _batch_size(max_memory, batch_size: int, layer_bytes: int, activations: int, config, length: int, dtype) -> int:
    """Windows per forward: batch_size, or under a budget fewer, so that one forward's temporaries (memory.forward_bytes)
    take at most half of what the budget leaves beside the layer (the other half for the hidden states); at least 1.
    The perplexity is the same whatever the batch size."""
    plan = plan_memory(max_memory, layer_bytes, 0, activations, writes=False)
    if plan.budget is None:
        return batch_size
    window = length * token_forward_bytes(config, length, dtype)
    return max(1, min(batch_size, (plan.budget - plan.layer_floor) // 2 // window))


def _head_loss(model: torch.nn.Module, batches, store: ActivationStore, read, elements: int) -> float:
    """The mean next-token cross-entropy from the last hidden states: final norm, head, float32 loss (as the
    transformers causal-LM loss upcasts), chunk by chunk of tokens, about `elements` logits at a time (at least one
    token's; under a budget they take the room of the layers' forward: the logits, their float32 copy and the
    loss's log-softmax, 12 bytes each)."""
    prefix, _ = decoder_layers(model)
    inner_name = prefix.rsplit(".", 1)[0]
    norm, head = model.get_submodule(inner_name).norm, model.get_output_embeddings()
    read(norm, f"{inner_name}.norm")
    read(head, _module_name(model, head))
    chunk = max(1, elements // head.out_features)
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
