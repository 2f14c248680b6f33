"""from_pretrained: a merged checkpoint back into the model it was saved from, every file checked against
config.json (sizes always, sha256 on request); tensors copied one at a time."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from ..drop import install_logit_mask
from ..models import moe_layers
from ..modules import BANK_FIELDS, CompressedMoEExperts, MoEExperts, slot_names
from ..quant import detect
from ..quant.report import drop_quantization
from ..quant.files import QuantizedFiles
from ..sections import MERGE_SECTION
from .format import FORMAT_VERSION, SHARDED_FORMAT_VERSION, WEIGHTS_NAME
from .plain_save import guard_plain_save
from .weight_files import SCALED, CheckpointError, WeightFiles, read_index, sha256_file


def read_config_json(path: Path):
    """The parsed config.json of the checkpoint directory `path` (a CheckpointError naming what is wrong)."""
    config_file = path / "config.json"
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint directory")
    if not config_file.is_file():
        raise CheckpointError(f"{path}: no config.json; not a checkpoint directory")
    try:
        return json.loads(config_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{config_file}: corrupt JSON ({exc})") from exc


def read_section(path: Path) -> dict | None:
    config_file = path / "config.json"
    raw = read_config_json(path)
    section = raw.get(MERGE_SECTION) if isinstance(raw, dict) else None
    if section is None:
        return None
    version = section.get("format_version") if isinstance(section, dict) else None
    if version not in (FORMAT_VERSION, SHARDED_FORMAT_VERSION):
        raise CheckpointError(f"{config_file}: unsupported {MERGE_SECTION} section (format_version {version!r}, "
                              f"expected {FORMAT_VERSION} or {SHARDED_FORMAT_VERSION})")
    required = ("weights", "weights_bytes", "layers", "aliases") + (("shards",) if version == SHARDED_FORMAT_VERSION else ())
    for key in required:
        if key not in section:
            raise CheckpointError(f"{config_file}: {MERGE_SECTION} section lacks {key!r}")
    check_section(section, config_file)
    return section


def _is_name_map(value) -> bool:
    return isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in value.items())


def check_section(section: dict, config_file: Path) -> None:
    """The types of the section's entries and its file names (names inside the checkpoint directory, never
    paths): a CheckpointError naming config.json and the key."""
    def refuse(what: str):
        raise CheckpointError(f"{config_file}: {MERGE_SECTION} {what}")

    dtype = section.get("dtype", "float32")
    if not (isinstance(dtype, str) and isinstance(getattr(torch, dtype, None), torch.dtype)
            and getattr(torch, dtype).is_floating_point):
        refuse(f"dtype {dtype!r} is not a floating-point torch dtype (float32, bfloat16, float16, ...)")
    if not isinstance(section["layers"], dict) or not all(isinstance(e, dict) for e in section["layers"].values()):
        refuse(f"layers must be a mapping {{layer name: entry}}, got {type(section['layers']).__name__}")
    if not _is_name_map(section["aliases"]):
        refuse("aliases must be a mapping {tied name: stored name}")
    if "shards" in section and not isinstance(section["shards"], dict):
        refuse("shards must be a mapping {file name: {bytes, sha256}}")
    for key, name in [("weights", section["weights"]), *(("shards", f) for f in section.get("shards", {}))]:
        if not isinstance(name, str) or Path(name).name != name:
            refuse(f"{key} {name!r} must be a file name inside the checkpoint directory, not a path")


def _check_file(path: Path, file: str, size: int, sha256: str | None, verify: bool, what: str) -> Path:
    """The file exists, has the recorded size and (verify) the recorded sha256."""
    weights = path / file
    if not weights.is_file():
        raise CheckpointError(f"{path}: {what} {file} is missing")
    actual = weights.stat().st_size
    if actual != size:
        raise CheckpointError(f"{weights}: {actual} bytes, the config says {size} (truncated or replaced {what})")
    if verify and sha256 and sha256_file(weights) != sha256:
        raise CheckpointError(f"{weights}: sha256 does not match the config (corrupt {what})")
    return weights


def open_weights(path: Path, section: dict, verify: bool) -> WeightFiles:
    """The checkpoint's weights, every file checked against config.json (size always, sha256 if verify)."""
    first = _check_file(path, section["weights"], section["weights_bytes"], section.get("weights_sha256"), verify,
                        "index file" if "shards" in section else "weights file")
    if "shards" not in section:
        return WeightFiles(path, single=first.name, aliases=section["aliases"])
    shards = section["shards"]
    weight_map = read_index(first)
    unlisted = sorted(set(weight_map.values()) - set(shards))
    if unlisted:
        raise CheckpointError(f"{first}: the index names shards that config.json does not list: {unlisted[:5]}")
    for file, info in shards.items():
        _check_file(path, file, info.get("bytes"), info.get("sha256"), verify, "weights shard")
    return WeightFiles(path, weight_map=weight_map, aliases=section["aliases"])


