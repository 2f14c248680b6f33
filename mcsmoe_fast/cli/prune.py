"""mcsmoe-fast prune: REAP (or usage-frequency) expert pruning, saved as the family's own checkpoint."""
from __future__ import annotations

import time
from functools import partial
from pathlib import Path

from .common import (add_calibration_options, add_dtype_option, dir_bytes, dtype_option, parameter_bytes,
                     refuse_overwriting_input, subcommand, vocab_size)


def add(sub):
    from ..calibrate import SALIENCY_MODES
    from ..prune import PRUNE_METHODS

    p = subcommand(sub, "prune", "prune each MoE layer to its most salient experts (REAP) and save the family's own "
                   "checkpoint (vanilla transformers, vLLM and SGLang load it)",
                   "mcsmoe-fast prune --model ./qwen3-moe --calib calib.txt --method reap --ratio 0.5 --out ./pruned")
    p.add_argument("--model", required=True, help="model directory or hub id (an unmerged model)")
    p.add_argument("--calib", required=True,
                   help="calibration text: a .txt file (one sample per line), a .jsonl file, or a dataset name")
    count = p.add_mutually_exclusive_group(required=True)
    count.add_argument("--num-experts", type=int, default=None, help="experts kept per MoE layer")
    count.add_argument("--ratio", type=float, default=None,
                       help="share of each layer's experts removed, in [0, 1) (0.5: half the experts)")
    p.add_argument("--method", choices=PRUNE_METHODS, default="reap",
                   help="reap: keep the highest REAP saliency (routing weight x expert output norm); frequency: "
                        "keep the most used experts")
    p.add_argument("--saliency", choices=SALIENCY_MODES, default=None,
                   help="REAP's routing weight: the softmax probability renormalised over the top-k (reap, default) "
                        "or the plain softmax probability (reap-softmax, REAP's own code default); sigmoid routers use "
                        "their own weights")
    p.add_argument("--out", required=True, help="directory to save the pruned model to")
    add_calibration_options(p)
    add_dtype_option(p, quantized=True)
    p.add_argument("--max-memory", default=None, metavar="SIZE",
                   help="memory budget, e.g. 8GB: a checkpoint that would not fit is pruned one decoder layer at a "
                        "time from its shards (the same standard checkpoint)")
    p.add_argument("--offload-dir", default=None,
                   help="with --max-memory: where the carried activations go when they exceed it (default: inside "
                        "--out)")
    p.set_defaults(run=run)
    return p


