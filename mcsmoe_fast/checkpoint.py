"""Checkpoints of merged models that are really smaller: safetensors holding each unique tensor once
(G merged experts per layer, not E copies) plus JSON; never pickle.

A merged checkpoint directory holds:

    config.json              the transformers config, with an "mcsmoe_merge" section: per merged layer
                             its expert_map, slot count, activation and dropped experts, the merge
                             method and a statistics summary, plus the weights file's size and sha256
    mcsmoe_model.safetensors every unique tensor once (tied weights are stored once, listed as aliases)

or, for a model larger than a shard (save_pretrained(..., max_shard_size=...), and the streaming
pipeline of streaming/), the same tensors split over mcsmoe_model-00001-of-0000N.safetensors ...
plus mcsmoe_model.safetensors.index.json (weight_map {tensor: shard}); the section then has format
version 2 and a "shards" entry {file: {bytes, sha256}}, and "weights" names the index (its size and
sha256 are recorded like a single file's). Loading copies one tensor at a time and closes each shard
once its tensors are in, and `verify` checks every shard's sha256.

The weights file deliberately is not named model.safetensors: plain transformers cannot run a merged
model, so its from_pretrained fails loudly instead of loading random experts. `export_dense=True`
writes a plain transformers checkpoint instead (every expert materialised), which vanilla
`from_pretrained` loads.

Saves are atomic: everything is written into a temporary directory next to the target, which is then
renamed into place; an interrupted save leaves the previous checkpoint as it was.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from .compressed import BANK_FIELDS, CompressedMoEExperts
from .drop import install_logit_mask, logit_mask
from .models import expert_weights_per_expert, moe_layers
from .modules import MoEExperts, slot_names
from .plain_save import guard_plain_save
from .sections import MERGE_SECTION
from .weight_files import (
    CheckpointError, ShardWriter, WeightFiles, WrittenWeights, parse_size, read_index, sha256_file,
)

FORMAT_VERSION = 1  # one weights file
SHARDED_FORMAT_VERSION = 2  # shards plus an index (readers of version 1 refuse it with a clear message)
WEIGHTS_NAME = "mcsmoe_model.safetensors"
WEIGHTS_METADATA = {"format": "pt", "producer": "mcsmoe-fast"}

__all__ = ["CheckpointError", "WEIGHTS_NAME", "save_pretrained", "from_pretrained", "to_dense", "layer_entry",
           "atomic_directory", "write_merged_config", "ShardWriter"]


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
        if isinstance(experts, CompressedMoEExperts) and experts.pruning:
            raise ValueError(f"layer {layer.name!r} is still being pruned (masked rows are stored): call "
                             "CompressionPruner.finalize() (or finalize() on its experts) before saving")
        entries[layer.name] = layer_entry(layer.num_experts, layer.activation, experts if slots else None,
                                          keep, dropless=bool(getattr(layer.module, "dropless", False)))
    return entries


def layer_entry(num_experts: int, activation: str, experts=None, keep: torch.Tensor | None = None,
                dropless: bool = False) -> dict:
    """The config.json entry of one merged layer: its expert slots (MoEExperts or a finalized
    CompressedMoEExperts; None when only router logits are masked) and its keep mask (None: none dropped)."""
    entry = {"num_experts": num_experts, "activation": activation}
    if experts is not None:
        entry.update(num_slots=experts.num_slots, expert_map=experts.expert_map.tolist(), dropless=dropless)
    if isinstance(experts, CompressedMoEExperts):
        entry["compressed"] = {"rank_in": experts.in_U.shape[2], "rank_out": experts.out_U.shape[2],
                               "kept_rows_in": experts.in_S_rows.shape[0],
                               "kept_rows_out": experts.out_S_rows.shape[0]}
    if keep is not None:
        entry["dropped"] = (~keep).nonzero().flatten().tolist()
    return entry


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


def _model_dtype(model: nn.Module) -> str:
    for p in model.parameters():
        if p.is_floating_point():
            return str(p.dtype).removeprefix("torch.")
    return "float32"


def _write_merged(model: nn.Module, tmp: Path, max_shard_size: int | None = None) -> None:
    layers = _merged_layers(model)  # refuses a model still being pruned before anything is written
    with slot_names():  # each merged slot once (a SwitchMoE's plain state dict names every expert)
        tensors, aliases = _unique_tensors(model.state_dict())
    writer = ShardWriter(tmp, WEIGHTS_NAME, max_shard_size, WEIGHTS_METADATA)
    for name, tensor in tensors.items():
        writer.add(name, tensor)
    config = model.config.__class__.from_dict(model.config.to_dict())
    write_merged_config(config, tmp, writer.finish(), aliases, layers, _model_dtype(model))


def write_merged_config(config, directory: Path, written: WrittenWeights, aliases: dict[str, str],
                        layers: dict[str, dict], dtype: str) -> None:
    """Save `config` (its mcsmoe_merge section completed with the weights files, aliases and merged layer
    entries) as config.json in `directory`, next to the weights `written` by a ShardWriter."""
    section = dict(getattr(config, MERGE_SECTION, None) or {})
    section.pop("shards", None)
    if written.sharded:
        index = Path(directory) / written.index
        section.update(format_version=SHARDED_FORMAT_VERSION, weights=written.index, shards=written.files,
                       weights_bytes=index.stat().st_size, weights_sha256=sha256_file(index))
    else:
        (name, info), = written.files.items()
        section.update(format_version=FORMAT_VERSION, weights=name, weights_bytes=info["bytes"],
                       weights_sha256=info["sha256"])
    section.update(dtype=dtype, aliases=aliases, layers=layers)
    setattr(config, MERGE_SECTION, section)
    config.save_pretrained(str(directory))


def _write_dense(model: nn.Module, tmp: Path, max_shard_size: int | None = None) -> None:
    dense = to_dense(model)
    dense.save_pretrained(str(tmp), **({} if max_shard_size is None else {"max_shard_size": max_shard_size}))


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


OWNER_FILE = ".mcsmoe-owner"  # the pid that writes a temporary directory


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _remove_dead_owners(directories) -> list[Path]:
    """Remove those of `directories` whose owner (OWNER_FILE) died; those without one, or whose owner
    still runs, are left alone."""
    removed = []
    for tmp in directories:
        try:
            pid = int((tmp / OWNER_FILE).read_text())
        except (OSError, ValueError):
            continue  # not ours, or being created right now
        if pid != os.getpid() and not _pid_alive(pid):
            shutil.rmtree(tmp, ignore_errors=True)
            removed.append(tmp)
    return removed


def remove_stale_temporaries(target: Path) -> list[Path]:
    """Remove the temporary directories of earlier saves to `target` whose writer died (SIGKILL, power
    loss: nothing ran to clean them up); a directory whose writer still runs is left alone."""
    return _remove_dead_owners(target.parent.glob(f".{target.name}.tmp-*"))


@contextmanager
def scratch_directory(parent, prefix: str) -> Iterator[Path]:
    """A fresh directory `parent/<prefix><random>` owned by this process for the block, removed when it
    ends (also on error); the ones a killed earlier run left in `parent` are removed first (offloaded
    weights and activations can be tens of GB)."""
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    _remove_dead_owners(parent.glob(f"{prefix}*"))
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    try:
        (tmp / OWNER_FILE).write_text(str(os.getpid()))
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def atomic_directory(target) -> Iterator[Path]:
    """Yield a fresh temporary directory next to `target`; when the block ends normally it replaces
    `target` (a previous checkpoint there, or nothing), when it raises it is removed and `target` is left
    as it was. Temporary directories left by a killed earlier run are removed first."""
    target = Path(target).absolute()
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(target)
    tmp = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        (tmp / OWNER_FILE).write_text(str(os.getpid()))
        yield tmp
        (tmp / OWNER_FILE).unlink()
        _replace_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_pretrained(model: nn.Module, save_directory, export_dense: bool = False, tokenizer=None,
                    extra: Callable[[Path], None] | None = None, max_shard_size=None) -> Path:
    """Save `model` (merged or not) to `save_directory`; returns its path.

    Default: the merged format above (unique weights only). export_dense=True: a plain transformers
    checkpoint with every expert materialised (not possible for models with dropped experts: plain
    transformers cannot mask router logits). `tokenizer`, when given, is saved alongside. `extra(dir)`
    writes more files into the checkpoint before it is moved into place (the trainer's state).
    max_shard_size: None (one weights file) or bytes (an int or "500MB", "2GiB"...) per shard of the
    merged format (the dense export uses transformers' own sharding, at this size when given).
    """
    shard = parse_size(max_shard_size, "max_shard_size")
    target = Path(save_directory).absolute()
    with atomic_directory(target) as tmp:
        if export_dense:
            _write_dense(model, tmp, shard)
        else:
            _write_merged(model, tmp, shard)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        if extra is not None:
            extra(tmp)
    return target


# --- dense export ----------------------------------------------------------------------------------
@torch.no_grad()
def to_dense(model: nn.Module) -> nn.Module:
    """A plain transformers model computing what `model` computes, each expert given its group's weights."""
    from transformers.initialization import no_init_weights

    from .models.hub import model_class_for

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
            w_in, w_out, b_in, b_out = expert_weights_per_expert(ours_layers[layer.name], biases=True)
            if b_in is None and b_out is None:
                layer.set_expert_weights(w_in, w_out)
            else:
                layer.set_expert_weights(w_in, w_out, b_in=b_in, b_out=b_out)
    dense.tie_weights()
    return dense.eval()


# --- loading ---------------------------------------------------------------------------------------
def read_section(path: Path) -> dict | None:
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
    version = section.get("format_version") if isinstance(section, dict) else None
    if version not in (FORMAT_VERSION, SHARDED_FORMAT_VERSION):
        raise CheckpointError(f"{config_file}: unsupported {MERGE_SECTION} section (format_version {version!r}, "
                              f"expected {FORMAT_VERSION} or {SHARDED_FORMAT_VERSION})")
    required = ("weights", "weights_bytes", "layers", "aliases") + (("shards",) if version == SHARDED_FORMAT_VERSION else ())
    for key in required:
        if key not in section:
            raise CheckpointError(f"{config_file}: {MERGE_SECTION} section lacks {key!r}")
    return section


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
            b_in, b_out = (weights.shapes.get(f"{name}.experts.{k}") for k in ("b_in", "b_out"))
            try:  # uninitialised slots of the saved shapes; the weights are copied in afterwards
                experts = MoEExperts(torch.empty(w_in, dtype=dtype), torch.empty(w_out, dtype=dtype), saved_map,
                                     layer.activation, None if b_in is None else torch.empty(b_in, dtype=dtype),
                                     None if b_out is None else torch.empty(b_out, dtype=dtype), layer.activation_args)
            except (ValueError, RuntimeError) as exc:
                raise CheckpointError(f"{path}: layer {name!r}: {exc}") from exc
            layer.install_experts(experts)
            if entry.get("dropless"):
                layer.module.dropless = True
        if entry.get("dropped"):
            keep = torch.ones(layer.num_experts, dtype=torch.bool)
            keep[entry["dropped"]] = False
            install_logit_mask(layer, keep)


def _install_compressed(layer, entry: dict, weights: WeightFiles, path: Path, dtype: torch.dtype) -> None:
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
    b_in, b_out = (weights.shapes.get(f"{name}.experts.{k}") for k in ("b_in", "b_out"))
    try:
        experts = CompressedMoEExperts(banks[0], banks[1], saved_map, layer.activation,
                                       None if b_in is None else torch.empty(b_in, dtype=dtype),
                                       None if b_out is None else torch.empty(b_out, dtype=dtype), layer.activation_args)
    except (ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: layer {name!r}: {exc}") from exc
    layer.install_experts(experts)
    if entry.get("dropless"):
        layer.module.dropless = True


def from_pretrained(path, verify: bool = True, dtype: torch.dtype | None = None) -> nn.Module:
    """Load a checkpoint written by save_pretrained (merged format) in eval mode, with exactly the saved
    weights. A directory without an mcsmoe_merge section is loaded as a plain transformers checkpoint.

    verify: check the weights file's (every shard's) sha256 against config.json (reads the files once more).
    The model is built from its config without initialising weights; merged layers get MoEExperts of
    the saved slot count; then the names and shapes must match the file exactly (strict), and the
    tensors are copied in one at a time (peak memory: the merged model plus one tensor).
    """
    from transformers import AutoConfig
    from transformers.initialization import no_init_weights

    from .models.hub import load_model, model_class_for

    path = Path(path)
    section = read_section(path)
    if section is None:
        try:
            return load_model(str(path), dtype=dtype)
        except Exception as exc:  # safetensors, OSError, ValueError...: a plain checkpoint that does not load
            raise CheckpointError(f"{path}: the transformers checkpoint does not load "
                                  f"({type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''})") from exc
    weights = open_weights(path, section, verify)
    try:
        config = AutoConfig.from_pretrained(str(path))
    except (ValueError, OSError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{path}: config.json does not describe a transformers model ({exc})") from exc
    saved_dtype = getattr(torch, section.get("dtype", "float32"))
    with no_init_weights():  # parameters stay uninitialised (and their pages untouched) until copied into
        model = model_class_for(config).from_config(config, dtype=saved_dtype)
    _install_layers(model, section, weights, path, saved_dtype)
    with slot_names():  # the tensors in the file's names, aliasing the model's parameters
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
    weights.copy_into(expected)  # one tensor at a time, one file open at a time: no second copy of the model
    weights.release()
    model.tie_weights()
    if dtype is not None:
        model = model.to(dtype)
    return guard_plain_save(model.eval()) if section["layers"] else model.eval()
