"""Routing statistics on calibration data (M-SMoE step 0): how often each expert is chosen, and what
the similarity bases of grouping.py need, accumulated in streaming form.

Per MoE layer, over the calibration tokens that are not padding:

- counts [E]        top-k selections of each expert (the router's choice before Switch's expert
                    capacity drops tokens); `frequency` = counts / sum (the paper's usage frequency).
- logit_gram [E, E] sum over tokens of logits^T logits: the `router-logits` basis compares the
                    columns of the tokens x E logit matrix, and their cosine needs only this Gram matrix.
- feature_sum [E, d] sum of the inputs routed to each expert (`feature` basis: the mean routed input).
- output_sum [E, d] (only when `expert-output` is asked for) sum over ALL calibration tokens of each
                    expert's output (HC-SMoE's basis), computed by running every expert on every token.

- saliency_sum [E]   (only with saliency="reap" or "reap-softmax") REAP's saliency numerator: sum over the
                    tokens whose top-k contains expert j of g_j(x) * ||f_j(x)||_2, where f_j(x) is expert j's
                    output (its bias included) and g_j(x) its routing weight; `saliency` = saliency_sum / counts
                    (REAP, Lasby et al. 2025, eq. 9: the mean over the tokens routed to j; 0 if none came).
                    g: "reap" the router's softmax probability renormalised over the token's chosen experts
                    (every softmax router, renormalising or not), "reap-softmax" the plain softmax probability
                    over all E experts (REAP's code default; docs/methods.md). A softmax router is told by
                    what it computes, whatever its class is called (softmax_weights: its top-k weights are the
                    softmax of its logits, plain or renormalised; Switch's top-1 router is one). Routers
                    whose weights are not a softmax (DeepSeek-V3's sigmoid, PhiMoE's sparsemixer, ...) give
                    g = the router's own top-k weight for both modes; where that weight
                    scales the expert's input instead (Llama-4), the contribution is f_j(s x) itself (g = 1,
                    the expert run on s x). The expert outputs
                    are computed once per routed (token, expert) pair by the fused grouped_expert_ffn (one row
                    per pair), never for every expert on every token.
- slot_input_sq [S, d], slot_hidden_sq [S, ff] (only with input_norms=True) per stored slot, the sums
                    of squares of the slot's inputs (routed tokens; Llama-4's scaled s x, the inputs its
                    experts really see) and of its hidden activations: the
                    feature norms that one-shot compression (compress.py, importance="activation") weighs
                    each |S_ij| with.

Every accumulator has a fixed size, so memory does not grow with the number of tokens.
Which tokens count: `attention_mask` excludes padding; the decoder layers of an encoder-decoder model
use `decoder_attention_mask` when the batch has one; otherwise `labels != -100` when it has labels, the
`attention_mask` when the decoder reads the input text itself (hooks.complete_inputs), and every decoder
token when it gives `decoder_input_ids` without a mask. Batches of padding alone are refused, and a step that
changes a layer no calibration token reached (merge, prune, activation compression) refuses it by name.
Which experts count: those the block's own router chooses (never a drop-baseline router's masked experts).
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields, replace

import torch
from torch import nn

from .drop import logit_mask
from .hooks import run_hooked
from .flags import check_flags
from .models import ExpertsLayer, MoELayer, moe_layers, unwrap
from .models.dispatched import compute_device, onloaded
from .ops import grouped_expert_ffn

CHEAP_BASES = ("router-logits", "feature")
SALIENCY_MODES = ("reap", "reap-softmax")


def softmax_weights(weights: torch.Tensor, index: torch.Tensor, probs: torch.Tensor) -> bool:
    """Whether a router's top-k weights [T, k] of the experts `index` [T, k] are the softmax `probs` [T, E] of its
    logits, plain or renormalised over the chosen experts (a softmax over the top-k logits, GPT-OSS's, is the
    latter), to float32 rounding or the weights' own where coarser: told by what the router computes, whatever its
    class is called. A correction bias that changes only the choice (ERNIE-4.5's) passes; sigmoid scores do not.
    With top_k = 1 a renormalising router's weights are all 1 whatever its scores: it is taken for a softmax router
    (HunYuan's is one), so a sigmoid router built with top_k = 1 and renormalisation (no family ships one) would get
    the softmax probability under saliency="reap-softmax"."""
    chosen = probs.gather(1, index.long().to(probs.device))
    tol = max(1e-5, 2 * torch.finfo(weights.dtype).eps)
    weights = weights.to(chosen)
    return any(torch.allclose(weights, p, rtol=tol, atol=tol)
               for p in (chosen, chosen / chosen.sum(-1, keepdim=True).clamp_min(torch.finfo(chosen.dtype).tiny)))


@dataclass
class LayerStats:
    """Streaming routing statistics of one MoE layer (float64 accumulators)."""

    name: str
    num_experts: int
    top_k: int
    tokens: int
    counts: torch.Tensor  # [E]
    logit_gram: torch.Tensor  # [E, E]
    feature_sum: torch.Tensor  # [E, d]
    output_sum: torch.Tensor | None = None  # [E, d], present when expert-output was collected
    slot_input_sq: torch.Tensor | None = None  # [S, d], present when input norms were collected
    slot_hidden_sq: torch.Tensor | None = None  # [S, ff]
    saliency_sum: torch.Tensor | None = None  # [E], present when saliency was collected
    saliency_mode: str | None = None  # "reap" or "reap-softmax"

    @property
    def frequency(self) -> torch.Tensor:
        """Usage frequency [E]: share of the layer's top-k selections (all zeros if no token came)."""
        total = self.counts.sum()
        return self.counts / total if total > 0 else torch.zeros_like(self.counts)

    @property
    def mean_feature(self) -> torch.Tensor:
        """Mean routed input [E, d] (zero rows for experts never routed to)."""
        return self.feature_sum / self.counts.clamp_min(1).unsqueeze(-1)

    @property
    def mean_output(self) -> torch.Tensor:
        if self.output_sum is None:
            raise ValueError(f"{self.name}: expert outputs were not collected; "
                             "pass bases including 'expert-output' to collect_routing_stats")
        return self.output_sum / max(self.tokens, 1)

    @property
    def saliency(self) -> torch.Tensor:
        """REAP saliency [E]: mean of g_j(x) * ||f_j(x)|| over the tokens routed to j (0 for experts never routed to)."""
        if self.saliency_sum is None:
            raise ValueError(f"{self.name}: expert saliency was not collected; pass saliency='reap' (or "
                             "'reap-softmax') to collect_routing_stats")
        return torch.where(self.counts > 0, self.saliency_sum / self.counts.clamp_min(1),
                           torch.zeros_like(self.saliency_sum))

    def to(self, device) -> LayerStats:
        """The same statistics with every tensor on `device`."""
        moved = {f.name: getattr(self, f.name).to(device) for f in fields(self)
                 if isinstance(getattr(self, f.name), torch.Tensor)}
        return replace(self, **moved)

    def summary(self) -> dict:
        """JSON-ready summary (saved with merged checkpoints)."""
        return {"tokens": int(self.tokens), "selections": int(self.counts.sum().item()),
                "usage_frequency": [round(float(f), 6) for f in self.frequency]}


class _Accumulator:
    """The hook that feeds one layer's LayerStats."""

    def __init__(self, layer: MoELayer, want_output: bool, chunk_tokens: int, input_norms: bool = False,
                 saliency: str | None = None):
        w_in, _ = layer.expert_weights()
        self.layer, self.chunk_tokens = layer, chunk_tokens
        self.device = compute_device(layer.module, w_in)
        with onloaded(layer.module):  # a router offloaded with its buffers keeps its mask on meta until then
            keep = logit_mask(layer)
            self.keep = None if keep is None else keep.to(self.device)
        acc = torch.float32 if self.device.type == "mps" else torch.float64
        e, d = layer.num_experts, layer.hidden_size
        self.stats = LayerStats(
            name=layer.name, num_experts=e, top_k=layer.top_k, tokens=0,
            counts=torch.zeros(e, dtype=acc, device=self.device),
            logit_gram=torch.zeros(e, e, dtype=acc, device=self.device),
            feature_sum=torch.zeros(e, d, dtype=acc, device=self.device),
        )
        # expert-output: sum of each slot's hidden activations; output_sum = w_out @ that at the end,
        # exact because the output is linear in the activations.
        self.activation_sum = (
            torch.zeros(w_in.shape[0], layer.intermediate_size, dtype=acc, device=self.device) if want_output else None
        )
        if input_norms:
            self.stats.slot_input_sq = torch.zeros(w_in.shape[0], d, dtype=acc, device=self.device)
            self.stats.slot_hidden_sq = torch.zeros(w_in.shape[0], layer.intermediate_size, dtype=acc,
                                                    device=self.device)
        if saliency is not None:
            self.stats.saliency_sum = torch.zeros(e, dtype=acc, device=self.device)
            self.stats.saliency_mode = saliency

    @torch.no_grad()  # also when a caller's own forward runs with grad enabled (layer_accumulator)
    def __call__(self, hidden: torch.Tensor, mask: torch.Tensor | None) -> None:
        if mask is not None:
            if mask.shape != hidden.shape[:-1]:
                raise ValueError(f"{self.layer.name}: attention mask of shape {tuple(mask.shape)} does not match "
                                 f"the layer input {tuple(hidden.shape[:-1])}")
            hidden = hidden[mask.to(hidden.device).bool()]
        x = hidden.reshape(-1, hidden.shape[-1])
        if x.shape[0] == 0:
            return
        s = self.stats
        acc = s.counts.dtype
        logits, top = self.layer.route(x)  # [T, E], [T, k]: the block's own choice (masked routers included)
        logits = logits.to(acc)
        if self.keep is None:
            chosen = torch.ones_like(top, dtype=torch.bool)
        else:  # a layer pruned by the drop baseline: a masked expert picked only to fill k is not a selection
            logits = logits.masked_fill(~self.keep, float("-inf"))
            chosen = torch.isfinite(logits.gather(-1, top))
        scale = self.layer.expert_input_scale(logits, top)  # Llama-4: the router's score scales the expert input
        gates = None
        if s.saliency_sum is not None:  # with an input scale the expert's contribution is FFN(s x) itself: g = 1
            gates = chosen.to(acc) if scale is not None else self._gates(x, logits, top, chosen)
        logits = torch.where(torch.isfinite(logits), logits, torch.zeros_like(logits))  # masked logits: 0 in the Gram
        s.tokens += x.shape[0]
        s.counts += torch.bincount(top[chosen], minlength=s.num_experts).to(acc)
        s.logit_gram += logits.T @ logits
        xs = x.to(acc)
        for j in range(s.top_k):
            s.feature_sum.index_add_(0, top[chosen[:, j], j], xs[chosen[:, j]])
        if self.activation_sum is not None or s.slot_input_sq is not None:
            with onloaded(self.layer.module):  # an offloaded block's experts, for the time of these sums
                if self.activation_sum is not None:
                    self._accumulate_activations(x)
                if s.slot_input_sq is not None:
                    self._accumulate_input_norms(x, top, chosen, scale)
        if gates is not None:
            with onloaded(self.layer.module):
                self._accumulate_saliency(x, top, chosen, gates, scale)

    def _gates(self, x: torch.Tensor, logits: torch.Tensor, top: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
        """g [T, k]: the routing weight of each chosen expert that REAP's saliency weighs (see the module docstring)."""
        acc = self.stats.saliency_sum.dtype
        zero = torch.zeros((), dtype=acc, device=logits.device)
        probs = torch.softmax(logits.to(acc), dim=-1)  # masked experts (-inf) get 0
        if isinstance(self.layer, ExpertsLayer):  # the contract's routers return their top-k weights: which are they?
            out = self.layer.router_outputs(x)  # as the block calls it
            if not isinstance(out, tuple) or len(out) != 3:
                raise ValueError(f"{self.layer.name}: REAP saliency needs the router's top-k weights, but "
                                 f"{type(self.layer.router).__name__} does not return (logits, top-k weights, "
                                 "top-k index)")
            if not softmax_weights(out[1], out[2], probs):  # sigmoid & co: the router's own top-k weights
                dense = torch.zeros_like(probs).scatter(1, out[2].long().to(probs.device), out[1].to(probs))
                return torch.where(chosen, dense.gather(1, top), zero)
        g = torch.where(chosen, probs.gather(1, top), zero)
        if self.stats.saliency_mode == "reap":
            g = g / g.sum(-1, keepdim=True).clamp_min(torch.finfo(acc).tiny)
        return g

    def _accumulate_saliency(self, x: torch.Tensor, top: torch.Tensor, chosen: torch.Tensor, gates: torch.Tensor,
                             scale: torch.Tensor | None) -> None:
        """saliency_sum[j] += g * ||f_j(x)|| over routed pairs (f_j(s x) with an input scale s): the fused op runs
        one row per (token, chosen expert)."""
        w_in, w_out = (w.detach() for w in self.layer.expert_weights())
        b_in, b_out = (None if b is None else b.detach() for b in self.layer.expert_biases())
        emap = self.layer.expert_map().to(w_in.device)
        k = top.shape[1]
        pairs = torch.where(chosen, top, -1).reshape(-1, 1).to(w_in.device)
        args = self.layer.activation_args
        step = max(1, self.chunk_tokens) * k
        rows = x.to(w_in.dtype).repeat_interleave(k, dim=0)
        if scale is not None:
            rows = rows * scale.reshape(-1, 1).to(rows)
        for start in range(0, rows.shape[0], step):
            idx = pairs[start : start + step]
            out = grouped_expert_ffn(rows[start : start + step], w_in, w_out, emap, idx,
                                     torch.ones(idx.shape, dtype=w_in.dtype, device=w_in.device),
                                     self.layer.activation, b_in, b_out, **args)
            norms = out.to(self.stats.saliency_sum.dtype).norm(dim=-1)
            g = gates.reshape(-1)[start : start + step].to(norms.device)
            valid = idx[:, 0] >= 0
            self.stats.saliency_sum.index_add_(0, idx[valid, 0].to(self.device), (g * norms)[valid].to(self.device))

    def _accumulate_activations(self, x: torch.Tensor) -> None:
        w_in, _ = self.layer.expert_weights()
        for start in range(0, x.shape[0], self.chunk_tokens):
            xc = x[start : start + self.chunk_tokens].to(w_in.dtype)
            for slot in range(w_in.shape[0]):
                h = self.layer.hidden_activations(xc, slot)
                self.activation_sum[slot] += h.sum(0).to(self.activation_sum.dtype)

    def _accumulate_input_norms(self, x: torch.Tensor, top: torch.Tensor, chosen: torch.Tensor,
                                scale: torch.Tensor | None) -> None:
        w_in, _ = self.layer.expert_weights()
        slots = torch.where(chosen, self.layer.expert_map().to(top.device)[top], -1)
        for slot in range(w_in.shape[0]):
            if scale is None:  # the slot sees a token once, whichever of its experts chose it
                xs = x[(slots == slot).any(-1)]
            else:  # each chosen expert sees its own scaled copy s x
                xs = (x.unsqueeze(1) * scale.to(x).unsqueeze(-1))[slots == slot]
            for start in range(0, xs.shape[0], self.chunk_tokens):
                xc = xs[start : start + self.chunk_tokens]
                h = self.layer.hidden_activations(xc.to(w_in.dtype), slot)
                self.stats.slot_input_sq[slot] += xc.to(self.stats.slot_input_sq.dtype).square().sum(0)
                self.stats.slot_hidden_sq[slot] += h.to(self.stats.slot_hidden_sq.dtype).square().sum(0)

    @torch.no_grad()
    def finish(self) -> LayerStats:
        if self.activation_sum is not None:
            with onloaded(self.layer.module):
                self._finish_output()
        return self.stats

    def _finish_output(self) -> None:
        _, w_out = self.layer.expert_weights()
        emap = self.layer.expert_map().to(self.device)
        per_slot = torch.einsum("sdf,sf->sd", w_out.detach().to(self.activation_sum.dtype), self.activation_sum)
        b_out = self.layer.expert_biases()[1]
        if b_out is not None:  # every token passes every slot here (the expert-output basis)
            per_slot += self.stats.tokens * b_out.detach().to(per_slot.dtype)
        self.stats.output_sum = per_slot[emap]


def _check_bases(bases) -> tuple[bool, tuple[str, ...]]:
    from .grouping import SIMILARITY_BASES

    bases = tuple(bases)
    unknown = [b for b in bases if b not in SIMILARITY_BASES]
    if unknown:
        raise ValueError(f"bases: unknown similarity basis {unknown}; choose from {', '.join(SIMILARITY_BASES)}")
    return "expert-output" in bases, bases


def check_saliency(saliency: str | None) -> None:
    if saliency is not None and saliency not in SALIENCY_MODES:
        raise ValueError(f"saliency must be None or one of {', '.join(SALIENCY_MODES)}, got {saliency!r}")


def layer_accumulator(layer: MoELayer, bases: Iterable[str] = CHEAP_BASES, chunk_tokens: int = 1024,
                      input_norms: bool = False, saliency: str | None = None):
    """The accumulator collect_routing_stats hooks onto one MoE layer, for callers that run the layers
    themselves (streaming/ runs a checkpoint one decoder layer at a time). Call it as acc(hidden [..., d],
    mask [...] or None) with every input of the layer's block (a forward pre-hook), then acc.finish()
    returns the layer's LayerStats. The layer's weights must be materialised when this is built. It sums under
    torch.no_grad whatever the caller's grad mode, so its accumulators never hold an autograd graph."""
    want_output, _ = _check_bases(bases)
    check_saliency(saliency)
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    return _Accumulator(layer, want_output, chunk_tokens, input_norms, saliency)


@torch.no_grad()
def collect_routing_stats(
    model: nn.Module,
    batches: Iterable[Mapping],
    bases: Iterable[str] = CHEAP_BASES,
    chunk_tokens: int = 1024,
    progress: bool = True,
    input_norms: bool = False,
    saliency: str | None = None,
) -> dict[str, LayerStats]:
    """Run calibration `batches` (an iterable of model input mappings: input_ids, attention_mask, ...; dicts
    or a tokenizer's BatchEncoding) through `model` and return {MoE layer name: LayerStats}, in module order.

    Usage counts, router-logit Gram matrices and routed-input sums are always collected (cheap);
    `bases` containing "expert-output" also runs every expert on every token (chunk_tokens at a time).
    `input_norms=True` also runs every slot on its routed tokens to collect the feature norms that
    one-shot compression needs (compress_experts(..., importance="activation")).
    `saliency` ("reap", "reap-softmax" or None) also accumulates REAP's expert saliency (LayerStats.saliency,
    see the module docstring), running each expert only on its routed tokens.
    """
    model = unwrap(model)
    check_flags("collect_routing_stats", input_norms=input_norms)
    want_output, _ = _check_bases(bases)
    check_saliency(saliency)
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    layers = moe_layers(model)
    accumulators = {
        layer.name: _Accumulator(layer, want_output, chunk_tokens, input_norms, saliency)
        for layer in layers
    }
    seen = run_hooked(model, layers, batches, lambda layer, hidden, mask: accumulators[layer.name](hidden, mask),
                      desc="routing statistics" if progress else None)
    if seen == 0:
        raise ValueError("batches: no calibration batch was given")
    stats = {name: acc.finish() for name, acc in accumulators.items()}
    if all(s.tokens == 0 for s in stats.values()):  # never useful; a layer left unreached is refused where used
        refuse_unmeasured(stats.values())
    return stats


def refuse_unmeasured(stats: Iterable[LayerStats]) -> None:
    """Refuse statistics of MoE layers no calibration token reached, where a step uses them: every choice made
    from them (groups, merge weights, kept experts, kept rows) would come from tie order alone. Called by the
    steps on the layers they change (merge_experts, prune's kept_experts, activation compression, the streamed
    statistics passes), so merging only a Switch encoder on batches without decoder labels still works."""
    empty = [s.name for s in stats if s.tokens == 0]
    if empty:
        raise ValueError(f"no calibration token reached MoE layers {empty}: every token of the batches was padding "
                         "(attention_mask 0; for an encoder-decoder's decoder layers, labels all -100 or a "
                         "decoder_attention_mask of 0); give batches with real tokens")
