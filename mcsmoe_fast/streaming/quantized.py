"""Quantized checkpoints in the streamed path (block-FP8, MXFP4; quant/): read dequantized, written back in
the input's precision.

Reading: SourceCheckpoint sees the weight files through quant.files.QuantizedFiles, so every tensor a
layer needs arrives dequantized into the working dtype, one layer at a time, whatever its stored parts.
Writing (`QuantizingWriter`, in front of the output's ShardWriter):
- a tensor the source stores quantized under the same name (attention, dense and shared-expert
  projections, the experts of a layer left as it is) is copied through byte for byte, with its scales;
- the expert banks (the merged slots' w_in / w_out, a family's own fused banks) are quantized to the
  source's format: fp8 blocks with the source's block size, scale_fmt and scale dtype; mxfp4 as
  transformers stores GPT-OSS's banks, the transpose of the module's last two dims packed in blocks of 32
  (the merged slots' w_in [G, F, d] as w_in_blocks [G, d, F/32, 16]), so one rule reads every bank back;
- everything else (norms, routers, biases, expert_map) as it is.
The config keeps its quantization_config. `quant.report.drop_quantization` drops it (and the error report)
for a dequantized output.

The error re-quantizing adds (`QuantizingWriter.report`, recorded in config.json under
`mcsmoe_quantization` and in StreamingResult.quantization_error): per merged layer, the relative
(Frobenius) error of each re-quantized bank against the merged bank it was quantized from (the working
dtype's values), and the relative error of the layer's routed-expert output on calibration tokens: the
merged experts run on the first PROBE_TOKENS tokens (padding left out) that reached the layer's experts in the
statistics pass (their hidden states and routing, as the original model routed them: `ErrorProbe`), once with the
merged weights and once with their re-quantized values, both in float32.

`quantize_checkpoint` writes a plain transformers checkpoint in an official quantized layout, atomically (tests and
benchmarks build their inputs with it; it is also how a model gets FP8 for serving).
"""
from __future__ import annotations

import json
import os
import shutil
from functools import partial
from pathlib import Path

import torch

from ..checkpoint.weight_files import ShardWriter
from ..quant import QuantFormat, detect
from ..quant.files import QuantizedFiles
from ..quant.report import ERROR_KEY, describe_error, drop_quantization, summarize
from ..quant.requantize import (LikeSource, check_layout, dequantize_parts, not_converted, quantizable, quantize_tensor,
                                relative_error, stored_scale_dtype)
from .layer_error import layer_error

__all__ = ["describe_error", "dequantize_parts", "quantize_tensor", "relative_error", "quantize_checkpoint",
           "write_quantized", "requantize_saved", "save_requantized", "load_dequantized", "output_writer",
           "record_error", "ErrorProbe", "QuantizingWriter"]

PROBE_TOKENS = 256  # calibration tokens (not padding) per layer the output error is measured on (kept until merged)


def source_format(config: dict) -> QuantFormat | None:
    """The quantized format of a checkpoint's raw config.json (None: not quantized)."""
    return detect(config.get("quantization_config")) if isinstance(config, dict) else None


def checkpoint_format(spec) -> QuantFormat | None:
    """The quantized format of the plain transformers checkpoint directory `spec` (None: not quantized, a
    merged checkpoint of ours, which loads dequantized, or not a local directory); ValueError for an
    unsupported quantization method."""
    from ..sections import MERGE_SECTION

    config = Path(str(spec)).expanduser() / "config.json"
    if not config.is_file():
        return None
    raw = json.loads(config.read_text(encoding="utf-8"))
    return None if not isinstance(raw, dict) or MERGE_SECTION in raw else source_format(raw)


