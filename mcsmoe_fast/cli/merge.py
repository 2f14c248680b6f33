"""mcsmoe-fast merge: M-SMoE (group and merge experts) and save the smaller model."""
from __future__ import annotations

import argparse
import time
from functools import partial
from pathlib import Path

from .common import (add_calibration_options, add_dtype_option, device_map_option, dir_bytes, dtype_option,
                     layers_option, parameter_bytes, per_device_sizes, refuse_overwriting_input,
                     save_requantized_merged, saved_dtype, subcommand, vocab_size)


def add(sub):
    from ..checkpoint import FORMATS
    from ..checkpoint.standard_router import ROUTERS
    from ..grouping import GROUPING_METHODS, MERGE_STRATEGIES, SIMILARITY_BASES

    p = subcommand(sub, "merge", "merge each MoE layer's experts into groups (M-SMoE) and save the smaller model",
                   "mcsmoe-fast merge --model ./mixtral-tiny --calib calib.txt --num-groups 4 --out ./mixtral-merged")
    p.add_argument("--model", required=True, help="model directory (plain or merged checkpoint) or hub id")
    p.add_argument("--calib", required=True,
                   help="calibration text: a .txt file (one sample per line), a .jsonl file, or a dataset name")
    p.add_argument("--num-groups", type=int, required=True,
                   help="groups per merged layer (the average per layer with --globally)")
    p.add_argument("--out", required=True, help="directory to save the merged model to")
    p.add_argument("--similarity", choices=SIMILARITY_BASES, default="router-logits", help="similarity basis ('weight' compares the weights as they are: run `permute` first to compare "
                        "aligned experts, as the original did)")
    p.add_argument("--grouping", choices=GROUPING_METHODS, default="dominant",
                   help="dominant experts (paper) or hierarchical clustering (HC-SMoE)")
    p.add_argument("--globally", action=argparse.BooleanOptionalAction, default=None,
                   help="spread one budget of groups over the layers by usage frequency (default on; off with "
                        "--format standard, whose checkpoint has one expert count)")
    p.add_argument("--no-permute", dest="permute", action="store_false",
                   help="do not align group members to their dominant expert before averaging")
    p.add_argument("--strategy", choices=MERGE_STRATEGIES, default="frequency",
                   help="frequency-weighted or uniform average, or drop non-dominant experts (baseline)")
    p.add_argument("--layers", nargs="+", default=None,
                   help="MoE layers to merge: names or positions in module order (default: all)")
    add_calibration_options(p)
    add_dtype_option(p, quantized=True, extra="; a merged or compressed input keeps the dtype it was saved in "
                                             "unless --dtype names one, and our merge of a block-FP8 / MXFP4 "
                                             "checkpoint merged again keeps that precision in the exact format "
                                             "(--format standard and --export-dense write it dequantized)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random similarity basis")
    p.add_argument("--export-dense", action="store_true",
                   help="save a plain transformers checkpoint (every expert materialised) instead")
    p.add_argument("--format", choices=FORMATS, default="exact",
                   help="exact: all router rows plus the expert_map, loaded by mcsmoe_fast (default); standard: the "
                        "family's own checkpoint with the merged experts and one router row each, loaded by vanilla "
                        "transformers, vLLM and SGLang")
    p.add_argument("--router", choices=ROUTERS, default=None,
                   help="with --format standard: each merged expert's router row, fitted on the calibration text to "
                        "its group's summed routing probability (fitted, default) or its dominant expert's (dominant, the "
                        "default with --device-map, which supports only it)")
    p.add_argument("--within-routing-groups", action=argparse.BooleanOptionalAction, default=None,
                   help="group-limited routers (DeepSeek-V3's n_group): merge only experts of the same routing group, "
                        "the same count in each (default on with --format standard, which needs it; --num-groups a "
                        "multiple of n_group; with --globally each layer's count is a multiple too)")
    p.add_argument("--max-memory", default=None, metavar="SIZE",
                   help="memory budget, e.g. 8GB: a checkpoint that would not fit is merged layer by layer from "
                        "its shards without loading the whole model (Switch, Qwen3-Next, Qwen3.5-MoE and Llama-4 need "
                        "--device-map); with --device-map also per device, e.g. cpu=8GB,0=70GB,1=70GB")
    p.add_argument("--device-map", default=None, metavar="MAP",
                   help="stream the merge and run the calibration forward with accelerate's device map: auto, "
                        "balanced, balanced_low_0, sequential, cpu, cuda:N or a JSON object {module: device}; GPUs "
                        "first, then the CPU up to --max-memory, the rest offloaded to --offload-dir (for several "
                        "GPUs, and Switch, Qwen3-Next, Qwen3.5-MoE and Llama-4)")
    p.add_argument("--offload-dir", default=None,
                   help="with --max-memory or --device-map: where carried calibration activations (or, with "
                        "--device-map, the offloaded layers) go when they exceed the budget")
    p.set_defaults(run=run)
    return p


