"""Shared helpers of the merging tests: tiny models saved and reloaded, calibration batches, forward."""
from __future__ import annotations

import torch

from mcsmoe_fast.models.hub import load_model
from mcsmoe_fast.tiny import tiny_mixtral, tiny_moe, tiny_switch


def build(family: str, tmp_path, **kwargs):
    """A tiny model of `family` ("switch", "mixtral" or a tiny_moe family) saved to tmp_path and loaded back
    through the real loading code."""
    if family == "switch":
        model = tiny_switch(**kwargs)
    elif family == "mixtral":
        model = tiny_mixtral(**kwargs)
    else:
        model = tiny_moe(family, **kwargs)
    path = tmp_path / f"{family}-base"
    model.save_pretrained(path)
    return load_model(str(path))


def calibration(model, seed: int = 0, batches: int = 2, batch: int = 3, length: int = 10, pad: bool = True):
    """Random input dicts; some sequences end in padding when pad=True."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(batches):
        ids = torch.randint(3, model.config.vocab_size, (batch, length), generator=g)
        mask = torch.ones_like(ids)
        if pad:
            mask[0, length // 2 :] = 0
            ids[0, length // 2 :] = 0
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


@torch.no_grad()
def forward(model, batch: dict) -> torch.Tensor:
    inputs = dict(batch)
    if model.config.model_type == "switch_transformers" and "decoder_input_ids" not in inputs:
        inputs["decoder_input_ids"] = inputs["input_ids"][:, :7]
    return model(**inputs).logits
