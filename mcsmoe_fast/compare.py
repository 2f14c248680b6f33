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
  m-smoe-standard, hc-smoe-standard   (not in the default list) the same merge written in the standard
             form, router rows fitted on the calibration batches: what the portable format costs
  m-smoe+c, hc-smoe+c, ream+c   (not in the default list) the merge, then compressed (MC-SMoE's second
             step: low rank plus the kept rows of the sparse part, compress.py, with `compress`'s settings)

On a group-limited router (DeepSeek-V3's n_group) ream and the "-standard" forms merge within routing groups,
which the standard form needs (as the streamed comparison does).

The statistics pass collects what all of them need at once (router logits, expert outputs, saliency).
The original model is never changed: merging methods work on copies.

With `kd` (a TrainConfig) every reduced model is then recovered by knowledge distillation with the same
budget (kd.steps optimizer steps on `kd_data`, the package's train(), routers frozen unless the config
says otherwise), the teacher being the input model, and evaluated again: one-shot and after-KD numbers
side by side. A standard-form method is distilled in its standard form (what would be served).

Every row's size is its expert parameters (footprint.py) as a share of the input model's, so a compressed
merge sits left of the plain merge it came from. With `harness` (a function of a model returning
{"task/metric": value}, e.g. lm-eval tasks through tasks/harness.py) every model is scored by it too,
one-shot and after KD.
"""
from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from .calibrate import collect_routing_stats
from .checkpoint import to_standard
from .checkpoint.atomic import write_text_atomic
from .compress import CompressOptions, compress_experts
from .footprint import expert_parameters
from .hooks import eval_mode
from .merge import merge_experts
from .models import moe_layers
from .models.config_fields import expert_count_fields, routing_groups
from .prune import (check_expert_count, check_prune, check_routing_group_counts, merged_or_compressed, prune_experts,
                    resolve_count)
from .ream import REAM_GROUP_SIZE, ream_experts
from .train import TrainConfig, train
from .train.text import lm_batch, perplexity

COMPARE_METHODS = ("m-smoe", "hc-smoe", "reap", "ream", "frequency")  # the default list
STANDARD_SUFFIX = "-standard"
COMPRESSED_SUFFIX = "+c"  # a merge, then compressed
MERGE_BASES = ("m-smoe", "hc-smoe")  # the merges with an exact form, shared by their other forms
KNOWN_METHODS = COMPARE_METHODS + ("m-smoe-standard", "hc-smoe-standard", "m-smoe+c", "hc-smoe+c", "ream+c")


def check_compare(methods, ratios, kd: TrainConfig | None = None, kd_data=None, compress=None) -> None:
    unknown = [m for m in methods if m not in KNOWN_METHODS]
    if unknown or not methods:
        raise ValueError(f"methods: unknown or none {unknown}; choose from {', '.join(KNOWN_METHODS)}")
    if compress is not None and not isinstance(compress, CompressOptions):
        raise ValueError(f"compress must be a CompressOptions (rank, keep_ratio, importance, svd), got {compress!r}")
    if compress is not None and compress.importance == "gradient":
        raise ValueError("compress.importance='gradient' prunes during fine-tuning; a comparison compresses one-shot: "
                         "choose weight or activation")
    bad = [r for r in ratios if not 0 < r < 1]
    if bad or not ratios:
        raise ValueError(f"ratios (shares of experts removed) must be in (0, 1), got {list(ratios)}")
    if kd is not None and (kd_data is None or len(kd_data) < kd.batch_size):
        have = "none" if kd_data is None else f"{len(kd_data)} examples"
        raise ValueError(f"KD recovery needs kd_data with at least one batch of {kd.batch_size} windows, got {have}")


def merged_model(model: nn.Module, stats, method: str, num_keep: int, within_routing_groups: bool = False) -> nn.Module:
    """A copy of the model merged to num_keep experts per layer by m-smoe or hc-smoe (exact form);
    within_routing_groups: every group inside one routing group of a group-limited router (merge_experts)."""
    options = dict(similarity="router-logits") if method == "m-smoe" else dict(similarity="expert-output",
                                                                              grouping="hierarchical")
    reduced = copy.deepcopy(model)
    merge_experts(reduced, stats, num_keep, globally=False, progress=False, within_routing_groups=within_routing_groups,
                  **options)
    return reduced


def ream_model(model: nn.Module, stats, num_keep: int) -> nn.Module:
    """A copy of the model merged to num_keep experts per layer REAM's way, on a group-limited router within its
    routing groups, each merged on its own: what the standard form needs, and what the streamed standard merge does."""
    reduced = copy.deepcopy(model)
    ream_experts(reduced, stats, num_experts=num_keep, within_routing_groups=True, progress=False)
    return reduced


def merge_key(model: nn.Module, method: str) -> tuple[str, bool] | None:
    """The exact merge `method` starts from, (m-smoe or hc-smoe, within routing groups); None for pruning and REAM.
    A "-standard" form on a group-limited router (DeepSeek-V3's n_group) starts from a merge within routing groups,
    which the standard checkpoint needs (as the streamed standard merge does); every other form from the plain one."""
    base = _base(method)
    if base not in MERGE_BASES:
        return None
    return base, method.endswith(STANDARD_SUFFIX) and routing_groups(model.config) > 1


def compressed_model(reduced: nn.Module, compress: CompressOptions, batches=None) -> nn.Module:
    """`reduced` compressed in place with `compress`'s settings; activation importance measures the input norms
    of the reduced model's own slots on the calibration batches."""
    stats = None
    if compress.importance == "activation":
        stats = collect_routing_stats(reduced, batches, input_norms=True, progress=False)
    compress_experts(reduced, rank=compress.rank, keep_ratio=compress.keep_ratio, importance=compress.importance,
                     stats=stats, svd=compress.svd, progress=False)
    return reduced


def reduced_model(model: nn.Module, stats, method: str, num_keep: int, batches=None,
                  merged: nn.Module | None = None, compress: CompressOptions | None = None,
                  reuse: bool = False) -> tuple[nn.Module, str]:
    """(the model reduced to num_keep experts per layer by `method`, the form it is evaluated in).
    `merged`: the exact merge the method starts from (merge_key), when already made; reuse: no later form needs
    `merged`, so it is changed or returned itself instead of copied. `compress`: the settings of the "+c" methods
    (default CompressOptions())."""
    key = merge_key(model, method)
    if merged is None and key is not None:
        merged, reuse = merged_model(model, stats, key[0], num_keep, key[1]), True
    if method.endswith(COMPRESSED_SUFFIX):
        if merged is not None:
            reduced, form = (merged if reuse else copy.deepcopy(merged)), "exact"
        else:
            reduced, form = reduced_model(model, stats, _base(method), num_keep, batches)
        return compressed_model(reduced, compress or CompressOptions(), batches), f"{form}, compressed"
    if method in ("reap", "frequency"):
        return prune_experts(model, stats, num_experts=num_keep, method=method), "standard"
    if method == "ream":
        return to_standard(ream_model(model, stats, num_keep), router="dominant"), "standard"
    if method.endswith(STANDARD_SUFFIX):
        return to_standard(merged, router="fitted" if batches is not None else "dominant", batches=batches), "standard"
    return (merged if reuse else copy.deepcopy(merged)), "exact"


def model_copies(methods, kd: bool = False) -> int:
    """The most models of the input model's size that compare_methods holds at once besides it: the evaluated
    copy and the exact merge (or REAM's merge) it is made from, one more exact merge kept for its other forms when a
    "-standard" or "+c" method is listed, and with KD the student's gradients and AdamW's two moments."""
    kept = any(m.endswith((STANDARD_SUFFIX, COMPRESSED_SUFFIX)) for m in methods)
    return 2 + kept + (3 if kd else 0)


def recover(student: nn.Module, teacher: nn.Module, kd_data, kd: TrainConfig, collate_fn=lm_batch) -> nn.Module:
    """KD recovery of `student` in place: kd.steps optimizer steps of the package's train() on kd_data,
    `teacher`'s logits as the soft targets (no evaluation or checkpoints in between). Every parameter of the
    student is trained but the routers (unless kd.train_routers), whatever a copy inherited; the teacher
    comes back with its requires_grad flags and every module's mode as they were (train() freezes it)."""
    flags = [p.requires_grad for p in teacher.parameters()]
    student.requires_grad_(True)
    try:
        with eval_mode(teacher):
            train(student, kd_data, replace(kd, eval_every=0), collate_fn=collate_fn, teacher=teacher, progress=False)
    finally:
        for p, flag in zip(teacher.parameters(), flags):
            p.requires_grad_(flag)
    return student.eval()


def check_counts(config, layers, methods, ratios) -> None:
    """The expert count of every (ratio, method), from the config and the MoE layers' views alone (no weights: the
    streamed comparison checks a checkpoint's skeleton with it): at least one expert kept; for the methods
    evaluated in the standard form (reap, frequency, ream, "-standard") what it needs (prune.check_prune's counts:
    at most E, at least top_k, on a group-limited router the same number in every routing group, at least 2); for
    REAM groups of at most REAM_GROUP_SIZE experts that hold every expert."""
    if not layers:
        raise ValueError("the model has no MoE layer: there are no experts to compare methods on")
    e, standard = layers[0].num_experts, _standard_forms(methods)
    if standard:
        expert_count_fields(config)
    for ratio in ratios:
        num_keep = resolve_count(e, None, ratio)
        if num_keep < 1:
            raise ValueError(f"ratios: {ratio} removes all {e} experts of a layer")
        if standard:
            check_expert_count(layers, num_keep)
            top_k = max(layer.top_k for layer in layers)
            if top_k > num_keep:
                raise ValueError(f"ratios: {ratio} keeps {num_keep} of {e} experts, fewer than the top_k={top_k} "
                                 f"experts each token uses, which the standard form needs; keep at least {top_k}")
            check_routing_group_counts(config, layers, num_keep)
        if "ream" in {_base(m) for m in methods} and num_keep * REAM_GROUP_SIZE < e:
            raise ValueError(f"ratios: {ratio} leaves {num_keep} REAM groups of at most {REAM_GROUP_SIZE} experts, "
                             f"fewer than the {e} experts of a layer")


def refuse_encoder_decoder(is_encoder_decoder: bool, what: str) -> None:
    """compare measures perplexity on text windows, a causal LM's (train.text.perplexity): an encoder-decoder model
    (Switch) is refused before any work; `what` names the model."""
    if is_encoder_decoder:
        raise ValueError(f"compare measures perplexity on text windows (causal LMs); {what} is an encoder-decoder "
                         "model: merge it with `mcsmoe-fast merge` and evaluate the merges with "
                         "`mcsmoe-fast eval --task ...`")


def check_feasible(model: nn.Module, methods: list[str], ratios: list[float]) -> None:
    """Every (ratio, method) can run on `model`: refused before the statistics pass and the first row, not after
    hours of rows that would then be lost. An encoder-decoder model (refuse_encoder_decoder), check_counts, and for
    the standard forms prune.check_prune's refusal of merged, compressed or masked layers. A model already merged,
    compressed or masked is refused for every method: its rows would count the removed share from the router's
    experts, not from what the model holds."""
    refuse_encoder_decoder(getattr(model.config, "is_encoder_decoder", False), type(model).__name__)
    layers = moe_layers(model)
    for layer in layers:
        if layer.logit_mask() is not None or merged_or_compressed(layer):
            raise ValueError(f"layer {layer.name!r} is merged, compressed or masked: the model is an mcsmoe-fast "
                             "checkpoint; compare the original model it was made from")
    check_counts(model.config, layers, methods, ratios)
    if _standard_forms(methods):
        for ratio in ratios:
            check_prune(model, resolve_count(layers[0].num_experts, None, ratio))


def _standard_forms(methods) -> bool:
    """Whether a method is evaluated in the standard form (M experts, M router rows)."""
    return any(_base(m) in ("reap", "frequency", "ream") or m.endswith(STANDARD_SUFFIX) for m in methods)


def _base(method: str) -> str:
    """The merge a "-standard" or "+c" method starts from (the method itself otherwise)."""
    for suffix in (STANDARD_SUFFIX, COMPRESSED_SUFFIX):
        if method.endswith(suffix):
            return method[: -len(suffix)]
    return method


def _scores(model: nn.Module, windows, harness, suffix: str = "") -> dict:
    scores = {f"perplexity{suffix}": perplexity(model, windows)}
    if harness is not None:
        scores[f"lm_eval{suffix}"] = harness(model)
    return scores


def compare_methods(model: nn.Module, batches, windows: torch.Tensor, methods=COMPARE_METHODS,
                    ratios=(0.25, 0.5), progress: bool = True, kd: TrainConfig | None = None, kd_data=None,
                    collate_fn=lm_batch, compress: CompressOptions | None = None, harness=None,
                    on_row: Callable[[dict], None] | None = None) -> dict:
    """{"experts": E, "kd_steps": N, "rows": [...]} with one row for the full model and one per (ratio,
    method): method, ratio, experts kept, expert_params and expert_share (the share of the input model's
    expert parameters), form, perplexity on `windows` [N, L]. `batches`: the calibration input dicts (any iterable, as
    for collect_routing_stats; taken as a list once, since the statistics pass, the fitted router rows and activation
    importance each read them).
    With `kd` (a TrainConfig: steps, batch size, learning rate, ...) and `kd_data` (a dataset of training
    examples for `collate_fn`, by default token windows), each reduced model is also recovered by KD from
    `model` (recover()) and the row gains perplexity_kd and kd_steps; kd_steps is 0 without KD.
    `compress`: the settings of the "+c" methods (CompressOptions; default rank 32, keep 10%, weight importance).
    `harness`: model -> {"task/metric": value}; every row then has lm_eval (and lm_eval_kd after KD).
    `on_row(result so far)` after each row (the CLI writes the tables then, so a late failure loses no finished row)."""
    methods, ratios = list(methods), [float(r) for r in ratios]
    check_compare(methods, ratios, kd, kd_data, compress)
    check_feasible(model, methods, ratios)
    batches = list(batches)  # read by the statistics pass, the fitted rows and activation importance: never used up
    e = moe_layers(model)[0].num_experts
    full_params = expert_parameters(model)
    stats = collect_routing_stats(model, batches, bases=("router-logits", "feature", "expert-output"),
                                  saliency="reap", progress=progress)
    rows = [{"method": "full", "ratio": 0.0, "experts": e, "expert_params": full_params, "expert_share": 1.0,
             "form": "original", **_scores(model, windows, harness)}]
    result = {"experts": e, "kd_steps": kd.steps if kd is not None else 0, "rows": rows}
    if on_row is not None:
        on_row(result)
    jobs = [(r, m) for r in ratios for m in methods]
    merges: dict = {}  # (ratio, merge_key) -> the one-shot exact merge, shared with its other forms
    for i, (ratio, method) in enumerate(tqdm(jobs, desc="comparing methods", disable=not progress)):
        num_keep, source = resolve_count(e, None, ratio), merge_key(model, method)
        key = (ratio, source)
        if source is not None and key not in merges:
            merges[key] = merged_model(model, stats, source[0], num_keep, source[1])
        last = all((r, merge_key(model, m)) != key for r, m in jobs[i + 1:])  # no later form starts from it
        merged = merges.pop(key, None) if last else merges.get(key)
        reduced, form = reduced_model(model, stats, method, num_keep, batches, merged, compress, reuse=last)
        params = expert_parameters(reduced)
        row = {"method": method, "ratio": ratio, "experts": num_keep, "expert_params": params,
               "expert_share": params / full_params, "form": form, **_scores(reduced, windows, harness)}
        if kd is not None:
            recover(reduced, model, kd_data, kd, collate_fn)
            row.update(kd_steps=kd.steps, **_scores(reduced, windows, harness, "_kd"))
        rows.append(row)
        del reduced, merged  # before the next row's models are made
        if on_row is not None:
            on_row(result)
    return result


def _ppl(value) -> str:
    if value is None:
        return "-"
    return "nan" if math.isnan(value) else f"{value:.3f}" if math.isfinite(value) else "inf"


def markdown_table(result: dict) -> str:
    kd = result.get("kd_steps", 0)
    tasks = list(result["rows"][0].get("lm_eval", {}))
    head = "| method | experts removed | experts kept | expert params | form | perplexity |"
    if kd:
        head += f" after KD ({kd} steps) |"
    for task in tasks:
        head += f" {task} |" + (" after KD |" if kd else "")
    lines = [head, "|---" * head.count(" |") + "|"]
    for r in result["rows"]:
        removed = 1 - r["experts"] / result["experts"]  # what was removed: E - round(ratio E) experts are kept
        line = (f"| {r['method']} | {removed:.0%} | {r['experts']} | {r['expert_share']:.1%} | {r['form']} "
                f"| {_ppl(r['perplexity'])} |")
        if kd:
            line += f" {_ppl(r.get('perplexity_kd'))} |"
        for task in tasks:
            line += f" {_score(r['lm_eval'].get(task))} |"
            if kd:
                line += f" {_score(r.get('lm_eval_kd', {}).get(task))} |"
        lines.append(line)
    return "\n".join(lines) + "\n"


def _score(value) -> str:
    return "-" if value is None else f"{value:.4f}"


def write_tables(result: dict, out) -> Path:
    """results.json and results.md (the table); an earlier run's perplexity.png is removed (write_results draws
    this run's once its table is complete), so a plot never sits beside another run's rows."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "results.json", json.dumps(result, indent=2) + "\n")
    write_text_atomic(out / "results.md", markdown_table(result))
    (out / "perplexity.png").unlink(missing_ok=True)
    return out


def write_results(result: dict, out) -> Path:
    """write_tables and, where matplotlib is installed, perplexity.png."""
    out = write_tables(result, out)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return out
    kd = result.get("kd_steps", 0)
    panels = [("perplexity", "one-shot")] + ([("perplexity_kd", f"after {kd} KD steps")] if kd else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels) + 1.6, 3.6), squeeze=False)
    full = next(r for r in result["rows"] if r["method"] == "full")
    methods = list(dict.fromkeys(r["method"] for r in result["rows"] if r["method"] != "full"))
    for ax, (key, title) in zip(axes[0], panels):
        ax.axhline(full["perplexity"], color="black", linestyle="--", label="full model")
        for method in methods:
            pts = sorted((r["expert_share"], r[key]) for r in result["rows"] if r["method"] == method)
            ax.plot(*zip(*pts), marker="o", label=method)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("share of expert parameters kept")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("perplexity")
    axes[0][-1].legend(loc="upper left", bbox_to_anchor=(1.02, 1), fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "perplexity.png", dpi=120)
    plt.close(fig)
    return out
