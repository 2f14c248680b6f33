"""The decoder-only forward pass cut at the layer boundaries, as the model forwards of Mixtral, Qwen2-MoE,
Qwen3-MoE, OLMoE, DeepSeek-V3 and GPT-OSS compute it (modeling_mixtral.py & co): embeddings, then per layer and batch the
causal mask (sliding window where the config says so) and the rotary position embeddings, then the layer.

Without a KV cache: for one full-sequence forward a cache changes nothing (keys and values are the
same), so the hidden states equal those of model(**batch) bit for bit (tests/test_streaming.py).
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn

ACCEPTED_KEYS = {"input_ids", "attention_mask", "position_ids", "labels"}  # labels: ignored by the cut forward
SEQ2SEQ_KEYS = {"input_ids", "attention_mask", "labels", "decoder_input_ids", "decoder_attention_mask"}


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, L]
    attention_mask: torch.Tensor | None  # [B, L], 1 = token, 0 = padding
    position_ids: torch.Tensor  # [B or 1, L]
    inputs: dict  # the batch as given (on the CPU): what a model's own forward gets

    @property
    def tokens(self) -> int:
        return int(self.attention_mask.sum()) if self.attention_mask is not None else self.input_ids.numel()


def prepare_batches(batches: Iterable[dict], vocab_size: int, accepted: set[str] = ACCEPTED_KEYS) -> list[Batch]:
    """Check and keep the calibration batches (input_ids, optional attention_mask / position_ids, or
    the `accepted` inputs of an encoder-decoder model)."""
    out = []
    for i, batch in enumerate(batches):
        if not isinstance(batch, dict):
            raise ValueError(f"calibration batches must be dicts of model inputs, batch {i} is {type(batch).__name__}")
        unknown = sorted(set(batch) - accepted)
        if unknown:
            raise ValueError(f"calibration batch {i}: unsupported inputs {unknown} for streaming "
                             f"(accepted: {', '.join(sorted(accepted))})")
        ids = batch.get("input_ids")
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.is_floating_point():
            raise ValueError(f"calibration batch {i}: input_ids must be an integer tensor [batch, length]")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
            raise ValueError(f"calibration batch {i}: token ids must be in [0, {vocab_size})")
        mask = batch.get("attention_mask")
        if mask is not None and tuple(mask.shape) != tuple(ids.shape):
            raise ValueError(f"calibration batch {i}: attention_mask {tuple(mask.shape)} does not match "
                             f"input_ids {tuple(ids.shape)}")
        positions = batch.get("position_ids")
        if positions is None:
            positions = torch.arange(ids.shape[1]).unsqueeze(0)
        inputs = {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        out.append(Batch(ids.cpu(), None if mask is None else mask.cpu(), positions.cpu(), inputs))
    if not out:
        raise ValueError("calibration_batches: no calibration batch was given")
    return out


def causal_mask(config, hidden: torch.Tensor, batch: Batch, layer_index: int):
    """The layer's attention mask, as the family's model forward builds it: per layer type where the
    config lists `layer_types` (Qwen2-MoE, GPT-OSS), else sliding-window when the config has a window (Mixtral,
    Qwen3-MoE), else causal (OLMoE)."""
    from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        sliding = layer_types[layer_index] == "sliding_attention"
    else:
        sliding = getattr(config, "sliding_window", None) is not None
    make = create_sliding_window_causal_mask if sliding else create_causal_mask
    return make(config=config, inputs_embeds=hidden, attention_mask=batch.attention_mask, cache=None,
                position_ids=batch.position_ids)


@torch.no_grad()
def run_layer(model: nn.Module, layer: nn.Module, index: int, batches: list[Batch], get: Callable[[int], torch.Tensor],
              put: Callable[[int, torch.Tensor], None], on_batch: Callable[[Batch], None] | None = None) -> None:
    """hidden_b <- layer(hidden_b) for every batch b, reading and writing through get / put.
    on_batch(batch) is called before the layer runs on it (the routing-statistics hook reads its mask)."""
    inner = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    for b, batch in enumerate(batches):
        hidden = get(b)
        position_embeddings = inner.rotary_emb(hidden, position_ids=batch.position_ids)
        mask = causal_mask(model.config, hidden, batch, index)
        if on_batch is not None:
            on_batch(batch)
        put(b, layer(hidden, attention_mask=mask, position_ids=batch.position_ids,
                     position_embeddings=position_embeddings))
