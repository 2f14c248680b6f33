"""Pruning the sparse rows of compressed experts during fine-tuning (MC-SMoE / LoSparse schedule).

    pruner = CompressionPruner(model, keep_ratio=0.1, total_steps=N, initial_warmup=w0, final_warmup=w1)
    for step in range(N):
        loss.backward(); optimizer.step(); pruner.step(); optimizer.zero_grad()
    pruner.finalize()   # drop the masked rows: the compact, fast form

After each optimizer step the importance of every S entry, |theta * grad|, is smoothed by an EMA
(beta 0.85) and averaged per row; one global threshold over every compressed matrix keeps the best rows
holding the scheduled share of entries: everything for the first `initial_warmup` steps, then
keep_ratio + (1 - keep_ratio) * (1 - progress)^3, and keep_ratio for the last `final_warmup` steps.
A masked row stays masked (it no longer takes part in the forward, so it has no gradient).

A step whose gradients hold an inf or NaN (an fp16 overflow that mixed precision skips) leaves the
importance scores as they were: one non-finite score would make its row's EMA NaN for good, and NaN rows
would then be kept or dropped by storage order instead of by importance. The schedule still advances.
"""
from __future__ import annotations

import torch
from torch import nn

from .compress import check_keep_ratio, global_keep
from .modules.compressed import CompressedMoEExperts


class CompressionPruner:
    def __init__(self, model: nn.Module, keep_ratio: float, total_steps: int, initial_warmup: int = 0,
                 final_warmup: int = 0, beta: float = 0.85):
        keep_ratio = check_keep_ratio(keep_ratio)
        if not 0 <= beta < 1:
            raise ValueError(f"beta must be in [0, 1), got {beta!r}")
        if total_steps < 1 or initial_warmup < 0 or final_warmup < 0 or initial_warmup + final_warmup > total_steps:
            raise ValueError(f"need total_steps >= 1 and 0 <= initial_warmup + final_warmup <= total_steps, got "
                             f"total_steps={total_steps}, initial_warmup={initial_warmup}, final_warmup={final_warmup}")
        self.modules = [m for m in model.modules() if isinstance(m, CompressedMoEExperts)]
        if not self.modules:
            raise ValueError("the model has no compressed experts: run compress_experts(model, importance='gradient')")
        finalized = [m for m in self.modules if not m.pruning]
        if finalized:
            raise ValueError(f"{len(finalized)} compressed expert modules are already finalized (pruned at once); "
                             "compress with importance='gradient' to prune during training")
        self.keep_ratio, self.total_steps, self.beta = keep_ratio, total_steps, beta
        self.initial_warmup, self.final_warmup = initial_warmup, final_warmup
        self.steps = 0
        self.skipped = 0  # score updates left out because the gradients were not finite
        self.ema = [torch.zeros_like(getattr(m, f"{side}_S_rows"), dtype=torch.float32)
                    for m in self.modules for side in ("in", "out")]

    def kept_fraction(self, step: int) -> float:
        """The scheduled share of S's entries kept after optimizer step `step` (1-based)."""
        if step <= self.initial_warmup:
            return 1.0
        if step > self.total_steps - self.final_warmup:
            return self.keep_ratio
        span = self.total_steps - self.final_warmup - self.initial_warmup
        progress = (step - self.initial_warmup) / span
        return self.keep_ratio + (1 - self.keep_ratio) * (1 - progress) ** 3

    def _matrices(self):
        for m in self.modules:
            for side in ("in", "out"):
                yield m, side, getattr(m, f"{side}_S_rows"), getattr(m, f"{side}_keep")

    @torch.no_grad()
    def _update_scores(self) -> bool:
        """Fold |theta * grad| into the EMA; False (nothing changed) when any of it is not finite."""
        importance = [(rows * rows.grad).abs().float() if rows.grad is not None else None
                      for _, _, rows, _ in self._matrices()]
        if all(i is None for i in importance):  # the scores would stay 0: rows kept in storage order
            raise ValueError("CompressionPruner.step(): no compressed expert's sparse rows have a gradient: call it after "
                             "loss.backward() and before optimizer.zero_grad(), with the compressed experts trainable "
                             "(requires_grad), or pass update_scores=False for a step the optimizer skipped")
        if not all(i is None or bool(torch.isfinite(i).all()) for i in importance):
            self.skipped += 1
            return False
        for ema, i in zip(self.ema, importance):
            if i is not None:
                ema.mul_(self.beta).add_(i, alpha=1 - self.beta)
        return True

    @torch.no_grad()
    def step(self, update_scores: bool = True) -> float:
        """Update the importance EMA from the current gradients (unless `update_scores` is False: the
        optimizer skipped this step) and mask rows; returns the kept share."""
        self.steps += 1
        if update_scores:
            self._update_scores()
        scores, lengths = [], []
        for ema, (_, _, rows, keep) in zip(self.ema, self._matrices()):
            row_score = ema.mean(-1) if ema.shape[-1] else ema.sum(-1)
            scores.append(row_score.masked_fill(~keep, float("-inf")))
            lengths.append(rows.shape[1])
        fraction = self.kept_fraction(self.steps)
        if fraction < 1.0:
            masks = global_keep(scores, lengths, fraction)
            for i, m in enumerate(self.modules):
                m.set_keep(masks[2 * i], masks[2 * i + 1])
        return fraction

    def finalize(self) -> None:
        """Drop every masked row for good (call once training is over)."""
        for m in self.modules:
            m.finalize()

    def state_dict(self) -> dict:
        return {"steps": self.steps, "ema": [e.clone() for e in self.ema],
                "keep": [keep.clone() for _, _, _, keep in self._matrices()]}

    def load_state_dict(self, state: dict) -> None:
        self.steps = int(state["steps"])
        for ema, saved in zip(self.ema, state["ema"]):
            ema.copy_(saved)
        for i, m in enumerate(self.modules):
            m.set_keep(state["keep"][2 * i], state["keep"][2 * i + 1])
