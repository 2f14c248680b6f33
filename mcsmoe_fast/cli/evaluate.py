"""mcsmoe-fast eval: a model's task metrics or held-out perplexity."""
from __future__ import annotations

import json
import os
from pathlib import Path

from .common import subcommand
from .data_options import add_data_options, resolve_data


def add(sub):
    p = subcommand(sub, "eval", "evaluate a model (plain, merged or compressed): task metrics or perplexity",
                   "mcsmoe-fast eval --model ./switch-merged --task copa --eval-data copa_val.jsonl")
    p.add_argument("--model", required=True, help="model directory (plain, merged or compressed) or hub id")
    add_data_options(p, training=False)
    p.add_argument("--optimize", action="store_true", help="run the fused inference modules (same results, faster)")
    p.add_argument("--json", default=None, help="also write the results to this JSON file (checked before any work)")
    p.set_defaults(run=run)
    return p


def run(args) -> int:
    from ..calibration_data import load_tokenizer
    from ..checkpoint.source_stamp import check_inputs
    from ..loading import open_model
    from ..optimize import optimize

    if args.json:
        check_json_path(args.json, [args.model, args.tokenizer, args.eval_text, args.eval_data, args.lm_eval_include])
    tokenizer = load_tokenizer(args.tokenizer or args.model)
    data = resolve_data(args, tokenizer, training=False)
    model = open_model(args.model)
    if args.optimize:
        optimize(model)
    results = data.evaluate(model.eval())
    check_inputs()  # the figures come from one checkpoint and its tokenizer
    for name, value in results.items():
        print(f"{name}: {value:.4f}")
    if args.json:
        from ..checkpoint.atomic import write_text_atomic

        write_text_atomic(args.json, json.dumps(results, indent=1))
    return 0


def check_json_path(path, inputs=()) -> None:
    """--json can be written, and is none of the `inputs` (the model and tokenizer directories, the data files)
    nor inside one of them: refused now, before the model is loaded, rather than after the evaluation."""
    file = Path(path)
    real = Path(os.path.realpath(file))
    for given in inputs:
        if given is not None and Path(given).exists():
            source = Path(os.path.realpath(given))
            if real == source or source in real.parents:
                raise ValueError(f"--json {path} would overwrite an input of this evaluation ({given}); choose a path "
                                 "outside the model and its data")
    folder = file.parent
    if file.is_dir():
        raise ValueError(f"--json {path} is a directory; give a file name for the results")
    if not folder.is_dir():
        raise ValueError(f"--json {path}: its directory {folder} does not exist; create it or choose another path")
    if not os.access(folder, os.W_OK) or (file.exists() and not os.access(file, os.W_OK)):
        raise ValueError(f"--json {path} cannot be written (no permission); choose another path")
