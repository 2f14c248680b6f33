"""The demo's recipe on a model it trains itself: a byte-level Mixtral-style MoE language model learns
the Python standard library's source; then align + merge 8 -> 4 experts per layer on average (M-SMoE,
adaptive per-layer counts from one budget, as in the paper), recover with knowledge distillation,
compress the merged experts (MC-SMoE), recover again, and measure every model on held-out source files.

Fair by construction: the full model trains for `steps`; the model that is merged is its checkpoint at
`steps - recover_steps`, so every recovered row ends at exactly `steps` optimizer steps (the JSON
records each row's steps). The teacher is that same merged-from checkpoint: nothing a student sees
comes from later training. MC-SMoE follows the paper's order: merge, half the recovery steps of KD,
compress, the other half; two rows: compressed one-shot (rows kept by weight magnitude) then KD, and the
paper's own recipe, the rows pruned during KD by |theta * grad| on the cubic schedule.

Then the field's methods on the same checkpoint (compare.py, issues 20 and 21): M-SMoE in the exact
(aliased) and the standard form (M router rows, fitted), HC-SMoE, REAM-style merging, REAP and frequency
pruning at `compare_ratios` fewer experts, each one-shot and after the same KD budget (`method_kd_steps`,
at most recover_steps, so these rows end at or before `steps` too), the teacher again the merged-from
checkpoint.
"""
from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, replace

import torch
from torch import nn

from ..calibrate import collect_routing_stats
from ..compare import compare_methods
from ..compress import CompressOptions, compress_experts
from ..merge import merge_experts
from ..train import TrainConfig, train
from ..train.text import Windows, lm_batch, perplexity
from .corpus import split_corpus


