"""The field's expert-reduction methods on one model, from one statistics pass, evaluated the same way
(issue 21, minimal): M-SMoE, HC-SMoE, REAP, REAM-style merging and frequency pruning at given ratios of
experts removed, perplexity on held-out text windows.

  m-smoe     dominant experts by usage, router-logit similarity, aligned, frequency-weighted (merge.py);
             evaluated in the exact (aliased) form: the router still scores all E experts
  hc-smoe    hierarchical clustering (average linkage) on expert-output similarity, aligned,
             frequency-weighted; exact form
  reap       REAP pruning (prune.py); standard form (M experts, M router rows)
  frequency  pruning of the least used experts; standard form
  ream       REAM-style merging (ream.py); standard form, centroid router rows

The statistics pass collects what all of them need at once (router logits, expert outputs, saliency).
The original model is never changed: merging methods work on copies.
"""
from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from .calibrate import collect_routing_stats
from .checkpoint import to_standard
from .merge import merge_experts
from .models import moe_layers
from .prune import prune_experts, resolve_count
from .ream import ream_experts
from .train.text import perplexity

COMPARE_METHODS = ("m-smoe", "hc-smoe", "reap", "ream", "frequency")


def check_compare(methods, ratios) -> None:
    unknown = [m for m in methods if m not in COMPARE_METHODS]
    if unknown or not methods:
        raise ValueError(f"methods: unknown or none {unknown}; choose from {', '.join(COMPARE_METHODS)}")
    bad = [r for r in ratios if not 0 < r < 1]
    if bad or not ratios:
        raise ValueError(f"ratios (shares of experts removed) must be in (0, 1), got {list(ratios)}")


def reduced_model(model: nn.Module, stats, method: str, num_keep: int) -> tuple[nn.Module, str]:
    """(the model reduced to num_keep experts per layer by `method`, the form it is evaluated in)."""
    if method in ("reap", "frequency"):
        return prune_experts(model, stats, num_experts=num_keep, method=method), "standard"
    reduced = copy.deepcopy(model)
    if method == "ream":
        ream_experts(reduced, stats, num_experts=num_keep, progress=False)
        return to_standard(reduced, router="dominant"), "standard"
    options = dict(similarity="router-logits") if method == "m-smoe" else dict(similarity="expert-output",
                                                                              grouping="hierarchical")
    merge_experts(reduced, stats, num_keep, globally=False, progress=False, **options)
    return reduced, "exact"


def compare_methods(model: nn.Module, batches, windows: torch.Tensor, methods=COMPARE_METHODS,
                    ratios=(0.25, 0.5), progress: bool = True) -> dict:
    """{"experts": E, "rows": [...]} with one row for the full model and one per (ratio, method): method,
    ratio, experts kept, expert share (kept / E), form, perplexity on `windows` [N, L]."""
    methods, ratios = list(methods), [float(r) for r in ratios]
    check_compare(methods, ratios)
    e = moe_layers(model)[0].num_experts
    stats = collect_routing_stats(model, batches, bases=("router-logits", "feature", "expert-output"),
                                  saliency="reap", progress=progress)
    rows = [{"method": "full", "ratio": 0.0, "experts": e, "expert_share": 1.0, "form": "original",
             "perplexity": perplexity(model, windows)}]
    jobs = [(r, m) for r in ratios for m in methods]
    for ratio, method in tqdm(jobs, desc="comparing methods", disable=not progress):
        num_keep = resolve_count(e, None, ratio)
        reduced, form = reduced_model(model, stats, method, num_keep)
        rows.append({"method": method, "ratio": ratio, "experts": num_keep, "expert_share": num_keep / e,
                     "form": form, "perplexity": perplexity(reduced, windows)})
    return {"experts": e, "rows": rows}


def markdown_table(result: dict) -> str:
    lines = ["| method | experts removed | experts kept | form | perplexity |", "|---|---|---|---|---|"]
    for r in result["rows"]:
        ppl = f"{r['perplexity']:.3f}" if math.isfinite(r["perplexity"]) else "inf"
        lines.append(f"| {r['method']} | {r['ratio']:.0%} | {r['experts']} | {r['form']} | {ppl} |")
    return "\n".join(lines) + "\n"


def write_results(result: dict, out) -> Path:
    """results.json, results.md (the table) and, where matplotlib is installed, perplexity.png."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "results.md").write_text(markdown_table(result))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return out
    fig, ax = plt.subplots(figsize=(5, 3.5))
    full = next(r for r in result["rows"] if r["method"] == "full")
    ax.axhline(full["perplexity"], color="gray", linestyle="--", label="full model")
    for method in dict.fromkeys(r["method"] for r in result["rows"] if r["method"] != "full"):
        pts = sorted((r["expert_share"], r["perplexity"]) for r in result["rows"] if r["method"] == method)
        ax.plot(*zip(*pts), marker="o", label=method)
    ax.set_xlabel("share of expert parameters kept")
    ax.set_ylabel("perplexity")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "perplexity.png", dpi=120)
    plt.close(fig)
    return out
