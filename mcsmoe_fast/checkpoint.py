"""Checkpoints of merged models that are really smaller: safetensors holding each unique tensor once
(G merged experts per layer, not E copies) plus JSON; never pickle.

A merged checkpoint directory holds:

    config.json              the transformers config, with an "mcsmoe_merge" section: per merged layer
                             its expert_map, slot count, activation and dropped experts, the merge
                             method and a statistics summary, plus the weights file's size and sha256
    mcsmoe_model.safetensors every unique tensor once (tied weights are stored once, listed as aliases)

The weights file deliberately is not named model.safetensors: plain transformers cannot run a merged
model, so its from_pretrained fails loudly instead of loading random experts. `export_dense=True`
writes a plain transformers checkpoint instead (every expert materialised), which vanilla
`from_pretrained` loads.

Saves are atomic: everything is written into a temporary directory next to the target, which is then
renamed into place; an interrupted save leaves the previous checkpoint as it was.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from .drop import install_logit_mask, logit_mask
from .merge import MERGE_SECTION, expert_weights_per_expert
from .models import moe_layers
from .compressed import BANK_FIELDS, CompressedMoEExperts
from .modules import MoEExperts
from .plain_save import guard_plain_save

FORMAT_VERSION = 1
WEIGHTS_NAME = "mcsmoe_model.safetensors"


class CheckpointError(ValueError):
    """A checkpoint directory that is missing, corrupt, truncated or does not match its config."""


# --- saving ---------------------------------------------------------------------------------------
def _merged_layers(model: nn.Module) -> dict:
    """{name: layer entry} for every MoE layer stored as slots (MoEExperts, CompressedMoEExperts) or with
    masked experts."""
    entries = {}
    for layer in moe_layers(model):
        experts = getattr(layer.module, "experts", None)
        keep = logit_mask(layer)
        slots = isinstance(experts, (MoEExperts, CompressedMoEExperts))
        if not slots and keep is None:
            continue
        entry = {"num_experts": layer.num_experts, "activation": layer.activation}
        if slots:
            entry.update(num_slots=experts.num_slots, expert_map=experts.expert_map.tolist(),
                         dropless=bool(getattr(layer.module, "dropless", False)))
        if isinstance(experts, CompressedMoEExperts):
            if experts.pruning:
                raise ValueError(f"layer {layer.name!r} is still being pruned (masked rows are stored): call "
                                 "CompressionPruner.finalize() (or finalize() on its experts) before saving")
            entry["compressed"] = {"rank_in": experts.in_U.shape[2], "rank_out": experts.out_U.shape[2],
                                   "kept_rows_in": experts.in_S_rows.shape[0],
                                   "kept_rows_out": experts.out_S_rows.shape[0]}
        if keep is not None:
            entry["dropped"] = (~keep).nonzero().flatten().tolist()
        entries[layer.name] = entry
    return entries


def _unique_tensors(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Each distinct tensor once; aliases {duplicate name: stored name} for tied weights."""
    kept, aliases, seen, storages = {}, {}, {}, {}
    for name, t in state.items():
        key = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
        if key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        storages.setdefault((t.device, t.untyped_storage().data_ptr()), []).append(name)
        kept[name] = t
    for names in storages.values():  # distinct views of one storage: safetensors needs separate copies
        if len(names) > 1:
            for n in names:
                kept[n] = kept[n].clone()
    return {n: t.contiguous() for n, t in kept.items()}, aliases


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def _model_dtype(model: nn.Module) -> str:
    for p in model.parameters():
        if p.is_floating_point():
            return str(p.dtype).removeprefix("torch.")
    return "float32"


def _write_merged(model: nn.Module, tmp: Path) -> None:
    from safetensors.torch import save_file

    tensors, aliases = _unique_tensors(model.state_dict())
    save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt", "producer": "mcsmoe-fast"})
    weights = tmp / WEIGHTS_NAME
    section = dict(getattr(model.config, MERGE_SECTION, None) or {})
    section.update(
        format_version=FORMAT_VERSION, weights=WEIGHTS_NAME, weights_bytes=weights.stat().st_size,
        weights_sha256=_sha256(weights), dtype=_model_dtype(model), aliases=aliases,
        layers=_merged_layers(model),
    )
    config = model.config.__class__.from_dict(model.config.to_dict())
    setattr(config, MERGE_SECTION, section)
    config.save_pretrained(str(tmp))


def _write_dense(model: nn.Module, tmp: Path) -> None:
    dense = to_dense(model)
    dense.save_pretrained(str(tmp))


def _replace_dir(tmp: Path, target: Path) -> None:
    """Move the finished temporary directory to `target`, replacing a previous checkpoint there."""
    if target.exists():
        if not target.is_dir():
            raise FileExistsError(f"{target} exists and is not a directory")
        if any(target.iterdir()) and not (target / "config.json").exists():
            raise FileExistsError(f"{target} is a non-empty directory that is not a checkpoint; refusing to replace it")
        old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
        os.rename(target, old)
        os.rename(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, target)


