"""Running calibration batches through a model with every MoE block's input in hand: the one loop that
routing statistics (calibrate.py) and activation matching (permute.py) share, and the pre-hook that the
streamed passes (streaming/passes.py) put on the one block they run at a time."""
from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import nn
from tqdm.auto import tqdm

from .models import MoELayer


def hook_block_input(module: nn.Module, receive: Callable[[torch.Tensor], None]):
    """A forward pre-hook on an MoE block: receive(hidden_states) with every input it is called with.
    Returns the handle (remove() it when done)."""
    def hook(_, args, kwargs):
        receive(args[0] if args else kwargs["hidden_states"])

    return module.register_forward_pre_hook(hook, with_kwargs=True)


def is_decoder_layer(model: nn.Module, name: str) -> bool:
    return bool(getattr(model.config, "is_encoder_decoder", False)) and (
        name.startswith("decoder.") or ".decoder." in name
    )


def complete_inputs(model: nn.Module, batch: dict) -> dict:
    """An encoder-decoder model needs decoder inputs. With `labels` (a task's targets, -100 on padding)
    the model feeds the decoder the shifted targets itself (or reads the batch's decoder_input_ids, as
    transformers' DataCollatorForSeq2Seq gives them), and the decoder mask, unless the batch has one, is the
    targets' mask. With neither labels nor decoder_input_ids, the decoder reads the input text itself
    (teacher forcing) with the same padding mask."""
    if not getattr(model.config, "is_encoder_decoder", False):
        return batch
    if "labels" in batch:
        if "decoder_attention_mask" in batch:
            return batch
        return {**batch, "decoder_attention_mask": (batch["labels"] != -100).long()}
    if "input_ids" not in batch or "decoder_input_ids" in batch:
        return batch
    batch = dict(batch)
    batch["decoder_input_ids"] = model._shift_right(batch["input_ids"])
    if "attention_mask" in batch and "decoder_attention_mask" not in batch:
        batch["decoder_attention_mask"] = batch["attention_mask"]
    return batch


def token_masks(batch: dict) -> dict[str, torch.Tensor | None]:
    """The padding masks of a completed batch: {"encoder": ..., "decoder": ...} (None = every token)."""
    return {"encoder": batch.get("attention_mask"), "decoder": batch.get("decoder_attention_mask")}


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """`model` in eval mode for the time of the block, then every submodule's own training flag as it was
    (model.train(flag) would give each submodule the top module's flag: a part kept in eval while the rest
    trains, a frozen embedding for instance, would come back in training mode)."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes:
            module.training = training


def run_hooked(model: nn.Module, layers: list[MoELayer], batches: Iterable[Mapping],
               receive: Callable[[MoELayer, torch.Tensor, torch.Tensor | None], None], *, desc: str | None = None,
               stop: Callable[[], bool] | None = None) -> int:
    """Run `batches` (mappings of model inputs: dicts, a tokenizer's BatchEncoding) through `model` in eval
    mode, with receive(layer, hidden, mask) called for the input of every layer's block (mask: the batch's
    padding mask for that side, None = every token). desc: a progress bar's title (None: no bar); stop() is
    asked after each batch. Restores every module's training flag; returns the number of batches run."""
    masks: dict[str, torch.Tensor | None] = {}

    def receiver(layer: MoELayer):
        side = "decoder" if is_decoder_layer(model, layer.name) else "encoder"
        return lambda hidden: receive(layer, hidden, masks.get(side))

    handles = [hook_block_input(layer.module, receiver(layer)) for layer in layers]
    seen = 0
    try:
        with eval_mode(model):
            total = len(batches) if hasattr(batches, "__len__") else None
            for batch in tqdm(batches, desc=desc, unit="batch", total=total, disable=desc is None):
                if not isinstance(batch, Mapping):
                    raise ValueError("batches must yield mappings of model inputs (dicts), "
                                     f"got {type(batch).__name__}")
                batch = complete_inputs(model, dict(batch))
                masks.update(token_masks(batch))
                model(**batch)
                seen += 1
                if stop is not None and stop():
                    break
    finally:
        for handle in handles:
            handle.remove()
    return seen
