"""The quick-start job: build a small Switch and a small Mixtral model locally, save them, load them
back through the real loading code, align their experts, and report what changed and how long it took."""
from __future__ import annotations

import tempfile
import time

import torch

from .models import moe_layers
from .models.loading import load_model
from .permute import align_experts
from .tiny import tiny_mixtral, tiny_switch


def _inputs(model, seed: int = 0) -> dict:
    ids = torch.randint(2, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(seed))
    if model.config.is_encoder_decoder:
        return {"input_ids": ids, "decoder_input_ids": ids[:, :8]}
    return {"input_ids": ids}


@torch.no_grad()
def run_demo(print_fn=print) -> dict[str, float]:
    """Returns {model family: max abs output change after alignment}."""
    builders = {
        "switch": lambda: tiny_switch(num_experts=16, d_model=128, d_ff=512, num_layers=4),
        "mixtral": lambda: tiny_mixtral(num_experts=8, hidden_size=128, intermediate_size=448, num_layers=2),
    }
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    changes = {}
    with tempfile.TemporaryDirectory() as tmp:
        for family, build in builders.items():
            path = f"{tmp}/{family}"
            build().save_pretrained(path)
            model = load_model(path)
            inputs = _inputs(model)
            before = model(**inputs).logits
            start = time.perf_counter()
            perms = align_experts(model, progress=False)
            elapsed = time.perf_counter() - start
            changes[family] = (model(**inputs).logits - before).abs().max().item()
            layers = moe_layers(model)
            print_fn(f"{family}: {len(layers)} MoE layers, {layers[0].num_experts} experts, "
                     f"activation {layers[0].activation}")
            for name, perm in perms.items():
                moved = (perm != torch.arange(perm.shape[1])).sum().item()
                print_fn(f"  {name:<34} {moved:6d} of {perm.numel():6d} neurons moved")
            print_fn(f"  aligned in {elapsed * 1e3:.1f} ms; max output change {changes[family]:.2e} (function preserved)")
    return changes
