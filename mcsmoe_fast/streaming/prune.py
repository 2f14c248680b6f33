"""prune_checkpoint: REAP / frequency pruning (prune.py) of a checkpoint larger than memory, one decoder layer at a
time, written as the standard format through the streamed standard writer (standard.py): equal to open_model ->
collect_routing_stats(saliency=...) -> prune_experts -> save_pretrained in memory.

One pass: each decoder layer runs over the carried hidden states of the ORIGINAL model (as collect_routing_stats
sees them), its MoE block's statistics (with REAP saliency) decide its kept experts (prune.top_experts), and the
kept experts and their router rows are written at once (a layer's choice does not depend on the others').

A block-FP8 / MXFP4 source is read dequantized and, with keep_quantization (the default), written back in its
format by the streamed standard writer's re-quantizing rule (quantized_standard.py): what the in-memory
`prune` writes, with the same error report (the kept experts' banks and the layer outputs, each token's
pruned experts weighted 0); keep_quantization=False writes dequantized tensors without quantization_config.
"""
from __future__ import annotations

from collections.abc import Iterable
from contextlib import nullcontext
from pathlib import Path

import torch

from ..checkpoint import atomic_directory, scratch_directory
from ..checkpoint.standard_plan import LayerPlan, check_expert_counts, check_standard_layer
from ..models.config_fields import expert_count_fields
from ..prune import check_expert_count, check_routing_group_counts
from .activations import ActivationStore, check_offload_dir
from .forward import ACCEPTED_KEYS, prepare_batches
from .memory import (largest_unit_bytes, plan_memory, saliency_bytes, stream_forward_bytes,
                     stream_requantization_bytes, warn_below_floor)
from .passes import Progress, Stream, layer_pass
from ..quant.report import drop_quantization
from .quantized import ErrorProbe, record_error
from .skeleton import layer_units, moe_views, open_source
from .source import IN_MEMORY_HINT
from .standard import StandardOutput


def _check(s: Stream, num_keep: int) -> int:
    """prune.check_prune's refusals, on the skeleton's views (no weights); returns the routing-group count."""
    layers = list(s.views.values())
    if not layers:
        raise ValueError("the model has no MoE layer to prune")
    check_expert_count(layers, num_keep)
    for layer in layers:
        check_standard_layer(layer)
    expert_count_fields(s.model.config)
    n_group = check_routing_group_counts(s.model.config, layers, num_keep)
    check_expert_counts(s.model.config, layers, {layer.name: num_keep for layer in layers})
    return n_group


@torch.no_grad()
def prune_checkpoint(path, out, calibration_batches: Iterable[dict], num_experts: int | None = None,
                     ratio: float | None = None, method: str = "reap", saliency: str = "reap", max_memory=None,
                     offload_dir=None, progress: bool = True, *, dtype: torch.dtype | None = None,
                     max_shard_size=None, tokenizer=None, keep_quantization: bool = True) -> Path:
    """Prune every MoE layer of the checkpoint directory `path` to its num_experts (or E - round(ratio E)) highest
    scoring experts (prune.prune_experts' method and saliency) and write the standard checkpoint to `out`, one
    decoder layer in memory at a time; returns out's path. max_memory, offload_dir, dtype, max_shard_size,
    tokenizer, keep_quantization: as merge_checkpoint. Families the layer-by-layer forward runs (not through a
    device map)."""
    from ..prune import PRUNE_METHODS, PRUNE_SECTION, expert_scores, resolve_count, top_experts

    if method not in PRUNE_METHODS:
        raise ValueError(f"method must be one of {', '.join(PRUNE_METHODS)}, got {method!r}")
    check_offload_dir(offload_dir)
    source, out, dtype, model, shapes, _ = open_source(path, out, dtype, hint=IN_MEMORY_HINT)
    batches = prepare_batches(calibration_batches, source.config.vocab_size, ACCEPTED_KEYS)
    units = layer_units(model)
    views = moe_views(model, units)
    s = Stream(model=model, source=source, shapes=shapes, units=units, views=views,
               chosen={v.name for v in views.values()}, batches=batches, dtype=dtype, bases=("router-logits",),
               writer=None, progress=Progress(progress, sum(b.tokens for b in batches)),
               saliency=saliency if method == "reap" else None)
    num_keep = resolve_count(next(iter(views.values())).num_experts if views else 0, num_experts, ratio)
    n_group = _check(s, num_keep)
    quantized = source.quant is not None and keep_quantization
    if source.quant is not None and not keep_quantization:
        drop_quantization(model.config)
    activations = sum(b.input_ids.numel() for b in batches) * model.config.hidden_size * dtype.itemsize
    plan = plan_memory(max_memory, largest_unit_bytes(shapes, units, dtype), 0, activations, max_shard_size,
                       stream_requantization_bytes(s, "standard", True) if quantized else 0,
                       saliency_bytes=saliency_bytes(s), forward_bytes=stream_forward_bytes(s))
    warn_below_floor(plan, "pruning")
    record = {"method": method, "layers": {}}

    def prune_now(view, tensors):
        scores = expert_scores(s.stats[view.name], method)
        kept = top_experts(scores, num_keep, n_group)
        w_in, w_out, b_in, b_out = view.stored_tensors().read(tensors.__getitem__)
        s.writer.write_layer(view, LayerPlan(view.name, kept, kept, [[e] for e in kept], dropped=True),
                             w_in, w_out, b_in, b_out)
        s.writer.write_router(view)
        record["layers"][view.name] = {"kept": kept, "scores": [round(float(x), 6) for x in scores]}

    with atomic_directory(out) as tmp:
        probe = ErrorProbe(views, s.chosen, [b.attention_mask for b in batches]) if quantized else None
        s.writer = StandardOutput(tmp, plan.shard_size, model, views, dtype, num_keep, "dominant",
                                  requantize=source.files if quantized else None, probe=probe)
        scratch = offload_dir or tmp
        with (scratch_directory(scratch, ".mcsmoe-activations-") if plan.offload else nullcontext()) as where:
            store = ActivationStore([(*b.input_ids.shape, model.config.hidden_size) for b in batches], dtype, where)
            try:
                layer_pass(s, prune_now, "pruning: statistics + kept experts", store)
            finally:
                store.close()
                if probe is not None:
                    probe.close()
        s.writer.finish()
        record_error(model.config, s.writer)  # the error re-quantizing added, into config.json
        # mcsmoe_standard as save_pretrained(format="standard") of the pruned model records it: its own experts, one
        # row each (the kept original experts are in mcsmoe_prune)
        s.writer.plans = {name: LayerPlan(name, list(range(num_keep)), list(range(num_keep)),
                                          [[e] for e in range(num_keep)], dropped=True) for name in s.writer.plans}
        s.writer.write_config(tmp, {PRUNE_SECTION: record})
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
    return out