def save_pretrained(model: nn.Module, save_directory, export_dense: bool = False, tokenizer=None,
                    extra: Callable[[Path], None] | None = None) -> Path:
    """Save `model` (merged or not) to `save_directory`; returns its path.

    Default: the merged format above (unique weights only). export_dense=True: a plain transformers
    checkpoint with every expert materialised (not possible for models with dropped experts: plain
    transformers cannot mask router logits). `tokenizer`, when given, is saved alongside. `extra(dir)`
    writes more files into the checkpoint before it is moved into place (the trainer's state).
    """
    target = Path(save_directory).absolute()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        (_write_dense if export_dense else _write_merged)(model, tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        if extra is not None:
            extra(tmp)
        _replace_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


# --- dense export ----------------------------------------------------------------------------------
@torch.no_grad()
def to_dense(model: nn.Module) -> nn.Module:
    """A plain transformers model computing what `model` computes, each expert given its group's weights."""
    from transformers.initialization import no_init_weights

    from .models.loading import model_class_for

    merged = _merged_layers(model)
    dropped = [n for n, e in merged.items() if e.get("dropped")]
    if dropped:
        raise ValueError(f"export_dense: layers {dropped} have dropped experts (strategy='drop'); a plain "
                         "transformers checkpoint cannot mask router logits, save the merged format instead")
    config = model.config.__class__.from_dict(model.config.to_dict())
    if hasattr(config, MERGE_SECTION):
        delattr(config, MERGE_SECTION)
    with no_init_weights():
        dense = model_class_for(config).from_config(config, dtype=getattr(torch, _model_dtype(model)))
    ours, theirs = model.state_dict(), dense.state_dict()
    dense.load_state_dict({k: v for k, v in ours.items() if k in theirs}, strict=False)  # all but merged experts
    prefixes = tuple(f"{name}." for name in merged)
    missing = sorted(k for k in set(theirs) - set(ours) if not k.startswith(prefixes))
    if missing:
        raise ValueError(f"export_dense: the model has no weights for {missing[:5]}")
    ours_layers = {layer.name: layer for layer in moe_layers(model)}
    for layer in moe_layers(dense):
        if layer.name in merged:
            layer.set_expert_weights(*expert_weights_per_expert(ours_layers[layer.name]))
    dense.tie_weights()
    return dense.eval()


# --- loading ---------------------------------------------------------------------------------------
def _read_section(path: Path) -> dict | None:
    config_file = path / "config.json"
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint directory")
    if not config_file.is_file():
        raise CheckpointError(f"{path}: no config.json; not a checkpoint directory")
    try:
        raw = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{config_file}: corrupt JSON ({exc})") from exc
    section = raw.get(MERGE_SECTION) if isinstance(raw, dict) else None
    if section is None:
        return None
    if not isinstance(section, dict) or section.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{config_file}: unsupported {MERGE_SECTION} section "
                              f"(format_version {section.get('format_version') if isinstance(section, dict) else None!r}, "
                              f"expected {FORMAT_VERSION})")
    for key in ("weights", "weights_bytes", "layers", "aliases"):
        if key not in section:
            raise CheckpointError(f"{config_file}: {MERGE_SECTION} section lacks {key!r}")
    return section


def _check_weights_file(path: Path, section: dict, verify: bool) -> Path:
    weights = path / section["weights"]
    if not weights.is_file():
        raise CheckpointError(f"{path}: weights file {section['weights']} is missing")
    size = weights.stat().st_size
    if size != section["weights_bytes"]:
        raise CheckpointError(f"{weights}: {size} bytes, the config says {section['weights_bytes']} "
                              "(truncated or replaced weights file)")
    if verify and section.get("weights_sha256") and _sha256(weights) != section["weights_sha256"]:
        raise CheckpointError(f"{weights}: sha256 does not match the config (corrupt weights file)")
    return weights


class _WeightsFile:
    """The safetensors file read lazily: shapes from its header, one tensor at a time on request, so
    loading never holds a second copy of the model in memory."""

    def __init__(self, weights: Path, aliases: dict[str, str]):
        from safetensors import SafetensorError, safe_open

        self.path = weights
        try:
            self.handle = safe_open(str(weights), framework="pt")
            stored = {k: tuple(self.handle.get_slice(k).get_shape()) for k in self.handle.keys()}
        except (SafetensorError, OSError, RuntimeError, ValueError) as exc:
            raise CheckpointError(f"{weights}: unreadable safetensors file ({exc})") from exc
        for alias, name in aliases.items():
            if name not in stored:
                raise CheckpointError(f"{weights}: tied weight {alias!r} refers to {name!r}, which the file lacks")
        self.names = {k: k for k in stored} | dict(aliases)  # name in the model -> name in the file
        self.shapes = {k: stored[v] for k, v in self.names.items()}

    def get(self, name: str) -> torch.Tensor:
        from safetensors import SafetensorError

        try:
            return self.handle.get_tensor(self.names[name])
        except (SafetensorError, OSError, RuntimeError, ValueError) as exc:
            raise CheckpointError(f"{self.path}: unreadable tensor {name!r} ({exc})") from exc


