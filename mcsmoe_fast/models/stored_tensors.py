"""Which stored tensors hold an MoE layer's experts and router, by the model's own parameter names (each
adapter's `stored_tensors()`; streaming reads and writes checkpoints through them), and how they map to the
canonical banks w_in [E, F, d] (gate rows then up rows), w_out [E, d, ff], b_in [E, F]
and b_out [E, d].

Contract families (transformers' fused experts: Mixtral, Qwen-MoE, OLMoE, DeepSeek-V3, Qwen3-Next,
GPT-OSS): experts.gate_up_proj (or up_proj) and experts.down_proj, with *_bias where the family has
biases, in the layout the module's flags give (ExpertsSpec: GPT-OSS's are transposed with gate and up
interleaved); router gate.weight or router.weight. Switch Transformers: one wi [ff, d] and wo [d, ff]
per expert (experts.expert_{j}), router router.classifier.weight.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..modules.experts_spec import ExpertsSpec


@dataclass(frozen=True)
class ExpertTensors:
    w_in: tuple[str, ...]  # one fused bank, or one tensor per expert (stacked on read)
    w_out: tuple[str, ...]
    router: str
    keep: str  # the drop baseline's logit mask, a buffer next to the router weight (drop.py)
    b_in: str | None = None
    b_out: str | None = None
    spec: ExpertsSpec | None = None  # the fused bank's layout (None: Switch's per-expert tensors)

    @property
    def experts(self) -> tuple[str, ...]:
        """Every stored tensor of the experts (weights and biases)."""
        return (*self.w_in, *self.w_out, *(b for b in (self.b_in, self.b_out) if b is not None))

    def read(self, get: Callable[[str], torch.Tensor]):
        """(w_in, w_out, b_in, b_out) canonical (biases None without them) from get(name) of each stored
        tensor; the fused banks themselves when already canonical, copies otherwise."""
        if self.spec is None:
            return torch.stack([get(x) for x in self.w_in]), torch.stack([get(x) for x in self.w_out]), None, None
        w_in, w_out = get(self.w_in[0]), get(self.w_out[0])
        if self.spec.transposed:
            w_in, w_out = w_in.transpose(1, 2), w_out.transpose(1, 2).contiguous()
        w_in = self.spec.in_rows_to_canonical(w_in, dim=1).contiguous()
        if self.b_in is None:
            return w_in, w_out, None, None
        return w_in, w_out, self.spec.in_rows_to_canonical(get(self.b_in), dim=1), get(self.b_out)

    def split(self, w_in: torch.Tensor, w_out: torch.Tensor, b_in: torch.Tensor | None = None,
              b_out: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """{stored name: tensor} of canonical banks (the inverse of read)."""
        if self.spec is None:
            return {**{x: w_in[j] for j, x in enumerate(self.w_in)}, **{x: w_out[j] for j, x in enumerate(self.w_out)}}
        out = {self.w_in[0]: self._stored_rows(w_in, dim=1), self.w_out[0]: w_out}
        if self.spec.transposed:
            out = {k: v.transpose(1, 2).contiguous() for k, v in out.items()}
        if self.b_in is not None:
            out[self.b_in], out[self.b_out] = self._stored_rows(b_in, dim=1), b_out
        return out

    def _stored_rows(self, t: torch.Tensor, dim: int) -> torch.Tensor:
        """Canonical gate block then up block along `dim` back to the stored order (interleaved for GPT-OSS)."""
        if not self.spec.gated or self.spec.concatenated:
            return t
        ff = t.shape[dim] // 2
        return torch.stack([t.narrow(dim, 0, ff), t.narrow(dim, ff, ff)], dim=dim + 1).flatten(dim, dim + 1)
