"""The `mcsmoe-fast` command. Each subcommand lives in its own module with an `add(sub)` that adds its
parser (with a worked example in its --help) and a `run(args)`; the work itself stays in the library."""
from __future__ import annotations

import argparse
import os
import sys

from safetensors import SafetensorError

from . import bench, compare, compress, demo, evaluate, finetune, merge, permute, prune
from ..checkpoint.source_stamp import watching_inputs
from .common import check_model_options
from .config_file import apply_config, config_path

SUBCOMMANDS = {
    "demo": demo, "finetune": finetune, "permute": permute, "merge": merge, "compress": compress, "eval": evaluate,
    "bench": bench, "prune": prune, "compare": compare,
}
# the options that name a file or directory (a model, data, an output): `~` in them is the home directory
INPUT_OPTIONS = ("model", "teacher", "tokenizer")  # directories read more than once: watched while a command runs
PATH_OPTIONS = ("model", "teacher", "tokenizer", "out", "calib", "data", "eval_data", "text", "eval_text", "kd_text",
                "json", "offload_dir", "lm_eval_include", "config")


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    from .. import __version__

    parser = argparse.ArgumentParser(prog="mcsmoe-fast", description="Merge, then compress Mixture-of-Experts models.",
                                     allow_abbrev=False)
    parser.add_argument("--version", action="version", version=f"mcsmoe-fast {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    parsers = {}
    for name, module in SUBCOMMANDS.items():
        p = module.add(sub)
        p.allow_abbrev = False  # every option spelled out: --conf would be taken for --config, the file never read
        p.add_argument("--config", default=None, metavar="FILE",
                       help="read settings from a YAML or JSON file, given once (options given here win)")
        parsers[name] = p
    return parser, parsers


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser, parsers = build_parser()
    command = next((a for a in argv if a in parsers), None)
    try:
        path = config_path(argv)
        if path is not None and command is not None:
            apply_config(parsers[command], path, argv)
    except (ValueError, FileNotFoundError) as exc:
        print(f"mcsmoe-fast {command}: error: {exc}", file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one progress bar per step of ours, not transformers' loading/writing bars
    try:
        check_model_options(args)  # before the subcommand reads any tokenizer or data (names --model as typed)
        expand_home(args)
        with watching_inputs(*(getattr(args, dest, None) for dest in INPUT_OPTIONS)):  # outputs of one checkpoint
            return args.run(args)
    except (ValueError, FileNotFoundError, OSError) as exc:
        print(f"mcsmoe-fast {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except SafetensorError as exc:  # a failed write (a full disk) in safetensors, which raises no OSError
        print(f"mcsmoe-fast {args.command}: error: writing a weights file failed (disk full?): {exc}", file=sys.stderr)
        return 2


def expand_home(args) -> None:
    """`~` in a path option is the home directory, wherever the path comes from (the shell expands it on the command
    line, not in quotes nor in a --config file) and whichever step reads or writes it."""
    for dest in PATH_OPTIONS:
        value = getattr(args, dest, None)
        if isinstance(value, str):
            setattr(args, dest, os.path.expanduser(value))