def _install_layers(model: nn.Module, section: dict, weights: WeightFiles, path: Path, dtype: torch.dtype) -> None:
    layers = {layer.name: layer for layer in moe_layers(model)}
    for name, entry in section["layers"].items():
        layer = layers.get(name)
        if layer is None:
            raise CheckpointError(f"{path}: merged layer {name!r} is not an MoE layer of the model its config builds")
        install_saved_layer(layer, entry, weights, path, dtype, section["weights"])


def install_saved_layer(layer, entry: dict, weights, path: Path, dtype: torch.dtype, file: str = WEIGHTS_NAME) -> None:
    """Give the MoE layer view `layer` the slots its config.json `entry` records (merged or compressed, empty, of
    the saved shapes in `weights`; the values are copied in afterwards) and its logit mask (the drop baseline)."""
    if entry.get("num_experts") != layer.num_experts or entry.get("activation") != layer.activation:
        raise CheckpointError(f"{path}: layer {layer.name!r} is recorded with {entry.get('num_experts')} "
                              f"{entry.get('activation')} experts, the config builds {layer.num_experts} {layer.activation}")
    if "compressed" in entry:
        _install_compressed(layer, entry, weights, path, dtype)
    elif "expert_map" in entry:
        _install_dense(layer, entry, weights, path, dtype, file)
    dropped = entry.get("dropped") or []
    wrong = ([e for e in dropped if not isinstance(e, int) or not 0 <= e < layer.num_experts]
             if isinstance(dropped, list) else [dropped])
    if wrong:
        raise CheckpointError(f"{path / 'config.json'}: layer {layer.name!r}: dropped expert {wrong[0]!r} out of "
                              f"range for {layer.num_experts} experts")
    if dropped:
        keep = torch.ones(layer.num_experts, dtype=torch.bool)
        keep[dropped] = False
        install_logit_mask(layer, keep)


def _saved_map(name: str, entry: dict, weights: WeightFiles, path: Path) -> torch.Tensor:
    saved_map = weights.get(f"{name}.experts.expert_map")
    if saved_map.tolist() != entry["expert_map"]:
        raise CheckpointError(f"{path}: expert_map of layer {name!r} differs between config.json and weights")
    return saved_map


def _empty_biases(name: str, weights: WeightFiles, dtype: torch.dtype) -> list[torch.Tensor | None]:
    shapes = (weights.shapes.get(f"{name}.experts.{k}") for k in ("b_in", "b_out"))
    return [None if shape is None else torch.empty(shape, dtype=dtype) for shape in shapes]


