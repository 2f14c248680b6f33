"""Causal language modelling on plain text: token windows to train on, and perplexity to evaluate."""
from __future__ import annotations

import inspect
import math
from pathlib import Path

import torch
from torch import nn

from ..hooks import eval_mode


class Windows(torch.utils.data.Dataset):
    """Non-overlapping windows of `length` tokens; each is one causal-LM example (labels = inputs)."""

    def __init__(self, tokens: torch.Tensor, length: int):
        if length < 2:
            raise ValueError(f"window length must be >= 2, got {length}")
        if tokens.numel() < length:
            raise ValueError(f"{tokens.numel()} tokens are fewer than one window of {length}")
        self.rows = tokens[: tokens.numel() // length * length].view(-1, length)

    def __len__(self) -> int:
        return self.rows.shape[0]

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.rows[i]


def lm_batch(rows) -> dict[str, torch.Tensor]:
    ids = torch.stack(list(rows))
    return {"input_ids": ids, "labels": ids}


def check_vocabulary(ids: torch.Tensor, vocab_size: int | None, what: str) -> None:
    """ValueError naming `what` when a token id is past the model's vocabulary (another model's tokenizer)."""
    if vocab_size is not None and ids.numel() and int(ids.max()) >= vocab_size:
        raise ValueError(f"{what}: the tokenizer produces token id {int(ids.max())} but the model's vocabulary has "
                         f"{vocab_size} entries; is --tokenizer the model's own tokenizer?")


def text_windows(path, tokenizer, length: int, vocab_size: int | None = None) -> Windows:
    """A text file, tokenized as one stream, cut into windows of `length` tokens; with vocab_size, a token id
    past the model's vocabulary is refused, naming the file."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"{path}: no such text file")
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not UTF-8 text ({exc})") from exc
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
    check_vocabulary(ids, vocab_size, str(path))
    return Windows(ids, length)


def refuse_encoder_decoder(model: nn.Module) -> None:
    """Text windows are a causal LM's: an encoder-decoder model would read in its encoder the very tokens its
    decoder must predict (a copy task, not language modelling)."""
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        raise ValueError(f"perplexity on text windows is for causal LMs; {type(model).__name__} is an encoder-decoder "
                         "model (its encoder would see the tokens to predict): use a --task for it")


@torch.no_grad()
def perplexity(model: nn.Module, windows: torch.Tensor, batch_size: int = 32) -> float:
    """exp(mean next-token cross-entropy) over the windows [N, L]: the language-modelling loss alone (with
    output_router_logits=True in its config, a MoE model adds its router's load-balancing loss to `.loss`).
    Runs in eval mode; every module's training flag comes back as it was."""
    if windows.dim() != 2 or windows.shape[0] == 0 or windows.shape[1] < 2:
        raise ValueError(f"perplexity needs windows [N >= 1, L >= 2], got {tuple(windows.shape)}")
    refuse_encoder_decoder(model)
    no_aux = {"output_router_logits": False} if "output_router_logits" in inspect.signature(model.forward).parameters \
        else {}
    total, count = 0.0, 0
    with eval_mode(model):
        for i in range(0, windows.shape[0], batch_size):
            batch = lm_batch(windows[i: i + batch_size])
            n = batch["labels"][:, 1:].numel()
            total += model(**batch, **no_aux).loss.item() * n
            count += n
    return math.exp(total / count)
