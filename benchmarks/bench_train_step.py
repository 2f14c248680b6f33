"""One KD-like training step of a Mixtral-shaped expert layer on the CPU, fp32 and bf16 (the whole step in bf16): our fused grouped expert FFN with its
fused backward over the layer merged 8 -> 4 slots (MoEExperts) against transformers' MixtralExperts on the
original 8 experts, with `config._experts_implementation` = "grouped_mm" (the anchor) and "eager".

The step: hidden [T, d] (requiring grad, as the output of the layer below) -> router (softmax, top-2,
renormalised, as Mixtral) -> experts -> a distillation loss against fixed teacher outputs (mean squared
error) -> backward into the hidden states, the router and both expert weight banks. The router, the tokens,
the teacher and the routing are the same for every candidate; only the experts module differs.
Candidates: `mcsmoe_fast_G4` (the merged layer: what KD recovery trains), `mcsmoe_fast_G8` (our op on the
very same 8 experts as transformers: its loss and gradients are checked against grouped_mm's), and
`reference_G4` (the plain-PyTorch path MoEExperts fell back to for gradients before the fused backward).
The goal (the issue): mcsmoe_fast_G4 at least as fast as grouped_mm on the original (ratio >= 1).

Shapes: d = 512, ff = 1792 (Mixtral's ff/d = 3.5 at an eighth of its width), E = 8, top-2, T = 128 and 1024.
Mixtral's own d = 4096 does not fit a 2-core machine's time, and bench_moe's d = 1024 makes one T = 1024 step
(about 140 GFLOP with the backward) take seconds per round per candidate (transformers' eager: over 10 s);
at d = 512 (about 35 GFLOP a step) the whole file runs in two to three minutes on 2 cores while the GEMMs
stay large enough (60 to 500 rows by 512-3584) to be compute bound.

Run:  python -m pytest benchmarks/bench_train_step.py --benchmark-only
The summary prints each candidate's speed-up against grouped_mm (> 1: faster)."""
from __future__ import annotations

import copy
import functools

import pytest
import torch

from mcsmoe_fast import reference
from mcsmoe_fast.modules import MoEExperts

D, FF, E, K, G = 512, 1792, 8, 2, 4
TOKENS = [128, 1024]


@functools.lru_cache(maxsize=1)
def layer():
    """(gate weight [E, d], transformers' MixtralExperts on 8 experts, merged slots (w_in, w_out), map)."""
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts

    cfg = MixtralConfig(hidden_size=D, intermediate_size=FF, num_local_experts=E, num_experts_per_tok=K)
    gen = torch.Generator().manual_seed(0)
    hf = MixtralExperts(cfg)
    with torch.no_grad():
        hf.gate_up_proj.copy_(torch.randn(E, 2 * FF, D, generator=gen) * D**-0.5)
        hf.down_proj.copy_(torch.randn(E, D, FF, generator=gen) * FF**-0.5)
    gate = torch.randn(E, D, generator=gen) * 0.05
    emap = torch.arange(E) // (E // G)  # experts 2g, 2g+1 -> slot g, merged by averaging
    w_in = torch.stack([hf.gate_up_proj[emap == g].mean(0) for g in range(G)]).detach()
    w_out = torch.stack([hf.down_proj[emap == g].mean(0) for g in range(G)]).detach()
    return gate, hf, w_in, w_out, emap


def batch(T: int):
    gen = torch.Generator().manual_seed(T)
    return torch.randn(T, D, generator=gen), torch.randn(T, D, generator=gen)  # hidden, teacher output


def make_step(experts, gate: torch.Tensor, x: torch.Tensor, teacher: torch.Tensor):
    """A closure running one forward + backward; returns (loss, the gradients it produced)."""
    router = gate.clone().requires_grad_()
    params = [p for p in experts.parameters()] + [router]

    def step():
        for p in params:
            p.grad = None
        hidden = x.detach().requires_grad_()
        probs = torch.softmax(hidden @ router.T, dim=-1)
        weights, index = probs.topk(K, dim=-1)
        weights = weights / weights.sum(-1, keepdim=True)
        loss = (experts(hidden, index, weights) - teacher).square().mean()
        loss.backward()
        return loss.detach(), [hidden.grad] + [p.grad for p in params]
    return step


class ReferenceExperts(MoEExperts):
    def forward(self, hidden, top_k_index, top_k_weights):
        return reference.grouped_expert_ffn(hidden, self.w_in, self.w_out, self.expert_map, top_k_index, top_k_weights,
                                            self.activation)


CANDIDATES = ["grouped_mm", "eager", "mcsmoe_fast_G4", "mcsmoe_fast_G8", "reference_G4"]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# bf16: the whole step in bf16 (parameters, activations, loss, gradients), T = 128 only (on CPUs
# without native bf16 ATen's bf16 GEMMs are several times slower than fp32: transformers' cells take long)
CASES = [("fp32", T, i) for T in TOKENS for i in CANDIDATES] + [("bf16", 128, i) for i in CANDIDATES]


def experts_module(impl: str, dtype: torch.dtype = torch.float32):
    gate, hf, w_in, w_out, emap = layer()
    if impl in ("grouped_mm", "eager"):
        hf = hf if dtype == torch.float32 else copy.deepcopy(hf).to(dtype)  # Module.to is in place
        hf.config._experts_implementation = impl
        return hf
    if impl == "mcsmoe_fast_G8":
        return MoEExperts(hf.gate_up_proj.detach().clone().to(dtype), hf.down_proj.detach().clone().to(dtype),
                          torch.arange(E), "swiglu")
    cls = ReferenceExperts if impl == "reference_G4" else MoEExperts
    return cls(w_in.clone().to(dtype), w_out.clone().to(dtype), emap, "swiglu")


@pytest.mark.parametrize("dt,T,impl", CASES, ids=[f"{dt}-T{T}-{i}" for dt, T, i in CASES])
def test_train_step(benchmark, dt, T, impl):
    from bench_moe import settle

    dtype = DTYPES[dt]
    gate, hf, *_ = layer()
    x, teacher = (t.to(dtype) for t in batch(T))
    experts = experts_module(impl, dtype)
    step = make_step(experts, gate.to(dtype), x, teacher)
    benchmark.group = f"train step {dt} mixtral d{D} ff{FF} E{E} top{K} (ours merged G={G}) T={T}"
    if impl == "grouped_mm":
        benchmark.extra_info["anchor"] = True
    rounds = 5 if T >= 1024 or dtype != torch.float32 else 15
    if impl.startswith("mcsmoe_fast"):
        settle(step, limit=40)
    loss, grads = benchmark.pedantic(step, rounds=rounds, iterations=1, warmup_rounds=1)
    if impl == "mcsmoe_fast_G8":  # the same 8 experts as transformers: the same loss and gradients
        hf = experts_module("grouped_mm", dtype)
        want_loss, want = make_step(hf, gate.to(dtype), x, teacher)()
        tol = dict(rtol=1e-4, atol=1e-6) if dtype == torch.float32 else dict(rtol=5e-2, atol=1e-3)
        torch.testing.assert_close(loss, want_loss, **tol)
        for got, ref in zip(grads, want):
            if dtype == torch.float32:
                torch.testing.assert_close(got, ref, rtol=1e-3, atol=1e-6)
            else:  # bf16 gradients: relative to the tensor's norm
                assert (got.double() - ref.double()).norm() <= 5e-2 * ref.double().norm() + 1e-6
