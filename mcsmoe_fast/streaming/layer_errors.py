"""The layer errors of an in-memory output written in its input's quantized precision (merge --format standard,
prune): the keys of the streamed report (quant/report.py "layers": w_in, w_out, output, tokens) added to what
requantize_saved records ("tensors").

`LayerErrors` hooks an ErrorProbe on the original model's MoE layers while the calibration statistics are
collected (the first PROBE_TOKENS tokens, padding left out, reaching each layer's experts: hidden states and
routing), keeps each
layer's weights in the standard experts' order once merged or pruned, and after the checkpoint is re-quantized
reads each layer's re-quantized banks back from it (SourceCheckpoint: dequantized, the family's hub layout
assembled as the streamed reader assembles it) and measures, as the streamed standard output does, the banks'
relative error and the layer's routed-expert output on the probe's tokens (each original expert sent to the
standard expert that took it over; a pruned expert's routing weight set to zero).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..models import moe_layers
from ..quant.report import ERROR_KEY, summarize
from .layer_error import layer_error


def read_standard_banks(directory, names) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{layer: (w_in, w_out)} canonical float32 of the MoE layers `names` of the (quantized) standard checkpoint
    `directory`, read as the streamed reader reads a checkpoint."""
    from .skeleton import build_skeleton, tensor_shapes
    from .source import SourceCheckpoint

    source = SourceCheckpoint(directory, dispatched=True)
    config = source.config
    if getattr(config, "quantization_config", None) is not None:
        del config.quantization_config
    skeleton = build_skeleton(config, torch.float32)
    shapes, _ = tensor_shapes(skeleton)
    views = {v.name: v for v in moe_layers(skeleton)}
    banks = {}
    for name in names:
        w_in, w_out, _, _ = views[name].stored_tensors().read(lambda n: source.read(n, shapes[n], torch.float32))
        source.release()
        banks[name] = (w_in, w_out)
    return banks


class LayerErrors:
    """The probe on `model`'s MoE layers (open it before collect_routing_stats, close it after), the layers'
    kept weights, and record() once the output is re-quantized."""

    def __init__(self, model: torch.nn.Module, batches):
        """batches: the calibration batches (dicts) collect_routing_stats will run, in that order: their padding
        masks tell the probe which positions are tokens."""
        from .quantized import ErrorProbe

        views = {v.name: v for v in moe_layers(model)}
        self.probe = ErrorProbe(views, set(views), [b.get("attention_mask") for b in batches])
        self.layers: dict[str, tuple] = {}  # name -> (merged banks in the standard order, groups, E, activation, args)

    def close(self) -> None:
        self.probe.close()

    def keep_merged(self, model: torch.nn.Module) -> None:
        """The merged model's slots in its standard plan's order (checkpoint/standard_plan.py)."""
        from ..checkpoint.standard_plan import plan_standard

        plans = plan_standard(model)
        for layer in moe_layers(model):
            slots = torch.tensor(plans[layer.name].slots, dtype=torch.long)
            banks = (*layer.expert_weights(), *layer.expert_biases())
            merged = tuple(None if t is None else t.detach()[slots] for t in banks)
            self.layers[layer.name] = (merged, plans[layer.name].groups, layer.num_experts, layer.activation,
                                       layer.activation_args)

    def keep_pruned(self, pruned: torch.nn.Module, kept: dict[str, list[int]], num_experts: dict[str, int]) -> None:
        """The pruned model's experts, standard expert m being original expert kept[layer][m]."""
        for layer in moe_layers(pruned):
            merged = tuple(None if t is None else t.detach() for t in (*layer.expert_weights(), *layer.expert_biases()))
            self.layers[layer.name] = (merged, [[e] for e in kept[layer.name]], num_experts[layer.name],
                                       layer.activation, layer.activation_args)

    def record(self, directory) -> dict | None:
        """Measure every kept layer against the re-quantized checkpoint `directory` and add the layers to the
        report in its config.json; returns the report."""
        from .quantized_standard import standard_routing

        path = Path(directory) / "config.json"
        raw = json.loads(path.read_text(encoding="utf-8"))
        previous = raw.get(ERROR_KEY) or {}
        method = previous.get("format") or raw["quantization_config"]["quant_method"]
        errors = {}
        for name, requantized in read_standard_banks(directory, list(self.layers)).items():
            merged, groups, num_experts, activation, args = self.layers.pop(name)
            expert_map, sample = standard_routing(groups, num_experts, self.probe.samples.pop(name, None))
            errors[name] = layer_error(merged, requantized, expert_map, activation, args, sample)
        raw[ERROR_KEY] = summarize(method, errors, previous.get("tensors"))
        path.write_text(json.dumps(raw, indent=2) + "\n")
        return raw[ERROR_KEY]