class ErrorProbe:
    """The first `tokens` calibration tokens (padding left out) that reach each chosen MoE layer's experts
    module in the statistics pass: (hidden [T, d], top-k experts [T, k], top-k weights [T, k]), the experts'
    inputs as the original model computes them (a forward pre-hook on `module.experts`, the experts
    contract's forward(hidden, top_k_index, top_k_weights)).

    masks: each calibration batch's padding mask [B, L] (None: every position a token), in the order the
    batches run. A layer's experts see batch j's B x L positions flattened on their j-th call; calls past the
    last batch (the same batches run again through an unmerged layer) add nothing."""

    def __init__(self, views: dict, chosen, masks, tokens: int = PROBE_TOKENS):
        self.tokens, self.samples, self.handles, self.chosen = tokens, {}, [], set(chosen)
        self.masks, self.calls = list(masks), {}
        self.attach(views.values())

    def attach(self, layers) -> None:
        """Hook the experts of the chosen ones of `layers` (views or MoE layers: .name, .module), e.g. those of the
        model accelerate dispatched for the statistics pass."""
        for layer in layers:
            experts = getattr(layer.module, "experts", None)
            if layer.name in self.chosen and isinstance(experts, torch.nn.Module):
                hook = partial(self._take, layer.name)
                self.handles.append(experts.register_forward_pre_hook(hook, with_kwargs=True))

    def _take(self, name, _module, args, kwargs) -> None:
        values = [*args, *kwargs.values()][:3]
        if len(values) < 3 or not all(isinstance(v, torch.Tensor) for v in values):
            return
        hidden, index, weights = values
        if hidden.dim() != 2 or index.dim() != 2 or tuple(weights.shape) != tuple(index.shape):
            return
        call = self.calls[name] = self.calls.get(name, 0) + 1
        have = self.samples.get(name)
        room = self.tokens - (0 if have is None else have[0].shape[0])
        if room <= 0 or call > len(self.masks):
            return
        mask = self.masks[call - 1]
        if mask is not None:
            if mask.numel() != hidden.shape[0]:
                raise ValueError(f"{name}: the experts received {hidden.shape[0]} rows for calibration batch "
                                 f"{call - 1}, whose padding mask has {mask.numel()} positions")
            keep = mask.reshape(-1).to(hidden.device).bool()
            hidden, index, weights = hidden[keep], index[keep], weights[keep]
        take = [t[:room].detach().to("cpu", copy=True) for t in (hidden, index, weights)]
        self.samples[name] = take if have is None else [torch.cat(p) for p in zip(have, take)]

    def close(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


class QuantizingWriter:
    """A ShardWriter that writes quantized tensors in the source's format (module docstring), and measures
    the error re-quantizing the merged slots adds (`report`)."""

    def __init__(self, writer: ShardWriter, files: QuantizedFiles, banks: set[str], views: dict | None = None,
                 probe: ErrorProbe | None = None):
        self.writer, self.files, self.banks, self.probe = writer, files, banks, probe
        self.views = {v.name: v for v in (views or {}).values()}
        self.names: set[str] = set()
        self.scale_dtype = stored_scale_dtype(files)
        self.pending: dict[str, dict] = {}  # merged layer -> {field: (merged tensor, its re-quantized values)}
        self.layers: dict[str, dict] = {}  # merged layer -> its errors

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self.names:
            raise ValueError(f"tensor {name!r} written twice")
        self.names.add(name)
        if self.files.is_quantized(name) and name not in self.banks:  # unchanged: the stored bytes
            parts = self.files.raw(name)
        elif name in self.banks and tensor.is_floating_point():
            parts = quantize_tensor(name, tensor, self.files.format, self.scale_dtype, transpose_mxfp4=True)
        else:
            parts = {name: tensor}
        self._measure(name, tensor, parts)
        for n, t in parts.items():
            self.writer.add(n, t)

    def _measure(self, name: str, tensor: torch.Tensor, parts: dict) -> None:
        """Keep a merged layer's banks (and biases) until its expert_map, the slots' last tensor, comes."""
        layer, _, field = name.rpartition(".experts.")
        if layer not in self.views or field not in ("w_in", "w_out", "b_in", "b_out", "expert_map"):
            return
        slot = self.pending.setdefault(layer, {})
        if field in ("w_in", "w_out") and name in self.banks:
            slot[field] = (tensor, parts)  # dequantized when the layer is measured
        elif field in ("b_in", "b_out"):
            slot[field] = (tensor, tensor)
        elif "w_in" in slot and "w_out" in slot:
            self.layers[layer] = self._layer_error(layer, self.pending.pop(layer), tensor)

    def _layer_error(self, layer: str, slot: dict, expert_map: torch.Tensor) -> dict:
        view = self.views[layer]
        merged = tuple(slot[f][0] if f in slot else None for f in ("w_in", "w_out", "b_in", "b_out"))

        def requantized(j: int) -> tuple[torch.Tensor, torch.Tensor]:  # slot j's re-quantized values, float32
            return tuple(dequantize_parts({n: p[j] for n, p in slot[f][1].items()}, self.files.format, slot[f][0].shape[1:])
                         for f in ("w_in", "w_out"))

        sample = self.probe.samples.pop(layer, None) if self.probe is not None else None
        return layer_error(merged, requantized, expert_map, view.activation, view.activation_args, sample)

    def report(self) -> dict | None:
        """{"format", "layers": {layer: {w_in, w_out, output, tokens}}, "max", "mean"} (None: nothing merged)."""
        if self.probe is not None:
            self.probe.close()
        return summarize(self.files.format.method, self.layers)

    def __getattr__(self, attr):  # finish, flush, bytes_written, ... of the ShardWriter
        return getattr(self.writer, attr)


def output_writer(writer: ShardWriter, source, views: dict, quantized_output: bool, masks, chosen=None):
    """The writer a streamed run writes through: QuantizingWriter when the source is quantized and the
    output keeps its precision, else `writer` itself. Banks: each MoE layer's merged slots (w_in, w_out)
    and, when the source stores them fused and quantized under the model's names, its own banks. The
    layers in `chosen` (default: every MoE layer) get an ErrorProbe for the error report, on the calibration
    batches whose padding masks are `masks`."""
    if not quantized_output or not isinstance(source.files, QuantizedFiles):
        return writer
    banks = set()
    for view in views.values():
        banks.update((f"{view.name}.experts.w_in", f"{view.name}.experts.w_out"))
        layout = view.stored_tensors()
        banks.update(n for n in (*layout.w_in, *layout.w_out) if not source.files.is_quantized(n))
    chosen = chosen if chosen is not None else {v.name for v in views.values()}
    return QuantizingWriter(writer, source.files, banks, views, ErrorProbe(views, chosen, masks))


def record_error(config, writer) -> dict | None:
    """The error report of a re-quantizing writer (QuantizingWriter, a re-quantizing StandardOutput; None for
    any other writer), set on `config` under ERROR_KEY."""
    report_of = writer.report if isinstance(writer, QuantizingWriter) else getattr(writer, "quantization_report", None)
    if report_of is None:
        return None
    report = report_of()
    if report is not None:
        setattr(config, ERROR_KEY, report)
    return report


@torch.no_grad()
def quantize_checkpoint(src, dst, quantization_config: dict | None = None, scale_dtype: torch.dtype = torch.float32,
                        like=None, max_shard_size: int | None = None) -> Path:
    """write_quantized(src, dst, ...) atomically: into a temporary directory that replaces `dst` once complete,
    so a refused tensor or a crash leaves whatever `dst` held as it was (`dst` may be `src`)."""
    from ..checkpoint import atomic_directory

    with atomic_directory(dst) as tmp:
        write_quantized(src, tmp, quantization_config, scale_dtype, like, max_shard_size)
    return Path(dst)


def write_quantized(src, dst, quantization_config: dict | None = None, scale_dtype: torch.dtype = torch.float32,
                    like=None, max_shard_size: int | None = None) -> Path:
    """Write the plain transformers checkpoint `src` (config.json + safetensors) to `dst` in the layout of
    the official quantized releases: fp8 (DeepSeek-V3 / Qwen3 FP8: every linear weight but the
    embeddings, norms, head, routers and shared-expert gates, and those of the modules the given
    modules_to_not_convert lists, weight_scale_inv per block; ue8m0 scales as float32 powers of two or, with
    scale_dtype=torch.float8_e8m0fnu (or torch.uint8, the same bytes), exponent bytes) or mxfp4 (GPT-OSS: the
    expert banks as *_blocks / *_scales of their [E, out, in] transpose). config.json gets `quantization_config`;
    for fp8 with a kept shared-expert gate (Qwen2-MoE, Qwen3-Next) or a given list, its modules_to_not_convert
    lists every linear weight left in float and the head, as the Qwen3-Next FP8 release does, so that transformers'
    FP8 loader leaves them nn.Linear. Refused before anything is written: fp8 of the hub's fused expert banks
    (GPT-OSS, Llama-4: transformers loads no block-FP8 of theirs right; write them as mxfp4) and mxfp4 of a model
    that stores its experts per expert (nothing would be quantized).

    like: the quantized checkpoint directory `src` was made from (a model loaded dequantized, then pruned
    or merged in memory): its format, scale dtype and quantization_config are used, a tensor it stores
    quantized under the same name is copied byte for byte with its scales when `src` kept its values (equal
    to its dequantization in src's dtype), a renumbered expert (the kept experts of a pruned Mixtral, a standard
    merge's one-expert groups: expect_renumbered) from the source expert whose values it kept, else quantized; the
    fused expert banks are quantized, and every other tensor stays as the source stores it.
    max_shard_size: bytes per output shard (None: one file); tensors are read and written one at a time, so a
    shard is what is held in memory."""
    from .source import open_weight_files

    src, dst = Path(src), Path(dst)
    like = LikeSource(QuantizedFiles(open_weight_files(Path(like)), checkpoint_format(like))) if like is not None else None
    if like is not None:
        quantization_config, scale_dtype = like.format.config, like.scale_dtype
    fmt = detect(quantization_config)
    if fmt is None:
        raise ValueError("quantization_config: expected a dict with quant_method 'fp8' or 'mxfp4'")
    config = json.loads((src / "config.json").read_text(encoding="utf-8"))
    if like is not None:
        expect_renumbered(like, config)
    files = open_weight_files(src)
    if like is None:
        check_layout({n: torch.empty(s, dtype=files.dtypes[n], device="meta") for n, s in files.shapes.items()}, fmt,
                     config.get("model_type"))
    dst.mkdir(parents=True, exist_ok=True)
    writer = ShardWriter(dst, "model.safetensors", max_shard_size, {"format": "pt"})
    written = LikeWriter(like, fmt) if like is not None else PlainWriter(fmt, scale_dtype, quantization_config)
    for name in files.shapes:
        for n, part in written.parts(name, files.get(name)).items():
            writer.add(n, part)
    files.release()
    writer.finish()
    config["quantization_config"] = written.quantization_config()
    if like is not None:
        config.pop(ERROR_KEY, None)
        if written.errors:
            config[ERROR_KEY] = summarize(fmt.method, None, written.errors)
    (dst / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for extra in ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                  "chat_template.jinja", "tokenizer.model"):
        if (src / extra).is_file():
            shutil.copy(src / extra, dst / extra)
    return dst


class PlainWriter:
    """write_quantized's rule without `like`: the tensors `quantizable` names quantized, but those of the modules the
    caller's modules_to_not_convert lists; the kept linear weights go to modules_to_not_convert (`not_converted`)."""

    def __init__(self, fmt: QuantFormat, scale_dtype: torch.dtype, quantization_config: dict):
        self.fmt, self.scale_dtype, self.config = fmt, scale_dtype, dict(quantization_config)
        self.given = self.config.get("modules_to_not_convert")
        self.kept: list[str] = []  # the modules whose linear weight stays in float

    def parts(self, name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        from transformers.quantizers.quantizers_utils import should_convert_module

        module = name.removesuffix(".weight")
        if quantizable(name, tensor, self.fmt) and should_convert_module(module, self.given):
            return quantize_tensor(name, tensor, self.fmt, self.scale_dtype, transpose_mxfp4=True)
        if tensor.is_floating_point() and tensor.dim() == 2 and name.endswith(".weight"):
            self.kept.append(module)
        return {name: tensor}

    def quantization_config(self) -> dict:
        listed = not_converted(self.kept, self.given) if self.fmt.method == "fp8" else self.given
        return self.config if listed is None else {**self.config, "modules_to_not_convert": listed}


def expect_renumbered(like: LikeSource, config: dict) -> None:
    """Tell `like` which source expert each written expert of a pruned or standard-merged checkpoint may be (the kept
    experts of its prune section, the one-expert groups of its standard section)."""
    from ..checkpoint.standard import STANDARD_SECTION
    from ..prune import PRUNE_SECTION

    for layer, entry in ((config.get(PRUNE_SECTION) or {}).get("layers") or {}).items():
        like.expect(layer, [[e] for e in entry["kept"]])
    for layer, entry in ((config.get(STANDARD_SECTION) or {}).get("layers") or {}).items():
        like.expect(layer, entry["groups"])


class LikeWriter:
    """write_quantized's rule with `like` (LikeSource), keeping the error of every tensor quantized afresh."""

    def __init__(self, like: LikeSource, fmt: QuantFormat):
        self.like, self.fmt = like, fmt
        self.errors: dict[str, float] = {}

    def parts(self, name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        parts, fresh = self.like.parts(name, tensor)
        if fresh:
            self.errors[name] = relative_error(dequantize_parts(parts, self.fmt, tensor.shape), tensor)
        return parts

    def quantization_config(self) -> dict:
        return dict(self.fmt.config)


def requantize_saved(directory, like) -> Path:
    """Rewrite the plain transformers checkpoint `directory` (a model loaded dequantized from the quantized
    checkpoint `like`, pruned or merged to the standard format, then saved) in `like`'s format, in place
    (quantize_checkpoint(like=...))."""
    directory = Path(directory)
    quantize_checkpoint(directory, directory, like=like)
    return directory


def save_requantized(out, like, save, measure=None) -> dict | None:
    """Save a model loaded dequantized from the quantized checkpoint `like` to `out` in `like`'s format, replacing
    `out` only once all is done, so a failure anywhere leaves what `out` held as it was: `save(directory)` writes the
    dequantized checkpoint into a scratch directory next to `out` (removed at the end), which write_quantized(like=...)
    rewrites into a temporary directory; `measure(directory)` (the layer errors) runs on that before it replaces
    `out`. Returns the error report (measure's, else the one write_quantized recorded)."""
    from ..checkpoint import atomic_directory, scratch_directory
    from ..checkpoint.atomic import keep_files

    real = Path(os.path.realpath(out))
    with atomic_directory(real) as tmp, scratch_directory(real.parent, f".{real.name}.dequantized-") as scratch:
        save(scratch / "model")
        write_quantized(scratch / "model", tmp, like=like)
        keep_files(scratch / "model", tmp)  # the tokenizer files write_quantized does not copy
        return measure(tmp) if measure is not None else saved_error(tmp)


def saved_error(directory) -> dict | None:
    """The error report recorded in a checkpoint's config.json (ERROR_KEY), None when there is none."""
    return json.loads((Path(directory) / "config.json").read_text(encoding="utf-8")).get(ERROR_KEY)


@torch.no_grad()
def load_dequantized(path, dtype: torch.dtype | None = None) -> torch.nn.Module:
    """The model of the block-FP8 / MXFP4 checkpoint directory `path` in memory (eval mode, not quantized),
    every tensor read as the streamed path reads it (its stored parts dequantized into `dtype`, default
    bfloat16, one tensor at a time): the in-memory path of quantized checkpoints (open_model uses it)."""
    from transformers.initialization import no_init_weights

    from ..checkpoint.load import read_generation_config
    from ..models.hub import keep_float32_, model_class_for
    from .skeleton import tensor_shapes
    from .source import SourceCheckpoint

    source = SourceCheckpoint(path, dispatched=True)
    dtype = dtype or torch.bfloat16
    config = source.config
    drop_quantization(config)  # the model in memory is not quantized
    with no_init_weights():
        model = model_class_for(config).from_config(config, dtype=dtype)
    keep_float32_(model, dtype)  # as from_pretrained keeps them
    read_generation_config(model, source.path)  # the input's sampling defaults and eos ids, written with the outputs
    model.tie_weights()
    shapes, _ = tensor_shapes(model)
    source.check(shapes)
    state = model.state_dict()
    for name, shape in shapes.items():
        state[name].copy_(source.read(name, shape, state[name].dtype))
        source.release()
    return model.eval()
