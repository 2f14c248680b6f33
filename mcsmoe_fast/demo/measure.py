"""What the demo's table reports for one model: held-out perplexity (per byte), expert parameters,
checkpoint size, and forward throughput with transformers' modules and after `optimize`."""
from __future__ import annotations

import copy
import time
from pathlib import Path

import torch
from torch import nn

from ..checkpoint import save_pretrained, to_dense
from ..footprint import expert_parameters  # noqa: F401  (re-exported: the demo's and python/ scripts' import)
from ..modules.compressed import CompressedMoEExperts
from ..models import moe_layers
from ..modules import MoEExperts
from ..optimize import optimize


def checkpoint_mb(model: nn.Module, directory: Path) -> float:
    save_pretrained(model, directory)
    return sum(f.stat().st_size for f in directory.glob("*.safetensors")) / 1e6


@torch.no_grad()
def tokens_per_second(model: nn.Module, inputs: dict, repeats: int = 3) -> float:
    """Input tokens per second: the best of `repeats` forward passes (after one warm-up pass)."""
    model.eval()
    model(**inputs)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        model(**inputs)
        best = min(best, time.perf_counter() - start)
    return inputs["input_ids"].numel() / best


def throughput(model: nn.Module, inputs: dict, repeats: int = 3) -> tuple[float, float]:
    """(tokens/s with transformers' modules, tokens/s after optimize). A merged or compressed model runs
    in transformers' modules as its dense export (every expert given its group's weights)."""
    merged = any(isinstance(getattr(layer.module, "experts", None), (MoEExperts, CompressedMoEExperts))
                 for layer in moe_layers(model))
    plain = to_dense(model) if merged else model
    fast = optimize(copy.deepcopy(model))
    return tokens_per_second(plain, inputs, repeats), tokens_per_second(fast, inputs, repeats)