def _install(layer, entry: dict, path: Path, build) -> None:
    """Install the slots build() makes (empty, of the saved shapes: the weights are copied in afterwards)."""
    try:
        experts = build()
    except (ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: layer {layer.name!r}: {exc}") from exc
    layer.install_experts(experts)
    if entry.get("dropless"):
        layer.module.dropless = True


def _install_dense(layer, entry: dict, weights: WeightFiles, path: Path, dtype: torch.dtype, file: str) -> None:
    name = layer.name
    w_in, w_out = (weights.shapes.get(f"{name}.experts.{k}") for k in ("w_in", "w_out"))
    if w_in is None or w_out is None or f"{name}.experts.expert_map" not in weights.shapes:
        raise CheckpointError(f"{path}: no merged expert weights for layer {name!r} in {file}")
    saved_map = _saved_map(name, entry, weights, path)
    if w_in[0] != entry["num_slots"]:
        raise CheckpointError(f"{path}: layer {name!r} has {w_in[0]} slots, config.json says {entry['num_slots']}")
    _install(layer, entry, path, lambda: MoEExperts(
        torch.empty(w_in, dtype=dtype), torch.empty(w_out, dtype=dtype), saved_map, layer.activation,
        *_empty_biases(name, weights, dtype), layer.activation_args))


def _install_compressed(layer, entry: dict, weights: WeightFiles, path: Path, dtype: torch.dtype) -> None:
    name = layer.name
    banks = []
    for side in ("in", "out"):
        shapes = [weights.shapes.get(f"{name}.experts.{side}_{f}") for f in BANK_FIELDS]
        if any(s is None for s in shapes):
            raise CheckpointError(f"{path}: no compressed expert weights ({side}_*) for layer {name!r} in {WEIGHTS_NAME}")
        U, V, S_rows, row_idx, offsets = shapes
        if U[0] != entry["num_slots"]:
            raise CheckpointError(f"{path}: layer {name!r} has {U[0]} slots, config.json says {entry['num_slots']}")
        banks.append([torch.empty(U, dtype=dtype), torch.empty(V, dtype=dtype), torch.empty(S_rows, dtype=dtype),
                      torch.zeros(row_idx, dtype=torch.int64), torch.zeros(offsets, dtype=torch.int64)])
    saved_map = _saved_map(name, entry, weights, path)
    _install(layer, entry, path, lambda: CompressedMoEExperts(
        banks[0], banks[1], saved_map, layer.activation, *_empty_biases(name, weights, dtype), layer.activation_args))


def read_generation_config(model: nn.Module, directory: Path) -> None:
    """The generation settings `directory` holds (generation_config.json: eos ids, sampling defaults) onto `model`,
    in place of those from_config derives from config.json; nothing when it holds none or the model cannot generate."""
    if (directory / "generation_config.json").is_file() and getattr(model, "generation_config", None) is not None:
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(str(directory))


def load_plain(path: Path, dtype) -> nn.Module:
    """A directory without an mcsmoe_merge section: a plain transformers checkpoint (load_model), every
    failure a CheckpointError naming the directory (weights lacking tensors of the model included)."""
    from ..models.hub import Float16Overflow, IncompleteCheckpoint, load_model

    try:
        return load_model(str(path), dtype=dtype)
    except (IncompleteCheckpoint, Float16Overflow) as exc:
        raise CheckpointError(str(exc)) from exc
    except Exception as exc:  # safetensors, OSError, ValueError...: a plain checkpoint that does not load
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise CheckpointError(f"{path}: the transformers checkpoint does not load "
                              f"({type(exc).__name__}: {reason})") from exc


def check_names(expected: dict[str, torch.Tensor], weights, path: Path) -> None:
    """The weights hold exactly the tensors of the model built from config.json, in its shapes."""
    missing = sorted(set(expected) - set(weights.shapes))
    unexpected = sorted(set(weights.shapes) - set(expected))
    wrong = sorted(k for k in set(expected) & set(weights.shapes) if tuple(expected[k].shape) != weights.shapes[k])
    if missing or unexpected or wrong:
        raise CheckpointError(
            f"{path}: weights do not match the model built from config.json: "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}, "
            f"wrong shape {[(k, weights.shapes[k], tuple(expected[k].shape)) for k in wrong[:5]]}"
        )


def check_ties(expected: dict[str, torch.Tensor], files: WeightFiles, path: Path) -> None:
    """Names that are one tensor in the model built from config.json (tied weights) must be one stored tensor
    (an alias) too: copied in one after the other, the last would silently win."""
    groups: dict[tuple, list[str]] = {}
    for name, t in expected.items():
        if t.numel():
            groups.setdefault((t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride()),
                              []).append(name)
    for names in groups.values():
        places = {(files.stored[n].file, files.stored[n].offset) if n in files.stored else n for n in names}
        if len(places) > 1:
            stored_in = sorted({files.stored[n].file for n in names if n in files.stored})
            raise CheckpointError(f"{path}: config.json ties {', '.join(map(repr, names))} (one tensor in the model "
                                  f"it builds), but {', '.join(stored_in)} stores them as different tensors: "
                                  "config.json and the weights come from different saves")


