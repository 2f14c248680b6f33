"""Models dispatched by accelerate (from_pretrained(device_map=...), dispatch_model): an offloaded
module keeps its parameters on the meta device between forwards and its AlignDevicesHook brings them to
its execution device for each forward. Code that reads an MoE block's weights outside the block's own
forward (the routing-statistics accumulators) goes through these two helpers; on a model without hooks
they change nothing.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import torch
from torch import nn


def _hooks(module: nn.Module):
    for m in module.modules():
        hook = getattr(m, "_hf_hook", None)
        if hook is not None:
            yield m, hook


def compute_device(module: nn.Module, weight: torch.Tensor) -> torch.device:
    """Where `module` computes: `weight`'s device, or for an offloaded module (weights on meta) the
    execution device of accelerate's hooks."""
    if weight.device.type != "meta":
        return weight.device
    for _, hook in _hooks(module):
        device = getattr(hook, "execution_device", None)
        if device is not None:
            return torch.device(device if not isinstance(device, int) else f"cuda:{device}")
    raise ValueError("the MoE block's weights are on the meta device and no accelerate hook says where it runs; "
                     "load the model with its weights (or dispatch it with accelerate)")


@contextmanager
def onloaded(module: nn.Module) -> Iterator[None]:
    """Every offloaded tensor of `module` and its children on its execution device inside the block
    (accelerate's align_module_device per hooked module), offloaded again after it."""
    hooked = [m for m, hook in _hooks(module) if getattr(hook, "offload", False)]
    if not hooked:
        yield
        return
    from accelerate.utils import align_module_device

    with ExitStack() as stack:
        for m in hooked:
            stack.enter_context(align_module_device(m))
        yield


def refuse_meta_experts(layers, step: str) -> None:
    """ValueError naming the layers whose expert weights are on the meta device (no values in memory), before
    `step` (align, merge, compress: they read and rewrite the weights in place) changes anything."""
    meta = [layer.name for layer in layers if any(w.is_meta for w in layer.expert_weights())]
    if meta:
        raise ValueError(f"{step}: the expert weights of layers {meta} are on the meta device (no values in memory: a "
                         "model built empty, or experts offloaded by accelerate); load the model with its weights (a "
                         "model larger than memory: the CLI's --max-memory streams it layer by layer)")
