"""transformers' own save_pretrained / push_to_hub refused on a model whose MoE layers are ours.

A merged or compressed model's experts are our slot modules (`experts.w_in` with an `expert_map`,
`experts.in_U`, ...), which transformers' from_pretrained does not know: it would load such a checkpoint
with freshly initialised experts and no error (an optimized Switch model's state_dict keeps transformers'
names, but its save is refused all the same: only this package's format records what was swapped). So every step that installs our modules (merge, compress, optimize,
loading a merged checkpoint) guards the model: the transformers methods raise and say what to use.
"""
from __future__ import annotations

from torch import nn

MESSAGE = (
    "this model's MoE layers are mcsmoe_fast modules (merged, compressed or optimized experts), whose weights "
    "transformers' from_pretrained cannot load back. Save it with mcsmoe_fast.save_pretrained(model, dir) "
    "(reloads with mcsmoe_fast.from_pretrained), or mcsmoe_fast.save_pretrained(model, dir, export_dense=True) "
    "for a plain transformers checkpoint."
)


class PlainSaveRefused(ValueError):
    pass


def _refuse(*args, **kwargs):
    raise PlainSaveRefused(MESSAGE)


def guard_plain_save(model: nn.Module) -> nn.Module:
    """Make model.save_pretrained / model.push_to_hub raise PlainSaveRefused (instance attributes that
    shadow transformers' methods; the model is otherwise unchanged). Returns the model."""
    for name in ("save_pretrained", "push_to_hub"):
        if hasattr(model, name):
            setattr(model, name, _refuse)
    return model