@dataclass(frozen=True)
class DemoPlan:
    hidden_size: int = 128
    intermediate_size: int = 256
    layers: int = 2
    heads: int = 4
    experts: int = 8
    top_k: int = 2
    length: int = 128  # bytes per training window
    batch_size: int = 16
    steps: int = 1000  # the full model's optimizer steps: every row ends at or before this
    recover_steps: int = 300  # KD steps after merging, >= 2 (the merged checkpoint is at steps - recover_steps)
    learning_rate: float = 3e-3
    kd_learning_rate: float = 1e-3
    warmup_steps: int = 50
    groups: int = 4  # merged experts per layer (on average: adaptive per-layer counts)
    rank: int = 16
    keep_ratio: float = 0.1
    calibration_windows: int = 64  # training windows for the routing statistics, in batches of 16
    eval_windows: int = 256  # spread over all held-out files (corpus.split_corpus)
    seed: int = 0
    compare_ratios: tuple[float, ...] = (0.25, 0.5)  # shares of experts removed in the method comparison
    compare_kd_steps: int | None = 100  # KD steps of each compared method (None: half of recover_steps)
    compare_methods: tuple[str, ...] = ()  # the compared methods (empty: DEMO_METHODS)

    def __post_init__(self):
        if not 2 <= self.recover_steps < self.steps:
            raise ValueError(f"recover_steps must be in [2, steps): MC-SMoE compresses after the first half of the "
                             f"KD steps and recovers in the second; got {self.recover_steps} of {self.steps}")
        if not 1 <= self.groups < self.experts:
            raise ValueError(f"groups must be in [1, experts), got {self.groups}")
        if not 0 < self.method_kd_steps <= self.recover_steps:
            raise ValueError(f"compare_kd_steps must be in (0, recover_steps]: no row may train past steps; "
                             f"got {self.method_kd_steps} of {self.recover_steps}")
        object.__setattr__(self, "compare_ratios", tuple(self.compare_ratios))
        object.__setattr__(self, "compare_methods", tuple(self.compare_methods))

    @property
    def merge_step(self) -> int:
        return self.steps - self.recover_steps

    @property
    def method_kd_steps(self) -> int:
        return self.compare_kd_steps if self.compare_kd_steps is not None else max(1, self.recover_steps // 2)


# the method comparison's rows: M-SMoE's exact and standard forms side by side (issue 20), then issue 21's,
# with M-SMoE and REAM-style merges also compressed (rank and keep ratio of the MC-SMoE rows)
DEMO_METHODS = ("m-smoe", "m-smoe-standard", "hc-smoe", "ream", "reap", "frequency", "m-smoe+c", "ream+c")

# --quick leaves the compressed merges out (minutes matter there; the full plan and the tests run them)
QUICK = DemoPlan(hidden_size=64, intermediate_size=128, steps=240, recover_steps=80, learning_rate=5e-3,
                 kd_learning_rate=2e-3, warmup_steps=20, rank=8, calibration_windows=32, eval_windows=128,
                 compare_kd_steps=40, compare_methods=DEMO_METHODS[:6])


def byte_lm(plan: DemoPlan) -> nn.Module:
    """A small Mixtral-style MoE language model over bytes (vocabulary 256)."""
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(plan.seed)
    config = MixtralConfig(vocab_size=256, hidden_size=plan.hidden_size, intermediate_size=plan.intermediate_size,
                           num_hidden_layers=plan.layers, num_attention_heads=plan.heads,
                           num_key_value_heads=plan.heads, num_local_experts=plan.experts,
                           num_experts_per_tok=plan.top_k, max_position_embeddings=plan.length,
                           tie_word_embeddings=False, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    return MixtralForCausalLM(config)


def _snapshot_at(step: int, into: dict):
    def callback(model, record):
        if record["step"] == step:
            into["model"] = copy.deepcopy(model).eval()
    return callback


def run_recipe(plan: DemoPlan, progress: bool = True, print_fn=print) -> dict:
    """Train, merge, recover, compress, recover. Returns {row name: (model, steps)} and the data."""
    train_tokens, held_out = split_corpus(int(plan.steps * plan.batch_size * plan.length * 1.05),
                                          plan.eval_windows, plan.length)
    data = Windows(train_tokens, plan.length)
    eval_fn = lambda m: {"perplexity": perplexity(m, held_out)}  # noqa: E731
    print_fn(f"corpus: {train_tokens.numel() / 1e6:.1f} MB of standard-library source to train on; evaluated on "
             f"{plan.eval_windows} windows of {plan.length} bytes spread evenly over the held-out files")

    full = byte_lm(plan)
    snap: dict = {}
    config = TrainConfig(steps=plan.steps, batch_size=plan.batch_size, learning_rate=plan.learning_rate,
                         warmup_steps=plan.warmup_steps, eval_every=math.gcd(plan.merge_step, plan.steps),
                         seed=plan.seed, train_routers=True)  # trained from scratch: its routers learn too
    train(full, data, config, collate_fn=lm_batch, eval_fn=eval_fn, callback=_snapshot_at(plan.merge_step, snap),
          progress=progress)
    teacher = snap["model"]

    calibration = [{"input_ids": data.rows[i: min(i + 16, plan.calibration_windows)]}
                   for i in range(0, plan.calibration_windows, 16)]
    stats = collect_routing_stats(teacher, calibration, progress=False)
    baseline = copy.deepcopy(teacher)
    merge_experts(baseline, stats, plan.groups, similarity="random", strategy="average", permute=False,
                  globally=False, seed=plan.seed, progress=False)
    msmoe = copy.deepcopy(teacher)
    merge_experts(msmoe, stats, plan.groups, progress=False)

    kd = replace(config, steps=plan.recover_steps, learning_rate=plan.kd_learning_rate, train_routers=False,
                 warmup_steps=min(plan.warmup_steps, plan.recover_steps // 4), eval_every=plan.recover_steps // 2)
    msmoe_kd, mid = copy.deepcopy(msmoe), {}
    train(msmoe_kd, data, kd, collate_fn=lm_batch, eval_fn=eval_fn, teacher=teacher,
          callback=_snapshot_at(kd.eval_every, mid), progress=progress)

    rest = replace(kd, steps=plan.recover_steps - kd.eval_every, eval_every=plan.recover_steps - kd.eval_every,
                   keep_ratio=plan.keep_ratio)
    mc, pruned = mid["model"], copy.deepcopy(mid["model"])
    compress_experts(mc, rank=plan.rank, keep_ratio=plan.keep_ratio, importance="weight", progress=False)
    one_shot = perplexity(mc, held_out)
    train(mc, data, rest, collate_fn=lm_batch, eval_fn=eval_fn, teacher=teacher, progress=progress)
    compress_experts(pruned, rank=plan.rank, keep_ratio=plan.keep_ratio, importance="gradient", progress=False)
    train(pruned, data, rest, collate_fn=lm_batch, eval_fn=eval_fn, teacher=teacher, progress=progress)
    method_kd = replace(kd, steps=plan.method_kd_steps, warmup_steps=min(plan.warmup_steps, plan.method_kd_steps // 4))
    methods = compare_methods(teacher, calibration, held_out, plan.compare_methods or DEMO_METHODS, plan.compare_ratios,
                              progress=progress, kd=method_kd, kd_data=data,
                              compress=CompressOptions(rank=plan.rank, keep_ratio=plan.keep_ratio))
    methods["merged_from_step"] = plan.merge_step
    rows = {
        "full": (full, plan.steps),
        "random groups, uniform average": (baseline, plan.merge_step),
        "M-SMoE": (msmoe, plan.merge_step),
        "M-SMoE + KD": (msmoe_kd, plan.steps),
        "MC-SMoE one-shot + KD": (mc, plan.steps),
        "MC-SMoE pruned during KD": (pruned, plan.steps),
    }
    return {"rows": rows, "held_out": held_out, "mc_one_shot_perplexity": one_shot, "plan": asdict(plan),
            "methods": methods, "teacher": teacher}
