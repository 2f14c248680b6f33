"""merge_checkpoint: M-SMoE (and optionally one-shot compression) on a checkpoint larger than memory,
one decoder layer at a time, writing the project's merged checkpoint format in shards.

    pass 1  statistics: embeddings -> every decoder layer in turn over all calibration tokens (the
            ORIGINAL model's activations, exactly as collect_routing_stats sees them), each MoE
            block's routing statistics collected by calibrate's own accumulator; non-expert tensors
            are copied to the output as each layer goes by.
            group counts: global adaptive (grouping.group_counts) once every layer's usage is known.
    pass 2  merging: per layer, its router and experts are read again, grouped, aligned and merged
            (merge.merge_layer_weights, the per-layer body of merge_experts) and written.
    (pass 3) compression: with compress=..., each merged layer's bank is staged and pruned once the
            global threshold is known (compress_stage.py).

When the group counts do not depend on other layers (globally=False) the merge happens in pass 1,
right after the layer's statistics are complete, and every tensor is read once.

With a device_map (dispatch.py), pass 1 is instead the model's own forward under accelerate (GPUs, CPU,
disk offload), and pass 2 reads every layer once, copying its other tensors and merging its experts.

The result equals open_model -> collect_routing_stats -> merge_experts (-> compress_experts) ->
save_pretrained on the same batches: same groups, same tensors. Everything is written into a
temporary directory renamed into place at the end; an interrupted run leaves no output.
"""
from __future__ import annotations

import time
from collections.abc import Iterable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..calibrate import CHEAP_BASES, LayerStats
from ..checkpoint import WEIGHTS_METADATA, WEIGHTS_NAME, atomic_directory, scratch_directory, write_merged_config
from ..drop import check_maskable
from ..grouping import LayerGrouping, check_routing_groups, group_counts, weight_gram_bytes
from ..merge import check_merge_options
from ..models import select_layers
from ..models.config_fields import routing_groups
from ..sections import record_compression, record_merge
from ..checkpoint.weight_files import ShardWriter
from .activations import ActivationStore, check_offload_dir
from .compress_stage import CompressionStage, compress_options
from .dispatch import check_device_map, dispatched_statistics, split_memory
from .forward import ACCEPTED_KEYS, SEQ2SEQ_KEYS, prepare_batches
from .memory import (MemoryPlan, largest_unit_bytes, plan_memory, saliency_bytes, stream_forward_bytes,
                     stream_requantization_bytes, warn_below_floor)
from .passes import Merger, Progress, Stream, layer_pass, merge_pass
from ..quant.report import drop_quantization
from .quantized import ErrorProbe, output_writer, record_error
from .skeleton import layer_units, moe_views, open_source
from .standard import StandardOutput, check_standard


@dataclass
class StreamingResult:
    """What merge_checkpoint did."""

    path: Path
    groupings: dict[str, LayerGrouping]
    stats: dict[str, LayerStats]
    passes: int  # weight passes over the checkpoint (1 when the merge ran during pass 1)
    offloaded: bool  # hidden states went to a file
    bytes_read: int  # tensor bytes read from the checkpoint
    bytes_written: int  # bytes of the written weights files
    peak_rss: int  # highest resident memory seen between layers (bytes)
    seconds: dict[str, float] = field(default_factory=dict)
    quantization_error: dict | None = None  # a re-quantized output: the error it added (quantized.py)


def _check_options(similarity, strategy, grouping, bases, max_group_size=None, device_map=None) -> tuple[str, ...]:
    check_merge_options(similarity, strategy, grouping)
    if max_group_size is not None and grouping != "ream":
        raise ValueError(f"max_group_size caps REAM's groups (grouping='ream'), not grouping={grouping!r}")
    if grouping == "ream" and device_map is not None:
        raise ValueError("grouping='ream' needs REAP saliency from the layer-by-layer statistics pass; it does not run "
                         "with a device_map")
    if bases is not None:
        return tuple(bases)
    return ("expert-output",) if similarity == "expert-output" else CHEAP_BASES


