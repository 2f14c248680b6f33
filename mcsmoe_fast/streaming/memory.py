"""Memory: what the process holds now, what a model needs, and how a budget is split.

A streaming run holds one decoder layer (plus the temporaries of merging it, and with REAP saliency the
expert outputs of one batch's routed tokens), the carried hidden states of the calibration tokens, and at
most one output shard being assembled. `plan_memory` decides from `max_memory` whether the hidden states
stay in memory or go to a file, how large output shards are, and how many bytes of weight-matching cost
matrices are built at once.
"""
from __future__ import annotations

import os
import re
import resource
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from ..checkpoint.weight_files import parse_size

DEFAULT_SHARD_SIZE = 2 * 10**9  # bytes per output shard without a budget (transformers uses 5 GB)
MIN_SHARD_SIZE = 10**6
ACCUMULATOR_CHUNK_TOKENS = 1024  # tokens the statistics pass's accumulator runs through the experts at once


def rss_bytes() -> int:
    """Resident memory of this process now (/proc/self/statm; the peak so far where /proc is absent)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return peak_rss_bytes()


def _glibc():
    """glibc's malloc controls (False where the C library is not glibc)."""
    global _libc
    if _libc is None:
        import ctypes
        import ctypes.util

        try:
            _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _libc.malloc_trim.argtypes = [ctypes.c_size_t]
            _libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        except (OSError, AttributeError):  # not glibc: nothing to do
            _libc = False
    return _libc


def trim_heap() -> None:
    """Hand the heap's free pages back to the system (glibc's malloc_trim) between layers: freed
    temporaries of one layer would otherwise stay resident and add up with the next layer's."""
    if _glibc():
        _libc.malloc_trim(0)


M_MMAP_THRESHOLD = -3  # glibc mallopt parameter
MMAP_THRESHOLD = 1 << 20


def fix_mmap_threshold() -> bool:
    """Allocations above 1 MiB mapped on their own and unmapped when freed, for the rest of the process (glibc's
    mallopt; False where it is not glibc). glibc raises its threshold to the size of each large block freed, so
    a layer's freed temporaries (tens of MB) are then carved from the heap and stay resident: the same streamed
    merge's peak RSS varied by 60 MB from run to run and a 12-layer FP8 merge peaked at 952-1033 MB against
    861 and 852 MB with the threshold fixed (docs/quantized.md). Called when a run keeps a memory budget."""
    return bool(_glibc()) and _libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1


_libc = None


def peak_rss_bytes() -> int:
    """Peak resident memory of this process so far (ru_maxrss, kilobytes on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def human(n: int) -> str:
    """Bytes for people: 812MiB, 1.5GiB, 3KiB."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f}{unit}" if n < 10 * size else f"{n / size:.0f}{unit}"
    return f"{n}B"


@dataclass
class MemoryPlan:
    budget: int | None  # max_memory in bytes (None: no limit)
    layer_bytes: int  # the largest decoder layer in the compute dtype
    activation_bytes: int  # the carried hidden states of every calibration token
    offload: bool  # hidden states go to a file
    shard_size: int  # bytes per output shard
    matching_bytes: int  # weight-matching cost matrices built at once (match_permutations memory_budget)
    quantized_bytes: int = 0  # a quantized source: dequantization and error-report copies (requantization_bytes)
    saliency_bytes: int = 0  # REAP saliency in the statistics pass: one batch's routed rows (saliency_bytes)
    forward_bytes: int = 0  # the temporaries of one batch's forward through a layer (forward_bytes)
    similarity_bytes: int = 0  # the weight similarity's float64 chunks (grouping.weight_gram_bytes)

    @property
    def layer_floor(self) -> int:
        """What one layer needs while it is merged: its weights (permuted in place), merged slots of at
        most the same size, the cost matrices, for a quantized source what reading and re-quantizing it
        add, what REAP's saliency holds, one batch's forward temporaries and the weight similarity's chunks (a rough
        floor; below it the budget cannot be kept)."""
        return (2 * self.layer_bytes + self.matching_bytes + self.quantized_bytes + self.saliency_bytes
                + self.forward_bytes + self.similarity_bytes)


