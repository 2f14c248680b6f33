"""The training losses: the task's cross-entropy and the MC-SMoE knowledge-distillation loss

    kd_lambda * KL(softmax(teacher / T) || softmax(student / T)) + task_lambda * task + hd_lambda * log MSE(hidden)

(batch mean over the target tokens; like the original, no T^2 factor). Target tokens are the labels
that are not -100; a decoder-only model predicts labels[t + 1] from position t."""
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


def kd_divergence(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher || student) of the tempered distributions, averaged over rows [N, V]."""
    s = F.log_softmax(student.float() / temperature, dim=-1)
    t = F.log_softmax(teacher.float() / temperature, dim=-1)
    return F.kl_div(s, t, log_target=True, reduction="batchmean")


def hidden_loss(student_hidden, teacher_hidden) -> torch.Tensor:
    """log of the mean squared error over every hidden state the models return."""
    s = torch.cat([h.float().flatten() for h in student_hidden])
    t = torch.cat([h.float().flatten() for h in teacher_hidden])
    return torch.log(F.mse_loss(s, t))


def _hidden_states(out) -> list[torch.Tensor]:
    states = []
    for key in ("encoder_hidden_states", "decoder_hidden_states", "hidden_states"):
        value = getattr(out, key, None)
        if value is not None:
            states.extend(value)
    return states


def kd_loss(student_out, teacher_out, labels: torch.Tensor, causal: bool, kd_lambda: float, temperature: float,
            task_lambda: float, hd_lambda: float) -> tuple[torch.Tensor, dict[str, float]]:
    """The total KD loss and its parts (floats, for logging)."""
    s_rows, targets = target_logits(student_out.logits, labels, causal)
    t_rows, _ = target_logits(teacher_out.logits, labels, causal)
    task = F.cross_entropy(s_rows.float(), targets)
    kd = kd_divergence(s_rows, t_rows, temperature)
    total = task_lambda * task + kd_lambda * kd
    parts = {"task": task.item(), "kd": kd.item()}
    if hd_lambda > 0:
        hd = hidden_loss(_hidden_states(student_out), _hidden_states(teacher_out))
        total = total + hd_lambda * hd
        parts["hd"] = hd.item()
    return total, parts
