"""Load a Hugging Face MoE model from a local directory or a hub id, with the right head class."""
from __future__ import annotations

import torch

SEQ2SEQ_TYPES = {"switch_transformers"}


def model_class_for(config):
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    return AutoModelForSeq2SeqLM if config.model_type in SEQ2SEQ_TYPES else AutoModelForCausalLM


def load_model(name_or_path: str, dtype: torch.dtype | None = None):
    """The model in eval mode; a plain transformers checkpoint (see checkpoint.py for merged ones)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(name_or_path)
    model = model_class_for(config).from_pretrained(name_or_path, dtype=dtype or torch.float32)
    return model.eval()