def stored_dtypes_(model: nn.Module, expected: dict[str, torch.Tensor], files: WeightFiles) -> None:
    """Give each floating tensor stored in another floating dtype than the model was built in that dtype (a
    float32 router of a bfloat16 model), so that copying the values in does not round them. Block-scaled
    (FP8) and dequantized tensors keep the working dtype."""
    stored = {(t.data_ptr(), tuple(t.shape)): files.dtypes.get(n) for n, t in expected.items() if t.numel()}
    for t in (*model.parameters(), *model.buffers()):
        dtype = stored.get((t.data_ptr(), tuple(t.shape)))
        if (t.is_floating_point() and dtype is not None and dtype.is_floating_point and dtype not in SCALED
                and dtype != t.dtype):
            t.data = torch.empty_like(t, dtype=dtype)


def from_pretrained(path, verify: bool = True, dtype: torch.dtype | str | None = None) -> nn.Module:
    """Load a checkpoint written by save_pretrained (merged format) in eval mode, with exactly the saved
    weights. A directory without an mcsmoe_merge section is loaded as a plain transformers checkpoint.

    verify: check the weights file's (every shard's) sha256 against config.json (reads the files once more).
    dtype: None (default) loads a merged checkpoint's tensors each in the dtype it was stored in (the
    section's dtype; a float32 router of a bfloat16 model stays float32), and a plain checkpoint in float32;
    "auto" loads either in the dtype it was saved in; a floating-point torch dtype or its name ("bfloat16")
    loads every floating tensor in that dtype, except those transformers keeps in float32 for it.
    The model is built from its config without initialising weights; merged layers get MoEExperts of
    the saved slot count; then the names and shapes must match the file exactly (strict), tied weights must
    be stored once, and the tensors are copied in one at a time, one file open at a time (peak memory: the
    merged model plus one tensor).
    """
    from transformers import AutoConfig
    from transformers.initialization import no_init_weights

    from ..models.hub import cast_as_loaded_, check_float16_range, checked_dtype, model_class_for

    path, dtype = Path(path).expanduser(), checked_dtype(dtype)  # "~" as save_pretrained reads it
    section = read_section(path)
    if section is None:
        return load_plain(path, dtype)
    dtype = None if dtype == "auto" else dtype  # the saved dtypes
    files = weights = open_weights(path, section, verify)
    try:
        config = AutoConfig.from_pretrained(str(path))
    except (ValueError, OSError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{path}: config.json does not describe a transformers model ({exc})") from exc
    quantized = detect(getattr(config, "quantization_config", None))
    if quantized is not None:  # block-FP8 / MXFP4 tensors (a streamed merge of such a source) load dequantized
        weights = QuantizedFiles(files, quantized)
        drop_quantization(config)  # the model in memory is not quantized
    saved_dtype = getattr(torch, section.get("dtype", "float32"))
    if quantized is not None and dtype is not None:
        saved_dtype = dtype  # dequantized straight into the dtype asked for, not rounded to the working dtype first
    with no_init_weights():  # parameters stay uninitialised (and their pages untouched) until copied into
        model = model_class_for(config).from_config(config, dtype=saved_dtype)
    _install_layers(model, section, weights, path, saved_dtype)
    weights.release()  # the files read while installing (expert maps): copy_into opens one at a time
    model.tie_weights()  # what config.json ties is one tensor: check_ties compares that with the weights
    with slot_names():  # the tensors in the file's names, aliasing the model's parameters
        expected = model.state_dict()
    check_names(expected, weights, path)
    check_ties(expected, files, path)
    stored_dtypes_(model, expected, files)
    with slot_names():  # again: tensors given their stored dtype are new
        expected = model.state_dict()
    weights.copy_into(expected)  # one tensor at a time, one file open at a time: no second copy of the model
    if quantized is not None and saved_dtype == torch.float16:  # FP8 / MXFP4 hold no inf: any is the cast's
        for name, t in expected.items():
            check_float16_range(name, t)
    model.tie_weights()
    read_generation_config(model, path)
    if dtype is not None:
        cast_as_loaded_(model, dtype)  # as transformers' from_pretrained in that dtype (some tensors float32)
        model.config.dtype = dtype
    return guard_plain_save(model.eval()) if section["layers"] else model.eval()
