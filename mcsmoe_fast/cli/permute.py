"""mcsmoe-fast permute: align every MoE layer's expert neurons to a reference expert."""
from __future__ import annotations

import time
from functools import partial

from .common import add_dtype_option, dtype_option, refuse_overwriting_input, saved_dtype, subcommand


def add(sub):
    p = subcommand(sub, "permute", "align every MoE layer's expert neurons to a reference expert (function-preserving)",
                   "mcsmoe-fast permute --model ./switch-base-32-sst2 --out ./switch-aligned --reference 0")
    p.add_argument("--model", required=True, help="model directory (or hub id where the network allows)")
    p.add_argument("--out", required=True, help="directory to save the aligned model to")
    p.add_argument("--reference", type=int, default=0, help="reference expert index in every layer (default 0)")
    p.add_argument("--max-memory", default=None, metavar="SIZE",
                   help="memory budget, e.g. 8GB: a checkpoint that would not fit is aligned layer by layer from "
                        "its shards without loading the whole model (every tested family, Switch included)")
    add_dtype_option(p, quantized=True)
    p.set_defaults(run=run)
    return p


def run(args) -> int:
    import torch

    from ..calibration_data import load_tokenizer
    from ..checkpoint import atomic_directory
    from ..loading import open_model, quantized_format
    from ..permute import align_experts

    from ..streaming import fits_in_memory, permute_checkpoint

    refuse_overwriting_input(args)
    if saved_dtype(args.model) is not None:
        raise ValueError(f"{args.model} is a merged (or compressed) checkpoint: permute aligns the experts of a plain "
                         "checkpoint, before merging (merge aligns each group itself)")
    # a block-FP8 / MXFP4 checkpoint: loaded dequantized, written in its own precision unless --dtype is given
    keep_quantization = quantized_format(args.model) is not None and args.dtype in (None, "auto")
    args.dtype = args.dtype or "float32"
    dtype = None if keep_quantization else dtype_option(args)
    if not fits_in_memory(args.model, args.max_memory, dtype):
        try:
            tokenizer = load_tokenizer(args.model)
        except ValueError:
            tokenizer = None
        start = time.perf_counter()
        perms = permute_checkpoint(args.model, args.out, args.reference, max_memory=args.max_memory, dtype=dtype,
                                   tokenizer=tokenizer, keep_quantization=keep_quantization)
        print(f"aligned {len(perms)} layers layer by layer from the checkpoint's shards in "
              f"{time.perf_counter() - start:.2f} s; saved to {args.out}")
        if keep_quantization:
            from ..streaming.quantized import describe_error, saved_error

            print(f"written in the input's precision ({quantized_format(args.model).method}, its quantization_config); "
                  + describe_error(saved_error(args.out)))
        return 0
    model = open_model(args.model, dtype)
    start = time.perf_counter()
    perms = align_experts(model, reference=args.reference)
    elapsed = time.perf_counter() - start
    for name, perm in perms.items():
        moved = (perm != torch.arange(perm.shape[1])).sum().item()
        print(f"{name}: {moved} of {perm.numel()} neurons moved")
    print(f"aligned {len(perms)} layers in {elapsed:.2f} s")
    if not keep_quantization:
        with atomic_directory(args.out) as tmp:  # a directory of the user's files is refused, a crash leaves it as is
            save_aligned(model, args.model, tmp)
    else:  # the aligned experts quantized afresh, every other tensor the input's bytes; --out replaced only then
        from ..streaming.quantized import describe_error, save_requantized

        report = save_requantized(args.out, args.model, partial(save_aligned, model, args.model))
        print(f"written in the input's precision ({quantized_format(args.model).method}, its quantization_config); "
              + describe_error(report))
    print(f"saved to {args.out}")
    return 0


def save_aligned(model, source, directory) -> None:
    """The aligned model, and the tokenizer beside `source`, saved to `directory`."""
    from ..calibration_data import load_tokenizer

    model.save_pretrained(directory)
    try:  # the aligned model is usable on its own (merge reads the tokenizer beside the model)
        load_tokenizer(source).save_pretrained(directory)
    except ValueError:
        print("no tokenizer beside the input model: none saved with the aligned model")
