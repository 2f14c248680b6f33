"""`compare` larger than memory: each method at each ratio run by the streamed commands into a scratch checkpoint
(prune_checkpoint for REAP and frequency pruning, merge_checkpoint(format="standard") for the merges), its
perplexity measured by streamed_perplexity, the checkpoint removed; one decoder layer in memory at a time
throughout. The rows are those of compare.compare_methods for the same methods: the same checkpoints as the
in-memory comparison writes in the standard form, the same perplexity.

The methods are those whose output is a plain transformers checkpoint, which the layer-by-layer forward reads:
reap, frequency, ream, m-smoe-standard and hc-smoe-standard. The exact and compressed forms (m-smoe, hc-smoe, +c)
live in this package's own format, which the streamed evaluation does not read; KD recovery and lm-eval tasks
need the model in memory. Each method collects its own statistics in its own pass (in memory, one pass serves
all of them).
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .checkpoint.atomic import scratch_directory
from .compare import check_compare
from .footprint import expert_parameters
from .models import moe_layers
from .prune import resolve_count
from .ream import REAM_GROUP_SIZE
from .streaming.perplexity import streamed_perplexity
from .streaming.pipeline import merge_checkpoint
from .streaming.prune import prune_checkpoint
from .streaming.skeleton import build_skeleton
from .streaming.source import SourceCheckpoint

STREAMED_METHODS = ("reap", "frequency", "ream", "m-smoe-standard", "hc-smoe-standard")
_MERGES = {"m-smoe-standard": dict(similarity="router-logits"),
           "hc-smoe-standard": dict(similarity="expert-output", grouping="hierarchical"),
           "ream": dict(similarity="expert-output", grouping="ream", max_group_size=REAM_GROUP_SIZE, router="dominant")}


def check_streamed_methods(methods) -> None:
    other = [m for m in methods if m not in STREAMED_METHODS]
    if other:
        raise ValueError(f"larger than memory, compare evaluates plain (standard-form) checkpoints one layer at a time: "
                         f"{', '.join(other)} cannot be run so; choose from {', '.join(STREAMED_METHODS)} (m-smoe-standard "
                         "and hc-smoe-standard are the merges in the standard form)")


def reduce_checkpoint(path, out, batches, method: str, num_keep: int, max_memory=None, dtype=None,
                      offload_dir=None) -> Path:
    """The checkpoint `path` reduced to num_keep experts per layer by `method` (STREAMED_METHODS), written to `out`
    in the standard form, layer by layer."""
    common = dict(max_memory=max_memory, offload_dir=offload_dir, dtype=dtype, progress=False)
    if method in ("reap", "frequency"):
        return prune_checkpoint(path, out, batches, num_experts=num_keep, method=method, **common)
    return merge_checkpoint(path, out, batches, num_keep, globally=False, format="standard", **_MERGES[method],
                            **common).path


def _expert_parameters(path, dtype) -> int:
    """Expert parameters of the checkpoint `path`, from its config (a skeleton on the meta device)."""
    source = SourceCheckpoint(path)
    return expert_parameters(build_skeleton(source.config, dtype or torch.float32))


def compare_checkpoint(path, batches, windows: torch.Tensor, methods=STREAMED_METHODS, ratios=(0.25, 0.5),
                       scratch=None, max_memory=None, dtype: torch.dtype | None = None, progress: bool = True) -> dict:
    """compare.compare_methods for a checkpoint directory larger than memory (module docstring): {"experts": E,
    "kd_steps": 0, "streamed": True, "rows": [...]}, a row for the full model and one per (ratio, method) with the
    same fields. scratch: where each reduced checkpoint and the offloaded hidden states are written and removed
    (default: the system's temporary directory); max_memory, dtype: as merge_checkpoint."""
    methods, ratios = list(methods), [float(r) for r in ratios]
    check_compare(methods, ratios)
    check_streamed_methods(methods)
    source = SourceCheckpoint(path)
    e = moe_layers(build_skeleton(source.config, torch.float32))[0].num_experts
    full_params = _expert_parameters(path, dtype)

    def evaluate(checkpoint, where) -> float:
        return streamed_perplexity(checkpoint, windows, max_memory=max_memory, offload_dir=where, dtype=dtype,
                                   progress=False)

    with scratch_directory(scratch or tempfile.gettempdir(), ".mcsmoe-compare-") as where:
        rows = [{"method": "full", "ratio": 0.0, "experts": e, "expert_params": full_params, "expert_share": 1.0,
                 "form": "original", "perplexity": evaluate(path, where)}]
        jobs = [(r, m) for r in ratios for m in methods]
        for ratio, method in tqdm(jobs, desc="comparing methods layer by layer", disable=not progress):
            num_keep = resolve_count(e, None, ratio)
            reduced = reduce_checkpoint(path, where / "reduced", batches, method, num_keep, max_memory, dtype, where)
            params = _expert_parameters(reduced, dtype)
            rows.append({"method": method, "ratio": ratio, "experts": num_keep, "expert_params": params,
                         "expert_share": params / full_params, "form": "standard",
                         "perplexity": evaluate(reduced, where)})
            shutil.rmtree(reduced)
    return {"experts": e, "kd_steps": 0, "streamed": True, "rows": rows}