def run(args) -> int:
    from ..calibrate import collect_routing_stats
    from ..calibration_data import calibration_batches, check_batches, load_tokenizer, read_calibration_texts
    from ..checkpoint import save_pretrained
    from ..streaming.layer_errors import LayerErrors
    from ..loading import open_model, quantized_format
    from ..models import moe_layers
    from ..prune import check_prune, kept_experts, prune_experts, resolve_count

    refuse_overwriting_input(args)
    if args.offload_dir is not None and args.max_memory is None:
        raise ValueError("--offload-dir needs --max-memory: it is where the streamed prune spills what exceeds the "
                         "budget; without one the model is pruned in memory")
    if args.saliency is not None and args.method != "reap":
        raise ValueError(f"--saliency chooses REAP's routing weight: it needs --method reap, not {args.method}")
    args.saliency = args.saliency or "reap"
    # a block-FP8 / MXFP4 checkpoint: loaded dequantized, written in its own precision unless --dtype is given
    keep_quantization = quantized_format(args.model) is not None and args.dtype in (None, "auto")
    args.dtype = args.dtype or "float32"
    from ..streaming import fits_in_memory

    if not fits_in_memory(args.model, args.max_memory, None if keep_quantization else dtype_option(args)):
        return run_streaming(args, keep_quantization)
    if args.offload_dir is not None:
        print(f"the model fits --max-memory {args.max_memory}: pruned in memory; --offload-dir is not used")
    model = open_model(args.model, None if keep_quantization else dtype_option(args))
    layers = moe_layers(model)
    if not layers:
        raise ValueError(f"--model {args.model}: the model has no MoE layer to prune")
    check_prune(model, resolve_count(layers[0].num_experts, args.num_experts, args.ratio))  # before calibrating
    tokenizer = load_tokenizer(args.tokenizer or args.model)
    texts = read_calibration_texts(args.calib, args.num_samples, args.text_field, args.split)
    batches = calibration_batches(texts, tokenizer, args.batch_size, args.max_length)
    check_batches(batches, tokenizer, model.config.vocab_size)
    start = time.perf_counter()
    errors = LayerErrors(model, batches) if keep_quantization else None  # the layer errors of the re-quantized output
    stats = collect_routing_stats(model, batches, saliency=args.saliency if args.method == "reap" else None)
    kept = kept_experts(model, stats, args.num_experts, args.ratio, args.method)
    pruned = prune_experts(model, stats, args.num_experts, args.ratio, args.method)
    if errors is not None:
        errors.close()
        errors.keep_pruned(pruned, kept, {layer.name: layer.num_experts for layer in layers})
    elapsed = time.perf_counter() - start
    width = max(len(name) for name in kept)
    print(f"{'layer':<{width}}  experts  kept  kept experts")
    for layer in layers:
        print(f"{layer.name:<{width}}  {layer.num_experts:>7}  {len(kept[layer.name]):>4}  {kept[layer.name]}")
    print(f"{len(texts)} calibration samples; {args.method} pruning of {len(layers)} layers in {elapsed:.2f} s")
    before, after = parameter_bytes(model), parameter_bytes(pruned)
    save = partial(save_pretrained, pruned, tokenizer=tokenizer, format="standard")
    if not keep_quantization:
        out = save(args.out)
    else:  # saved and re-quantized beside --out, which is replaced only once both are done
        from ..streaming.quantized import describe_error, save_requantized

        out, report = Path(args.out), save_requantized(args.out, args.model, save, errors.record)
        print(f"written in the input's precision ({quantized_format(args.model).method}, its quantization_config); "
              + describe_error(report))
    print(f"parameters: {before / 2**20:.2f} MiB before, {after / 2**20:.2f} MiB after pruning "
          f"({before / max(after, 1):.2f}x smaller)")
    print(f"saved standard checkpoint to {out} ({dir_bytes(out) / 2**20:.2f} MiB on disk)")
    return 0


def run_streaming(args, keep_quantization: bool) -> int:
    """Larger than --max-memory: the checkpoint pruned one decoder layer at a time (streaming.prune)."""
    from ..calibration_data import calibration_batches, check_batches, load_tokenizer, read_calibration_texts
    from ..streaming.prune import prune_checkpoint

    tokenizer = load_tokenizer(args.tokenizer or args.model)
    texts = read_calibration_texts(args.calib, args.num_samples, args.text_field, args.split)
    batches = calibration_batches(texts, tokenizer, args.batch_size, args.max_length)
    check_batches(batches, tokenizer, vocab_size(args.model))
    start = time.perf_counter()
    out = prune_checkpoint(args.model, args.out, batches, args.num_experts, args.ratio, args.method, args.saliency,
                           max_memory=args.max_memory, offload_dir=args.offload_dir,
                           dtype=None if keep_quantization else dtype_option(args), tokenizer=tokenizer,
                           keep_quantization=keep_quantization)
    print(f"{len(texts)} calibration samples; {args.method} pruning layer by layer from the checkpoint's shards in "
          f"{time.perf_counter() - start:.2f} s")
    if keep_quantization:
        from ..loading import quantized_format
        from ..streaming.quantized import describe_error, saved_error

        print(f"written in the input's precision ({quantized_format(args.model).method}, its quantization_config); "
              + describe_error(saved_error(out)))
    print(f"saved standard checkpoint to {out} ({dir_bytes(out) / 2**20:.2f} MiB on disk)")
    return 0