def warn_below_floor(plan: MemoryPlan, doing: str) -> None:
    """Warn (once the plan is made) when the budget is below what `doing` one layer needs: the run goes on above it.
    The warning names the caller's line: the first frame outside this package and torch (torch.no_grad wraps the
    streamed entry points)."""
    if plan.budget is not None and plan.layer_floor > plan.budget:
        warnings.warn(f"max_memory {human(plan.budget)} is below what {doing} one layer needs (about "
                      f"{human(plan.layer_floor)}); the run continues above the budget", stacklevel=_outside_level())


def _outside_level() -> int:
    """warnings.warn's stacklevel, called from a function called here, of the first frame outside mcsmoe_fast / torch."""
    inside = tuple(str(Path(m.__file__).resolve().parent) for m in (torch, __import__("mcsmoe_fast")))
    frame, level = sys._getframe(2), 2
    while frame is not None and str(Path(frame.f_code.co_filename).resolve()).startswith(inside):
        frame, level = frame.f_back, level + 1
    return level


def shard_size_for(max_memory, max_shard_size=None) -> int:
    """Bytes per output shard: max_shard_size when given, else max_memory / 8 between 1 MB and 2 GB
    (2 GB without a budget)."""
    shard = parse_size(max_shard_size, "max_shard_size")
    if shard is not None:
        return shard
    budget = parse_size(max_memory, "max_memory")
    return DEFAULT_SHARD_SIZE if budget is None else min(DEFAULT_SHARD_SIZE, max(MIN_SHARD_SIZE, budget // 8))


def plan_memory(budget, layer_bytes: int, expert_matrix_bytes: int, activation_bytes: int,
                shard_size=None, quantized_bytes: int = 0, writes: bool = True, saliency_bytes: int = 0,
                forward_bytes: int = 0, similarity_bytes: int = 0) -> MemoryPlan:
    """Split `budget` (bytes, "1GB", or None) between one layer (layer_bytes: the largest decoder layer's
    tensors in the compute dtype), the output buffer and the hidden states; expert_matrix_bytes is one
    ff x ff cost matrix (float32); quantized_bytes what a quantized source adds to the layer
    (requantization_bytes); writes=False: nothing is written (a perplexity), no output shard (size 0);
    saliency_bytes what REAP's saliency adds to the layer (saliency_bytes); forward_bytes one batch's forward
    temporaries (forward_bytes); similarity_bytes the weight similarity's chunks (grouping.weight_gram_bytes)."""
    from ..permute import DEFAULT_MEMORY_BUDGET

    shard_size = shard_size_for(budget, shard_size) if writes else 0
    budget = parse_size(budget, "max_memory")
    if budget is None:
        return MemoryPlan(None, layer_bytes, activation_bytes, False, shard_size, DEFAULT_MEMORY_BUDGET,
                          quantized_bytes, saliency_bytes, forward_bytes, similarity_bytes)
    fix_mmap_threshold()  # keeping a budget: freed temporaries go back to the system
    matching = max(expert_matrix_bytes, min(DEFAULT_MEMORY_BUDGET, budget // 8))
    plan = MemoryPlan(budget, layer_bytes, activation_bytes, False, shard_size, matching, quantized_bytes,
                      saliency_bytes, forward_bytes, similarity_bytes)
    plan.offload = activation_bytes > budget - plan.layer_floor - shard_size
    return plan


def requantization_bytes(slot_numel: int, bank_numel: int, matrix_numel: int, sample_bytes: int,
                         report: str | None) -> int:
    """What a quantized source adds to one layer's floor. Reading: the float32 temporary of one dequantized
    matrix (quant/files.py dequantizes one expert at a time). Re-quantizing with the error report
    (report "exact" or "standard"; None: written dequantized, no report): the calibration samples the
    ErrorProbe keeps (`sample_bytes`) and the report's float32 copies: one merged slot and its re-quantized
    values at a time for the exact format (streaming/layer_error.py), the whole re-quantized banks twice
    for the standard format (the written hub tensors' values and the banks read back from them). Numel:
    one slot's w_in + w_out, the layer's banks, the largest matrix."""
    if report not in (None, "exact", "standard"):
        raise ValueError(f"report: expected None, 'exact' or 'standard', got {report!r}")
    reading = 4 * matrix_numel
    if report is None:
        return reading
    return reading + sample_bytes + 2 * 4 * (bank_numel if report == "standard" else slot_numel)


def stream_requantization_bytes(s, report: str | None, fused: bool) -> int:
    """requantization_bytes of a streamed run (`s`: the Stream of a quantized source) from its largest MoE layer;
    the probe's samples are held for one layer at a time when `fused` (merged in the statistics pass), else for
    every chosen layer until the merge pass."""
    from .quantized import PROBE_TOKENS

    slot = bank = matrix = 0
    for view in s.views.values():
        shapes = [s.shapes[n] for n in (*view.stored_tensors().w_in, *view.stored_tensors().w_out)]
        numel = sum(_numel(shape) for shape in shapes)
        bank, slot = max(bank, numel), max(slot, numel // max(view.num_experts, 1))
        matrix = max(matrix, max((_numel(shape[-2:]) for shape in shapes), default=0))
    top_k = getattr(s.model.config, "num_experts_per_tok", None) or 8
    sample = PROBE_TOKENS * (s.model.config.hidden_size * s.dtype.itemsize + 16 * top_k)
    return requantization_bytes(slot, bank, matrix, sample * (1 if fused else len(s.chosen)), report)


def saliency_bytes(s) -> int:
    """What REAP's saliency (`s`: a Stream whose statistics pass collects it: s.saliency set) holds besides the layer
    while the largest calibration batch passes a chosen MoE layer (calibrate's accumulator): every routed
    (token, expert) pair of the batch as a row of d values, and ACCUMULATOR_CHUNK_TOKENS x top_k of those rows at a
    time through the fused expert FFN: its gathered input, output and combined rows (3 d), intermediates (at most
    3 ff: gate, up, activation) and the output's float64 copy for the norms (8 d bytes a row). 0 without saliency."""
    if s.saliency is None:
        return 0
    tokens = max((b.input_ids.numel() for b in s.batches), default=0)
    most = 0
    for view in (v for v in s.views.values() if v.name in s.chosen):
        k, d, ff = view.top_k, view.hidden_size, view.intermediate_size
        rows = min(tokens, ACCUMULATOR_CHUNK_TOKENS) * k
        most = max(most, (tokens * k * d + rows * (3 * d + 3 * ff)) * s.dtype.itemsize + rows * d * 8)
    return most


def stream_forward_bytes(s) -> int:
    """forward_bytes of a streamed run's largest calibration batch (`s`: a Stream)."""
    return forward_bytes(s.model.config, [tuple(b.input_ids.shape) for b in s.batches], s.dtype)


def token_forward_bytes(config, length: int, dtype: torch.dtype) -> int:
    """Bytes one token of a window of `length` tokens holds in a decoder layer's forward, at most (an estimate
    from the config): the attention's projections, norms and residuals (8 x hidden), its scores and
    probabilities in float32 (2 x heads x length), the routed rows in and out of the fused expert FFN
    (2 x top_k x hidden) and the FFN's intermediates, gate, up and activation (3 x the larger of the dense
    width and top_k x the expert width + the shared experts'). Measured on a Mixtral (hidden 256, expert
    width 1024, top-2, 4 heads, windows of 256, float32): 35 KB a token; this gives 45 KB."""
    hidden = config.hidden_size
    heads = _count(config, ("num_attention_heads", "num_heads"), 1)
    top_k = _count(config, ("num_experts_per_tok", "moe_topk", "top_k"), 1)
    dense = _count(config, ("intermediate_size", "d_ff", "intermediate_size_mlp"), 4 * hidden)
    expert = _count(config, ("moe_intermediate_size",), dense)
    shared = _count(config, ("shared_expert_intermediate_size",), _count(config, ("n_shared_experts",), 0) * expert)
    width = max(dense, top_k * expert + shared)
    return (8 * hidden + 2 * top_k * hidden + 3 * width) * dtype.itemsize + 4 * 2 * heads * length


def _count(config, names: tuple[str, ...], default: int) -> int:
    """The first of the config's fields `names` that is a whole number > 0 (per-layer lists count their largest),
    else `default`: an estimate must not stop a run over a field it cannot read."""
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, (list, tuple)) and value and all(isinstance(v, int) for v in value):
            value = max(value)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return default


def forward_bytes(config, batch_shapes, dtype: torch.dtype) -> int:
    """The temporaries of the largest batch's forward through one decoder layer (batch_shapes: (windows, length)
    of each batch; token_forward_bytes a token)."""
    return max((n * length * token_forward_bytes(config, length, dtype) for n, length in batch_shapes), default=0)


def largest_unit_bytes(shapes: dict, units, dtype: torch.dtype) -> int:
    """Bytes of the largest decoder layer in `dtype`: units (name, module) as skeleton.layer_units gives them, shapes
    {tensor name: shape} as skeleton.tensor_shapes gives them."""
    return max((sum(_numel(shape) for n, shape in shapes.items() if n.startswith(f"{u}.")) for u, _ in units),
               default=0) * dtype.itemsize


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


_EXPERT_LAYER = re.compile(r"(.*?\.(?:layers|block)\.\d+)\.")


def checkpoint_bytes(path, dtype: torch.dtype | None = torch.float32) -> tuple[int, int]:
    """(bytes of every tensor of the safetensors checkpoint at `path` in `dtype` (None: as stored),
    bytes of its largest layer's expert tensors), from the file headers alone. In a `dtype`, an MXFP4 tensor
    (GPT-OSS's X_blocks, two 4-bit values a byte, and X_scales) counts as its dequantized values, as open_model
    holds it: two values of `dtype` per stored byte of the blocks, nothing for the scales."""
    from .source import open_weight_files

    files = open_weight_files(Path(path))
    total, per_layer = 0, {}
    for name, shape in files.shapes.items():
        numel = _numel(shape)
        stored = files.dtypes[name]
        if dtype is None:
            size = numel * stored.itemsize
        elif name.endswith("_blocks") and name.removesuffix("_blocks") + "_scales" in files.shapes:
            size = 2 * numel * dtype.itemsize
        elif name.endswith("_scales") and name.removesuffix("_scales") + "_blocks" in files.shapes:
            size = 0
        else:
            size = numel * (dtype.itemsize if stored.is_floating_point else stored.itemsize)
        total += size
        layer = _EXPERT_LAYER.match(name) if ".experts." in name else None
        if layer is not None:  # "model.layers.3", Switch's "encoder.block.1" / "decoder.block.1"
            per_layer[layer[1]] = per_layer.get(layer[1], 0) + size
    return total, max(per_layer.values(), default=0)


def in_memory_bytes(path, dtype: torch.dtype | None = torch.float32, copies: int = 0) -> int:
    """Estimated peak memory of the in-memory pipeline (open_model -> collect_routing_stats ->
    merge_experts -> save_pretrained) on the checkpoint directory `path`: transformers' loader holds
    the checkpoint's mapped file pages next to the parameters in `dtype` (open_model loads float32),
    and merging the largest layer adds about 2.5x its expert tensors (per-expert weights, permuted
    copies, merged slots). Calibration activations are not counted. Measured on a 3 GB fp32 Mixtral
    (benchmarks/bench_streaming.py): estimate 6.9 GB, peak RSS 6.7 GB. copies: further models of the
    same size held at once (compare: its reduced copies, compare.model_copies). dtype None keeps each tensor's
    stored dtype, but a block-FP8 / MXFP4 checkpoint counts in bfloat16, as open_model dequantizes it by default."""
    from .quantized import checkpoint_format

    path = Path(path).expanduser()
    if dtype is None and checkpoint_format(path) is not None:
        dtype = torch.bfloat16
    stored, _ = checkpoint_bytes(path, None)
    total, layer = checkpoint_bytes(path, dtype)
    return stored + (1 + copies) * total + int(2.5 * layer)


def fits_in_memory(path, budget, dtype: torch.dtype | None = torch.float32, copies: int = 0) -> bool:
    """Whether the in-memory pipeline should fit in `budget` (bytes or "24GB") for the checkpoint
    directory `path` (see in_memory_bytes; copies: the further models it holds). None: no limit, fits.
    A path that is not a local directory (a hub id) counts as fitting: its size cannot be known without
    downloading it."""
    limit = parse_size(budget, "budget")
    if limit is None:
        return True
    path = Path(path).expanduser()
    if not path.is_dir():
        return True
    return in_memory_bytes(path, dtype, copies) <= limit
