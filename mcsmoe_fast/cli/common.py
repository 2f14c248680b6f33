"""What several subcommands share: the check that the models they read are there, the guard against
writing over the input model, calibration options, sizes."""
from __future__ import annotations

import os
from pathlib import Path


def refuse_overwriting_input(args, checkpoint: bool = True) -> None:
    """Every subcommand that writes a model refuses to write it over the model it reads: a save replaces
    the target directory, which would delete the user's original weights. checkpoint: --out is the checkpoint
    itself, so a directory a save could not replace (the user's other files in it) is refused now, before any
    work, rather than when the save starts. "~" is expanded in both, as the loader and the save expand it."""
    out, model = (Path(p).expanduser().absolute().resolve() for p in (args.out, args.model))
    if out == model or (model.is_dir() and model in out.parents):
        raise ValueError(f"--out {args.out} would write into the input model's directory {args.model}; "
                         "choose another output directory")
    if out in model.parents:
        raise ValueError(f"--out {args.out} holds the input model {args.model}: replacing it would delete the input; "
                         "choose another output directory")
    if checkpoint:
        from ..checkpoint.atomic import check_replaceable

        check_replaceable(out)


def first_given(*values):
    """The first value that is not None: an option's 0 is a value (refused by name where it is out of range),
    not "use the default"."""
    return next(v for v in values if v is not None)


MODEL_OPTIONS = ("model", "teacher")  # the options that name a model to read (directory or hub id)


def check_model_options(args) -> None:
    """Every model a subcommand will read is there, checked before the subcommand reads any tokenizer,
    config or data (main runs this for every subcommand): a missing directory fails at once, a hub id
    that is not cached is asked about once, briefly (models.hub.check_model_source)."""
    from ..models.hub import check_model_source

    for option in MODEL_OPTIONS:
        spec = getattr(args, option, None)
        if spec is not None:
            check_model_source(str(spec))


CALIBRATION_DEFAULTS = {"num_samples": 256, "batch_size": 8, "max_length": 256, "text_field": "text", "split": "train"}


def add_calibration_options(p, optional: bool = False) -> None:
    """How calibration text becomes batches (merge, prune, compare, compress). optional: the subcommand reads them
    only with --calib (compress): their defaults are None until calibration_defaults fills them in."""
    d = {k: None if optional else v for k, v in CALIBRATION_DEFAULTS.items()}
    p.add_argument("--num-samples", type=int, default=d["num_samples"], help="calibration samples (default 256)")
    p.add_argument("--batch-size", type=int, default=d["batch_size"], help="calibration batch size (default 8)")
    p.add_argument("--max-length", type=int, default=d["max_length"], help="tokens per calibration sample (default 256)")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the model directory)")
    p.add_argument("--text-field", default=d["text_field"],
                   help="text field of .jsonl records and datasets (default text)")
    p.add_argument("--split", default=d["split"], help="dataset split for a dataset name (default train)")


def calibration_defaults(args, reading: bool) -> None:
    """For add_calibration_options(optional=True): refuse the options given when the calibration text is not read
    (`reading` False: they would be ignored), else fill in the defaults of those not given."""
    given = [k for k in CALIBRATION_DEFAULTS if getattr(args, k) is not None]
    if given and not reading:
        names = ", ".join("--" + k.replace("_", "-") for k in given)
        raise ValueError(f"{names} shape(s) the calibration text of --calib, which is read for --importance activation "
                         "only: drop them")
    for key, value in CALIBRATION_DEFAULTS.items():
        if getattr(args, key) is None:
            setattr(args, key, value)


def layers_option(values):
    """--layers: MoE layer names, or positions in module order (negative from the end); None: every layer."""
    if not values:
        return None
    return [int(x) if isinstance(x, int) or str(x).lstrip("-").isdigit() else x for x in values]


def parameter_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def dir_bytes(path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())




def subcommand(sub, name: str, help: str, example: str, description: str | None = None):
    """A subcommand's parser whose --help ends with a worked example."""
    import argparse

    return sub.add_parser(name, help=help, description=description or help, epilog=f"example:\n  {example}",
                          formatter_class=argparse.RawDescriptionHelpFormatter)


def per_device_sizes(text):
    """--max-memory: one size ("8GB") or sizes per device ("cpu=8GB,0=70GB,1=70GB") as a dict (a mapping
    from a --config file is taken as it is)."""
    if text is None or isinstance(text, dict) or "=" not in str(text):
        return text
    sizes = {}
    for part in text.split(","):
        device, sep, size = part.partition("=")
        if not sep or not device.strip() or not size.strip():
            raise ValueError(f"--max-memory: expected SIZE or DEVICE=SIZE,... (e.g. cpu=8GB,0=70GB), got {text!r}")
        sizes[device.strip()] = size.strip()
    return sizes


