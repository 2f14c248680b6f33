"""M-SMoE on switch-base-32 with the paper's settings (Li et al., ICLR 2024, and the public recipe):

- calibration: 256 training samples of the task (SST-2 by default: dataset `glue:sst2`, field `sentence`);
- similarity basis: router logits; dominant experts by usage frequency; global adaptive group counts
  with 8 groups per merged layer on average;
- merged layers: every MoE layer except the first encoder one (switch-base-32: encoder blocks
  3, 5, 7, 9, 11 and all six decoder MoE blocks);
- members aligned to their group's dominant expert (weight matching), then frequency-weighted merging.

It runs `mcsmoe-fast merge` with those arguments; everything after `--` goes to it unchanged, so
any setting can be overridden. KD fine-tuning of the merged model and task evaluation are not part
of this recipe yet.

    python python/switch_base_32_msmoe.py --out switch-base-32-msmoe
    python python/switch_base_32_msmoe.py --model DIR --calib data.jsonl --text-field text --out DIR
"""
from __future__ import annotations

import argparse
import sys


def merge_arguments(args: argparse.Namespace, num_moe_layers: int) -> list[str]:
    layers = [str(position) for position in range(1, num_moe_layers)]  # all but the first encoder MoE layer
    return [
        "merge", "--model", args.model, "--calib", args.calib, "--text-field", args.text_field,
        "--num-samples", "256", "--num-groups", str(args.num_groups), "--similarity", "router-logits",
        "--strategy", "frequency", "--globally", "--layers", *layers, "--out", args.out,
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="google/switch-base-32", help="hub id or directory (a task fine-tuned model)")
    parser.add_argument("--calib", default="glue:sst2", help="calibration source: dataset[:config], .txt or .jsonl")
    parser.add_argument("--text-field", default="sentence")
    parser.add_argument("--num-groups", type=int, default=8, help="average groups per merged layer")
    parser.add_argument("--out", required=True)
    args, passthrough = parser.parse_known_args(argv)

    from transformers import AutoConfig

    from mcsmoe_fast.cli import main as cli_main

    config = AutoConfig.from_pretrained(args.model)
    if config.model_type != "switch_transformers":
        parser.error(f"{args.model} is a {config.model_type} model; this recipe is for Switch Transformers")
    num_moe_layers = config.num_sparse_encoder_layers + config.num_sparse_decoder_layers
    return cli_main(merge_arguments(args, num_moe_layers) + [a for a in passthrough if a != "--"])


if __name__ == "__main__":
    sys.exit(main())