def _plan(s: Stream, max_memory, max_shard_size, standard: tuple | None, strategy: str, keep_quantization: bool,
          fused: bool, similarity: str) -> MemoryPlan:
    """The memory plan: one layer, the carried hidden states (twice with the fitted standard router: the merged
    model's too), for a quantized source what reading and re-quantizing it add (memory.requantization_bytes),
    with REAM grouping what its REAP saliency holds (memory.saliency_bytes) and with the weight similarity its
    float64 chunks (grouping.weight_gram_bytes, for gated experts of at most 2 ff x d entries a matrix)."""
    stores = 2 if _fits_router(standard, strategy) else 1
    report = ("standard" if standard else "exact") if keep_quantization else None
    quantized_bytes = stream_requantization_bytes(s, report, fused) if s.source.quant is not None else 0
    layer_bytes = largest_unit_bytes(s.shapes, s.units, s.dtype)
    ff = max((v.intermediate_size for v in s.views.values()), default=1)
    activations = stores * sum(b.input_ids.numel() for b in s.batches) * s.model.config.hidden_size * s.dtype.itemsize
    chosen = [v for v in s.views.values() if v.name in s.chosen]
    similarity_bytes = 0 if similarity != "weight" else max(
        (weight_gram_bytes(v.num_experts, 2 * v.intermediate_size * v.hidden_size) for v in chosen), default=0)
    plan = plan_memory(max_memory, layer_bytes, ff * ff * 4, activations, max_shard_size, quantized_bytes,
                       saliency_bytes=saliency_bytes(s), forward_bytes=stream_forward_bytes(s),
                       similarity_bytes=similarity_bytes)
    warn_below_floor(plan, "merging")
    return plan


def _check_memory(max_memory, device_map, offload_dir) -> tuple:
    """Check device_map, max_memory and offload_dir; returns (resident budget, per-device memory or None)."""
    check_device_map(device_map)
    check_offload_dir(offload_dir)
    if isinstance(max_memory, dict) and device_map is None:
        raise ValueError("max_memory per device (a dict) is for accelerate's device map; pass device_map too, "
                         "or one size for the resident memory")
    return split_memory(max_memory) if device_map is not None else (max_memory, None)


@dataclass
class _Groups:
    """The MoE layers to merge (module order) and how their group counts are decided."""

    chosen: list[str]
    num_groups: object
    globally: bool
    unit: int  # every count a multiple of it (merging within DeepSeek-V3's n_group routing groups)

    def up_front(self, views) -> dict[str, int]:
        """The counts before any statistics (valid when they do not depend on other layers' usage)."""
        num_experts = {v.name: v.num_experts for v in views.values()}
        return group_counts({n: torch.zeros(num_experts[n]) for n in self.chosen}, self.num_groups, self.globally, self.unit)

    def from_stats(self, stats: dict[str, LayerStats]) -> dict[str, int]:
        return group_counts({n: stats[n].frequency for n in self.chosen}, self.num_groups, self.globally, self.unit)


def _open_stream(path, out, dtype, calibration_batches, layers, strategy: str, bases, progress: bool,
                 dispatched: bool, grouping: str = "dominant") -> tuple[Stream, Path, list[str], dict]:
    """Open the checkpoint as a skeleton and prepare the calibration batches; returns the Stream (no
    writer yet), the output path, the names of the layers to merge (module order) and the tied aliases."""
    source, out, dtype, model, shapes, aliases = open_source(path, out, dtype, dispatched)
    seq2seq = getattr(source.config, "is_encoder_decoder", False)
    batches = prepare_batches(calibration_batches, source.config.vocab_size, SEQ2SEQ_KEYS if seq2seq else ACCEPTED_KEYS)
    units = layer_units(model)
    views = moe_views(model, units)
    chosen_views = select_layers(list(views.values()), layers)  # module order
    if strategy == "drop":  # refused before any work, as merge_experts does
        for view in chosen_views:
            check_maskable(view)
    chosen = [v.name for v in chosen_views]
    s = Stream(model=model, source=source, shapes=shapes, units=units, views=views,
               chosen=set(chosen), batches=batches, dtype=dtype, bases=bases, writer=None,
               progress=Progress(progress, sum(b.tokens for b in batches)),
               saliency="reap" if grouping == "ream" else None)  # REAM's centroids and merge weights
    return s, out, chosen, aliases


