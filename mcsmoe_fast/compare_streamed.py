"""`compare` larger than memory: each method at each ratio run by the streamed commands into a scratch checkpoint
(prune_checkpoint for REAP and frequency pruning, merge_checkpoint for the merges: the exact form, the standard form,
or merged then compressed), its perplexity measured by streamed_perplexity, the checkpoint removed; one decoder
layer in memory at a time throughout. The rows are those of compare.compare_methods for the same methods: the same
models, the same expert parameters, the same perplexity (on group-limited routers both merge the standard forms
within routing groups); what either refuses, both refuse before any work.

Every method but ream+c (REAM's output is a standard checkpoint, which the streamed compression does not read);
the compressed merges with weight importance only (activation importance needs the merged model's forward).
KD recovery and lm-eval tasks need the model in memory. Each method collects its own statistics in its own pass
(in memory, one pass serves all of them).
"""
from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .checkpoint import read_section
from .checkpoint.atomic import scratch_directory
from .checkpoint.load import read_config_json
from .compare import COMPRESSED_SUFFIX, STANDARD_SUFFIX, check_compare, check_counts, refuse_encoder_decoder
from .compress import CompressOptions
from .models import moe_layers
from .prune import resolve_count
from .ream import REAM_GROUP_SIZE
from .streaming.perplexity import streamed_perplexity
from .streaming.readers import open_reader
from .streaming.pipeline import merge_checkpoint
from .streaming.prune import prune_checkpoint
from .streaming.source import SUPPORTED_TYPES

STREAMED_METHODS = ("m-smoe", "hc-smoe", "reap", "ream", "frequency", "m-smoe-standard", "hc-smoe-standard",
                    "m-smoe+c", "hc-smoe+c")
_SIMILARITY = {"m-smoe": dict(similarity="router-logits"),
               "hc-smoe": dict(similarity="expert-output", grouping="hierarchical")}


def check_streamed_methods(methods, compress: CompressOptions | None = None) -> None:
    other = [m for m in methods if m not in STREAMED_METHODS]
    if other:
        raise ValueError(f"larger than memory, {', '.join(other)} cannot be compared (REAM's standard output is not "
                         f"compressed layer by layer); choose from {', '.join(STREAMED_METHODS)}")
    if compress is not None and compress.importance != "weight":
        raise ValueError(f"larger than memory, the compressed merges use weight importance (compress_checkpoint); "
                         f"got importance={compress.importance!r}")


def check_checkpoint(path, methods, ratios, dtype: torch.dtype | None = None) -> None:
    """What compare_checkpoint cannot do on the checkpoint directory `path`, refused before any work: an
    encoder-decoder model (compare.refuse_encoder_decoder: no comparison runs it), a model type the layer-by-layer
    forward does not run, this package's merged or compressed checkpoint (the streamed merges and
    pruning read plain transformers checkpoints), and every (ratio, method) whose expert count compare.check_counts
    refuses in memory, checked on the checkpoint's skeleton (no weights read)."""
    path = Path(path).expanduser()
    raw = read_config_json(path)
    model_type = raw.get("model_type") if isinstance(raw, dict) else None
    refuse_encoder_decoder(isinstance(raw, dict) and bool(raw.get("is_encoder_decoder")),
                           f"the {model_type!r} model at {path}")
    if model_type not in SUPPORTED_TYPES:
        raise ValueError(f"{path}: compare larger than memory runs the families the layer-by-layer forward runs "
                         f"({', '.join(SUPPORTED_TYPES)}); a {model_type!r} model is compared in memory only "
                         "(leave out --max-memory or raise it)")
    if read_section(path) is not None:
        raise ValueError(f"{path} is a merged or compressed mcsmoe-fast checkpoint; compare the original model it was "
                         "made from (the streamed merges and pruning read plain transformers checkpoints)")
    model = open_reader(path, dtype).model
    check_counts(model.config, moe_layers(model), methods, ratios)


