"""The merged checkpoint format: its names, versions and config.json entries.

Checkpoints of merged models that are really smaller: safetensors holding each unique tensor once
(G merged experts per layer, not E copies) plus JSON; never pickle.

A merged checkpoint directory holds:

    config.json              the transformers config, with an "mcsmoe_merge" section: per merged layer
                             its expert_map, slot count, activation and dropped experts, the merge
                             method and a statistics summary, plus the weights file's size and sha256
    mcsmoe_model.safetensors every unique tensor once (tied weights are stored once, listed as aliases)

or, for a model larger than a shard (save_pretrained(..., max_shard_size=...), and the streaming
pipeline of streaming/), the same tensors split over mcsmoe_model-00001-of-0000N.safetensors ...
plus mcsmoe_model.safetensors.index.json (weight_map {tensor: shard}); the section then has format
version 2 and a "shards" entry {file: {bytes, sha256}}, and "weights" names the index (its size and
sha256 are recorded like a single file's). Loading copies one tensor at a time, holding one shard file
open at a time (so any number of shards loads under the open-file limit), and `verify` checks every
shard's sha256. Each tensor is stored in its own dtype and loaded back in it; the section's "dtype" is
the one the model is built in before that.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..drop import logit_mask
from ..models import moe_layers
from ..modules import CompressedMoEExperts, MoEExperts
from ..sections import MERGE_SECTION
from .weight_files import WrittenWeights, sha256_file

FORMAT_VERSION = 1  # one weights file
SHARDED_FORMAT_VERSION = 2  # shards plus an index (readers of version 1 refuse it with a clear message)
WEIGHTS_NAME = "mcsmoe_model.safetensors"
WEIGHTS_METADATA = {"format": "pt"}  # one key: safetensors writes several in a random order (bytes would differ run to run)


def merged_layers(model: nn.Module) -> dict:
    """{name: layer entry} for every MoE layer stored as slots (MoEExperts, CompressedMoEExperts) or with
    masked experts."""
    entries = {}
    for layer in moe_layers(model):
        experts = getattr(layer.module, "experts", None)
        keep = logit_mask(layer)
        slots = isinstance(experts, (MoEExperts, CompressedMoEExperts))
        if not slots and keep is None:
            continue
        if isinstance(experts, CompressedMoEExperts) and experts.pruning:
            raise ValueError(f"layer {layer.name!r} is still being pruned (masked rows are stored): call "
                             "CompressionPruner.finalize() (or finalize() on its experts) before saving")
        entries[layer.name] = layer_entry(layer.num_experts, layer.activation, experts if slots else None,
                                          keep, dropless=bool(getattr(layer.module, "dropless", False)))
    return entries


def layer_entry(num_experts: int, activation: str, experts=None, keep: torch.Tensor | None = None,
                dropless: bool = False) -> dict:
    """The config.json entry of one merged layer: its expert slots (MoEExperts or a finalized
    CompressedMoEExperts; None when only router logits are masked) and its keep mask (None: none dropped)."""
    entry = {"num_experts": num_experts, "activation": activation}
    if experts is not None:
        entry.update(num_slots=experts.num_slots, expert_map=experts.expert_map.tolist(), dropless=dropless)
    if isinstance(experts, CompressedMoEExperts):
        entry["compressed"] = {"rank_in": experts.in_U.shape[2], "rank_out": experts.out_U.shape[2],
                               "kept_rows_in": experts.in_S_rows.shape[0],
                               "kept_rows_out": experts.out_S_rows.shape[0]}
    if keep is not None:
        entry["dropped"] = (~keep).nonzero().flatten().tolist()
    return entry


def unique_tensors(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Each distinct tensor once; aliases {duplicate name: stored name} for tied weights (an empty tensor is never
    taken for another's alias)."""
    kept, aliases, seen, storages = {}, {}, {}, {}
    for name, t in state.items():
        key = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
        if t.numel() == 0:  # every empty tensor's storage is at address 0: no tie to record
            key = (name,)
        if key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        storages.setdefault((t.device, t.untyped_storage().data_ptr()), []).append(name)
        kept[name] = t
    for names in storages.values():  # distinct views of one storage: safetensors needs separate copies
        if len(names) > 1:
            for n in names:
                kept[n] = kept[n].clone()
    return {n: t.contiguous() for n, t in kept.items()}, aliases


def model_dtype(model: nn.Module) -> str:
    """The section's dtype: the first floating parameter's (tensors kept in another dtype, such as a float32
    router of a bfloat16 model, are stored and loaded in theirs)."""
    for p in model.parameters():
        if p.is_floating_point():
            return str(p.dtype).removeprefix("torch.")
    return "float32"


def write_merged_config(config, directory: Path, written: WrittenWeights, aliases: dict[str, str],
                        layers: dict[str, dict], dtype: str) -> None:
    """Save `config` (its mcsmoe_merge section completed with the weights files, aliases and merged layer
    entries) as config.json in `directory`, next to the weights `written` by a ShardWriter."""
    section = dict(getattr(config, MERGE_SECTION, None) or {})
    section.pop("shards", None)
    if written.sharded:
        index = Path(directory) / written.index
        section.update(format_version=SHARDED_FORMAT_VERSION, weights=written.index, shards=written.files,
                       weights_bytes=index.stat().st_size, weights_sha256=sha256_file(index))
    else:
        (name, info), = written.files.items()
        section.update(format_version=FORMAT_VERSION, weights=name, weights_bytes=info["bytes"],
                       weights_sha256=info["sha256"])
    section.update(dtype=dtype, aliases=aliases, layers=layers)
    setattr(config, MERGE_SECTION, section)
    config.dtype = dtype  # the weights' dtype, also where the model was cast after loading
    config.save_pretrained(str(directory))
