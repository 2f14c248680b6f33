"""How many expert parameters a model stores: the size axis of every comparison (the demo's table, `compare`)."""
from __future__ import annotations

from torch import nn

from .models import moe_layers
from .modules import MoEExperts
from .modules.compressed import CompressedMoEExperts


COMPRESSED_FIELDS = tuple(f"{side}_{f}" for side in ("in", "out") for f in ("U", "V", "S_rows"))  # values, not indices


def expert_parameters(model: nn.Module) -> int:
    """Stored expert weights (values, not indices) over every MoE layer: a merged layer counts its slots, a
    compressed one its low-rank factors and kept sparse rows, a pruned or plain one its experts."""
    total = 0
    for layer in moe_layers(model):
        experts = layer.module.experts
        if isinstance(experts, CompressedMoEExperts):
            total += sum(getattr(experts, f).numel() for f in COMPRESSED_FIELDS)
        elif isinstance(experts, MoEExperts):
            total += experts.w_in.numel() + experts.w_out.numel()
        else:
            total += sum(t.numel() for t in layer.expert_weights())
    return total
