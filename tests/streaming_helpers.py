"""Shared helpers of the streaming tests: the in-memory pipeline a streamed run must equal, and the
comparison of two merged checkpoints."""
from __future__ import annotations

import json
import warnings

import torch
from safetensors import safe_open

from mcsmoe_fast import (
    collect_routing_stats, compress_experts, from_pretrained, merge_experts, moe_layers, open_model, save_pretrained,
)
from mcsmoe_fast.streaming import merge_checkpoint
from merge_helpers import forward

NUM_GROUPS = 3


def stored(directory) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint directory's safetensors files, by name."""
    out = {}
    for f in sorted(directory.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            out |= {k: h.get_tensor(k) for k in h.keys()}
    return out


def in_memory(src, out, batches, compress=None, **kwargs):
    """The in-memory pipeline the streamed one must equal."""
    model = open_model(str(src))
    bases = ("router-logits", "feature") + (("expert-output",) if kwargs.get("similarity") == "expert-output" else ())
    stats = collect_routing_stats(model, batches, bases=bases, progress=False)
    merge_experts(model, stats, NUM_GROUPS, progress=False, **kwargs)
    if compress:
        compress_experts(model, **compress, importance="weight", progress=False)
    return save_pretrained(model, out)


def assert_same_checkpoint(expected, actual, batches):
    a, b = from_pretrained(expected), from_pretrained(actual)
    for x in batches:
        torch.testing.assert_close(forward(b, x), forward(a, x), rtol=0, atol=1e-5)
    for la, lb in zip(moe_layers(a), moe_layers(b)):
        assert la.name == lb.name
        assert torch.equal(la.expert_map(), lb.expert_map())
    sa, sb = a.state_dict(), b.state_dict()
    assert sorted(sa) == sorted(sb)
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    ca, cb = (json.loads((p / "config.json").read_text()) for p in (expected, actual))
    for key in ("merges", "layers"):
        assert ca["mcsmoe_merge"][key] == cb["mcsmoe_merge"][key]
    assert ca.get("mcsmoe_compress") == cb.get("mcsmoe_compress")


def quiet_merge(*args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # a budget below one layer warns
        return merge_checkpoint(*args, progress=False, **kwargs)
