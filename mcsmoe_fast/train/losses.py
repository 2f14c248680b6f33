"""The training losses: the task's cross-entropy and the MC-SMoE knowledge-distillation loss

    kd_lambda * KL(softmax(teacher / T) || softmax(student / T)) + task_lambda * task + hd_lambda * hidden

as the original computes it: the KL term summed over the target tokens and divided by the batch size
(PyTorch's `batchmean` over [B, L, V] logits; no T^2 factor), the task term averaged over the target
tokens, and the hidden-state term the log of the mean squared error between the models' hidden states
after the embeddings (encoder-decoder models: the mean of the encoder's and the decoder's). Target tokens
are the labels that are not -100; a decoder-only model predicts labels[t + 1] from position t.

One deliberate difference: the original sums the KL over every decoder position, padding included. Here
padding positions (label -100) are left out: their logits depend on how long the batch was padded, not on
the data, so including them would make the KD term's weight depend on batch composition."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def target_logits(logits: torch.Tensor, labels: torch.Tensor, causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits [N, V], targets [N]) of the N target tokens."""
    if causal:
        logits, labels = logits[:, :-1], labels[:, 1:]
    valid = labels != -100
    return logits[valid], labels[valid]


def task_loss(logits: torch.Tensor, labels: torch.Tensor, causal: bool) -> torch.Tensor:
    rows, targets = target_logits(logits, labels, causal)
    return F.cross_entropy(rows.float(), targets)


def kd_divergence(student: torch.Tensor, teacher: torch.Tensor, temperature: float, batch_size: int) -> torch.Tensor:
    """KL(teacher || student) of the tempered distributions over the last dimension V, summed over the rows
    ([N, V], or any [..., V]) and divided by the batch size (the rows are the target tokens of `batch_size`
    sequences)."""
    s = F.log_softmax(student.float() / temperature, dim=-1)
    t = F.log_softmax(teacher.float() / temperature, dim=-1)
    return F.kl_div(s, t, log_target=True, reduction="sum") / batch_size


def _mean_squared_error(student_states, teacher_states) -> torch.Tensor:
    """The mean squared error over every element of the states after the embeddings (states[1:])."""
    pairs = list(zip(student_states, teacher_states))[1:]
    if not pairs:
        raise ValueError("the hidden-state loss needs at least one hidden state after the embeddings")
    total = sum(F.mse_loss(s.float(), t.float(), reduction="sum") for s, t in pairs)
    return total / sum(s.numel() for s, _ in pairs)


def hidden_loss(student_out, teacher_out) -> torch.Tensor:
    """log of the hidden states' mean squared error (the embeddings skipped); for an encoder-decoder
    model, log((encoder MSE + decoder MSE) / 2), as the original."""
    if getattr(student_out, "encoder_hidden_states", None) is not None:
        parts = [_mean_squared_error(getattr(student_out, key), getattr(teacher_out, key))
                 for key in ("encoder_hidden_states", "decoder_hidden_states")]
        return torch.log((parts[0] + parts[1]) / 2)
    return torch.log(_mean_squared_error(student_out.hidden_states, teacher_out.hidden_states))


def kd_loss(student_out, teacher_out, labels: torch.Tensor, causal: bool, kd_lambda: float, temperature: float,
            task_lambda: float, hd_lambda: float) -> tuple[torch.Tensor, dict[str, float]]:
    """The total KD loss and its parts (floats, for logging)."""
    s_rows, targets = target_logits(student_out.logits, labels, causal)
    t_rows, _ = target_logits(teacher_out.logits, labels, causal)
    task = F.cross_entropy(s_rows.float(), targets)
    kd = kd_divergence(s_rows, t_rows, temperature, labels.shape[0])
    total = task_lambda * task + kd_lambda * kd
    parts = {"task": task.item(), "kd": kd.item()}
    if hd_lambda > 0:
        hd = hidden_loss(student_out, teacher_out)
        total = total + hd_lambda * hd
        parts["hd"] = hd.item()
    return total, parts
