"""Writing tensors back in a quantized checkpoint's format: one tensor quantized to a format (and read back),
the relative error that adds, and the rule every output "in the input's precision" follows (`LikeSource`).

The rule (the in-memory outputs' requantize_saved and the streamed standard checkpoint both use it, so the two
write the same bytes): a tensor the source stores quantized under the same name is copied byte for byte with its
scales when its values are the source's (equal to the source's dequantization in the tensor's dtype); so is a
renumbered expert stored per expert (a pruned model's kept expert, a standard merge's one-expert group: `expect`)
from the source expert it is, when its values are that expert's; else it is quantized afresh (merged experts);
a fused expert bank (transformers 5 names, our merged slots) is quantized afresh;
every other tensor (norms, routers, biases, embeddings) stays as it is.
"""
from __future__ import annotations

import re

import torch

from .files import QuantizedFiles
from .format import QuantFormat
from .fp8 import dequantize_fp8, quantize_fp8
from .mxfp4 import BLOCK, dequantize_mxfp4, quantize_mxfp4

# tensors that stay unquantized in the releases: embeddings, norms, the head, routers
KEEP = ("embed_tokens", "lm_head", "norm", ".gate.weight", ".router.weight", "e_score_correction_bias", "shared_expert_gate")
# fused expert banks: the hub's (GPT-OSS, Llama-4, transformers 5 names) and the merged slots of our exact format
HUB_BANKS = ("experts.gate_up_proj", "experts.down_proj", "experts.up_proj")
BANKS = (*HUB_BANKS, "experts.w_in", "experts.w_out")
LAYER_PREFIX = re.compile(r".*?layers\.\d+\.")  # a decoder layer's name prefix ("model.layers.3.")
EXPERT_INDEX = re.compile(r"experts\.(\d+)\.")  # a per-expert tensor's expert index
# kept tensors of modules transformers' FP8 loader turns into FP8Linear unless modules_to_not_convert lists them (its
# routers are not nn.Linear; its default skips, the head, are replaced by any list given)
KEPT_LINEAR = ("shared_expert_gate",)


def quantize_tensor(name: str, tensor: torch.Tensor, fmt: QuantFormat, scale_dtype: torch.dtype = torch.float32,
                    transpose_mxfp4: bool = False) -> dict[str, torch.Tensor]:
    """{stored name: part} of `tensor` in format `fmt` (fp8: [..., out, in] blocks, scales in scale_dtype: float32,
    float8_e8m0fnu, or uint8 for the e8m0 bytes stored raw; mxfp4: packed along the last dim, after transposing the
    last two when transpose_mxfp4, GPT-OSS's [E, in, out] banks)."""
    if fmt.method == "fp8":
        as_bytes = scale_dtype == torch.uint8  # e8m0 exponents stored as raw uint8 bytes (read as float8_e8m0fnu)
        q, s = quantize_fp8(tensor, fmt.block, fmt.scale_fmt, torch.float8_e8m0fnu if as_bytes else scale_dtype)
        return dict(zip(fmt.parts(name), (q, s.view(torch.uint8) if as_bytes else s)))
    packed = tensor.transpose(-1, -2) if transpose_mxfp4 else tensor
    if packed.shape[-1] % BLOCK:  # the format stores no column count: readers take blocks * 32
        raise ValueError(f"{name}: MXFP4 packs its dim of {packed.shape[-1]} in blocks of {BLOCK}; a checkpoint cannot "
                         f"store a ragged last block (transformers and vLLM read {BLOCK} columns a block)")
    blocks, scales = quantize_mxfp4(packed)
    return dict(zip(fmt.parts(name), (blocks, scales)))


def dequantize_parts(parts: dict[str, torch.Tensor], fmt: QuantFormat, shape) -> torch.Tensor:
    """The float32 values of a tensor of `shape` from its quantized parts (quantize_tensor's, transpose_mxfp4=True)."""
    a, b = parts.values()
    if fmt.method == "fp8":
        return dequantize_fp8(a, b, torch.float32, fmt.block)
    return dequantize_mxfp4(a, b, torch.float32, cols=shape[-2]).transpose(-1, -2)


def relative_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    """||got - ref|| / ||ref|| (Frobenius; float32 squares summed by torch.sum's cascade, one leading slice at a
    time so the temporaries stay one matrix, the slices added in float64); 0 when both are zero."""
    diff, norm = squared_error(got, ref)
    diff, norm = diff ** 0.5, norm ** 0.5
    return diff / norm if norm > 0 else (0.0 if diff == 0 else float("inf"))


