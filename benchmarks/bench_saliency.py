"""REAP saliency pass, fp32 CPU: collect_routing_stats(..., saliency="reap") against plain-PyTorch observers on
one Qwen3-MoE layer, in the same run.

Layer: Qwen3-30B-A3B's MoE shape (d 2048, ff 768, E 128, top-8) scaled to a 2-core CPU: d 512, ff 192,
E 128, top-8 (the same ff/d, E and k), one decoder layer, 4 x 128 calibration tokens.

Candidates (each one full calibration pass: the model's forward plus the observer):
  ours            collect_routing_stats(saliency="reap"): counts, logit Gram, routed-input sums and the
                  saliency, the expert outputs from the fused grouped_expert_ffn, one row per routed pair
  hook_routed     a forward pre-hook on the block computing, expert by expert in a Python loop, the outputs
                  of the tokens routed to it and g * ||f|| (the per-expert observer, plain PyTorch)
  hook_all        REAP's own observer: every expert on every token ([E, T, d] outputs), then the routed
                  tokens' norms (what CerebrasResearch/reap's observer computes)
The saliencies of all three are checked against each other before timing.

Run:  python benchmarks/bench_saliency.py   (about a minute on 2 cores; on an idle machine)
"""
from __future__ import annotations

import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from bench_moe import settle
from mcsmoe_fast import collect_routing_stats
from mcsmoe_fast.tiny import tiny_moe

SHAPE = dict(hidden_size=512, intermediate_size=192, num_experts=128, top_k=8)
TOKENS = (4, 128)  # batches x length
REPEATS = 3


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").is_file() else []:
        if line.startswith("model name"):
            return line.partition(":")[2].strip()
    return platform.processor() or platform.machine()


def build():
    model = tiny_moe("qwen3_moe", num_layers=1, **SHAPE)
    with torch.no_grad():  # weights of about 1/sqrt(fan-in), so that outputs and routing are not degenerate
        for name, p in model.named_parameters():
            if "experts" in name or "gate" in name:
                p.normal_(0, p.shape[-1] ** -0.5)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, model.config.vocab_size, TOKENS, generator=g)
    return model, [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}]


def expert_out(experts, e: int, x: torch.Tensor) -> torch.Tensor:
    gate, up = F.linear(x, experts.gate_up_proj[e]).chunk(2, dim=-1)
    return F.linear(F.silu(gate) * up, experts.down_proj[e])


def hook_observer(model, batches, every_token: bool) -> torch.Tensor:
    """REAP saliency [E] of the one MoE block by a forward pre-hook (renormalised softmax over the top-k)."""
    block = model.model.layers[0].mlp
    e, k = block.gate.weight.shape[0], model.config.num_experts_per_tok
    total, count = torch.zeros(e, dtype=torch.float64), torch.zeros(e, dtype=torch.float64)

    def hook(module, args):
        x = args[0].reshape(-1, args[0].shape[-1])
        probs = torch.softmax(F.linear(x, module.gate.weight), dim=-1)
        weights, index = probs.topk(k, dim=-1)
        weights = weights / weights.sum(-1, keepdim=True)
        outs = torch.stack([expert_out(module.experts, j, x) for j in range(e)]) if every_token else None
        for j in range(e):
            tokens, slot = torch.where(index == j)
            if len(tokens):
                f = outs[j, tokens] if every_token else expert_out(module.experts, j, x[tokens])
                total[j] += (weights[tokens, slot] * f.norm(dim=-1)).sum().double()
                count[j] += len(tokens)

    handle = block.register_forward_pre_hook(hook)
    try:
        with torch.no_grad():
            for b in batches:
                model(**b)
    finally:
        handle.remove()
    return torch.where(count > 0, total / count.clamp_min(1), torch.zeros_like(total))


def ours(model, batches) -> torch.Tensor:
    stats = collect_routing_stats(model, batches, progress=False, saliency="reap")
    return next(iter(stats.values())).saliency.cpu()


def timed(fn, *args) -> float:
    runs = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        fn(*args)
        runs.append(time.perf_counter() - start)
    return statistics.median(runs)


def main() -> None:
    torch.manual_seed(0)
    model, batches = build()
    reference = ours(model, batches)
    settle(lambda: ours(model, batches))  # the fused ops' choices by measurement made: no trial in the timed runs
    for every in (False, True):
        torch.testing.assert_close(hook_observer(model, batches, every), reference, rtol=1e-4, atol=1e-6)
    times = {"ours": timed(ours, model, batches),
             "hook_routed": timed(hook_observer, model, batches, False),
             "hook_all": timed(hook_observer, model, batches, True)}
    tokens = TOKENS[0] * TOKENS[1]
    print(f"CPU: {cpu_name()}; torch threads: {torch.get_num_threads()}; torch {torch.__version__}")
    print(f"Qwen3-MoE layer scaled: d {SHAPE['hidden_size']}, ff {SHAPE['intermediate_size']}, "
          f"E {SHAPE['num_experts']}, top-{SHAPE['top_k']}; {tokens} tokens; median of {REPEATS}")
    print(f"{'candidate':<12} {'seconds':>8} {'tokens/s':>9} {'ours faster':>11}")
    for name, t in times.items():
        print(f"{name:<12} {t:>8.3f} {tokens / t:>9.0f} {t / times['ours']:>10.2f}x")


if __name__ == "__main__":
    main()
