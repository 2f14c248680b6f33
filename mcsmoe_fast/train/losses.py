"""The training losses: the task's cross-entropy and the MC-SMoE knowledge-distillation loss

    kd_lambda * KL(softmax(teacher / T) || softmax(student / T)) + task_lambda * task + hd_lambda * hidden

as the original computes it: the KL term summed over the target tokens and divided by the batch size
(PyTorch's `batchmean` over [B, L, V] logits; no T^2 factor), the task term averaged over the target
tokens, and the hidden-state term the log of the mean squared error between the models' hidden states
after the embeddings (encoder-decoder models: the mean of the encoder's and the decoder's). Target tokens
are the labels that are not -100; a decoder-only model predicts labels[t + 1] from position t.

One deliberate difference: the original sums the KL over every decoder position, padding included. Here
padding positions (label -100) are left out: their logits depend on how long the batch was padded, not on
the data, so including them would make the KD term's weight depend on batch composition.

Under N processes (`across`: train/processes.py's Across, sums over the processes sharing a global batch) the
terms are the global batch's, as one process computes them: the task term is each process's sum over its target
tokens divided by the global batch's count (times N: the gradients are averaged over the processes), the hidden-
state term the log of the global mean squared error (each process's gradient its share of it); the KL term, a sum
over the process's sequences divided by its batch size (equal on every process), needs nothing."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def target_logits(logits: torch.Tensor, labels: torch.Tensor, causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits [N, V], targets [N]) of the N target tokens."""
    if causal:
        logits, labels = logits[:, :-1], labels[:, 1:]
    valid = labels != -100
    return logits[valid], labels[valid]


def task_loss(logits: torch.Tensor, labels: torch.Tensor, causal: bool, across=None) -> torch.Tensor:
    """The cross-entropy averaged over the target tokens (of the global batch, across processes)."""
    rows, targets = target_logits(logits, labels, causal)
    if across is None:
        return F.cross_entropy(rows.float(), targets)
    total = across.sum(torch.tensor(float(targets.numel()), device=logits.device))
    return F.cross_entropy(rows.float(), targets, reduction="sum") * across.processes / total


def fine_tuning_loss(out, labels: torch.Tensor, causal: bool, across=None) -> torch.Tensor:
    """The model's own loss (task_loss where it has none). across: the model's loss is a mean over this process's
    target tokens, so it is weighted by their share of the global batch's (a process without any contributes
    nothing)."""
    own = getattr(out, "loss", None)
    if own is None:
        return task_loss(out.logits, labels, causal, across)
    if across is None:
        return own
    local = int(((labels[:, 1:] if causal else labels) != -100).sum())
    total = across.sum(torch.tensor(float(local), device=own.device))
    return own * (local * across.processes / total) if local else out.logits.sum() * 0


def kd_divergence(student: torch.Tensor, teacher: torch.Tensor, temperature: float, batch_size: int) -> torch.Tensor:
    """KL(teacher || student) of the tempered distributions over the last dimension V, summed over the rows
    ([N, V], or any [..., V]) and divided by the batch size (the rows are the target tokens of `batch_size`
    sequences)."""
    s = F.log_softmax(student.float() / temperature, dim=-1)
    t = F.log_softmax(teacher.float() / temperature, dim=-1)
    return F.kl_div(s, t, log_target=True, reduction="sum") / batch_size


def _squared_errors(student_states, teacher_states) -> tuple[torch.Tensor, int]:
    """(the sum of squared errors, the element count) over the states after the embeddings (states[1:])."""
    pairs = list(zip(student_states, teacher_states))[1:]
    if not pairs:
        raise ValueError("the hidden-state loss needs at least one hidden state after the embeddings")
    total = sum(F.mse_loss(s.float(), t.float(), reduction="sum") for s, t in pairs)
    return total, sum(s.numel() for s, _ in pairs)


def hidden_loss(student_out, teacher_out, across=None) -> torch.Tensor:
    """log of the hidden states' mean squared error (the embeddings skipped); for an encoder-decoder
    model, log((encoder MSE + decoder MSE) / 2), as the original. across: of the global batch's states (module
    docstring): its value log(MSE), its gradient this process's share."""
    keys = ("encoder_hidden_states", "decoder_hidden_states") \
        if getattr(student_out, "encoder_hidden_states", None) is not None else ("hidden_states",)
    parts = [_squared_errors(getattr(student_out, key), getattr(teacher_out, key)) for key in keys]
    if across is None:
        return torch.log(sum(total / count for total, count in parts) / len(parts))
    sums = torch.stack([total for total, _ in parts])
    counts = across.sum(torch.tensor([float(count) for _, count in parts], device=sums.device))
    mse = across.sum(sums.detach()) / counts
    mean = mse.mean()
    # 0, with the gradient; equal states (mean 0) keep log(0) = -inf, as one process gives it, not 0 / 0
    share = across.processes * ((sums - sums.detach()) / counts).sum() / (len(parts) * mean.clamp_min(1e-30))
    return torch.log(mean) + share


def kd_loss(student_out, teacher_out, labels: torch.Tensor, causal: bool, kd_lambda: float, temperature: float,
            task_lambda: float, hd_lambda: float, across=None) -> tuple[torch.Tensor, dict[str, float]]:
    """The total KD loss and its parts (floats, for logging); across: module docstring."""
    s_rows, targets = target_logits(student_out.logits, labels, causal)
    t_rows, _ = target_logits(teacher_out.logits, labels, causal)
    task = task_loss(student_out.logits, labels, causal, across)
    kd = kd_divergence(s_rows, t_rows, temperature, labels.shape[0])
    total = task_lambda * task + kd_lambda * kd
    parts = {"task": task.item(), "kd": kd.item()}
    if hd_lambda > 0:
        hd = hidden_loss(student_out, teacher_out, across)
        total = total + hd_lambda * hd
        parts["hd"] = hd.item()
    return total, parts