def run_streaming(args, tokenizer, batches, dtype, keep_quantization: bool = False) -> int:
    """The whole merge layer by layer from the checkpoint's shards (streaming/); a block-FP8 / MXFP4 source
    is written back in its format when keep_quantization (dtype None: bfloat16 work)."""
    from ..streaming import merge_checkpoint
    from ..streaming.quantized import describe_error

    check_groups_below_experts(args.num_groups, expert_count(args.model))
    layers = layers_option(args.layers)
    result = merge_checkpoint(args.model, args.out, batches, args.num_groups, similarity=args.similarity,
                              globally=args.globally, max_memory=per_device_sizes(args.max_memory),
                              offload_dir=args.offload_dir, permute=args.permute, strategy=args.strategy,
                              grouping=args.grouping, layers=layers, seed=args.seed, tokenizer=tokenizer,
                              device_map=device_map_option(args.device_map), dtype=dtype,
                              keep_quantization=keep_quantization, format=args.format, router=args.router,
                              within_routing_groups=bool(args.within_routing_groups))
    total = sum(g.num_groups for g in result.groupings.values())
    print(f"streamed {len(result.groupings)} layers layer by layer ({result.passes} pass(es) over the weights, "
          f"{result.bytes_read / 2**20:.1f} MiB read, peak RSS {result.peak_rss / 2**20:.0f} MiB): {total} groups")
    if keep_quantization:
        print(describe_error(result.quantization_error))
    kind = "standard " if args.format == "standard" else ""
    print(f"saved {kind}checkpoint to {result.path} ({dir_bytes(result.path) / 2**20:.2f} MiB on disk)")
    return 0


def expert_count(model) -> int:
    """The expert count of the checkpoint `model` (a directory or hub id) from its config alone."""
    from ..models.config_fields import expert_count_fields
    from ..models.hub import load_config

    config = load_config(model)
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return getattr(config, expert_count_fields(config)[0])


def check_groups_below_experts(num_groups: int, experts: int) -> None:
    """The merge must merge something, in memory or streamed alike."""
    if num_groups >= experts:
        raise ValueError(f"nothing would be merged: --num-groups {num_groups} is not below the number of "
                         f"experts (or merged slots) per layer ({experts})")


def check_format_options(args) -> None:
    """--format / --router / --globally / --export-dense together, before any work; resolves --globally."""
    standard = args.format == "standard"
    if args.router is not None and not standard:
        raise ValueError("--router chooses the router rows of --format standard; add --format standard")
    if standard and args.export_dense:
        raise ValueError("--export-dense writes every expert; --format standard writes the merged ones: choose one")
    if standard and args.globally:
        raise ValueError("--globally gives the layers different expert counts, but a --format standard checkpoint "
                         "has one count for the whole model: drop --globally (every layer gets --num-groups)")
    if args.globally is None:
        args.globally = not standard
    if args.within_routing_groups is None:
        args.within_routing_groups = standard


def _layer_errors(model, batches):
    """The layer errors of a re-quantized standard checkpoint (streaming/layer_errors.py), probed from here."""
    from ..streaming.layer_errors import LayerErrors

    return LayerErrors(model, batches)


def _print_groupings(groupings, samples: int, elapsed: float) -> None:
    width = max(len(name) for name in groupings)
    print(f"{'layer':<{width}}  experts  groups  dominant experts")
    for name, g in groupings.items():
        print(f"{name:<{width}}  {g.num_experts:>7}  {g.num_groups:>6}  {g.dominant}")
    total = sum(g.num_groups for g in groupings.values())
    print(f"{samples} calibration samples; {total} groups over {len(groupings)} layers in {elapsed:.2f} s")


def _save(args, model, tokenizer, batches, errors, keep_quantization: bool, merged_format, requantize: bool) -> Path:
    """The merged model written to --out: in its input's block-FP8 / MXFP4 precision where kept (a quantized
    source's standard / dense export beside --out, then moved; our merged checkpoint of one re-quantized like it),
    else in the working dtype."""
    from ..checkpoint import save_pretrained

    standard = dict(format="standard", router=args.router, batches=batches) if args.format == "standard" else {}
    save = partial(save_pretrained, model, export_dense=args.export_dense, tokenizer=tokenizer, **standard)
    if requantize:
        out, error = save_requantized_merged(model, args.out, args.model, tokenizer)
        print(f"written in the input's precision ({merged_format.method}), the new slots quantized afresh; {error}")
        return out
    if not keep_quantization:
        out = save(args.out)
        if merged_format is not None:
            print(f"the input's {merged_format.method} tensors written dequantized in {args.dtype} (the exact format "
                  "without --dtype keeps its precision)")
        return out
    from ..streaming.quantized import describe_error, save_requantized

    out = Path(args.out)
    print(describe_error(save_requantized(out, args.model, save, errors.record if errors is not None else None)))
    return out


