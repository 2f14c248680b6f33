"""`mcsmoe-fast demo --tour`: the pipeline's mechanics on both families, in seconds. Build a small Switch
and a small Mixtral model locally (random weights: this shows sizes, timings and exactness, not
quality), save them and load them back through the real loading code, then run the pipeline on each:
align experts, collect routing statistics, merge to a quarter of the experts, save the smaller
checkpoint, load it back into the fused inference modules, and report what changed and how long it took."""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

from ..calibrate import collect_routing_stats
from ..checkpoint import from_pretrained, save_pretrained
from ..merge import merge_experts
from ..models import moe_layers
from ..models.hub import load_model
from ..optimize import optimize
from ..permute import align_experts
from ..tiny import tiny_mixtral, tiny_switch

BUILDERS = {
    "switch": lambda: tiny_switch(num_experts=16, d_model=128, d_ff=512, num_layers=4),
    "mixtral": lambda: tiny_mixtral(num_experts=8, hidden_size=128, intermediate_size=448, num_layers=2),
}


def _inputs(model, seed: int = 0, batch: int = 2, length: int = 16) -> dict:
    ids = torch.randint(2, model.config.vocab_size, (batch, length), generator=torch.Generator().manual_seed(seed))
    if model.config.is_encoder_decoder:
        return {"input_ids": ids, "decoder_input_ids": ids[:, : length // 2]}
    return {"input_ids": ids}


def _bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


@torch.no_grad()
def run_family(family: str, workdir: Path, print_fn=print) -> dict[str, float]:
    path = workdir / family
    BUILDERS[family]().save_pretrained(path)
    model = load_model(str(path))
    layers = moe_layers(model)
    experts = layers[0].num_experts
    print_fn(f"{family}: {len(layers)} MoE layers, {experts} experts each, activation {layers[0].activation}")
    inputs = _inputs(model)
    before = model(**inputs).logits

    perms, seconds = _timed(lambda: align_experts(model, progress=False))
    moved = sum((p != torch.arange(p.shape[1])).sum().item() for p in perms.values())
    total = sum(p.numel() for p in perms.values())
    aligned_change = (model(**inputs).logits - before).abs().max().item()
    print_fn(f"  align   {seconds * 1e3:7.1f} ms  {moved} of {total} neurons moved; "
             f"max output change {aligned_change:.1e} (function preserved)")

    calibration = [_inputs(model, seed=s, batch=4, length=32) for s in range(1, 9)]
    stats, seconds = _timed(lambda: collect_routing_stats(model, calibration, progress=False))
    print_fn(f"  stats   {seconds * 1e3:7.1f} ms  {sum(s.tokens for s in stats.values())} routed tokens")
    groups, seconds = _timed(lambda: merge_experts(model, stats, num_groups=experts // 4, progress=False))
    counts = ", ".join(str(g.num_groups) for g in groups.values())
    print_fn(f"  merge   {seconds * 1e3:7.1f} ms  {experts} experts -> groups per layer [{counts}]")

    merged = workdir / f"{family}-merged"
    save_pretrained(model, merged)
    print_fn(f"  save    checkpoint {_bytes(path) / 1e6:.2f} MB -> {_bytes(merged) / 1e6:.2f} MB")
    reference = model(**inputs).logits
    fast = optimize(from_pretrained(merged))
    fast(**inputs)  # warm-up: the first call includes one-time setup (thread pools, kernel selection)
    out, seconds = _timed(lambda: fast(**inputs).logits)
    load_change = (out - reference).abs().max().item()
    print_fn(f"  load    fused modules, forward {seconds * 1e3:.1f} ms (after a warm-up call); max difference to the merged model "
             f"{load_change:.1e}")
    return {"aligned_change": aligned_change, "load_change": load_change,
            "size_ratio": _bytes(merged) / _bytes(path)}


def run_demo(print_fn=print) -> dict[str, dict[str, float]]:
    """Runs every family; returns {family: figures} (output changes and checkpoint size ratio)."""
    print_fn("Randomly initialised models: this shows the pipeline, its sizes and timings, not quality. "
             "The align / stats / merge times are single first calls (they include one-time setup).")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    with tempfile.TemporaryDirectory() as tmp:
        return {family: run_family(family, Path(tmp), print_fn) for family in BUILDERS}
