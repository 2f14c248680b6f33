"""mcsmoe-fast bench: forward throughput of a model with transformers' modules and after `optimize`."""
from __future__ import annotations

from .common import subcommand


def add(sub):
    p = subcommand(sub, "bench", "tokens/s of a model (plain, merged or compressed) with transformers' modules and "
                   "after optimize", "mcsmoe-fast bench --model ./mixtral-merged --tokens 128 1024")
    p.add_argument("--model", required=True, help="model directory (plain, merged or compressed) or hub id")
    p.add_argument("--tokens", type=int, nargs="+", default=[128, 1024],
                   help="tokens per forward pass, one measurement each (default 128 1024)")
    p.add_argument("--length", type=int, default=128, help="sequence length; batch = tokens / length (default 128)")
    p.add_argument("--repeats", type=int, default=5, help="timed passes per measurement; the best counts (default 5)")
    p.set_defaults(run=run)
    return p


def random_inputs(model, tokens: int, length: int, seed: int = 0) -> dict:
    import torch

    batch, length = max(1, tokens // length), min(length, tokens)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (batch, length), generator=g)
    if getattr(model.config, "is_encoder_decoder", False):
        return {"input_ids": ids, "decoder_input_ids": ids[:, : max(1, length // 4)]}
    return {"input_ids": ids}


def run(args) -> int:
    from ..demo.measure import throughput
    from ..loading import open_model

    if min(args.tokens) < 1 or args.length < 1 or args.repeats < 1:
        raise ValueError("--tokens, --length and --repeats must be >= 1")
    uneven = [t for t in args.tokens if t > args.length and t % args.length]
    if uneven:
        raise ValueError(f"--tokens {uneven} not a multiple of --length {args.length}: a pass is whole sequences of "
                         "--length tokens (or one shorter sequence)")
    model = open_model(args.model)
    print(f"{'tokens':>7}  {'tok/s transformers':>18}  {'tok/s optimize':>14}  speed-up")
    for tokens in args.tokens:
        hf, fast = throughput(model, random_inputs(model, tokens, args.length), args.repeats)
        print(f"{tokens:7d}  {hf:18.0f}  {fast:14.0f}  {fast / hf:7.2f}x")
    return 0
