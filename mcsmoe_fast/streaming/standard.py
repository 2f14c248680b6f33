"""The standard format written layer by layer: merge_checkpoint(format="standard") (docs/standard_format.md).

What save_pretrained(format="standard") writes for the merged model in memory, without the model: every tensor
the passes copy or merge arrives here under the original model's names, one unit (decoder layer) at a time, and
leaves as transformers' own save_pretrained of the standard (M-expert) model writes it:

- each MoE layer's merged slots in the standard plan's order (checkpoint/standard_plan.py, built from the layer's
  LayerGrouping: plan_from_grouping), split into the M-expert model's stored tensors by its adapter
  (stored_tensors().split, the reverse of the streamed read);
- each MoE layer's router tensors (weight, bias, e_score_correction_bias) held until the layer is merged, then
  sliced at the plan's rows (dominant) or fitted on the merged model's router inputs (fitted; passes.py runs the
  merged layers over the calibration batches for them), as standard_router.router_state does in memory;
- the names then reverted to the family's hub layout by transformers' revert_weight_conversion on a meta model
  of the standard config (Mixtral's per-expert w1/w2/w3, the others' gate/up/down_proj, GPT-OSS fused), one unit
  at a time (end_unit), as transformers reverts an offloaded model's shards;
- weights in model.safetensors (or shards and model.safetensors.index.json), config.json from standard_config.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..checkpoint.standard import standard_config
from ..checkpoint.standard_plan import LayerPlan
from ..checkpoint.standard_router import sliced_rows
from ..checkpoint.weight_files import ShardWriter
from ..models import moe_layers
from ..models.config_fields import expert_count_fields, routing_groups
from .quantized_standard import StandardRequantizer
from .skeleton import build_skeleton

HF_WEIGHTS = "model.safetensors"  # transformers' own weights name, which every loader looks for
HF_METADATA = {"format": "pt"}


class StandardOutput:
    """The output writer of a streamed standard checkpoint: add() / names / finish() as a ShardWriter's, plus
    end_unit() after each unit, write_layer() and write_router() per MoE layer (module docstring)."""

    def __init__(self, directory: Path, max_shard_size: int | None, model: torch.nn.Module, views: dict,
                 dtype: torch.dtype, num_experts: int, router: str, requantize=None, probe=None):
        """requantize: the source's QuantizedFiles, to write in its format (quantized_standard.py; probe: its
        ErrorProbe); None: every tensor as it comes."""
        config = model.config.__class__.from_dict(model.config.to_dict())
        for name in expert_count_fields(config):
            setattr(config, name, num_experts)
        self.model, self.dtype, self.router, self.probe = model, dtype, router, probe
        self.standard = build_skeleton(config, dtype)  # meta: names, layouts and the conversion mapping only
        self.standard_views = {v.name: v for v in moe_layers(self.standard)}
        self.prefixes = {v.name: f"{v.name}.{v.router_rows()[1]}" for v in views.values()}
        self.writer = ShardWriter(directory, HF_WEIGHTS, max_shard_size, HF_METADATA)
        if requantize is not None:
            self.writer = StandardRequantizer(self.writer, requantize, probe)
        self.unit_layers: dict[str, tuple] = {}  # re-quantizing: the unit's merged layers, measured at end_unit
        self.names: set[str] = set()  # the original model's names given to add()
        self.pending: dict[str, torch.Tensor] = {}  # the current unit's tensors, standard model names
        self.held: dict[str, torch.Tensor] = {}  # router tensors waiting for their layer's plan
        self.plans: dict[str, LayerPlan] = {}

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self.names:
            raise ValueError(f"tensor {name!r} written twice")
        self.names.add(name)
        routed = any(name.startswith(p) for p in self.prefixes.values())
        (self.held if routed else self.pending)[name] = tensor

    def write_layer(self, view, plan: LayerPlan, w_in: torch.Tensor, w_out: torch.Tensor,
                    b_in: torch.Tensor | None, b_out: torch.Tensor | None) -> None:
        """The merged slots [G, ...] of `view` (canonical layout) as the standard layer's M experts."""
        if len(set(plan.slots)) != len(plan.slots) or not set(plan.slots) <= set(range(w_in.shape[0])):
            raise ValueError(f"{view.name}: the standard plan's slots {plan.slots} are not distinct slots of the "
                             f"{w_in.shape[0]} given")
        slots = torch.tensor(plan.slots, dtype=torch.long)
        pick = lambda t: None if t is None else t[slots]  # noqa: E731
        layout = self.standard_views[view.name].stored_tensors()
        picked = (pick(w_in), pick(w_out), pick(b_in), pick(b_out))
        self.pending.update(layout.split(*picked))
        self.plans[view.name] = plan
        if isinstance(self.writer, StandardRequantizer):
            self.unit_layers[view.name] = (self.standard_views[view.name], plan, view.num_experts, picked)

    def router_tensors(self, view) -> dict[str, torch.Tensor]:
        """The held router tensors of `view`, {key inside the router module: tensor}."""
        prefix = self.prefixes[view.name]
        return {n[len(prefix):]: t for n, t in self.held.items() if n.startswith(prefix)}

    def write_router(self, view, state: dict[str, torch.Tensor] | None = None) -> None:
        """The standard router of `view`: `state` (fitted, {key: tensor}) or its held tensors sliced at the
        plan's rows (dominant)."""
        plan, prefix = self.plans[view.name], self.prefixes[view.name]
        if state is None:
            state = sliced_rows(self.router_tensors(view), view.num_experts, plan.rows)
        for name in [n for n in self.held if n.startswith(prefix)]:
            del self.held[name]
        self.pending.update({prefix + k: t for k, t in state.items()})

    def end_unit(self) -> None:
        """Write the unit's tensors under the family's hub names."""
        from transformers.core_model_loading import revert_weight_conversion

        if not self.pending:
            return
        if isinstance(self.writer, StandardRequantizer):
            self.writer.write_unit(self.standard, self.pending, self.unit_layers)
        else:
            for name, tensor in revert_weight_conversion(self.standard, self.pending).items():
                self.writer.add(name, tensor)
        self.pending, self.unit_layers = {}, {}

    def quantization_report(self) -> dict | None:
        """The error re-quantizing added (None when the output is not re-quantized)."""
        return self.writer.report() if isinstance(self.writer, StandardRequantizer) else None

    def finish(self):
        self.end_unit()
        if self.held:
            raise RuntimeError(f"router tensors of unmerged layers were never written: {sorted(self.held)[:3]}")
        return self.writer.finish()

    def write_config(self, directory: Path, sections: dict | None = None) -> None:
        """config.json (and generation_config.json) as save_pretrained of the standard model writes them, with
        `sections` {name: value} added (the prune's record)."""
        config = standard_config(self.model, self.plans, self.router, None)
        for name, value in (sections or {}).items():
            setattr(config, name, value)
        config.dtype = str(self.dtype).removeprefix("torch.")
        config.architectures = [type(self.standard).__name__]
        config.save_pretrained(str(directory))
        if self.standard.can_generate():  # the source's (open_source reads its generation_config.json)
            self.model.generation_config.save_pretrained(str(directory))