def _merger(s: Stream, tmp: Path, plan: MemoryPlan, compress: dict | None, options: dict,
            keep_quantization: bool = True, standard: tuple | None = None) -> Merger:
    """Open the output shards in `tmp` (s.writer) and the merge step, staging for compression when asked.
    A quantized source is written back in its format (quantized.py) unless keep_quantization is False.
    standard: (M, router) for the standard format (standard.py)."""
    if not keep_quantization:
        drop_quantization(s.model.config)
    masks = [b.attention_mask for b in s.batches]  # the error probe's padding (quantized outputs)
    if standard is not None:
        quantized = keep_quantization and s.source.quant is not None
        s.writer = StandardOutput(tmp, plan.shard_size, s.model, s.views, s.dtype, *standard,
                                  requantize=s.source.files if quantized else None,
                                  probe=ErrorProbe(s.views, s.chosen, masks) if quantized else None)
        return Merger(s.writer, None, options, plan.matching_bytes, s.model.config,
                      fit_router=_fits_router(standard, options["strategy"]))
    s.writer = output_writer(ShardWriter(tmp, WEIGHTS_NAME, plan.shard_size, WEIGHTS_METADATA), s.source, s.views,
                             keep_quantization, masks, s.chosen)
    stage = (CompressionStage(tmp / ".compress-staging", compress["rank"], compress["keep_ratio"], compress["svd"])
             if compress else None)
    return Merger(s.writer, stage, options, plan.matching_bytes)


def _fits_router(standard: tuple | None, strategy: str) -> bool:
    """The standard format's fitted router runs the merged layers too (dropped layers keep their kept rows)."""
    return standard is not None and standard[1] == "fitted" and strategy != "drop"


def _merge_in_layer_pass(s: Stream, merger: Merger, counts: dict[str, int], merge_all: bool):
    """layer_pass's merge_now: every layer when merge_all, else only the layers kept as they are."""
    def merge_now(view, tensors):
        if merge_all or (view.name not in s.chosen and merger.stage is None):
            merger(view, tensors, s.stats.get(view.name), counts.get(view.name))
    return merge_now


def _dispatched_passes(s: Stream, merger: Merger, groups: _Groups, device_map, device_memory, scratch: Path,
                       seconds: dict) -> bool:
    """Statistics from the model's own forward under accelerate, then one pass over the weights that
    copies every layer and merges its experts; returns whether accelerate offloaded layers to disk."""
    t0 = time.perf_counter()
    with scratch_directory(scratch, ".mcsmoe-offload-") as offload:
        s.stats, placed = dispatched_statistics(s.source, s.dtype, s.batches, s.bases, s.chosen, device_map,
                                                device_memory, offload, s.progress, getattr(s.writer, "probe", None))
    offloaded = "disk" in placed.values()
    seconds["pass1"] = time.perf_counter() - t0
    counts = groups.from_stats(s.stats)
    t0 = time.perf_counter()
    layer_pass(s, _merge_in_layer_pass(s, merger, counts, merge_all=True), "pass 2/2: merging")
    seconds["pass2"] = time.perf_counter() - t0
    return offloaded


def _streamed_passes(s: Stream, merger: Merger, groups: _Groups, counts: dict[str, int], fused: bool,
                     offload: bool, scratch: Path, seconds: dict) -> None:
    """The cut forward, one layer at a time over the carried hidden states (in memory, or in a file when
    `offload`): statistics, and the merge too when `fused`; else a second pass merges."""
    t0 = time.perf_counter()
    with (scratch_directory(scratch, ".mcsmoe-activations-") if offload else nullcontext()) as where:
        shapes = [(*b.input_ids.shape, s.model.config.hidden_size) for b in s.batches]
        store = ActivationStore(shapes, s.dtype, where)
        s.merged = ActivationStore(shapes, s.dtype, where) if merger.fit_router else None  # the merged model's
        try:
            layer_pass(s, _merge_in_layer_pass(s, merger, counts, merge_all=fused),
                       "pass 1/1: statistics + merging" if fused else "pass 1/2: routing statistics", store, merger)
        finally:
            store.close()
            if s.merged is not None:
                s.merged.close()
    seconds["pass1"] = time.perf_counter() - t0
    if not fused:
        t0 = time.perf_counter()
        merge_pass(s, merger, groups.from_stats(s.stats), "pass 2/2: merging")
        seconds["pass2"] = time.perf_counter() - t0


