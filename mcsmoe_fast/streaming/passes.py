"""The passes over the decoder layers of a streamed merge (pipeline.py sets them up).

layer_pass: each decoder layer read once, its non-expert tensors copied to the output, its experts
  merged when their statistics are known; as the statistics pass (with an ActivationStore), the
  embeddings and then each layer materialised from the checkpoint run over every calibration batch
  (its MoE block feeding calibrate's accumulator through a forward pre-hook, as collect_routing_stats
  does) and are emptied again.
merge_pass: each MoE layer's router and experts read again and handed to the Merger.
Merger: the expert step of one layer: merge.merge_layer_weights, then write the slots (or stage them
  for compression, compress_stage.py), or, for the standard format (standard.py), the layer's M experts
  and router rows.
With a second store (the standard format's fitted router), each layer also runs over the hidden states
  of the MERGED model (its merged slots installed as merge_experts installs them), whose MoE block inputs
  are the tokens the layer's router rows are fitted on, as to_standard does on the merged model in memory.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from .. import merge as merge_module
from ..calibrate import LayerStats, layer_accumulator, refuse_unmeasured
from ..checkpoint import layer_entry
from ..checkpoint.standard_plan import plan_from_grouping
from ..checkpoint.standard_router import keep_tokens, router_state
from ..grouping import LayerGrouping
from ..hooks import hook_block_input
from ..modules import MoEExperts
from ..checkpoint.weight_files import ShardWriter
from .activations import ActivationStore
from .compress_stage import CompressionStage
from .forward import Batch, run_layer
from .memory import ACCUMULATOR_CHUNK_TOKENS, human, rss_bytes, trim_heap
from .skeleton import empty, materialise
from .source import SourceCheckpoint
from .standard import StandardOutput


class Progress:
    """One tqdm bar per pass; the postfix shows the layer, the calibration tokens and resident memory,
    whose highest value between layers is kept in `peak`."""

    def __init__(self, enabled: bool, tokens: int):
        self.enabled, self.tokens, self.peak = enabled, tokens, rss_bytes()

    def bar(self, items, desc: str):
        if isinstance(items, int):
            return tqdm(total=items, desc=desc, unit="layer", disable=not self.enabled)
        return tqdm(items, desc=desc, unit="layer", disable=not self.enabled)

    def update(self, bar, layer: str) -> None:
        trim_heap()
        now = rss_bytes()
        self.peak = max(self.peak, now)
        bar.set_postfix_str(f"{layer} | {self.tokens} tokens | rss {human(now)}", refresh=False)


@dataclass
class Stream:
    """Everything the passes share."""

    model: torch.nn.Module  # the skeleton (parameters on the meta device)
    source: SourceCheckpoint
    shapes: dict[str, tuple[int, ...]]  # every model tensor stored once
    units: list[tuple[str, torch.nn.Module]]  # (name, module) of the blocks read one at a time (skeleton.layer_units)
    views: dict[str, object]  # unit name -> MoELayer view
    chosen: set[str]  # names of the MoE layers to merge
    batches: list[Batch]
    dtype: torch.dtype
    bases: tuple[str, ...]
    writer: ShardWriter | None  # set once the output directory exists
    progress: Progress
    stats: dict[str, LayerStats] = field(default_factory=dict)
    merged: ActivationStore | None = None  # the merged model's hidden states (the fitted standard router)
    max_tokens: int = 65536  # router inputs kept per layer for the fitted rows (to_standard's max_tokens)
    saliency: str | None = None  # REAP saliency in the statistics (calibrate.layer_accumulator; the streamed prune)

    def read(self, name: str) -> torch.Tensor:
        return self.source.read(name, self.shapes[name], self.dtype)


class Merger:
    """The expert step of one MoE layer: merge it (chosen layers) and write its slots, or stage them
    for compression. Collects the groupings and the config entries of the merged layers."""

    def __init__(self, writer: ShardWriter | StandardOutput, stage: CompressionStage | None, options: dict,
                 matching_bytes: int, config=None, fit_router: bool = False):
        """With a StandardOutput as writer (`config`: the model's), each merged layer is written as the standard
        layer; fit_router: its router is written by passes.py after the merged run (merged holds its slots)."""
        self.writer, self.stage, self.options, self.matching_bytes = writer, stage, options, matching_bytes
        self.config, self.fit_router = config, fit_router
        self.groupings: dict[str, LayerGrouping] = {}
        self.entries: dict[str, dict] = {}
        self.merged: dict[str, MoEExperts] = {}  # fit_router: the merged slots of a layer until its merged run

    @torch.no_grad()
    def __call__(self, view, tensors: dict[str, torch.Tensor], stats: LayerStats | None, count: int | None) -> None:
        """Merge (or pass on) the layer of `view` from `tensors`, which hold its stored expert and
        router tensors (view.stored_tensors())."""
        name, opts, layout = view.name, self.options, view.stored_tensors()
        w_in, w_out, b_in, b_out = layout.read(tensors.__getitem__)
        keep = None
        if stats is None:  # a layer left out of `layers`: experts unchanged (compressed as they are)
            expert_map = torch.arange(view.num_experts)
            if self.stage is None:
                for n in layout.experts:
                    self.writer.add(n, tensors[n])
                return
        else:
            g, w_in, w_out, b_in, b_out = merge_module.merge_layer_weights(
                name, stats, w_in, w_out, count, view.activation, router_weight=tensors[layout.router],
                similarity=opts["similarity"], permute=opts["permute"], strategy=opts["strategy"],
                grouping=opts["grouping"], seed=opts["seed"], memory_budget=self.matching_bytes, b_in=b_in,
                b_out=b_out, inplace=True, routing_groups=opts.get("routing_groups", 1),
                max_group_size=opts.get("max_group_size"))
            self.groupings[name] = g
            expert_map = torch.tensor(g.expert_map, dtype=torch.int64)
            if isinstance(self.writer, StandardOutput):
                self._write_standard(view, g, w_in, w_out, b_in, b_out, expert_map)
                return
            if opts["strategy"] == "drop":  # drop.py's logit mask buffer next to the router weight
                keep = torch.zeros(view.num_experts, dtype=torch.bool)
                keep[g.dominant] = True
                self.writer.add(layout.keep, keep)
        if self.stage is not None:
            self.stage.add(name, w_in, w_out, expert_map, view.activation, keep, b_in, b_out, view.activation_args)
            return
        experts = MoEExperts(w_in, w_out, expert_map, view.activation, b_in, b_out, view.activation_args)
        for k, v in experts.state_dict().items():
            self.writer.add(f"{name}.experts.{k}", v)
        self.entries[name] = layer_entry(view.num_experts, view.activation, experts, keep)

    def _write_standard(self, view, g: LayerGrouping, w_in, w_out, b_in, b_out, expert_map) -> None:
        """The layer's M experts in the standard plan's order; its router now (dominant rows, or a layer merged
        with strategy='drop', whose kept rows route exactly) or after its merged run (fitted)."""
        plan = plan_from_grouping(self.config, view, g, dropped=self.options["strategy"] == "drop")
        self.writer.write_layer(view, plan, w_in, w_out, b_in, b_out)
        if self.fit_router and not plan.dropped:
            self.merged[view.name] = MoEExperts(w_in, w_out, expert_map, view.activation, b_in, b_out,
                                                view.activation_args)
        else:
            self.writer.write_router(view)


def _attach(view, bases, current: dict, saliency: str | None = None):
    """(accumulator, hook handle): calibrate's accumulator fed by a pre-hook on the MoE block, with the
    padding mask of the batch being run (current["mask"])."""
    acc = layer_accumulator(view, bases=bases, chunk_tokens=ACCUMULATOR_CHUNK_TOKENS, saliency=saliency)
    return acc, hook_block_input(view.module, lambda hidden: acc(hidden, current.get("mask")))


@torch.no_grad()
def embed(s: Stream, store: ActivationStore | None) -> None:
    """The embedding goes to the output; with a store, hidden_b <- embed_tokens(input_ids_b) for every batch."""
    embeddings = s.model.get_input_embeddings()
    name = next(n for n, m in s.model.named_modules() if m is embeddings)
    tensors = {f"{name}.{k}": s.read(f"{name}.{k}") for k, _ in embeddings.named_parameters()}
    s.source.release()
    if store is not None:
        materialise(embeddings, name, tensors)
        for b, batch in enumerate(s.batches):
            store.put(b, embeddings(batch.input_ids))
            if s.merged is not None:
                s.merged.put(b, store.get(b))
        empty(embeddings)
    for n, t in tensors.items():
        s.writer.add(n, t)
    _end_unit(s.writer)


def _end_unit(writer) -> None:
    if isinstance(writer, StandardOutput):  # the standard names are reverted a unit at a time
        writer.end_unit()


@torch.no_grad()
def layer_pass(s: Stream, merge_now, desc: str, store: ActivationStore | None = None,
               merger: Merger | None = None) -> None:
    """Read every unit (decoder layer, or Switch block) once and copy its non-expert tensors to the
    output; merge_now(view, tensors) is called for the MoE layers whose experts are handled in this
    pass. With a store (the statistics pass of the cut forward), each layer also runs over the carried
    hidden states, collecting the chosen MoE layers' statistics into s.stats before merge_now sees it; with
    s.merged too (the fitted standard router), each layer then runs as merged over s.merged (`merger`'s slots)."""
    embed(s, store)
    bar = s.progress.bar(s.units, desc)
    for i, (name, unit) in enumerate(bar):
        s.progress.update(bar, name)
        view = s.views.get(name)
        tensors = {n: s.read(n) for n in s.shapes if n.startswith(name + ".")}
        s.source.release()
        if store is not None:
            _run_with_statistics(s, store, i, name, unit, tensors)
        experts = set(view.stored_tensors().experts) if view is not None else set()
        for n, t in tensors.items():  # attention, norms, router: copied through unchanged
            if n not in experts:
                s.writer.add(n, t)
        if view is not None:
            merge_now(view, tensors)
        if s.merged is not None:
            _run_merged(s, merger, i, name, unit, tensors)
        _end_unit(s.writer)
        del tensors
        s.progress.update(bar, name)
    for n in s.shapes:  # final norms, the head and anything else outside the units
        if n not in s.writer.names and not any(n.startswith(u + ".") for u, _ in s.units):
            s.writer.add(n, s.read(n))
    s.source.release()


def _run_merged(s: Stream, merger: Merger, i: int, name: str, unit: torch.nn.Module,
                tensors: dict[str, torch.Tensor]) -> None:
    """Unit i of the MERGED model (its MoE layer's merged slots installed, as merge_experts installs them) over
    the merged model's hidden states s.merged; the MoE block's inputs (padding left out, the first s.max_tokens
    tokens) are what its standard router rows are fitted on (standard_router.router_state), written here."""
    view = s.views.get(name)
    experts = merger.merged.pop(view.name, None) if view is not None else None
    materialise(unit, name, tensors)
    original = view.module.experts if experts is not None else None
    seen: list[torch.Tensor] = []
    current: dict = {}
    handle = None
    if experts is not None:
        view.install_experts(experts)
        handle = hook_block_input(view.module, lambda hidden: keep_tokens(seen, hidden, current.get("mask"),
                                                                          s.max_tokens))
    try:
        run_layer(s.model, unit, i, s.batches, s.merged.get, s.merged.put,
                  lambda batch: current.update(mask=batch.attention_mask))
        if experts is not None:
            plan = merger.writer.plans[view.name]
            hidden = torch.cat(seen) if seen else None
            if (hidden is None or hidden.shape[0] == 0) and not plan.dropped:  # as to_standard refuses it
                raise ValueError(f"router='fitted': no calibration token reached layer {view.name} (every token "
                                 "is padding); give batches with tokens, or router='dominant'")
            merger.writer.write_router(view, router_state(view, view.router_rows()[0], plan, hidden))
    finally:
        if handle is not None:
            handle.remove()
            view.install_experts(original)
        empty(unit)


def _run_with_statistics(s: Stream, store: ActivationStore, i: int, name: str, layer: torch.nn.Module,
                         tensors: dict[str, torch.Tensor]) -> None:
    """Decoder layer i, materialised from `tensors`, over every carried hidden state; its MoE block's
    statistics (a chosen layer) go to s.stats."""
    view = s.views.get(name)
    materialise(layer, name, tensors)
    current: dict = {}
    acc = _attach(view, s.bases, current, s.saliency) if view is not None and view.name in s.chosen else None
    try:
        run_layer(s.model, layer, i, s.batches, store.get, store.put,
                  lambda batch: current.update(mask=batch.attention_mask))
        if acc is not None:  # while the layer still holds its weights: the expert-output basis reads w_out
            s.stats[view.name] = acc[0].finish()
            refuse_unmeasured([s.stats[view.name]])
    finally:
        if acc is not None:
            acc[1].remove()
        empty(layer)


@torch.no_grad()
def merge_pass(s: Stream, merger: Merger, counts: dict[str, int], desc: str) -> None:
    """Read each MoE layer's experts and router again and merge (or stage) them."""
    todo = [v for v in s.views.values() if v.name in s.chosen or merger.stage is not None]
    bar = s.progress.bar(todo, desc)
    for view in bar:
        s.progress.update(bar, view.name)
        layout = view.stored_tensors()
        tensors = {n: s.read(n) for n in (*layout.experts, layout.router)}
        s.source.release()
        merger(view, tensors, s.stats.get(view.name), counts.get(view.name))
        del tensors
        s.progress.update(bar, view.name)
