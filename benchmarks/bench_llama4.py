"""One Llama-4 MoE layer, fp32 CPU: transformers' Llama4TextMoe against our Llama4MoE block
(models/llama4.py) at T = 1, 16, 128, 512 tokens, all in the same run.

Layer: Llama-4-Scout's shape scaled to a 2-core CPU: d 1024, ff 1638 (Scout: 5120, 8192; the same ff/d),
E 16, top-1, a shared expert of the same ff (Scout's). transformers runs all 16 experts on every token
(a dense bmm on the router-scaled copies, zero rows for the unchosen experts); ours runs each token's
chosen expert only (one pre-scaled row per (token, chosen expert) through ops.grouped_expert_ffn), so at
top-1 the routed experts cost about E = 16 times less; the shared expert costs the same in both.

Candidates (one benchmark group per T; transformers is the anchor):
  transformers   Llama4TextMoe, eager (its only implementation)
  fast_block     Llama4MoE on transformers' own Llama4TextExperts (Llama4Layer.install_fast_block, what
                 optimize() installs: the same Parameters laid out canonically in place, transformers' names)
  slots          Llama4MoE on MoEExperts, a contiguous canonical copy (what merging at G = E gives)
  merged_G4      Llama4MoE on 4 merged slots (expert_map [16] -> 4), the merged model
  floor          not an implementation: the shared expert on the tokens plus one read of every routed
                 expert's weights (a sum over them), the least any exact fp32 layer that reads each weight
                 once can take. Once T * k >= E every expert is chosen by some token and the routed part
                 reads all E experts' weights (16 x 20 MB here) for a few rows each: memory-bound, while
                 transformers' dense bmm is compute-bound (2 T flops per weight). fast_block / floor says
                 how far the small-M GEMMs are from streaming the weights once.
Each output is checked against transformers' before timing.

Run:  python -m pytest benchmarks/bench_llama4.py --benchmark-only   (about 2 min on 2 cores; measure on an
      idle machine: threaded GEMMs slow down several times when another process competes for the cores).
"""
from __future__ import annotations

import copy

import pytest
import torch

from bench_moe import settle
from mcsmoe_fast.models.llama4 import llama4_layers
from mcsmoe_fast.modules import MoEExperts

TOKENS = [1, 16, 128, 512]
SCOUT = dict(d=1024, ff=1638, E=16, k=1)
CANDIDATES = ("transformers", "fast_block", "slots", "merged_G4", "floor")


def hf_layer(seed: int = 0):
    """A transformers Llama4TextMoe of the scaled Scout shape with weights of about 1/sqrt(fan-in), inside a
    one-layer model so that our adapter finds it."""
    from transformers import Llama4TextConfig
    from transformers.models.llama4.modeling_llama4 import Llama4TextMoe

    cfg = Llama4TextConfig(hidden_size=SCOUT["d"], intermediate_size=SCOUT["ff"], num_local_experts=SCOUT["E"],
                           num_experts_per_tok=SCOUT["k"], num_hidden_layers=1)
    gen = torch.Generator().manual_seed(seed)
    block = Llama4TextMoe(cfg).eval().requires_grad_(False)
    with torch.no_grad():
        for name, p in block.named_parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * p.shape[-2 if "experts" in name else -1] ** -0.5)
    return cfg, block


class Holder(torch.nn.Module):
    """The block as model.layers[0].feed_forward, for llama4_layers (discovery by module)."""

    def __init__(self, cfg, block):
        super().__init__()
        self.config = cfg
        self.feed_forward = block


_cache: dict[str, torch.nn.Module] = {}


def candidate(name: str) -> torch.nn.Module:
    if not _cache:
        cfg, hf = hf_layer()
        _cache["transformers"] = hf
        fast = Holder(cfg, copy.deepcopy(hf))
        llama4_layers(fast)[0].install_fast_block()
        _cache["fast_block"] = fast.feed_forward
        slots = Holder(cfg, copy.deepcopy(hf))
        layer = llama4_layers(slots)[0]
        w_in, w_out = (w.contiguous() for w in layer.expert_weights())
        layer.install_experts(MoEExperts(w_in, w_out, torch.arange(SCOUT["E"]), "swiglu").requires_grad_(False))
        _cache["slots"] = slots.feed_forward
        _cache["merged_G4"] = merged(cfg, hf)
        _cache["floor"] = Floor(hf)
    return _cache[name]


class Floor(torch.nn.Module):
    """The shared expert on the tokens, plus one read of every routed expert's weights (see the docstring)."""

    def __init__(self, block):
        super().__init__()
        self.shared_expert = block.shared_expert
        self.weights = (block.experts.gate_up_proj, block.experts.down_proj)

    def forward(self, x):
        return self.shared_expert(x.reshape(-1, x.shape[-1])), [w.sum() for w in self.weights]


def merged(cfg, hf) -> torch.nn.Module:
    """Our block on 4 slots (expert e on slot e // 4), and transformers' block made to compute the same
    (each expert holds its slot's weights) for the output check."""
    holder = Holder(cfg, copy.deepcopy(hf))
    layer = llama4_layers(holder)[0]
    emap = torch.arange(SCOUT["E"]) // 4
    w_in, w_out = (w[::4].contiguous() for w in layer.expert_weights())
    layer.install_experts(MoEExperts(w_in, w_out, emap, "swiglu").requires_grad_(False))
    reference = copy.deepcopy(hf)
    llama4_layers(Holder(cfg, reference))[0].set_expert_weights(w_in[emap], w_out[emap])
    _cache["merged_reference"] = reference
    return holder.feed_forward


def inputs(T: int) -> torch.Tensor:
    return torch.randn(1, T, SCOUT["d"], generator=torch.Generator().manual_seed(T))


@pytest.mark.parametrize("T", TOKENS)
@pytest.mark.parametrize("impl", CANDIDATES)
def test_llama4_layer(benchmark, impl, T):
    module, x = candidate(impl), inputs(T)
    with torch.inference_mode():
        if impl not in ("transformers", "floor"):
            reference = _cache["merged_reference" if impl == "merged_G4" else "transformers"]
            torch.testing.assert_close(module(x)[0], reference(x)[0], rtol=1e-4, atol=1e-4)
        benchmark.group = f"llama4 scout/5 E16 top1 T={T}"
        if impl == "transformers":
            benchmark.extra_info["anchor"] = True
        if impl not in ("transformers", "floor"):
            settle(lambda: module(x))
        benchmark.pedantic(module, args=(x,), rounds=5 if T >= 128 else 20, iterations=1, warmup_rounds=1)
