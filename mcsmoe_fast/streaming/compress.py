"""compress_checkpoint: one-shot MC-SMoE compression of a merged checkpoint larger than memory.

Weight-importance compression needs no calibration data and each layer only its own slots, but one
threshold over the whole model: every MoE layer's slots are read from the merged checkpoint's shards
and decomposed into a staged full bank (compress_stage.py, the streamed merge's own stage), every other
tensor is copied through one at a time, and once all layers are in, the staged banks are pruned with
the global threshold and written. The result equals from_pretrained -> compress_experts(importance=
"weight") -> save_pretrained on the same checkpoint, written atomically in the project's sharded format.

A merged checkpoint of a block-FP8 / MXFP4 source (its slots and other tensors stored quantized with their
scales): the slots are dequantized as they are read; by default every other tensor is copied as stored (still
quantized, with its scales: what the in-memory `compress` writes through streaming/requantize_merged.py), and
with dtype= everything is written dequantized in that dtype.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..checkpoint import WEIGHTS_METADATA, WEIGHTS_NAME, atomic_directory, open_weights, read_section
from ..checkpoint import write_merged_config
from ..checkpoint.atomic import refuse_out_at_source
from ..checkpoint.weight_files import CheckpointError, ShardWriter
from ..sections import record_compression
from ..quant import detect
from ..quant.files import QuantizedFiles
from .quantized import ERROR_KEY
from .compress_stage import CompressionStage, compress_options
from .memory import shard_size_for
from .skeleton import build_skeleton

SLOTS = ("w_in", "w_out", "expert_map")
BIASES = ("b_in", "b_out")  # expert biases (GPT-OSS), kept dense next to the compressed banks


@torch.no_grad()
def compress_checkpoint(path, out, rank: int = 32, keep_ratio: float = 0.1, svd: str = "auto", max_memory=None,
                        max_shard_size=None, verify: bool = True, progress: bool = True, tokenizer=None,
                        dtype: torch.dtype | None = None) -> dict:
    """Compress every MoE layer of the merged checkpoint directory `path` (written by save_pretrained or
    merge_checkpoint; every MoE layer stored as slots) into `out`; returns {layer name: config entry}.
    rank, keep_ratio, svd: as compress_experts (importance="weight"); max_memory sets the output shard
    size (max_memory / 8 between 1 MB and 2 GB) unless max_shard_size is given; verify: check every
    input shard's sha256 first (reads the files once more); dtype: None keeps the checkpoint's dtype (and its
    quantized tensors as stored), a dtype writes everything in it (dequantized)."""
    from transformers import AutoConfig

    from ..models import moe_layers

    opts = compress_options(dict(rank=rank, keep_ratio=keep_ratio, svd=svd))
    path, out = Path(path).expanduser().absolute(), Path(out).expanduser().absolute()
    section = read_section(path)
    if section is None:
        raise ValueError(f"{path} is a plain transformers checkpoint: streaming compression reads merged "
                         "checkpoints (merge it first, e.g. with mcsmoe-fast merge --max-memory)")
    refuse_out_at_source(path, out)
    weights = open_weights(path, section, verify)
    config = AutoConfig.from_pretrained(str(path))
    quantized = detect(getattr(config, "quantization_config", None))
    if quantized is not None:
        weights = QuantizedFiles(weights, quantized)  # the slots read dequantized, the rest as stored
        if hasattr(config, ERROR_KEY):
            delattr(config, ERROR_KEY)  # the merge's re-quantization report: its slots are replaced by the factors
        if dtype is not None:
            del config.quantization_config  # written dequantized
    keep_stored = dtype is None
    dtype = dtype or getattr(torch, section.get("dtype", "float32"))
    model = build_skeleton(config, dtype)
    layers = moe_layers(model)
    entries = section["layers"]
    for layer in layers:
        entry = entries.get(layer.name, {})
        if "compressed" in entry:
            raise ValueError(f"layer {layer.name!r} is already compressed; compress a model once (from its merged form)")
        if "expert_map" not in entry:
            raise CheckpointError(f"{path}: layer {layer.name!r} is not stored as merged slots; streaming compression "
                                  "needs every MoE layer merged (use the in-memory pipeline for this checkpoint)")
    slot_names = {f"{layer.name}.experts.{k}" for layer in layers for k in (*SLOTS, *BIASES)}
    with atomic_directory(out) as tmp:
        writer = ShardWriter(tmp, WEIGHTS_NAME, shard_size_for(max_memory, max_shard_size), WEIGHTS_METADATA)
        stage = CompressionStage(tmp / ".compress-staging", opts["rank"], opts["keep_ratio"], opts["svd"])
        for layer in tqdm(layers, desc="compressing: decomposing", unit="layer", disable=not progress):
            w_in, w_out, emap = (weights.get(f"{layer.name}.experts.{k}") for k in SLOTS)  # quantized: in float32
            b_in, b_out = (weights.get(f"{layer.name}.experts.{k}").to(dtype) if f"{layer.name}.experts.{k}" in
                           weights.shapes else None for k in BIASES)
            weights.release()
            keep = None
            if entries[layer.name].get("dropped"):
                keep = torch.ones(layer.num_experts, dtype=torch.bool)
                keep[entries[layer.name]["dropped"]] = False
            stage.add(layer.name, w_in.to(dtype), w_out.to(dtype), emap, layer.activation, keep, b_in, b_out,
                      layer.activation_args)
            del w_in, w_out
        skeleton_dtypes = {n: t.dtype for n, t in model.state_dict().items()}  # float32 where transformers keeps it
        for name in weights.shapes:  # everything else, one tensor at a time; a tied name stays an alias
            if name not in slot_names and name not in section["aliases"]:
                cast = None if keep_stored else skeleton_dtypes.get(name, dtype)
                for part, tensor in _stored_or_cast(weights, name, cast).items():
                    writer.add(part, tensor)
        weights.release()
        bar = tqdm(total=len(layers), desc="compressing: global threshold", unit="layer", disable=not progress)
        new_entries = stage.finish(writer, progress=lambda name: bar.update())
        bar.close()
        for name, entry in new_entries.items():
            entry["dropless"] = bool(entries[name].get("dropless", False))
        written = writer.finish()
        record_compression(model, new_entries, dict(
            rank=opts["rank"], keep_ratio=opts["keep_ratio"], importance="weight", svd=opts["svd"]))
        ordered = {layer.name: new_entries[layer.name] for layer in layers}
        write_merged_config(model.config, tmp, written, section["aliases"], ordered,
                            str(dtype).removeprefix("torch."))
        if (Path(path) / "generation_config.json").is_file():  # as the merged checkpoint generates
            shutil.copy(Path(path) / "generation_config.json", tmp / "generation_config.json")
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
    return ordered


def _stored_or_cast(weights, name: str, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """{stored name: tensor} of a tensor copied through: as stored (dtype None; a quantized one as its parts,
    values and scales), or dequantized and cast to dtype (floating tensors)."""
    if isinstance(weights, QuantizedFiles):
        if dtype is None:
            return weights.raw(name)
        tensor = weights.get(name, dtype)
    else:
        tensor = weights.get(name)
    return {name: tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor}