def reduce_checkpoint(path, out, batches, method: str, num_keep: int, max_memory=None, dtype=None, offload_dir=None,
                      compress: CompressOptions | None = None) -> Path:
    """The checkpoint `path` reduced to num_keep experts per layer by `method` (STREAMED_METHODS), written to `out`
    layer by layer, in the form compare.reduced_model gives it."""
    common = dict(max_memory=max_memory, offload_dir=offload_dir, dtype=dtype, progress=False)
    if method in ("reap", "frequency"):
        return prune_checkpoint(path, out, batches, num_experts=num_keep, method=method, **common)
    if method == "ream":
        return merge_checkpoint(path, out, batches, num_keep, similarity="expert-output", grouping="ream",
                                max_group_size=REAM_GROUP_SIZE, globally=False, format="standard", router="dominant",
                                **common).path
    base = method.removesuffix(STANDARD_SUFFIX).removesuffix(COMPRESSED_SUFFIX)
    form = dict(format="standard") if method.endswith(STANDARD_SUFFIX) else {}
    if method.endswith(COMPRESSED_SUFFIX):
        c = compress or CompressOptions()
        form = dict(compress=dict(rank=c.rank, keep_ratio=c.keep_ratio, svd=c.svd))
    return merge_checkpoint(path, out, batches, num_keep, globally=False, **_SIMILARITY[base], **form, **common).path


def form_of(method: str) -> str:
    """The form compare.reduced_model evaluates `method` in."""
    if method.endswith(COMPRESSED_SUFFIX):
        return "exact, compressed"
    return "exact" if method in _SIMILARITY else "standard"


def compare_checkpoint(path, batches, windows: torch.Tensor, methods=STREAMED_METHODS, ratios=(0.25, 0.5),
                       scratch=None, max_memory=None, dtype: torch.dtype | None = None, progress: bool = True,
                       compress: CompressOptions | None = None, on_row: Callable[[dict], None] | None = None) -> dict:
    """compare.compare_methods for a checkpoint directory larger than memory (module docstring): {"experts": E,
    "kd_steps": 0, "streamed": True, "rows": [...]}, a row for the full model and one per (ratio, method) with the
    same fields. batches: as in compare_methods (any iterable, taken as a list once: each method's pass reads them).
    scratch: where each reduced checkpoint and the offloaded hidden states are written and removed (default: the
    system's temporary directory); max_memory, dtype: as merge_checkpoint; compress: the "+c" methods' settings
    (weight importance); on_row(result so far) after each row, as in compare_methods. What it cannot do is refused
    before the first pass (check_streamed_methods, check_checkpoint)."""
    methods, ratios = list(methods), [float(r) for r in ratios]
    check_compare(methods, ratios, compress=compress)
    check_streamed_methods(methods, compress)
    check_checkpoint(path, methods, ratios, dtype)
    batches = list(batches)  # each method's own statistics pass reads them: an iterator would serve the first only
    source = open_reader(path, dtype)
    e, full_params = source.num_experts(), source.expert_parameters()

    def evaluate(checkpoint, where) -> float:
        return streamed_perplexity(checkpoint, windows, max_memory=max_memory, offload_dir=where, dtype=dtype,
                                   progress=False)

    with scratch_directory(scratch or tempfile.gettempdir(), ".mcsmoe-compare-") as where:
        rows = [{"method": "full", "ratio": 0.0, "experts": e, "expert_params": full_params, "expert_share": 1.0,
                 "form": "original", "perplexity": evaluate(path, where)}]
        result = {"experts": e, "kd_steps": 0, "streamed": True, "rows": rows}
        if on_row is not None:
            on_row(result)
        jobs = [(r, m) for r in ratios for m in methods]
        for ratio, method in tqdm(jobs, desc="comparing methods layer by layer", disable=not progress):
            num_keep = resolve_count(e, None, ratio)
            reduced = reduce_checkpoint(path, where / "reduced", batches, method, num_keep, max_memory, dtype, where,
                                        compress)
            params = open_reader(reduced, dtype).expert_parameters()
            rows.append({"method": method, "ratio": ratio, "experts": num_keep, "expert_params": params,
                         "expert_share": params / full_params, "form": form_of(method),
                         "perplexity": evaluate(reduced, where)})
            shutil.rmtree(reduced)
            if on_row is not None:
                on_row(result)
    return result
