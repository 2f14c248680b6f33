"""A checkpoint of ours (the exact format: merged or compressed slots, config.json's mcsmoe_merge section naming
its weights) rewritten in the precision of the quantized checkpoint it was made from: what `compress` in memory
writes for a block-FP8 / MXFP4 input.

Every tensor by quant/requantize.py's rule (LikeSource): tensors the input stores quantized whose values the
model kept (attention, dense and shared-expert projections, the slots of a layer left as it was) are copied byte
for byte with their scales, merged slots (experts.w_in / w_out) are quantized afresh, and what has no quantized
layout in the releases stays in the working dtype: the compressed experts' low-rank factors and sparse rows
(in_U, in_V, in_S_rows ...), norms, routers, expert_map. The weights go to one file, the merge section's
weights entry is rewritten for it, quantization_config is the input's and the error quantizing added is
recorded (quant/report.py "tensors"). from_pretrained reads the mix (checkpoint/load.py: the quantized tensors
dequantized, the others as stored).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from ..quant import detect
from ..quant.files import QuantizedFiles
from ..quant.report import ERROR_KEY, summarize
from ..quant.requantize import LikeSource, dequantize_parts, relative_error
from ..sections import MERGE_SECTION
from ..checkpoint.atomic import atomic_directory
from ..checkpoint.format import FORMAT_VERSION, WEIGHTS_METADATA, WEIGHTS_NAME
from ..checkpoint.weight_files import ShardWriter



def stored_format(spec):
    """The quantized format the checkpoint directory `spec` stores tensors in (a plain release or one of our
    merged checkpoints of it), None when it has none or is not a local directory."""
    config = Path(str(spec)).expanduser() / "config.json"
    if not config.is_file():
        return None
    raw = json.loads(config.read_text(encoding="utf-8"))
    return detect(raw.get("quantization_config")) if isinstance(raw, dict) else None


def requantize_merged(directory, like) -> dict | None:
    """Rewrite our checkpoint `directory` in place in the format of the quantized checkpoint `like` (module
    docstring); returns the error report (None when nothing was quantized afresh)."""
    from .source import open_weight_files

    directory, like = Path(directory), Path(like)
    fmt = stored_format(like)
    if fmt is None:
        raise ValueError(f"{like}: not a block-FP8 or MXFP4 checkpoint (no quantization_config naming one)")
    raw = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    if MERGE_SECTION not in raw:
        raise ValueError(f"{directory}: not an mcsmoe-fast checkpoint (no {MERGE_SECTION} section in config.json)")
    source = LikeSource(QuantizedFiles(open_weight_files(like), fmt))
    files = open_weight_files(directory)
    errors = {}
    with atomic_directory(directory) as tmp:
        writer = ShardWriter(tmp, WEIGHTS_NAME, None, WEIGHTS_METADATA)
        for name in files.shapes:
            tensor = files.get(name)
            parts, fresh = source.parts(name, tensor)
            if fresh:
                errors[name] = relative_error(dequantize_parts(parts, fmt, tensor.shape), tensor)
            for n, part in parts.items():
                writer.add(n, part)
        files.release()
        (name, info), = writer.finish().files.items()
        section = raw[MERGE_SECTION]
        section.pop("shards", None)
        section.update(format_version=FORMAT_VERSION, weights=name, weights_bytes=info["bytes"],
                       weights_sha256=info["sha256"])
        raw["quantization_config"] = dict(fmt.config)
        raw.pop(ERROR_KEY, None)
        report = summarize(fmt.method, None, errors)
        if report is not None:
            raw[ERROR_KEY] = report
        (tmp / "config.json").write_text(json.dumps(raw, indent=2) + "\n")
        weights = set(files.shapes and [files.file_of(n) for n in files.shapes]) | {WEIGHTS_NAME, f"{WEIGHTS_NAME}.index.json"}
        for path in directory.iterdir():  # tokenizer, generation config ...
            if path.is_file() and path.name not in weights and path.name != "config.json":
                shutil.copy(path, tmp / path.name)
    return report
