"""`compare` larger than memory (compare_streamed.compare_checkpoint) on a Mixtral-shaped bf16 checkpoint bigger than
its --max-memory budget: peak RSS of the whole process (getrusage) against the budget plus the interpreter, the time
per method, and the rows. Each comparison runs in a fresh child process (Linux keeps ru_maxrss across fork and exec,
so the parent that built the checkpoint must not be the one measured); the interpreter's own RSS (torch,
transformers and mcsmoe_fast imported) is measured in another child.

    python benchmarks/bench_compare_streamed.py --workdir DIR [--layers 8 --hidden 1024 --ff 3584 --experts 8]
        [--max-memory 1GB] [--methods reap,m-smoe,m-smoe+c] [--ratio 0.5]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def build(args) -> None:
    import torch
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    config = MixtralConfig(vocab_size=1024, hidden_size=args.hidden, intermediate_size=args.ff,
                           num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=2,
                           num_local_experts=args.experts, num_experts_per_tok=2, max_position_embeddings=512)
    MixtralForCausalLM(config).to(torch.bfloat16).save_pretrained(Path(args.workdir) / "model")


def interpreter() -> dict:
    import resource

    import mcsmoe_fast  # noqa: F401  (what the measured child imports)
    import torch  # noqa: F401
    import transformers  # noqa: F401

    return dict(rss=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)


def compare_one(args) -> dict:
    import resource

    import torch

    from mcsmoe_fast.compare_streamed import compare_checkpoint
    from mcsmoe_fast.compress import CompressOptions

    g = torch.Generator().manual_seed(1)
    batches = [{"input_ids": torch.randint(3, 1024, (4, 64), generator=g)} for _ in range(4)]
    windows = torch.randint(3, 1024, (16, 64), generator=g)
    start = time.perf_counter()
    result = compare_checkpoint(Path(args.workdir) / "model", batches, windows, args.methods.split(","), [args.ratio],
                                scratch=Path(args.workdir), max_memory=args.max_memory, dtype=torch.bfloat16,
                                progress=False, compress=CompressOptions(rank=32, keep_ratio=0.1))
    return dict(seconds=time.perf_counter() - start, max_rss=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                rows=result["rows"])


def child(flag: str, args) -> dict:
    out = subprocess.run([sys.executable, __file__, flag, *sys.argv[1:]], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--workdir", required=True, help="the checkpoint is built here once and reused")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--ff", type=int, default=3584)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--max-memory", default="1GB")
    p.add_argument("--methods", default="reap,m-smoe,m-smoe+c")
    p.add_argument("--ratio", type=float, default=0.5)
    p.add_argument("--build", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--interpreter", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--compare-one", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.build:
        return build(args)
    if args.interpreter or args.compare_one:
        return print(json.dumps(interpreter() if args.interpreter else compare_one(args)))
    model = Path(args.workdir) / "model"
    if not (model / "config.json").is_file():
        subprocess.run([sys.executable, __file__, "--build", *sys.argv[1:]], check=True)
    from cpu_info import cpu_line
    from mcsmoe_fast.streaming.memory import parse_size

    run, base = child("--compare-one", args), child("--interpreter", args)
    size = sum(f.stat().st_size for f in model.glob("*.safetensors"))
    budget = parse_size(args.max_memory, "max_memory")
    print(cpu_line())
    print(f"checkpoint {size / 2**30:.2f} GiB bf16, --max-memory {args.max_memory}, interpreter {base['rss'] / 2**20:.0f} MiB")
    print(f"peak RSS {run['max_rss'] / 2**20:.0f} MiB (budget + interpreter {(budget + base['rss']) / 2**20:.0f} MiB), "
          f"{run['seconds']:.0f} s for the full model and {len(run['rows']) - 1} reduced ones")
    for r in run["rows"]:
        print(f"  {r['method']:<10} {r['form']:<18} expert params {r['expert_share']:6.1%}  perplexity {r['perplexity']:.3f}")


if __name__ == "__main__":
    main()
