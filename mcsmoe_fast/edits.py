"""The steps that write new tensors into a model (merge_experts, compress_experts) run without autograd and
outside inference mode: the new slots are the model's parameters, normal tensors whatever mode the caller is in
(built under torch.inference_mode they would be inference tensors, and the merged model could not be fine-tuned:
"Inference tensors cannot be saved for backward")."""
from __future__ import annotations

import functools

import torch


def edits_model(step):
    """Decorate a step that writes new tensors into the model (see the module docstring)."""
    @functools.wraps(step)
    def run(*args, **kwargs):
        with torch.inference_mode(False), torch.no_grad():  # this order: leaving inference mode turns grad on
            return step(*args, **kwargs)

    return run