def device_map_option(text):
    """--device-map: a strategy or device name as it is, or a JSON object {module name: device} (a mapping
    from a --config file is taken as it is)."""
    import json

    if text is None or isinstance(text, dict) or not str(text).lstrip().startswith("{"):
        return text
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"--device-map: not a JSON object ({exc})") from None


def saved_dtype(model: str) -> str | None:
    """The dtype a merged or compressed checkpoint directory was saved in; None for anything else."""
    from ..checkpoint import read_section

    path = Path(model).expanduser()
    section = read_section(path) if path.is_dir() else None
    return None if section is None else section.get("dtype", "float32")


DTYPE_CHOICES = ("float32", "bfloat16", "float16", "auto")


def add_dtype_option(p, quantized: bool = False, saves: bool = True, extra: str = "") -> None:
    """--dtype; quantized: its default (None) keeps a block-FP8 / MXFP4 source's precision (run() resolves it);
    saves: whether the command writes a checkpoint (compare evaluates only); extra: appended to the help."""
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default=None if quantized else "float32",
                   help=f"dtype the model is {'loaded, worked on and saved' if saves else 'loaded and worked on'} in: "
                        "float32 (default), bfloat16, float16, or auto (the checkpoint's own, e.g. bfloat16 for "
                        f"Mixtral: half the memory{' and output size' if saves else ''})"
                        + ("; a block-FP8 or MXFP4 checkpoint is written in its own precision (bfloat16 work) unless "
                           "--dtype names a dtype (auto keeps it): then it is written dequantized in that dtype"
                           if quantized else "") + extra)


def dtype_option(args):
    """The torch dtype of --dtype; auto reads the checkpoint's config, and when it names none the dtype of the
    weights (weights_dtype, as transformers' dtype="auto" reads them); float32 when neither says."""
    import torch

    if args.dtype != "auto":
        return getattr(torch, args.dtype)
    from ..models.hub import load_config

    stored = getattr(load_config(args.model), "dtype", None)
    stored = getattr(torch, stored, None) if isinstance(stored, str) else stored
    stored = stored or weights_dtype(args.model)
    return stored if stored in (torch.float32, torch.bfloat16, torch.float16) else torch.float32


def weights_dtype(model: str):
    """The dtype transformers' dtype="auto" takes when config.json names none: the first floating-point tensor's
    in the first weights file (the first shard of a sharded checkpoint) of the model directory or the cached hub
    id; None when no weights file is there."""
    import json

    from transformers.modeling_utils import get_state_dict_dtype, load_state_dict

    from ..checkpoint import WEIGHTS_NAME
    from ..models.hub import local_directory

    directory = local_directory(model)
    if directory is None:
        return None
    for name in ("model.safetensors", "pytorch_model.bin", WEIGHTS_NAME):
        first, index = directory / name, directory / f"{name}.index.json"
        if index.is_file():
            first = directory / min(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
        if first.is_file():
            return get_state_dict_dtype(load_state_dict(str(first), map_location="meta"))
    return None


def save_requantized_merged(model, out, like, tokenizer) -> tuple[Path, str]:
    """Save the compressed or merged model of the block-FP8 / MXFP4 checkpoint `like` to `out` in `like`'s precision
    (streaming/requantize_merged.py), replacing `out` once all is done: the dequantized save and its
    re-quantization happen in a scratch directory next to `out`, so a failure or Ctrl-C leaves what `out` held.
    Returns (out, the error re-quantizing added, in words)."""
    from ..checkpoint import atomic_directory, save_pretrained, scratch_directory
    from ..streaming.quantized import describe_error
    from ..streaming.requantize_merged import requantize_merged

    target = Path(out).expanduser().absolute()
    real = Path(os.path.realpath(target))
    with atomic_directory(target) as tmp, scratch_directory(real.parent, f".{real.name}.dequantized-") as scratch:
        save_pretrained(model, scratch / "model", tokenizer=tokenizer)
        report = requantize_merged(scratch / "model", like)
        for file in (scratch / "model").iterdir():
            os.replace(file, tmp / file.name)
    return target, describe_error(report)


def vocab_size(model) -> int:
    """The vocabulary size of --model, read from its config (before the model is loaded): token ids of the texts
    are checked against it."""
    from ..models.hub import load_config

    return load_config(model).get_text_config().vocab_size
