"""The router row of a merged expert in a standard checkpoint: "dominant" or "fitted".

A standard checkpoint has one router row per merged expert, where the merged (aliased) model still
scores all E original experts and a group's merged expert receives the summed routing weight of its
members. Two ways to give the merged expert one row:

  dominant  the row of the group's dominant expert (the member with the highest usage frequency, as
            the merge recorded it): no data needed; the merged expert is then chosen where its dominant
            expert was, with the dominant expert's probability only (what REAM does).
  fitted    rows (and the bias, where the router has one) fitted on calibration tokens so that each
            merged expert's routing probability matches what its group receives in the merged model
            (routing_targets: the summed routing weights of the members the token chose, for gates whose
            top-k weights sum to 1; the summed probability of all members otherwise): softmax routers
            minimise the cross-entropy (= KL up to a constant) between that target and
            softmax(W h_t + b) over the M merged experts; sigmoid routers (DeepSeek-V3's design, under
            whatever class name: GLM-4.5-MoE, dots1, Kimi-Linear, Nemotron-H, ...; is_sigmoid_router tells
            them by what they compute) the binary cross-entropy between sigmoid(W h_t + b)_g and the clamped
            sum of member scores. Full-batch L-BFGS from the dominant rows, with a small ridge pull towards
            them (well posed with fewer tokens than d). A correction bias (DeepSeek-V3's
            e_score_correction_bias, ERNIE-4.5's [1, E] one) is sliced at the dominant experts.

Measured on the demo's trained byte-level MoE (docs/standard_format.md, benchmarks/standard_router.py):
fitted rows come within 0.2% of the merged model's own perplexity (11.392 vs 11.374 aliased), dominant rows
4.7% above it (11.912); fitting to the summed probability of all members was worse than the dominant rows for a
renormalising gate, hence the chosen-members target. `to_standard` defaults to "fitted" whenever calibration batches
are given.
Layers merged with strategy='drop' keep their dominant rows whatever the choice: routing over the kept
experts' rows is exactly what their masked router computes.
"""
from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F

from ..hooks import run_hooked
from ..models import ExpertsLayer, MoELayer
from .standard_plan import LayerPlan, expert_dim

ROUTERS = ("dominant", "fitted")


def check_router(router: str, batches) -> None:
    if router not in ROUTERS:
        raise ValueError(f"router must be one of {', '.join(ROUTERS)}, got {router!r}")
    if router == "fitted" and batches is None:
        raise ValueError("router='fitted' needs calibration batches (batches=...) to fit the merged experts' "
                         "router rows on; pass them, or router='dominant'")


@torch.no_grad()
def is_sigmoid_router(layer: MoELayer, hidden: torch.Tensor, probe_tokens: int = 4096) -> bool:
    """Whether the layer's router weighs the experts it chose by their sigmoid scores (DeepSeek-V3's design,
    shared by GLM-4.5-MoE, dots1, Kimi-Linear, Nemotron-H and others under their own class names) rather than by
    a softmax, told by what it computes on the tokens `hidden` [N, d] (the first probe_tokens): its top-k weights
    are sigmoid(logit) of the chosen experts up to one factor per token (the renormalisation,
    routed_scaling_factor), where a softmax's are exp(logit); with top_k = 1, up to one factor for all tokens.
    Only the experts contract's routers return their top-k weights; Switch's and Llama-4's are fitted as
    softmax routers."""
    if not isinstance(layer, ExpertsLayer) or hidden.shape[0] == 0:
        return False
    logits, weights, index = layer.router_outputs(hidden[:probe_tokens].to(layer.router_weight().dtype))[:3]
    chosen, weights = logits.float().gather(1, index.long()), weights.float()
    return spread(weights, chosen.sigmoid()) < min(1e-2, spread(weights, chosen.softmax(-1)))


def spread(weights: torch.Tensor, scores: torch.Tensor) -> float:
    """How far weights / scores [N, k] are from one factor per token (k > 1) or for all tokens (k = 1): the mean
    over tokens of the largest relative deviation from that factor."""
    ratio = weights / scores.clamp_min(1e-30)
    ratio = ratio if ratio.shape[1] > 1 else ratio.T
    mean = ratio.mean(-1, keepdim=True)
    return float(((ratio - mean).abs().amax(-1) / mean.squeeze(-1).abs().clamp_min(1e-30)).mean())


@torch.no_grad()
def router_inputs(model: nn.Module, layers: list[MoELayer], batches, max_tokens: int = 65536) -> dict[str, torch.Tensor]:
    """{layer name: hidden states [N, d]} entering each layer's router on the calibration batches (padding
    left out; the first max_tokens tokens), in float32 on the CPU."""
    seen: dict[str, list[torch.Tensor]] = {layer.name: [] for layer in layers}
    run_hooked(model, layers, batches, lambda layer, hidden, mask: keep_tokens(seen[layer.name], hidden, mask, max_tokens))
    return {name: torch.cat(hs) for name, hs in seen.items() if hs}


def keep_tokens(seen: list[torch.Tensor], hidden: torch.Tensor, mask: torch.Tensor | None, max_tokens: int) -> None:
    """Append the tokens of `hidden` [B, L, d] (padding left out by `mask` [B, L]) to `seen`, in float32 on the
    CPU, until it holds max_tokens (router_inputs; the streamed merge's pass over the merged layers)."""
    if mask is not None and hidden.dim() == 3 and tuple(mask.shape) == tuple(hidden.shape[:2]):
        hidden = hidden[mask.bool()]
    kept = sum(h.shape[0] for h in seen)
    if kept < max_tokens:
        seen.append(hidden.reshape(-1, hidden.shape[-1])[: max_tokens - kept].float().cpu())