def squared_error(got: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """(||got - ref||^2, ||ref||^2), summed as relative_error sums them (several tensors add up to one bank)."""
    diff = norm = 0.0
    got, ref = got.reshape(-1, *got.shape[-2:]) if got.dim() > 2 else got[None], \
        ref.reshape(-1, *ref.shape[-2:]) if ref.dim() > 2 else ref[None]
    for g, r in zip(got, ref):
        r = r.float()
        norm += r.square().sum().item()
        diff += torch.sub(g.float(), r).square_().sum().item()
    return diff, norm


def quantizable(name: str, tensor: torch.Tensor, fmt: QuantFormat) -> bool:
    """Whether the official releases store `name` quantized (fp8: every linear weight but KEEP, and the fused
    banks, which only our own checkpoints hold in fp8: check_layout refuses the hub's in a transformers checkpoint;
    mxfp4: the fused expert banks)."""
    if not tensor.is_floating_point() or any(k in name for k in KEEP):
        return False
    if fmt.method == "mxfp4":
        return tensor.dim() == 3 and name.endswith(BANKS)
    return (tensor.dim() == 2 and name.endswith(".weight")) or (tensor.dim() == 3 and name.endswith(BANKS))


def check_layout(tensors: dict[str, torch.Tensor], fmt: QuantFormat, model_type: str) -> None:
    """ValueError, before anything is written, when `fmt` has no layout a reader loads for a checkpoint of these
    tensors (meta tensors will do): block-FP8 of the hub's fused expert banks (transformers' dequantizing load would
    take the e4m3 codes as the weights, 10^3 off), MXFP4 of experts stored per expert (nothing would be quantized)."""
    if fmt.method == "fp8":
        fused = [n for n, t in tensors.items() if t.dim() == 3 and t.is_floating_point() and n.endswith(HUB_BANKS)]
        if fused:
            raise ValueError(f"block-FP8 of {model_type}'s fused expert banks (experts.gate_up_proj / down_proj, e.g. "
                             f"{fused[0]}): transformers' dequantizing load reads block-FP8 scales only as "
                             "<module>.weight_scale_inv and its FP8 experts take neither GPT-OSS's biased banks nor "
                             "Llama-4's [E, in, out] ones, so no reader but mcsmoe-fast would load them right; write "
                             "this model as MXFP4 ({'quant_method': 'mxfp4'}), which transformers reads")
    elif not any(quantizable(n, t, fmt) for n, t in tensors.items()):
        raise ValueError("MXFP4 is written for fused expert banks (GPT-OSS, Llama-4: experts.gate_up_proj / "
                         f"down_proj), but {model_type} stores its experts per expert, so nothing would be quantized; "
                         "write it as block-FP8 ({'quant_method': 'fp8', 'weight_block_size': [128, 128]})")


def not_converted(kept: list[str], given: list[str] | None) -> list[str] | None:
    """quantization_config's modules_to_not_convert for an fp8 checkpoint that stores the modules `kept` (the
    linear weights left in float) unquantized: None (transformers' default skips, the head, suffice) unless the
    caller gave a list or a kept module is KEPT_LINEAR, which transformers' FP8 loader would cast to e4m3 with a
    scale it never reads; then the caller's list, every kept module and the head (a list replaces the defaults)."""
    if not given and not any(n.endswith(KEPT_LINEAR) for n in kept):
        return None
    return sorted(set(given or ()) | set(kept) | {"lm_head"})


def stored_scale_dtype(files: QuantizedFiles) -> torch.dtype:
    """The dtype the source stores its fp8 scales in (float32, float8_e8m0fnu exponent bytes, or the same bytes as
    uint8), the one quantize_tensor writes them in."""
    scales = [files.files.dtypes[p[1]] for p in files.parts.values()]
    return scales[0] if scales and files.format.method == "fp8" else torch.float32


class LikeSource:
    """Tensors written as the quantized checkpoint `files` (QuantizedFiles) stores them (module docstring)."""

    def __init__(self, files: QuantizedFiles):
        self.files, self.format, self.scale_dtype = files, files.format, stored_scale_dtype(files)
        self.sources: dict[str, dict[int, list[int]]] = {}  # "model.layers.3." -> {written expert: source experts}

    def expect(self, layer: str, groups) -> None:
        """MoE layer `layer` (its module name) is written as one expert per group of source experts, in order: a
        one-expert group [j] written at another index is looked for at source expert j too (parts). A hint only:
        the values decide."""
        prefix = LAYER_PREFIX.match(layer)
        if prefix is not None:
            experts = self.sources.setdefault(prefix.group(0), {})
            for i, group in enumerate(groups):
                if len(group) == 1 and group[0] != i and group[0] not in experts.setdefault(i, []):
                    experts[i].append(group[0])

    def _source_experts(self, name: str) -> list[str]:
        """The names of the source experts per-expert tensor `name` may be (`expect`)."""
        prefix = LAYER_PREFIX.match(name)
        experts = self.sources.get(prefix.group(0)) if prefix is not None else None
        index = EXPERT_INDEX.search(name, prefix.end()) if experts else None
        if index is None:
            return []
        return [f"{name[:index.start(1)]}{j}{name[index.end(1):]}" for j in experts.get(int(index.group(1)), ())]

    @torch.no_grad()
    def parts(self, name: str, tensor: torch.Tensor) -> tuple[dict[str, torch.Tensor], bool]:
        """({stored name: part}, whether `tensor` was quantized afresh)."""
        source = self.files
        if source.is_quantized(name) and tensor.is_floating_point():
            # the expected source expert first: its name's own expert may be a dropped one equal in the working dtype
            for stored in (*self._source_experts(name), name):
                if (source.is_quantized(stored)
                        and tuple(source.shapes[stored]) == tuple(tensor.shape)
                        and torch.equal(source.get(stored, tensor.dtype), tensor)):
                    parts = source.raw(stored)
                    source.release()
                    return {name + part[len(stored):]: value for part, value in parts.items()}, False
            return quantize_tensor(name, tensor, self.format, self.scale_dtype, transpose_mxfp4=True), True
        if name.endswith(BANKS) and quantizable(name, tensor, self.format):
            return quantize_tensor(name, tensor, self.format, self.scale_dtype, transpose_mxfp4=True), True
        return {name: tensor}, False
