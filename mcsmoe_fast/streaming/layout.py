"""Which stored tensors hold an MoE layer's experts and router, by the model's own parameter names.

Fused families (Mixtral, Qwen-MoE, OLMoE, DeepSeek-V3, Qwen3-Next): experts.gate_up_proj [E, F, d] and
experts.down_proj [E, d, ff], router gate.weight. Switch Transformers: one wi [ff, d] and wo [d, ff]
per expert (experts.expert_{j}), router router.classifier.weight. Either way `read` gives the canonical
banks w_in [E, F, d] and w_out [E, d, ff] and `split` turns banks back into the stored tensors.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..models import SwitchLayer


@dataclass(frozen=True)
class ExpertTensors:
    w_in: tuple[str, ...]  # one fused bank, or one tensor per expert (stacked on read)
    w_out: tuple[str, ...]
    router: str
    keep: str  # the drop baseline's logit mask, a buffer next to the router weight (drop.py)

    @classmethod
    def of(cls, view) -> ExpertTensors:
        n = view.name
        if isinstance(view, SwitchLayer):
            experts = range(view.num_experts)
            return cls(tuple(f"{n}.experts.expert_{j}.wi.weight" for j in experts),
                       tuple(f"{n}.experts.expert_{j}.wo.weight" for j in experts),
                       f"{n}.router.classifier.weight", f"{n}.router.classifier.keep")
        return cls((f"{n}.experts.gate_up_proj",), (f"{n}.experts.down_proj",), f"{n}.gate.weight", f"{n}.gate.keep")

    @property
    def experts(self) -> tuple[str, ...]:
        return (*self.w_in, *self.w_out)

    def read(self, get: Callable[[str], torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(w_in [E, F, d], w_out [E, d, ff]) from get(name) of each stored tensor."""
        return tuple(get(names[0]) if len(names) == 1 else torch.stack([get(x) for x in names])
                     for names in (self.w_in, self.w_out))

    def split(self, w_in: torch.Tensor, w_out: torch.Tensor) -> dict[str, torch.Tensor]:
        """{stored name: tensor} of the banks."""
        out = {}
        for names, bank in ((self.w_in, w_in), (self.w_out, w_out)):
            out.update({names[0]: bank} if len(names) == 1 else {x: bank[j] for j, x in enumerate(names)})
        return out