def _compress_pass(s: Stream, merger: Merger, seconds: dict) -> None:
    """Prune the staged merged banks once the global threshold is known and write them."""
    t0 = time.perf_counter()
    bar = s.progress.bar(len(merger.stage.layers), "compressing: global threshold")
    merger.entries.update(merger.stage.finish(s.writer, progress=lambda n: (s.progress.update(bar, n), bar.update())))
    bar.close()
    seconds["compress"] = time.perf_counter() - t0


def _write_config(s: Stream, merger: Merger, tmp: Path, groups: _Groups, options: dict, compress: dict | None,
                  aliases: dict, tokenizer):
    """Close the shards, record the merge (and compression) in the config and write it (and the
    tokenizer); returns the written shards' index."""
    written = s.writer.finish()
    if isinstance(s.writer, StandardOutput):
        s.writer.write_config(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        return written
    num_groups = groups.num_groups
    n_group = options.get("routing_groups", 1)
    record_merge(s.model, merger.groupings, {n: s.stats[n] for n in groups.chosen}, dict(
        num_groups=num_groups if isinstance(num_groups, int) else dict(num_groups), similarity=options["similarity"],
        globally=groups.globally, permute=options["permute"], strategy=options["strategy"],
        grouping=options["grouping"], seed=options["seed"],
        **({} if options.get("max_group_size") is None else {"max_group_size": options["max_group_size"]}),
        **({"within_routing_groups": n_group} if n_group > 1 else {})))
    if compress:
        record_compression(s.model, merger.entries, dict(
            rank=compress["rank"], keep_ratio=compress["keep_ratio"], importance="weight", svd=compress["svd"]))
    entries = {v.name: merger.entries[v.name] for v in s.views.values() if v.name in merger.entries}
    write_merged_config(s.model.config, tmp, written, aliases, entries, str(s.dtype).removeprefix("torch."))
    if s.model.can_generate():
        s.model.generation_config.save_pretrained(str(tmp))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(tmp))
    return written


def _check_routing_groups(s: Stream, groups: _Groups) -> None:
    """Merging within routing groups: the counts checked before any work, as merge_experts checks."""
    if groups.unit > 1:
        experts = {v.name: v.num_experts for v in s.views.values()}
        for name, count in groups.up_front(s.views).items():
            if count < experts[name]:
                check_routing_groups(name, experts[name], count, groups.unit)


