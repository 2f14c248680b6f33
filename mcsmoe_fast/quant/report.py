"""The error re-quantizing adds, as every output in the input's precision reports it (config.json's
`mcsmoe_quantization`, the CLI's line):

{"format": "fp8" | "mxfp4",
 "layers": {layer: {"w_in", "w_out": relative error of the re-quantized bank against the merged bank it was
                    quantized from; "output": relative error of the layer's routed-expert output on calibration
                    tokens, merged weights against their re-quantized values (float32); "tokens"}},
 "tensors": {stored name: relative error} of every tensor quantized afresh (the in-memory outputs, the streamed
            standard checkpoint),
 "max": {...}, "mean": {...} over the layers (w_in, w_out, output) and the tensors (weights)}
"""
from __future__ import annotations

import torch

from .requantize import relative_error, squared_error


def summarize(method: str, layers: dict[str, dict] | None = None, tensors: dict[str, float] | None = None) -> dict | None:
    """The report of `layers` and `tensors` (None when both are empty)."""
    if not layers and not tensors:
        return None
    values = {what: [e[what] for e in (layers or {}).values() if what in e] for what in ("w_in", "w_out", "output")}
    values["weights"] = list((tensors or {}).values())
    report = {"format": method}
    if layers:
        report["layers"] = layers
    if tensors:
        report["tensors"] = tensors
    report["max"] = {k: max(v) for k, v in values.items() if v}
    report["mean"] = {k: sum(v) / len(v) for k, v in values.items() if v}
    return report


@torch.no_grad()
def layer_error(merged: tuple, requantized, expert_map: torch.Tensor, activation: str, activation_args=None,
                sample=None) -> dict:
    """{w_in, w_out[, output, tokens]} of one layer: merged = (w_in, w_out, b_in, b_out) canonical slots;
    requantized = their re-quantized values, (w_in, w_out) or a function slot -> (w_in[slot], w_out[slot]) in
    float32; sample = (hidden [T, d], top-k index [T, k], top-k weights [T, k]) the layer's experts saw in the
    original model (None: no output error). One slot at a time: its two float32 copies are all the report holds
    besides the [T, d] outputs (streaming/memory.py counts them); the output is the sum over slots of each slot's
    weighted output on the tokens routed to it, as the grouped FFN computes it."""
    from ..modules import MoEExperts

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


def describe_error(report: dict | None) -> str:
    """One line for the CLI."""
    if not report:
        return "re-quantized: no merged layer"
    mx, mean, method = report["max"], report["mean"], report["format"]
    parts = []
    if "w_in" in mx:
        text = (f"re-quantized to {method}: merged weights {100 * max(mx['w_in'], mx['w_out']):.2f}% relative error "
                f"(max over banks; mean {100 * (mean['w_in'] + mean['w_out']) / 2:.2f}%)")
        if "output" in mx:
            text += (f", layer outputs on calibration tokens {100 * mx['output']:.2f}% (max; mean "
                     f"{100 * mean['output']:.2f}%)")
        parts.append(text)
    if "weights" in mx:
        parts.append(f"re-quantized {len(report['tensors'])} changed tensors to {method}: {100 * mx['weights']:.2f}% "
                     f"relative error (max; mean {100 * mean['weights']:.2f}%)")
    return "; ".join(parts)