def _install_layers(model: nn.Module, section: dict, weights: _WeightsFile, path: Path, dtype: torch.dtype) -> None:
    layers = {layer.name: layer for layer in moe_layers(model)}
    for name, entry in section["layers"].items():
        layer = layers.get(name)
        if layer is None:
            raise CheckpointError(f"{path}: merged layer {name!r} is not an MoE layer of the model its config builds")
        if entry.get("num_experts") != layer.num_experts or entry.get("activation") != layer.activation:
            raise CheckpointError(f"{path}: layer {name!r} is recorded with {entry.get('num_experts')} "
                                  f"{entry.get('activation')} experts, the config builds {layer.num_experts} {layer.activation}")
        if "compressed" in entry:
            _install_compressed(layer, entry, weights, path, dtype)
        elif "expert_map" in entry:
            w_in, w_out = (weights.shapes.get(f"{name}.experts.{k}") for k in ("w_in", "w_out"))
            if w_in is None or w_out is None or f"{name}.experts.expert_map" not in weights.shapes:
                raise CheckpointError(f"{path}: no merged expert weights for layer {name!r} in {section['weights']}")
            saved_map = weights.get(f"{name}.experts.expert_map")
            if saved_map.tolist() != entry["expert_map"]:
                raise CheckpointError(f"{path}: expert_map of layer {name!r} differs between config.json and weights")
            if w_in[0] != entry["num_slots"]:
                raise CheckpointError(f"{path}: layer {name!r} has {w_in[0]} slots, config.json says {entry['num_slots']}")
            try:  # uninitialised slots of the saved shapes; the weights are copied in afterwards
                experts = MoEExperts(torch.empty(w_in, dtype=dtype), torch.empty(w_out, dtype=dtype), saved_map,
                                     layer.activation)
            except (ValueError, RuntimeError) as exc:
                raise CheckpointError(f"{path}: layer {name!r}: {exc}") from exc
            layer.install_experts(experts)
            if entry.get("dropless"):
                layer.module.dropless = True
        if entry.get("dropped"):
            keep = torch.ones(layer.num_experts, dtype=torch.bool)
            keep[entry["dropped"]] = False
            install_logit_mask(layer, keep)


def _install_compressed(layer, entry: dict, weights: _WeightsFile, path: Path, dtype: torch.dtype) -> None:
    """Empty compressed slots of the saved shapes (the weights are copied in afterwards)."""
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
    saved_map = weights.get(f"{name}.experts.expert_map")
    if saved_map.tolist() != entry["expert_map"]:
        raise CheckpointError(f"{path}: expert_map of layer {name!r} differs between config.json and weights")
    try:
        experts = CompressedMoEExperts(banks[0], banks[1], saved_map, layer.activation)
    except (ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: layer {name!r}: {exc}") from exc
    layer.install_experts(experts)
    if entry.get("dropless"):
        layer.module.dropless = True


def from_pretrained(path, verify: bool = True, dtype: torch.dtype | None = None) -> nn.Module:
    """Load a checkpoint written by save_pretrained (merged format) in eval mode, with exactly the saved
    weights. A directory without an mcsmoe_merge section is loaded as a plain transformers checkpoint.

    verify: check the weights file's sha256 against config.json (reads the file once more).
    The model is built from its config without initialising weights; merged layers get MoEExperts of
    the saved slot count; then the names and shapes must match the file exactly (strict), and the
    tensors are copied in one at a time (peak memory: the merged model plus one tensor).
    """
    from transformers import AutoConfig
    from transformers.initialization import no_init_weights

    from .models.loading import load_model, model_class_for

    path = Path(path)
    section = _read_section(path)
    if section is None:
        try:
            return load_model(str(path), dtype=dtype)
        except Exception as exc:  # safetensors, OSError, ValueError...: a plain checkpoint that does not load
            raise CheckpointError(f"{path}: the transformers checkpoint does not load "
                                  f"({type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''})") from exc
    weights = _WeightsFile(_check_weights_file(path, section, verify), section["aliases"])
    try:
        config = AutoConfig.from_pretrained(str(path))
    except (ValueError, OSError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{path}: config.json does not describe a transformers model ({exc})") from exc
    saved_dtype = getattr(torch, section.get("dtype", "float32"))
    with no_init_weights():  # parameters stay uninitialised (and their pages untouched) until copied into
        model = model_class_for(config).from_config(config, dtype=saved_dtype)
    _install_layers(model, section, weights, path, saved_dtype)
    expected = model.state_dict()
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
    with torch.no_grad():
        for name, target in expected.items():  # one tensor at a time: no second copy of the model
            target.copy_(weights.get(name))
    model.tie_weights()
    if dtype is not None:
        model = model.to(dtype)
    return guard_plain_save(model.eval()) if section["layers"] else model.eval()
