"""The statistics pass on accelerate's big-model inference (merge_checkpoint(device_map=...)).

Instead of the cut CPU forward (forward.py), transformers' from_pretrained loads the checkpoint with an
accelerate device map: layers fill the GPUs first, then the CPU up to its budget, and the rest is
offloaded to disk (offload_folder) and brought in one module at a time by accelerate's hooks during
each forward. Every calibration batch then runs through the model's own forward, and calibrate's
accumulators (collect_routing_stats) see exactly what the in-memory pipeline sees. This runs on
several GPUs, on one GPU with CPU/disk offload, or on the CPU with disk offload, and it runs the
families whose decoder layers the cut forward does not know.

The price of disk offload: every batch runs the whole model, so an offloaded layer is read from disk
once per batch (the cut forward reads each layer once for all batches), and transformers may first
write the offloaded (converted) expert tensors into offload_folder. Best when the model fits the
GPUs and the CPU budget together; larger models are better served by the cut forward where it applies.
"""
from __future__ import annotations

import gc

import torch

from ..calibrate import LayerStats, collect_routing_stats, refuse_unmeasured
from ..models import moe_layers
from ..models.dispatched import compute_device
from ..checkpoint.weight_files import parse_size
from .forward import Batch
from .memory import human, rss_bytes

DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")


def check_device_map(device_map) -> None:
    """A device map transformers' from_pretrained takes: a strategy, one device, or {module name: device}."""
    if device_map is None or isinstance(device_map, dict):
        if isinstance(device_map, dict) and not device_map:
            raise ValueError("device_map: an empty dict places no module; give {module name: device} or a strategy")
        return
    if isinstance(device_map, str) and (device_map in DEVICE_MAP_STRATEGIES or device_map == "cpu"
                                        or device_map.split(":")[0] == "cuda"):
        return
    raise ValueError(f"device_map: expected one of {', '.join(DEVICE_MAP_STRATEGIES)}, 'cpu', 'cuda[:N]' or a dict "
                     f"{{module name: device}}, got {device_map!r}")


def _memory_key(key):
    if isinstance(key, int) and not isinstance(key, bool) and key >= 0:
        return key
    if isinstance(key, str):
        if key.isdigit():
            return int(key)
        if key.startswith("cuda:") and key[5:].isdigit():
            return int(key[5:])
        if key in ("cpu", "mps"):
            return key
    raise ValueError(f"max_memory: unknown device {key!r} (use GPU indices 0, 1, ... and 'cpu')")


def split_memory(max_memory) -> tuple[int | None, dict | None]:
    """(resident-memory budget in bytes, accelerate's max_memory {device: bytes}) from max_memory given
    as one size (the CPU's; GPUs keep accelerate's defaults) or a dict {0: "70GB", "cpu": "8GB"}."""
    if isinstance(max_memory, dict):
        sizes = {_memory_key(k): parse_size(v, f"max_memory[{k!r}]") for k, v in max_memory.items()}
        return sizes.get("cpu"), sizes
    budget = parse_size(max_memory, "max_memory")
    if budget is None:
        return None, None
    from accelerate.utils import get_max_memory

    return budget, {**get_max_memory(), "cpu": budget}


@torch.no_grad()
def dispatched_statistics(source, dtype: torch.dtype, batches: list[Batch], bases, chosen: set[str], device_map,
                          max_memory: dict | None, offload_folder, progress,
                          probe=None) -> tuple[dict[str, LayerStats], dict]:
    """({chosen MoE layer: LayerStats on the CPU}, the device map accelerate used), from one forward of
    every batch through the checkpoint dispatched by accelerate; the model is released before returning.
    probe: an ErrorProbe (a quantized source's error report) to take its calibration samples from that forward."""
    from tqdm.auto import tqdm

    from ..models.hub import model_class_for

    model = model_class_for(source.config).from_pretrained(
        str(source.path), device_map=device_map, max_memory=max_memory, offload_folder=str(offload_folder),
        dtype=dtype).eval()
    placed = dict(getattr(model, "hf_device_map", {}) or {})
    if probe is not None:
        probe.attach(moe_layers(model))
    try:
        bar = tqdm(batches, desc="pass 1/2: routing statistics (accelerate device map)", unit="batch",
                   disable=not progress.enabled)

        embeddings = model.get_input_embeddings()
        encoder_decoder = bool(getattr(model.config, "is_encoder_decoder", False))
        device = compute_device(embeddings, embeddings.weight)  # where the first layer runs (a GPU, the CPU)

        def inputs():
            for b in bar:
                now = rss_bytes()
                progress.peak = max(progress.peak, now)
                bar.set_postfix_str(f"{b.tokens} tokens | rss {human(now)}", refresh=False)
                batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in b.inputs.items()}
                yield embedded(encoder_decoder, embeddings, batch)

        stats = collect_routing_stats(model, inputs(), bases=bases, progress=False)
        progress.peak = max(progress.peak, rss_bytes())
    finally:
        del model
        gc.collect()
    chosen_stats = {name: st.to("cpu") for name, st in stats.items() if name in chosen}
    refuse_unmeasured(chosen_stats.values())
    return chosen_stats, placed


def embedded(encoder_decoder: bool, embeddings, batch: dict) -> dict:
    """The batch with inputs_embeds in place of input_ids when the input embedding is offloaded (its weight on
    the meta device) in a decoder-only model: some forwards (Llama-4's) move input_ids to the embedding
    weight's device first, which would be the meta device; the hooked embedding module computes the same
    embeddings on its execution device."""
    if encoder_decoder or embeddings.weight.device.type != "meta" \
            or "input_ids" not in batch:
        return batch
    batch = dict(batch)
    batch["inputs_embeds"] = embeddings(batch.pop("input_ids"))
    return batch
