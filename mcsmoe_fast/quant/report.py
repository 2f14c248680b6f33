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

ERROR_KEY = "mcsmoe_quantization"  # config.json: the output's format and the error re-quantizing added


def drop_quantization(config) -> None:
    """`config` for a model or an output that is no longer quantized (dequantized on loading, or written in a
    float dtype): without quantization_config, and without the re-quantization report of the checkpoint it came
    from, which describes tensors that are no longer there."""
    for key in ("quantization_config", ERROR_KEY):
        if getattr(config, key, None) is not None:
            delattr(config, key)


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


def describe_error(report: dict | None) -> str:
    """One line for the CLI."""
    if not report:
        return "re-quantized: no merged layer"
    mx, mean, method = report["max"], report["mean"], report["format"]
    parts = []
    if "w_in" in mx:
        # against the working dtype's values: a kept expert copied byte for byte shows that copy's rounding
        text = (f"written in {method}: expert weights {100 * max(mx['w_in'], mx['w_out']):.2f}% relative error "
                f"against the working copy (max over banks; mean {100 * (mean['w_in'] + mean['w_out']) / 2:.2f}%)")
        if "output" in mx:
            text += (f", layer outputs on calibration tokens {100 * mx['output']:.2f}% (max; mean "
                     f"{100 * mean['output']:.2f}%)")
        parts.append(text)
    if "weights" in mx:
        parts.append(f"re-quantized {len(report['tensors'])} changed tensors to {method}: {100 * mx['weights']:.2f}% "
                     f"relative error (max; mean {100 * mean['weights']:.2f}%)")
    return "; ".join(parts)