def member_targets(logits: torch.Tensor, groups: list[list[int]], sigmoid: bool) -> torch.Tensor:
    """[N, M] summed probability (sigmoid: clamped summed score) of each merged expert's members."""
    scores = logits.float().sigmoid() if sigmoid else logits.float().softmax(-1)
    target = torch.stack([scores[:, g].sum(-1) for g in groups], dim=-1)
    return target.clamp(1e-6, 1 - 1e-6) if sigmoid else target


@torch.no_grad()
def routing_targets(layer: MoELayer, hidden: torch.Tensor, groups: list[list[int]],
                    sigmoid: bool | None = None) -> torch.Tensor:
    """[N, M] what the fitted rows are fitted to: the routing weight the merged (aliased) model gives each
    merged expert, i.e. the summed weights of the members a token chose, where the router's top-k weights
    sum to 1, to the rounding of their own dtype (renormalising gates: Mixtral, Qwen3-MoE, OLMoE, GPT-OSS, whose
    weights come in the model's dtype); otherwise (Switch, Qwen2-MoE with norm_topk_prob=False, where the weights
    are the probabilities themselves) the summed probability of all members, which equals the chosen members'
    weights plus the rest of the mass; sigmoid routers (is_sigmoid_router, computed when `sigmoid` is None:
    DeepSeek-V3, GLM-4.5-MoE, ...): the clamped summed member scores."""
    if sigmoid is None:
        sigmoid = is_sigmoid_router(layer, hidden)
    hidden = hidden.to(layer.router_weight().dtype)
    logits = layer.router_logits(hidden)
    if sigmoid:
        return member_targets(logits, groups, sigmoid=True)
    if isinstance(layer, ExpertsLayer):
        _, weights, index = layer.router_outputs(hidden)
        tol = max(1e-4, 2 * torch.finfo(weights.dtype).eps)  # GPT-OSS's come in the model's dtype, rounded there
        weights = weights.float()
        if torch.allclose(weights.sum(-1), torch.ones_like(weights[:, 0]), atol=tol):
            position = torch.empty(layer.num_experts, dtype=torch.long)
            for i, members in enumerate(groups):
                position[members] = i
            target = torch.zeros(hidden.shape[0], len(groups), dtype=torch.float32)
            return target.scatter_add_(1, position[index.long().cpu()], weights.cpu())
    return member_targets(logits, groups, sigmoid=False)


def fit_rows(hidden: torch.Tensor, target: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
             sigmoid: bool, ridge: float = 1e-4, steps: int = 100) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Rows [M, d] (and bias [M]) from the dominant rows `weight` / `bias`, fitted so that the router's
    probabilities on `hidden` [N, d] match `target` [N, M] (see the module docstring)."""
    w0 = weight.detach().float()
    w = w0.clone().requires_grad_(True)
    b0 = None if bias is None else bias.detach().float()
    b = None if b0 is None else b0.clone().requires_grad_(True)
    params = [w] if b is None else [w, b]
    opt = torch.optim.LBFGS(params, max_iter=steps, line_search_fn="strong_wolfe")

    def loss_fn():
        opt.zero_grad()
        logits = F.linear(hidden, w, b)
        if sigmoid:
            loss = F.binary_cross_entropy_with_logits(logits, target)
        else:
            loss = -(target * logits.log_softmax(-1)).sum(-1).mean()
        loss = loss + ridge * ((w - w0) ** 2).sum() + (0 if b is None else ridge * ((b - b0) ** 2).sum())
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(loss_fn)
    return w.detach().to(weight.dtype), None if b is None else b.detach().to(bias.dtype)


def sliced_rows(state: dict[str, torch.Tensor], num_experts: int, rows: list[int]) -> dict[str, torch.Tensor]:
    """A router's state dict {key: tensor} with every tensor that runs over the experts (weight, bias,
    e_score_correction_bias: standard_plan.expert_dim) sliced at `rows` along that dimension, the rest copied;
    the drop strategy's `keep` mask left out (the kept rows need none)."""
    index = torch.tensor(rows, dtype=torch.long)
    out = {}
    for key, t in state.items():
        if key == "keep" or key.endswith(".keep"):
            continue
        dim = expert_dim(key, t, num_experts)
        out[key] = t.clone() if dim is None else t.index_select(dim, index.to(t.device))
    return out


def router_state(layer: MoELayer, module: nn.Module, plan: LayerPlan, hidden: torch.Tensor | None) -> dict:
    """The standard router's state dict: every [E]-leading tensor of the layer's router module (weight,
    bias, e_score_correction_bias) sliced at plan.rows; with `hidden` (router="fitted", layers not dropped)
    weight and bias fitted."""
    state = sliced_rows(module.state_dict(), layer.num_experts, plan.rows)
    if hidden is not None and not plan.dropped:
        sigmoid = is_sigmoid_router(layer, hidden)
        target = routing_targets(layer, hidden, plan.groups, sigmoid)
        state["weight"], fitted_bias = fit_rows(hidden, target, state["weight"], state.get("bias"), sigmoid)
        if fitted_bias is not None:
            state["bias"] = fitted_bias
    return state