@torch.no_grad()
def merge_checkpoint(path, out, calibration_batches: Iterable[dict], num_groups, similarity: str = "router-logits",
                     globally: bool | None = None, compress: dict | None = None, max_memory=None, offload_dir=None,
                     progress: bool = True, *, permute: bool = True, strategy: str = "frequency",
                     grouping: str = "dominant", layers=None, seed: int = 0, dtype: torch.dtype | None = None,
                     max_shard_size=None, bases: Iterable[str] | None = None, tokenizer=None, device_map=None,
                     keep_quantization: bool = True, format: str = "exact", router: str | None = None,
                     within_routing_groups: bool | None = None, max_group_size: int | None = None) -> StreamingResult:
    """Merge the experts of the checkpoint directory `path` (a family source.py lists) into `out`
    without ever holding the model in memory; returns a StreamingResult.

    calibration_batches: dicts with input_ids [B, L] (and attention_mask, position_ids), as for
      collect_routing_stats; kept for the whole run (their hidden states are carried layer to layer).
    num_groups, similarity, globally, permute, strategy, grouping, layers, seed, within_routing_groups, max_group_size:
      as merge_experts (globally: default True, False with format="standard"; within_routing_groups: default
      False, True with format="standard", which needs it for group-limited routers; grouping="ream" collects REAP
      saliency in the statistics pass, without a device_map only).
    compress: None, or dict(rank=..., keep_ratio=..., svd="auto"): one-shot compression of the merged
      experts as compress_experts(importance="weight") would do on the merged model (every MoE layer).
    max_memory: a target for resident memory (bytes or "16GB"): decides whether the carried hidden
      states stay in memory or go to a file, the output shard size and the weight-matching chunks. One
      layer (with its merge temporaries, about 2x its weights) has to fit; None: no limit. With a
      device_map, also a dict per device as accelerate takes it ({0: "70GB", 1: "70GB", "cpu": "8GB"});
      its "cpu" entry is then the resident budget.
    offload_dir: where hidden states go when they exceed the budget, and with a device_map where
      accelerate offloads the layers that fit no device (default: inside the temporary output
      directory); what the run writes there is removed at the end, also when the run fails.
    device_map: None (the statistics pass runs the cut forward on the CPU, one layer at a time), or a
      device map for accelerate's big-model inference ("auto", "balanced", "balanced_low_0",
      "sequential", "cpu", "cuda:N" or {module name: device or "disk"}, see dispatch.py): the statistics
      pass is the model's own forward on GPUs / CPU / disk as accelerate places it, then one pass over
      the weights merges every layer. Needed for several GPUs, and for Qwen3-Next, Qwen3.5-MoE and Switch
      Transformers, whose layers the cut forward does not run.
    dtype: compute and output dtype (default float32, as open_model loads; bfloat16 for a quantized source).
    keep_quantization: a block-FP8 or MXFP4 source (read dequantized, layer by layer) is written back in its
      format, non-expert tensors byte for byte and the merged experts re-quantized, its quantization_config
      kept (quantized.py); False: every tensor dequantized in `dtype`, without quantization_config.
    max_shard_size: bytes per output shard (default: max_memory / 8 within 1 MB-2 GB; 2 GB without a budget).
    bases: similarity bases to collect (default: what `similarity` needs); tokenizer: saved with it when given.
    format: "exact" (the merged format: all E router rows and the expert_map) or "standard" (the family's own
      checkpoint with M experts and M router rows, equal to save_pretrained(format="standard") of the merged model
      in memory; standard.py); refused before any work when it cannot be expressed: globally, some `layers` only,
      top_k > M, compression (a quantized source is kept quantized as for "exact").
    router: the standard format's router rows: "fitted" (the default; fitted on the merged model's router inputs,
      from one more forward of every layer as merged over the calibration batches) or "dominant" (the default
      with a device_map, which supports only it).
    """
    started = time.perf_counter()
    bases = _check_options(similarity, strategy, grouping, bases, max_group_size, device_map)
    compress = compress_options(compress)
    globally = format != "standard" if globally is None else globally
    within_routing_groups = format == "standard" if within_routing_groups is None else within_routing_groups
    budget, device_memory = _check_memory(max_memory, device_map, offload_dir)
    s, out, chosen, aliases = _open_stream(path, out, dtype, calibration_batches, layers, strategy, bases, progress,
                                           dispatched=device_map is not None, grouping=grouping)
    groups = _Groups(chosen, num_groups, globally, routing_groups(s.model.config) if within_routing_groups else 1)
    _check_routing_groups(s, groups)
    # group counts known up front (not global): each layer is merged as soon as its statistics are in
    fused = not globally and device_map is None
    counts = groups.up_front(s.views) if fused else {}
    standard = check_standard(format, router, s, chosen, globally, compress, device_map,
                              groups.up_front(s.views) if not globally else None, groups.unit)
    plan = _plan(s, budget, max_shard_size, standard, strategy, keep_quantization, fused, similarity)
    options, seconds = dict(similarity=similarity, permute=permute, strategy=strategy, grouping=grouping, seed=seed,
                            routing_groups=groups.unit, max_group_size=max_group_size), {}
    with atomic_directory(out) as tmp:
        merger = _merger(s, tmp, plan, compress, options, keep_quantization, standard)
        if device_map is not None:
            offloaded = _dispatched_passes(s, merger, groups, device_map, device_memory, offload_dir or tmp, seconds)
        else:
            offloaded = plan.offload
            _streamed_passes(s, merger, groups, counts, fused, offloaded, offload_dir or tmp, seconds)
        if merger.stage is not None:
            _compress_pass(s, merger, seconds)
        quantization_error = record_error(s.model.config, s.writer)
        written = _write_config(s, merger, tmp, groups, options, compress, aliases, tokenizer)
    seconds["total"] = time.perf_counter() - started
    return StreamingResult(path=out, groupings=merger.groupings, stats=s.stats, passes=1 if fused else 2,
                           offloaded=offloaded, bytes_read=s.source.bytes_read,
                           bytes_written=sum(f["bytes"] for f in written.files.values()),
                           peak_rss=s.progress.peak, seconds=seconds, quantization_error=quantization_error)
