"""The error re-quantizing adds to one merged (or pruned) MoE layer: its banks' relative error and its
routed-expert output on calibration tokens, merged weights against their re-quantized values (the "layers"
entries of quant/report.py's report; the streamed outputs and the in-memory ones, layer_errors.py, use it)."""
from __future__ import annotations

import torch

from ..modules import MoEExperts
from ..quant.requantize import relative_error, squared_error


@torch.no_grad()
def layer_error(merged: tuple, requantized, expert_map: torch.Tensor, activation: str, activation_args=None,
                sample=None) -> dict:
    """{w_in, w_out[, output, tokens]} of one layer: merged = (w_in, w_out, b_in, b_out) canonical slots;
    requantized = their re-quantized values, (w_in, w_out) or a function slot -> (w_in[slot], w_out[slot]) in
    float32; sample = (hidden [T, d], top-k index [T, k], top-k weights [T, k]) the layer's experts saw in the
    original model (None: no output error). One slot at a time: its two float32 copies are all the report holds
    besides the [T, d] outputs (streaming/memory.py counts them); the output is the sum over slots of each slot's
    weighted output on the tokens routed to it, as the grouped FFN computes it."""
    slot_values = requantized if callable(requantized) else (lambda j: (requantized[0][j], requantized[1][j]))
    sums = {"w_in": [0.0, 0.0], "w_out": [0.0, 0.0]}
    if sample is not None:
        hidden, index, weights = (t.float() if t.is_floating_point() else t for t in sample)
        slot_of = expert_map.to(index.device)[index.long()]
        out = [torch.zeros(hidden.shape, dtype=torch.float32) for _ in (0, 1)]
    for j in range(merged[0].shape[0]):
        ref, got = (merged[0][j], merged[1][j]), slot_values(j)
        for bank, q, r in zip(("w_in", "w_out"), got, ref):
            diff, norm = squared_error(q, r)
            sums[bank][0] += diff
            sums[bank][1] += norm
        if sample is None:
            continue
        rows, cols = (slot_of == j).nonzero(as_tuple=True)
        if rows.numel() == 0:
            continue
        b_in, b_out = (None if b is None else b[j:j + 1].float() for b in merged[2:])
        for k, (w_in, w_out) in enumerate((ref, got)):
            experts = MoEExperts(w_in[None].float(), w_out[None].float(), torch.zeros(1, dtype=torch.int64), activation,
                                 b_in, b_out, activation_args)
            out[k].index_add_(0, rows, experts(hidden[rows], torch.zeros_like(rows)[:, None], weights[rows, cols][:, None]))
    entry = {bank: _ratio(*sums[bank]) for bank in ("w_in", "w_out")}
    if sample is not None:
        entry.update(output=relative_error(out[1], out[0]), tokens=int(hidden.shape[0]))
    return entry


def _ratio(diff: float, norm: float) -> float:
    diff, norm = diff ** 0.5, norm ** 0.5
    return diff / norm if norm > 0 else (0.0 if diff == 0 else float("inf"))