def check_standard(format: str, router: str | None, s, chosen: list[str], globally: bool, compress, device_map,
                   counts: dict[str, int] | None, merged_routing_groups: int = 1) -> tuple[int, str] | None:
    """(M, router) of a streamed standard checkpoint, None for format="exact"; what it cannot express is refused
    here, before the first pass (`s`: the Stream; `counts`: the group counts known up front, None when global;
    merged_routing_groups: the routing groups the merge keeps apart, 1 when it does not)."""
    from ..checkpoint import FORMATS
    from ..checkpoint.standard_plan import check_expert_counts, check_standard_layer
    from ..checkpoint.standard_router import check_router

    if format not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {format!r}")
    if format != "standard":
        if router is not None:
            raise ValueError("router chooses the router rows of format='standard' only")
        return None
    if globally:
        raise ValueError("format='standard': globally=True gives the layers different expert counts, but the config "
                         "has one expert count for the whole model: pass globally=False (every layer gets num_groups)")
    if compress:
        raise ValueError("format='standard': the streamed merge writes the standard format of merged (not compressed) "
                         "experts; drop compress, or save format='exact'")
    if len(chosen) < len(s.views):
        raise ValueError(f"format='standard': layers={sorted(chosen)} leaves the other MoE layers with all their "
                         "experts, but the config has one expert count for every layer: merge every layer (layers=None)")
    router = router or ("dominant" if device_map is not None else "fitted")
    check_router(router, s.batches)
    if router == "fitted" and device_map is not None:
        raise ValueError("format='standard' with a device_map writes router='dominant' rows only: fitting them needs "
                         "the merged model's own forward over the calibration batches, which the dispatched merge does "
                         "not run; pass router='dominant' (--router dominant), or stream without device_map")
    layers = list(s.views.values())
    for layer in layers:
        check_standard_layer(layer)
    n_group = routing_groups(s.model.config)
    if n_group > 1 and merged_routing_groups != n_group:
        raise ValueError(f"format='standard': the router routes within n_group={n_group} routing groups, so every "
                         "merged group must stay inside one: merge within routing groups (within_routing_groups=True, "
                         "the default with format='standard'; --within-routing-groups), or save format='exact'")
    expert_count_fields(s.model.config)
    check_expert_counts(s.model.config, layers, counts)
    return next(iter(counts.values())), router
