"""permute_checkpoint: align_experts (weight matching) on a checkpoint larger than memory.

Weight matching needs no calibration data and each MoE layer only its own experts, so one pass does it:
for every MoE layer its experts are read, every expert is aligned to the reference expert and permuted
in place, and the layer is written out; every other tensor is copied through one at a time. The output
is a plain transformers checkpoint (sharded safetensors with an index, every tensor under the family's hub names
as the source stores them, transformers' weight conversion reverted one tensor at a time), written into a
temporary directory renamed into place, equal to open_model -> align_experts(model, reference) ->
model.save_pretrained on the same checkpoint: the same tensors under the same names.

A block-FP8 / MXFP4 source is read dequantized and, with keep_quantization (the default), the aligned
checkpoint is written as above and then rewritten in its format one tensor at a time (write_quantized(like=source),
as the in-memory `permute` does with requantize_saved): the permuted experts quantized afresh, every other tensor
the source's bytes, its quantization_config and the error report in config.json. keep_quantization=False:
dequantized tensors in `dtype`, without quantization_config.
"""
from __future__ import annotations

import shutil

import torch
from tqdm.auto import tqdm

from ..checkpoint import atomic_directory
from ..permute import apply_permutation_, match_permutations, with_bias_column
from ..checkpoint.source_stamp import watching_inputs
from ..checkpoint.weight_files import ShardWriter
from .memory import shard_size_for
from .skeleton import layer_units, moe_views, open_source
from ..quant.report import drop_quantization
from .quantized import write_quantized


@torch.no_grad()
def permute_checkpoint(path, out, reference: int = 0, max_memory=None, max_shard_size=None,
                       dtype: torch.dtype | None = None, progress: bool = True, tokenizer=None,
                       keep_quantization: bool = True) -> dict[str, torch.Tensor]:
    """Align every MoE layer of the checkpoint directory `path` to its expert `reference` and write the
    result to `out`, one layer in memory at a time; returns {layer name: permutation [E, ff]} as
    align_experts does. dtype: compute and output dtype (default float32, as open_model loads);
    max_memory: a resident-memory target (bytes or "16GB"; one layer's experts have to fit) that sets the
    output shard size (max_memory / 8 between 1 MB and 2 GB) unless max_shard_size (bytes) is given;
    tokenizer: saved with the checkpoint; keep_quantization: see the module docstring."""
    from transformers.core_model_loading import revert_weight_conversion

    source, out, dtype, model, shapes, _ = open_source(path, out, dtype, dispatched=True)  # no forward
    views = list(moe_views(model, layer_units(model)).values())
    for view in views:
        if not 0 <= reference < view.num_experts:
            raise ValueError(f"{view.name}: reference expert {reference} out of range [0, {view.num_experts})")
    experts = {n for v in views for n in v.stored_tensors().experts}
    perms, shard_size = {}, shard_size_for(max_memory, max_shard_size)
    requantize = source.quant is not None and keep_quantization
    # the re-quantizing write opens `path` again: the output is committed only if it still holds the same files
    with watching_inputs(path if requantize else None), atomic_directory(out) as final:
        tmp = final / ".dequantized" if requantize else final
        tmp.mkdir(exist_ok=True)
        writer = ShardWriter(tmp, "model.safetensors", shard_size, {"format": "pt"})

        def add(name: str, tensor: torch.Tensor) -> None:  # under the hub names, as model.save_pretrained writes
            for n, t in revert_weight_conversion(model, {name: tensor}).items():
                writer.add(n, t.contiguous())
        for view in tqdm(views, desc="aligning experts", unit="layer", disable=not progress):
            layout = view.stored_tensors()
            w_in, w_out, b_in, b_out = layout.read(lambda n: source.read(n, shapes[n], dtype))
            source.release()
            d = w_in.shape[-1]
            w_in = with_bias_column(w_in, b_in)  # an input bias moves with its neuron
            refs = torch.full((view.num_experts,), reference, dtype=torch.int64)
            perm = match_permutations(w_in, w_out, refs, view.activation, name=view.name)
            apply_permutation_(w_in, w_out, perm, view.activation)
            aligned = layout.split(w_in[..., :d], w_out, None if b_in is None else w_in[..., d], b_out)
            for n, t in aligned.items():
                add(n, t)
            perms[view.name] = perm
            del w_in, w_out
        for name, shape in shapes.items():  # everything else, one tensor at a time
            if name not in experts:
                add(name, source.read(name, shape, dtype))
        source.release()
        writer.finish()
        config = source.config
        drop_quantization(config)  # dequantized here (re-quantized below when keep_quantization)
        config.dtype = str(dtype).removeprefix("torch.")
        config.save_pretrained(str(tmp))
        if model.can_generate():  # the source's (open_source reads its generation_config.json)
            model.generation_config.save_pretrained(str(tmp))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        if requantize:  # in the source's format, one tensor at a time
            write_quantized(tmp, final, like=path, max_shard_size=shard_size)
            shutil.rmtree(tmp)
    return perms
