"""The model without its weights: built from the config with every parameter on the meta device (no
memory), then filled one module at a time from the checkpoint and emptied again.

Buffers stay real (accelerate's init_empty_weights leaves them on the CPU): the rotary embedding's
inverse frequencies are computed from the config and needed by every layer.
"""
from __future__ import annotations

import torch
from torch import nn

from ..models import moe_layers
from ..models.hub import keep_float32_, model_class_for


def build_skeleton(config, dtype: torch.dtype) -> nn.Module:
    from accelerate import init_empty_weights

    with init_empty_weights():
        model = model_class_for(config).from_config(config, dtype=dtype)
    keep_float32_(model, dtype)
    model.tie_weights()  # as from_pretrained does: tied names become aliases of one stored tensor
    return model.eval()


def read_float32_as_skeleton(source, model: nn.Module) -> None:
    """The source reads in float32 the tensors the skeleton holds in float32, whatever the working dtype."""
    source.float32_names = {n for n, t in model.state_dict().items() if t.dtype == torch.float32}


def open_source(path, out, dtype: torch.dtype | None, dispatched: bool = False, hint: str | None = None):
    """(SourceCheckpoint, absolute out path, dtype, skeleton, {name: shape}, aliases) for a streamed run
    reading checkpoint `path` into `out` (never the input directory or inside it); every tensor the
    skeleton needs is checked to be in the checkpoint with its shape. dispatched, hint: see SourceCheckpoint."""
    from pathlib import Path

    from ..checkpoint.atomic import refuse_out_at_source
    from ..checkpoint.load import read_generation_config
    from .source import SourceCheckpoint

    source = SourceCheckpoint(path, dispatched, hint)
    out = Path(out).expanduser().absolute()
    refuse_out_at_source(source.path, out)
    dtype = dtype or (torch.bfloat16 if source.quant is not None else torch.float32)  # quantized: bf16 work
    model = build_skeleton(source.config, dtype)
    read_generation_config(model, source.path)  # written with the output
    shapes, aliases = tensor_shapes(model)
    source.check(shapes)
    read_float32_as_skeleton(source, model)
    return source, out, dtype, model, shapes, aliases


def tensor_shapes(model: nn.Module) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """({name: shape} of every state-dict tensor stored once, {tied name: stored name}); tied names
    follow state-dict order as checkpoint.save_pretrained records them."""
    shapes, aliases, seen = {}, {}, {}
    for name, t in model.state_dict(keep_vars=True).items():
        if id(t) in seen:
            aliases[name] = seen[id(t)]
            continue
        seen[id(t)] = name
        shapes[name] = tuple(t.shape)
    return shapes, aliases


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(dotted prefix, the decoder layers) of a decoder-only transformers model."""
    inner = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    if not hasattr(inner, "layers"):  # get_decoder() giving the model itself (Llama4ForCausalLM)
        inner = model.model
    prefix = next(name for name, module in model.named_modules() if module is inner.layers)
    return prefix, inner.layers


def layer_units(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of the blocks a pass reads one at a time, in order: the decoder layers of a
    decoder-only model; the encoder blocks, then the decoder blocks, of Switch Transformers."""
    if getattr(model.config, "is_encoder_decoder", False):
        return [(f"{stack}.block.{i}", block) for stack in ("encoder", "decoder")
                for i, block in enumerate(getattr(model, stack).block)]
    prefix, layers = decoder_layers(model)
    return [(f"{prefix}.{i}", layer) for i, layer in enumerate(layers)]


def moe_views(model: nn.Module, units: list[tuple[str, nn.Module]]) -> dict[str, object]:
    """{unit name: MoELayer view} of the units that hold an MoE block, in unit order."""
    views, layers = {}, moe_layers(model)
    for name, unit in units:
        for view in layers:
            if any(m is view.module for m in unit.modules()):
                views[name] = view
    return views


def materialise(module: nn.Module, prefix: str, tensors: dict[str, torch.Tensor]) -> None:
    """Give `module` (named `prefix` in the model) the given tensors {full name: tensor}; strict."""
    local = {name[len(prefix) + 1:]: t for name, t in tensors.items()}
    module.load_state_dict(local, strict=True, assign=True)


def empty(module: nn.Module) -> None:
    """Back to the meta device: the module's weights are released."""
    module.to("meta")
