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

- slot_input_sq [S, d], slot_hidden_sq [S, ff] (only with input_norms=True) per stored slot, the sums
                    of squares of the slot's inputs (routed tokens) and of its hidden activations: the
                    feature norms that one-shot compression (compress.py, importance="activation") weighs
                    each |S_ij| with.

Every accumulator has a fixed size, so memory does not grow with the number of tokens.
Which tokens count: `attention_mask` excludes padding; the decoder layers of an encoder-decoder model
use `decoder_attention_mask` when the batch has one, else every decoder token.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, fields, replace

import torch
from torch import nn

from .drop import logit_mask
from .hooks import is_decoder_layer, run_hooked
from .models import MoELayer, moe_layers
from .models.dispatched import compute_device, onloaded

CHEAP_BASES = ("router-logits", "feature")


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

    def __init__(self, layer: MoELayer, decoder: bool, want_output: bool, chunk_tokens: int,
                 input_norms: bool = False):
        w_in, _ = layer.expert_weights()
        self.layer, self.decoder, self.chunk_tokens = layer, decoder, chunk_tokens
        self.keep = logit_mask(layer)
        self.device = compute_device(layer.module, w_in)
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
        if self.keep is None:  # the experts the block itself chooses (its family's routing rule)
            logits, top = self.layer.route(x)
            logits = logits.to(acc)
            chosen = torch.ones_like(top, dtype=torch.bool)
        else:  # a layer pruned by the drop baseline: its masked experts are never chosen
            logits = self.layer.router_logits(x).to(acc).masked_fill(~self.keep, float("-inf"))
            top_logits, top = logits.topk(s.top_k, dim=-1)  # [T, k]
            chosen = torch.isfinite(top_logits)  # a masked expert picked only to fill k is not a selection
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
                    self._accumulate_input_norms(x, top, chosen)

    def _accumulate_activations(self, x: torch.Tensor) -> None:
        w_in, _ = self.layer.expert_weights()
        for start in range(0, x.shape[0], self.chunk_tokens):
            xc = x[start : start + self.chunk_tokens].to(w_in.dtype)
            for slot in range(w_in.shape[0]):
                h = self.layer.hidden_activations(xc, slot)
                self.activation_sum[slot] += h.sum(0).to(self.activation_sum.dtype)

    def _accumulate_input_norms(self, x: torch.Tensor, top: torch.Tensor, chosen: torch.Tensor) -> None:
        w_in, _ = self.layer.expert_weights()
        slots = torch.where(chosen, self.layer.expert_map().to(top.device)[top], -1)
        for slot in range(w_in.shape[0]):
            xs = x[(slots == slot).any(-1)]
            for start in range(0, xs.shape[0], self.chunk_tokens):
                xc = xs[start : start + self.chunk_tokens]
                h = self.layer.hidden_activations(xc.to(w_in.dtype), slot)
                self.stats.slot_input_sq[slot] += xc.to(self.stats.slot_input_sq.dtype).square().sum(0)
                self.stats.slot_hidden_sq[slot] += h.to(self.stats.slot_hidden_sq.dtype).square().sum(0)

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


def layer_accumulator(layer: MoELayer, bases: Iterable[str] = CHEAP_BASES, chunk_tokens: int = 1024,
                      input_norms: bool = False, decoder: bool = False):
    """The accumulator collect_routing_stats hooks onto one MoE layer, for callers that run the layers
    themselves (streaming/ runs a checkpoint one decoder layer at a time). Call it as acc(hidden [..., d],
    mask [...] or None) with every input of the layer's block (a forward pre-hook), then acc.finish()
    returns the layer's LayerStats. The layer's weights must be materialised when this is built."""
    want_output, _ = _check_bases(bases)
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    return _Accumulator(layer, decoder, want_output, chunk_tokens, input_norms)


@torch.no_grad()
def collect_routing_stats(
    model: nn.Module,
    batches: Iterable[dict],
    bases: Iterable[str] = CHEAP_BASES,
    chunk_tokens: int = 1024,
    progress: bool = True,
    input_norms: bool = False,
) -> dict[str, LayerStats]:
    """Run calibration `batches` (an iterable of model input dicts: input_ids, attention_mask, ...)
    through `model` and return {MoE layer name: LayerStats}, in module order.

    Usage counts, router-logit Gram matrices and routed-input sums are always collected (cheap);
    `bases` containing "expert-output" also runs every expert on every token (chunk_tokens at a time).
    `input_norms=True` also runs every slot on its routed tokens to collect the feature norms that
    one-shot compression needs (compress_experts(..., importance="activation")).
    """
    want_output, _ = _check_bases(bases)
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    layers = moe_layers(model)
    accumulators = {
        layer.name: _Accumulator(layer, is_decoder_layer(model, layer.name), want_output, chunk_tokens, input_norms)
        for layer in layers
    }
    seen = run_hooked(model, layers, batches, lambda layer, hidden, mask: accumulators[layer.name](hidden, mask),
                      desc="routing statistics" if progress else None)
    if seen == 0:
        raise ValueError("batches: no calibration batch was given")
    return {name: acc.finish() for name, acc in accumulators.items()}
