"""The router of a merged expert in a standard checkpoint, measured: "dominant" against "fitted".

Trains the demo's byte-level Mixtral-style MoE (mcsmoe_fast/demo/recipe.py, the QUICK plan unless
--full), merges 8 -> 4 experts in every layer (M-SMoE, --no-globally: a standard checkpoint has one
count), and compares on the held-out source files the aliased merged model (format='exact') with its
standard form under each router choice: perplexity, mean KL(aliased || standard) of the next-byte
distribution, and the mean absolute logit difference. The fitted rows use the merge's own calibration
windows. Prints a markdown table (docs/standard_format.md quotes it).

    python benchmarks/standard_router.py [--full] [--groups 4]
"""
from __future__ import annotations

import argparse
import copy
import time

import torch

from mcsmoe_fast import collect_routing_stats, merge_experts
from mcsmoe_fast.checkpoint.standard import to_standard
from mcsmoe_fast.demo.corpus import split_corpus
from mcsmoe_fast.demo.recipe import QUICK, DemoPlan, byte_lm
from mcsmoe_fast.train import TrainConfig, train
from mcsmoe_fast.train.text import Windows, lm_batch, perplexity


@torch.no_grad()
def logit_gap(reference, model, windows: torch.Tensor, batch_size: int = 16) -> tuple[float, float]:
    """(mean KL(reference || model) per byte, mean |logit difference|) over the windows."""
    kl = gap = 0.0
    count = 0
    for i in range(0, windows.shape[0], batch_size):
        ids = windows[i: i + batch_size]
        a = reference(input_ids=ids).logits.float()
        b = model(input_ids=ids).logits.float()
        kl += torch.nn.functional.kl_div(b.log_softmax(-1), a.log_softmax(-1), log_target=True,
                                         reduction="sum").item()
        gap += (a - b).abs().mean(-1).sum().item()
        count += a.shape[0] * a.shape[1]
    return kl / count, gap / count


def trained(plan: DemoPlan, data: Windows, cache: str | None):
    """The demo's byte-level MoE trained for plan.steps (loaded from `cache` when it holds one)."""
    from pathlib import Path

    from transformers import MixtralForCausalLM

    if cache is not None and (Path(cache) / "config.json").exists():
        return MixtralForCausalLM.from_pretrained(cache).eval()
    full = byte_lm(plan)
    train(full, data, TrainConfig(steps=plan.steps, batch_size=plan.batch_size, learning_rate=plan.learning_rate,
                                  warmup_steps=plan.warmup_steps, seed=plan.seed, train_routers=True, eval_every=0),
          collate_fn=lm_batch, progress=False)
    if cache is not None:
        full.save_pretrained(cache)
    return full.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="the demo's full plan (1000 steps) instead of QUICK")
    parser.add_argument("--groups", type=int, default=4)
    parser.add_argument("--cache", default=None, help="directory to keep the trained model in (reused when there)")
    args = parser.parse_args()
    plan: DemoPlan = DemoPlan() if args.full else QUICK
    start = time.perf_counter()
    train_tokens, held_out = split_corpus(int(plan.steps * plan.batch_size * plan.length * 1.05),
                                          plan.eval_windows, plan.length)
    data = Windows(train_tokens, plan.length)
    full = trained(plan, data, args.cache)
    calibration = [{"input_ids": data.rows[i: i + 16]} for i in range(0, plan.calibration_windows, 16)]
    stats = collect_routing_stats(full, calibration, progress=False)
    merged = copy.deepcopy(full)
    merge_experts(merged, stats, args.groups, globally=False, progress=False)
    rows = [("full (8 experts)", full), (f"merged, exact (aliased), {args.groups} experts", merged)]
    for router in ("dominant", "fitted"):
        rows.append((f"merged, standard, router={router}", to_standard(merged, router=router, batches=calibration)))
    print(f"plan: {'full' if args.full else 'QUICK'} ({plan.steps} steps, hidden {plan.hidden_size}); "
          f"{held_out.shape[0]} held-out windows of {plan.length} bytes; {time.perf_counter() - start:.0f} s")
    print("| model | perplexity | KL(aliased ‖ model) per byte | mean abs logit diff vs aliased |")
    print("|---|---|---|---|")
    for name, model in rows:
        kl, gap = logit_gap(merged, model, held_out)
        print(f"| {name} | {perplexity(model, held_out):.4f} | {kl:.5f} | {gap:.4f} |")


if __name__ == "__main__":
    main()