def run(args) -> int:
    from ..calibrate import collect_routing_stats
    from ..calibration_data import calibration_batches, check_batches, load_tokenizer, read_calibration_texts
    from ..merge import merge_experts
    from ..models import moe_layers, select_layers
    from ..loading import open_model

    refuse_overwriting_input(args)
    check_format_options(args)
    if args.offload_dir is not None and args.max_memory is None and args.device_map is None:
        raise ValueError("--offload-dir needs --max-memory (or --device-map): it is where the streamed merge spills "
                         "what exceeds the budget; without one the model is merged in memory")
    if args.num_groups < 1:
        raise ValueError(f"--num-groups must be >= 1, got {args.num_groups}")
    tokenizer = load_tokenizer(args.tokenizer or args.model)
    texts = read_calibration_texts(args.calib, args.num_samples, args.text_field, args.split)
    batches = calibration_batches(texts, tokenizer, args.batch_size, args.max_length)
    check_batches(batches, tokenizer, vocab_size(args.model))  # streamed runs too
    from ..streaming import fits_in_memory
    from ..streaming.quantized import checkpoint_format
    from ..streaming.requantize_merged import stored_format

    budget = per_device_sizes(args.max_memory)
    # a block-FP8 / MXFP4 checkpoint: written in its own precision unless --dtype is given (then dequantized)
    quantized = checkpoint_format(args.model) is not None
    keep_quantization = quantized and args.dtype in (None, "auto")
    # our merge of one, merged again (in memory): the exact format is re-quantized like it, as compress does
    merged_format = None if quantized else stored_format(args.model)
    requantize = merged_format is not None and args.dtype in (None, "auto") and args.format == "exact" \
        and not args.export_dense
    args.dtype = args.dtype or saved_dtype(args.model) or "float32"  # a merged input keeps the dtype it was saved in
    dtype = None if keep_quantization else dtype_option(args)
    if quantized and not (args.export_dense or args.format == "standard"):  # re-quantized by the streamed merge
        return run_streaming(args, tokenizer, batches, dtype, keep_quantization)
    if isinstance(budget, dict) and args.device_map is None:
        raise ValueError("--max-memory per device (DEVICE=SIZE,...) needs --device-map")
    if args.device_map is not None or not fits_in_memory(
            args.model, budget.get("cpu") if isinstance(budget, dict) else budget, dtype):
        if args.export_dense:
            raise ValueError("--export-dense needs the whole model in memory (the streamed merge writes the exact or "
                             "the standard format); drop it (and --device-map) or raise --max-memory")
        return run_streaming(args, tokenizer, batches, dtype, keep_quantization)
    if args.offload_dir is not None:
        print(f"the model fits --max-memory {args.max_memory}: merged in memory; --offload-dir is not used")
    model = open_model(args.model, dtype)
    if args.format == "standard" and args.layers and len(select_layers(moe_layers(model), layers_option(args.layers))) \
            < len(moe_layers(model)):
        raise ValueError("--layers leaves some MoE layers with all their experts, but a --format standard checkpoint "
                         "has one expert count for every layer: drop --layers")
    check_groups_below_experts(args.num_groups,  # a merged input: its slots
                               max(int(layer.expert_map().max()) + 1 for layer in moe_layers(model)))
    before = parameter_bytes(model)
    similarity_bases = (args.similarity,) if args.similarity == "expert-output" else ("router-logits", "feature")
    start = time.perf_counter()
    errors = _layer_errors(model, batches) if keep_quantization and args.format == "standard" else None
    stats = collect_routing_stats(model, batches, bases=similarity_bases)
    if errors is not None:
        errors.close()
    layers = layers_option(args.layers)
    groupings = merge_experts(model, stats, args.num_groups, similarity=args.similarity, globally=args.globally,
                              permute=args.permute, strategy=args.strategy, layers=layers,
                              grouping=args.grouping, seed=args.seed,
                              within_routing_groups=args.within_routing_groups)
    elapsed = time.perf_counter() - start
    if errors is not None:
        errors.keep_merged(model)
    after = parameter_bytes(model)
    _print_groupings(groupings, len(texts), elapsed)
    out = _save(args, model, tokenizer, batches, errors, keep_quantization, merged_format, requantize)
    print(f"parameters: {before / 2**20:.2f} MiB before, {after / 2**20:.2f} MiB after merging "
          f"({before / max(after, 1):.2f}x smaller)")
    kind = "dense " if args.export_dense else ("standard " if args.format == "standard" else "")
    print(f"saved {kind}checkpoint to {out} ({dir_bytes(out) / 2**20:.2f} MiB on disk)")
    return 0
