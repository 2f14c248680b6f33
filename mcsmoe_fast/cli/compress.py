"""mcsmoe-fast compress: MC-SMoE one-shot (low-rank factors plus kept rows) and save."""
from __future__ import annotations

import time

from .common import (DTYPE_CHOICES, add_calibration_options, calibration_defaults, dir_bytes, dtype_option,
                     layers_option, parameter_bytes, refuse_overwriting_input, save_requantized_merged, subcommand)


def add(sub):
    from ..compress import IMPORTANCE, SVD_METHODS, CompressOptions

    p = subcommand(sub, "compress", "compress every expert slot into low-rank factors plus kept rows (one-shot)",
                   "mcsmoe-fast compress --model ./mixtral-merged --rank 32 --keep-ratio 0.1 --out ./mixtral-mc")
    p.add_argument("--model", required=True, help="model directory (merged or plain checkpoint) or hub id")
    p.add_argument("--out", required=True, help="directory to save the compressed model to (not --model)")
    p.add_argument("--rank", type=int, default=CompressOptions.rank,
                   help=f"rank of the low-rank factors (default {CompressOptions.rank})")
    p.add_argument("--keep-ratio", type=float, default=CompressOptions.keep_ratio,
                   help="share of the sparse part's entries kept, one threshold over all experts "
                        f"(default {CompressOptions.keep_ratio})")
    one_shot = [i for i in IMPORTANCE if i != "gradient"]
    p.add_argument("--importance", choices=one_shot, default="weight",
                   help="row scores: |S| (weight) or |S| times input norms from --calib (activation)")
    p.add_argument("--svd", choices=SVD_METHODS, default="auto", help="truncated SVD method (default auto)")
    p.add_argument("--layers", nargs="+", default=None,
                   help="MoE layers to compress: names or positions in module order (default: all)")
    p.add_argument("--calib", default=None, help="calibration text for --importance activation (as for merge)")
    add_calibration_options(p, optional=True)
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default=None,
                   help="dtype the model is loaded, compressed and saved in (default: as the checkpoint loads; auto: the "
                        "checkpoint's own); a block-FP8 or MXFP4 input keeps its non-expert tensors quantized (bfloat16 "
                        "work) unless --dtype names a dtype: then everything is written dequantized in that dtype")
    p.add_argument("--max-memory", default=None, metavar="SIZE",
                   help="memory budget, e.g. 8GB: a merged checkpoint that would not fit is compressed layer by "
                        "layer from its shards (importance weight, every layer)")
    p.set_defaults(run=run)
    return p


def run(args) -> int:
    import torch

    from ..calibrate import collect_routing_stats
    from ..calibration_data import calibration_batches, check_batches, load_tokenizer, read_calibration_texts
    from ..checkpoint import save_pretrained
    from ..compress import CompressOptions, compress_experts
    from ..loading import open_model

    refuse_overwriting_input(args)
    try:  # checked before anything is loaded
        CompressOptions(args.rank, args.keep_ratio, args.importance, args.svd)
    except ValueError as exc:  # the message names the option as the user typed it
        raise ValueError("--" + str(exc).replace("keep_ratio", "keep-ratio")) from None
    if args.importance == "activation" and args.calib is None:
        raise ValueError("--importance activation needs --calib (calibration text)")
    if args.importance != "activation" and args.calib is not None:
        raise ValueError(f"--calib is read for --importance activation only (--importance {args.importance} scores "
                         "rows by the weights alone): add --importance activation or drop --calib")
    calibration_defaults(args, reading=args.calib is not None)
    tokenizer = None
    try:
        tokenizer = load_tokenizer(args.tokenizer or args.model)
    except (OSError, ValueError):
        if args.calib is not None:
            raise
    from ..streaming.requantize_merged import stored_format
    from ..streaming import compress_checkpoint, fits_in_memory

    # a block-FP8 / MXFP4 input (a release or our merge of one): the non-expert tensors stay quantized, the factors
    # in the working dtype (streaming/requantize_merged.py), unless --dtype is given (then all dequantized)
    keep_quantization = stored_format(args.model) is not None and args.dtype in (None, "auto")
    dtype = None if keep_quantization or args.dtype is None else dtype_option(args)
    if not fits_in_memory(args.model, args.max_memory, None if keep_quantization else dtype or torch.float32):
        if args.importance != "weight" or args.layers:
            raise ValueError("streaming compression (--max-memory) compresses every layer with --importance weight")
        start = time.perf_counter()
        entries = compress_checkpoint(args.model, args.out, args.rank, args.keep_ratio, args.svd,
                                      max_memory=args.max_memory, tokenizer=tokenizer, dtype=dtype)
        print(f"compressed {len(entries)} layers layer by layer from the checkpoint's shards in "
              f"{time.perf_counter() - start:.2f} s")
        if keep_quantization:
            print(f"non-expert tensors kept in the input's precision ({stored_format(args.model).method}), the "
                  "compressed experts' factors in the working dtype")
        print(f"saved checkpoint to {args.out} ({dir_bytes(args.out) / 2**20:.2f} MiB on disk)")
        return 0
    model = open_model(args.model, dtype)
    stats = None
    start = time.perf_counter()
    if args.importance == "activation":
        texts = read_calibration_texts(args.calib, args.num_samples, args.text_field, args.split)
        batches = calibration_batches(texts, tokenizer, args.batch_size, args.max_length)
        check_batches(batches, tokenizer, model.config.vocab_size)
        stats = collect_routing_stats(model, batches, input_norms=True)
    before = parameter_bytes(model)
    layers = layers_option(args.layers)
    modules = compress_experts(model, rank=args.rank, keep_ratio=args.keep_ratio, layers=layers,
                               importance=args.importance, stats=stats, svd=args.svd)
    elapsed = time.perf_counter() - start
    width = max(len(name) for name in modules)
    print(f"{'layer':<{width}}  slots  rank in/out  kept rows in/out")
    for name, m in modules.items():
        print(f"{name:<{width}}  {m.num_slots:>5}  {m.in_U.shape[2]:>4}/{m.out_U.shape[2]:<4}  "
              f"{m.in_S_rows.shape[0]}/{m.out_S_rows.shape[0]}")
    after = parameter_bytes(model)
    print(f"compressed {len(modules)} layers in {elapsed:.2f} s")
    if keep_quantization:
        out, error = save_requantized_merged(model, args.out, args.model, tokenizer)
        print(f"non-expert tensors kept in the input's precision ({stored_format(args.model).method}), the compressed "
              "experts' factors in the working dtype; " + error)
    else:
        out = save_pretrained(model, args.out, tokenizer=tokenizer)
    print(f"parameters: {before / 2**20:.2f} MiB before, {after / 2**20:.2f} MiB after compressing "
          f"({before / max(after, 1):.2f}x smaller)")
    print(f"saved checkpoint to {out} ({dir_bytes(out) / 2**20:.2f} MiB on disk)")
    return 0
