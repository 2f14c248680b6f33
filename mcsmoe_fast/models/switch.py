"""Switch Transformers (transformers 5.x): experts are a ModuleDict of `expert_{i}` with wi [ff, d],
wo [d, ff] and the config's dense_act_fn (ReLU by default); router.classifier [E, d]; top-1 routing with expert capacity.
Sparse layers sit in both the encoder and the decoder."""
from __future__ import annotations

import torch
from torch import nn

from ..modules.compressed import CompressedMoEExperts
from ..modules import MoEExperts, SwitchMoE
from ..modules.masked_router import MaskedLinear
from .base import MoELayer, refuse_compressed
from .registry import Family
from .stored_tensors import ExpertTensors


class SwitchLayer(MoELayer):
    def _router(self) -> nn.Module:
        return self.module.router

    def router_weight(self) -> torch.Tensor:
        return self._router().classifier.weight

    def router_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """As transformers' router computes them: the classifier cast to the router's dtype (float32 by default,
        as its forward casts it too, for good), then applied (masked logits included)."""
        router = self._router()
        router.classifier = router.classifier.to(router.dtype)
        return router.classifier(hidden.to(router.dtype))

    def choose(self, logits: torch.Tensor, input_dtype: torch.dtype) -> torch.Tensor:
        """As transformers' router chooses: the argmax of the probabilities rounded to the input's dtype (ties in
        bfloat16 / float16 go to the lower index, where the float32 logits could say otherwise)."""
        probs = torch.softmax(logits, dim=-1, dtype=self._router().dtype).to(input_dtype)
        return probs.argmax(dim=-1, keepdim=True)

    def _experts(self):
        return self.module.experts

    def expert_tensors(self) -> tuple[list[torch.Tensor], list[torch.Tensor]] | None:
        """Each expert's wi and wo weight (None once the block holds our slots)."""
        experts = self._experts()
        if isinstance(experts, (MoEExperts, CompressedMoEExperts)):
            return None
        return ([experts[f"expert_{i}"].wi.weight for i in range(self.num_experts)],
                [experts[f"expert_{i}"].wo.weight for i in range(self.num_experts)])

    def expert_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        if (slots := self.slot_weights()) is not None:
            return slots
        w_in, w_out = self.expert_tensors()
        return torch.stack(w_in).detach(), torch.stack(w_out).detach()

    @torch.no_grad()
    def set_expert_weights(self, w_in: torch.Tensor, w_out: torch.Tensor) -> None:
        experts = self._experts()
        refuse_compressed(self, experts)
        if isinstance(experts, MoEExperts):
            experts.w_in.copy_(w_in)
            experts.w_out.copy_(w_out)
            return
        for i in range(self.num_experts):
            experts[f"expert_{i}"].wi.weight.copy_(w_in[i])
            experts[f"expert_{i}"].wo.weight.copy_(w_out[i])

    def install_experts(self, experts: MoEExperts | CompressedMoEExperts) -> None:
        """Replace the block by a SwitchMoE with the same router, transformers' expert dropout and the given
        expert slots."""
        if isinstance(self.module, SwitchMoE):
            self.module.experts = experts
        else:
            block = SwitchMoE(self.module.router, experts, expert_dropout=expert_dropout_rate(self.module))
            self.replace(block.train(self.module.training))  # the model's mode (eval: no expert dropout)


    # --- the drop baseline: the router calls its classifier, whose logits are masked ----------------------
    def check_maskable(self) -> None:
        return None

    def mask_router(self, keep: torch.Tensor) -> None:
        router = self.module.router
        if not isinstance(router.classifier, MaskedLinear):
            router.classifier = MaskedLinear(router.classifier, keep)
        router.classifier.keep.copy_(keep)

    def logit_mask(self) -> torch.Tensor | None:
        classifier = self.module.router.classifier
        return classifier.keep if isinstance(classifier, MaskedLinear) else None

    def router_rows(self) -> tuple[nn.Module, str]:
        return self.module.router.classifier, "router.classifier."

    def stored_tensors(self) -> ExpertTensors:
        """One wi [ff, d] and wo [d, ff] per expert (experts.expert_{j}), router router.classifier.weight."""
        n, experts = self.name, range(self.num_experts)
        return ExpertTensors(tuple(f"{n}.experts.expert_{j}.wi.weight" for j in experts),
                             tuple(f"{n}.experts.expert_{j}.wo.weight" for j in experts),
                             f"{n}.router.classifier.weight", f"{n}.router.classifier.keep")


def expert_dropout_rate(block: nn.Module) -> float:
    """The dropout rate inside transformers' Switch experts (config.dropout_rate), read from the block's first
    expert (SwitchTransformersDenseActDense.dropout, between the activation and wo); 0 when it has none."""
    experts = getattr(block, "experts", None)
    first = experts["expert_0"] if isinstance(experts, nn.ModuleDict) and "expert_0" in experts else None
    dropout = getattr(first, "dropout", None)
    return float(dropout.p) if isinstance(dropout, nn.Dropout) else 0.0


def is_switch_block(module: nn.Module) -> bool:
    return type(module).__name__ == "SwitchTransformersSparseMLP" or isinstance(module, SwitchMoE)


def switch_layers(model: nn.Module) -> list[SwitchLayer]:
    from ..activations import from_config
    from .base import split_name

    config = getattr(model, "config", None)
    activation = from_config(getattr(config, "dense_act_fn", "relu"), gated=False, where="switch_transformers")
    layers = []
    for name, module in model.named_modules():
        if is_switch_block(module):
            parent, attr = split_name(model, name)
            layers.append(
                SwitchLayer(name=name, module=module, parent=parent, attr=attr,
                            num_experts=module.router.num_experts, top_k=1, activation=activation)
            )
    return layers


FAMILIES = (Family("switch_transformers", ("switch_transformers",), switch_layers, seq2seq=True, streaming="dispatch"),)
