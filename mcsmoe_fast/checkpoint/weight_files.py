"""Safetensors weights in one file or split over several shards plus an index: written shard by shard,
read tensor by tensor.

Both checkpoint/ (merged checkpoints) and streaming/ (plain transformers checkpoints read layer by
layer) go through these two classes:

- `ShardWriter` buffers tensors and writes a shard whenever the next tensor would push the buffer past
  `max_shard_size` (a tensor larger than that gets a shard of its own), so memory holds at most one
  shard. One shard in all (or no size limit) gives the single file `base_name`; several give
  `<stem>-00001-of-0000N.safetensors` ... plus `<base_name>.index.json` ({"metadata", "weight_map"},
  the layout transformers uses). Every file's size and sha256 is recorded as it is written.
- `WeightFiles` checks at once that every file exists and has a complete safetensors header listing
  the tensors the index puts there, then reads one tensor at a time. safetensors maps a file into
  memory and its pages count as resident while the file is open, so each file is opened on demand and
  closed again by `release` (or file by file in `copy_into`, which holds one file open at a time).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path

import torch


class CheckpointError(ValueError):
    """A checkpoint directory that is missing, corrupt, truncated or does not match its config."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(size, name: str = "size") -> int | None:
    """Bytes from an int or a string such as "500MB", "1.5GB", "2GiB" (KB/MB/GB are powers of 10 as in
    transformers' max_shard_size, KiB/MiB/GiB powers of 2); None stays None. A size that is not a whole, finite
    number of bytes (inf, nan, 1.5) is refused by `name`."""
    if size is None:
        return None
    expected = f"{name}: expected a whole number of bytes or a string like '2GB' or '512MiB', got {size!r}"
    if isinstance(size, bool):
        raise ValueError(expected)
    try:
        if isinstance(size, (int, float)):
            value = Decimal(size)
        else:
            text = str(size).strip().upper().replace(" ", "")
            number = text.rstrip("KMGTIB")
            value = Decimal(number) * _UNITS[text[len(number):]]  # exact: "1.1KB" is 1100 bytes
    except (KeyError, ArithmeticError):
        raise ValueError(expected) from None
    if not math.isfinite(value):  # 1e400 too: no float holds it
        raise ValueError(f"{expected} (None for no limit)")
    if value != value.to_integral_value():
        raise ValueError(f"{name}: {size!r} is not a whole number of bytes")
    if value < 1:
        raise ValueError(f"{name} must be at least 1 byte, got {size!r}")
    return int(value)


def index_name(base_name: str) -> str:
    return f"{base_name}.index.json"


# --- writing ---------------------------------------------------------------------------------------
@dataclass
class WrittenWeights:
    """What a ShardWriter wrote: `files` {file name: {"bytes", "sha256"}} and, when sharded, the index."""

    files: dict[str, dict] = field(default_factory=dict)
    weight_map: dict[str, str] = field(default_factory=dict)
    index: str | None = None  # the index file's name; None for a single file

    @property
    def sharded(self) -> bool:
        return self.index is not None


class ShardWriter:
    """Write tensors into `directory` as safetensors shards of at most `max_shard_size` bytes (None: one
    file). Call add() per tensor and finish() once."""

    def __init__(self, directory, base_name: str, max_shard_size: int | None = None, metadata: dict | None = None):
        if max_shard_size is not None and max_shard_size < 1:
            raise ValueError(f"max_shard_size must be >= 1 byte, got {max_shard_size}")
        self.directory, self.base_name, self.max_shard_size = Path(directory), base_name, max_shard_size
        self.metadata = metadata
        self.stem = base_name.removesuffix(".safetensors")
        self.buffer: dict[str, torch.Tensor] = {}
        self.buffered = 0
        self.shards: list[tuple[str, list[str]]] = []  # (temporary file name, tensor names) per written shard
        self.names: set[str] = set()
        self.bytes_written = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self.names:
            raise ValueError(f"tensor {name!r} written twice")
        self.names.add(name)
        size = tensor.numel() * tensor.element_size()
        if self.max_shard_size is not None and self.buffer and self.buffered + size > self.max_shard_size:
            self.flush()
        self.buffer[name] = tensor.detach().contiguous()
        self.buffered += size

    def flush(self) -> None:
        """Write the buffered tensors as the next shard."""
        from safetensors.torch import save_file  # looked up per call: tests interrupt it

        if not self.buffer:
            return
        name = f"{self.stem}-{len(self.shards) + 1:05d}.safetensors"
        save_file(self.buffer, str(self.directory / name), metadata=self.metadata)
        self.shards.append((name, list(self.buffer)))
        self.bytes_written += self.buffered
        self.buffer, self.buffered = {}, 0

    def finish(self) -> WrittenWeights:
        """Write what is left, name the shards -of-N and write the index (several shards) or rename the
        only shard to `base_name`; returns sizes and hashes of every file."""
        self.flush()
        if not self.shards:  # no tensor at all: still a valid (empty) weights file
            from safetensors.torch import save_file

            save_file({}, str(self.directory / f"{self.stem}-00001.safetensors"), metadata=self.metadata)
            self.shards.append((f"{self.stem}-00001.safetensors", []))
        out = WrittenWeights()
        total = len(self.shards)
        for i, (tmp_name, names) in enumerate(self.shards, 1):
            final = self.base_name if total == 1 else f"{self.stem}-{i:05d}-of-{total:05d}.safetensors"
            os.replace(self.directory / tmp_name, self.directory / final)
            path = self.directory / final
            out.files[final] = {"bytes": path.stat().st_size, "sha256": sha256_file(path)}
            out.weight_map.update(dict.fromkeys(names, final))
        if total > 1:
            out.index = index_name(self.base_name)
            index = {"metadata": {"total_size": self.bytes_written, "format": "pt"},
                     "weight_map": dict(sorted(out.weight_map.items()))}
            (self.directory / out.index).write_text(json.dumps(index, indent=2) + "\n")
        return out


# --- reading ---------------------------------------------------------------------------------------
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}
for _name, _attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"), ("F8_E8M0", "float8_e8m0fnu"),
                     ("U16", "uint16"),
                     ("U32", "uint32"), ("U64", "uint64")):
    if hasattr(torch, _attr):
        DTYPES[_name] = getattr(torch, _attr)


def read_index(index: Path) -> dict[str, str]:
    """The weight_map {tensor name: file name} of a safetensors index file."""
    try:
        raw = json.loads(index.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{index}: index file is missing") from None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{index}: corrupt index file ({exc})") from exc
    weight_map = raw.get("weight_map") if isinstance(raw, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{index}: index file has no weight_map {{tensor name: file}}")
    for file in set(weight_map.values()):
        if Path(file).name != file:
            raise CheckpointError(f"{index}: shard {file!r} is not a file name inside the checkpoint directory")
    return weight_map


@dataclass
class StoredTensor:
    file: str
    key: str  # its name inside the file
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # absolute byte offset of its data in the file
    nbytes: int


def _header(path: Path) -> dict[str, dict]:
    """The tensors of a safetensors file {key: {dtype, shape, data_offsets}}, checked by safetensors
    itself (a truncated or corrupt file fails here) and with the data offsets made absolute."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt"):  # validates header, offsets and file size
            pass
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(size))
    except (SafetensorError, OSError, RuntimeError, ValueError) as exc:
        raise CheckpointError(f"{path}: unreadable safetensors file, truncated or corrupt ({exc})") from exc
    header.pop("__metadata__", None)
    for info in header.values():
        begin, end = info["data_offsets"]
        info["data_offsets"] = (8 + size + begin, 8 + size + end)
    return header


def _readinto(f, out: torch.Tensor, offset: int, nbytes: int, path: Path) -> None:
    """Read nbytes at offset straight into the contiguous tensor `out` (no memory map, no extra copy)."""
    if nbytes == 0:
        return
    view = memoryview(out.reshape(-1).view(torch.uint8).numpy())
    f.seek(offset)
    done = 0
    while done < nbytes:  # one read() returns at most ~2 GiB on Linux
        n = f.readinto(view[done:])
        if not n:
            raise CheckpointError(f"{path}: file ended while reading {nbytes} bytes at offset {offset} (truncated)")
        done += n


# Stored dtypes whose values mean nothing without a scale (quant/ reads them with theirs): never converted raw.
SCALED = (torch.float8_e4m3fn, torch.float8_e5m2, torch.float8_e8m0fnu)


def file_identity(stat: os.stat_result) -> tuple:
    """What tells one file from another at the same path (a replaced file has another inode, size or time)."""
    return stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns


class WeightFiles:
    """Tensors stored in safetensors files of one directory, named by `weight_map` {tensor: file}
    (None: every tensor of the single file `single`). `aliases` {name: stored name} add tied names.

    Every file is checked when this is built (exists, complete and valid safetensors, holds the tensors
    the index puts in it); `shapes` and `dtypes` come from the headers. Tensors are then read with
    plain file reads (not safetensors' memory map, whose pages would count as resident memory for as
    long as the file is open), straight into the destination in copy_into; `bytes_read` counts them."""

    def __init__(self, directory, weight_map: dict[str, str] | None = None, single: str | None = None,
                 aliases: dict[str, str] | None = None):
        self.directory = Path(directory)
        self.handles: dict[str, object] = {}
        self.identity: dict[str, tuple] = {}  # each file as its header was read: reopened files must be the same
        self.bytes_read = 0
        files = [single] if weight_map is None else sorted(set(weight_map.values()))
        stored: dict[str, StoredTensor] = {}
        for file in files:
            path = self.directory / file
            if not path.is_file():
                raise CheckpointError(f"{path}: weights file (shard) {file} is missing")
            self.identity[file] = file_identity(os.stat(path))
            header = _header(path)
            if weight_map is None:
                wanted = list(header)
            else:
                wanted = [k for k, f in weight_map.items() if f == file]
                lacking = [k for k in wanted if k not in header]
                if lacking:
                    raise CheckpointError(f"{path}: shard {file} lacks tensors the index puts there: "
                                          f"{lacking[:5]}{'...' if len(lacking) > 5 else ''}")
            for k in wanted:
                info = header[k]
                if info["dtype"] not in DTYPES:
                    raise CheckpointError(f"{path}: tensor {k!r} has dtype {info['dtype']}, which is not supported")
                begin, end = info["data_offsets"]
                stored[k] = StoredTensor(file, k, DTYPES[info["dtype"]], tuple(info["shape"]), begin, end - begin)
        for alias, name in (aliases or {}).items():
            if name not in stored:
                raise CheckpointError(f"{self.directory}: tied weight {alias!r} refers to {name!r}, which the "
                                      "weights files lack")
            if alias in stored:
                raise CheckpointError(f"{self.directory / 'config.json'}: alias {alias!r} (tied to {name!r}) names a "
                                      f"tensor the weights file {stored[alias].file} stores itself: config.json and "
                                      "the weights come from different saves")
        self.stored = {k: stored[v] for k, v in ({k: k for k in stored} | dict(aliases or {})).items()}
        self.shapes = {k: t.shape for k, t in self.stored.items()}
        self.dtypes = {k: t.dtype for k, t in self.stored.items()}

    def __contains__(self, name: str) -> bool:
        return name in self.stored

    def file_of(self, name: str) -> str:
        return self.stored[name].file

    def nbytes(self, name: str) -> int:
        return self.stored[name].nbytes

    def _handle(self, file: str):
        """The open file (files are closed between layers, release(), and opened again by name: a file replaced
        meanwhile, by another command writing this directory, is refused rather than read at the old offsets)."""
        if file not in self.handles:
            try:
                handle = open(self.directory / file, "rb", buffering=0)
            except OSError as exc:
                raise CheckpointError(f"{self.directory / file}: cannot open weights file ({exc})") from exc
            if file_identity(os.fstat(handle.fileno())) != self.identity[file]:
                handle.close()
                raise CheckpointError(f"{self.directory / file} changed while it was being read (another command "
                                      "wrote this directory?): the output would mix two checkpoints; run again once "
                                      "nothing writes it")
            self.handles[file] = handle
        return self.handles[file]

    def read_into(self, name: str, out: torch.Tensor) -> torch.Tensor:
        """Copy tensor `name` into `out` (same shape; any dtype: converted when it differs) and return out.
        Reads straight into out's memory when it is a contiguous CPU tensor of the stored dtype."""
        t = self.stored[name]
        if tuple(out.shape) != t.shape:
            raise CheckpointError(f"{self.directory / t.file}: tensor {name!r} has shape {t.shape}, "
                                  f"expected {tuple(out.shape)}")
        if out.dtype == t.dtype and out.is_contiguous() and out.device.type == "cpu":
            _readinto(self._handle(t.file), out, t.offset, t.nbytes, self.directory / t.file)
        elif t.dtype in SCALED:
            raise CheckpointError(
                f"{self.directory / t.file}: tensor {name!r} is stored as {t.dtype} with no scales read with it: its "
                f"values alone are off by their block scale. A block-FP8 checkpoint needs {name}_scale_inv next to it "
                "and config.json's quantization_config (quant_method 'fp8', weight_block_size)")
        else:
            with torch.no_grad():
                out.copy_(self.get(name))
            return out
        self.bytes_read += t.nbytes
        return out

    def get(self, name: str) -> torch.Tensor:
        """Tensor `name` as stored (a fresh CPU tensor)."""
        t = self.stored[name]
        out = torch.empty(t.shape, dtype=t.dtype)
        _readinto(self._handle(t.file), out, t.offset, t.nbytes, self.directory / t.file)
        self.bytes_read += t.nbytes
        return out

    def release(self, files: Iterable[str] | None = None) -> None:
        """Close the given files (all when None)."""
        for file in list(self.handles) if files is None else list(files):
            handle = self.handles.pop(file, None)
            if handle is not None:
                handle.close()

    @torch.no_grad()
    def copy_into(self, targets: dict[str, torch.Tensor]) -> None:
        """targets[name] <- stored tensor for every name, file after file in offset order (sequential
        reads), straight into the targets' memory (peak memory: the targets plus one tensor at most). One
        file is open at a time (any number of shards loads under the open-file limit); all are closed at
        the end, also when a read fails."""
        order = sorted(targets, key=lambda n: (self.stored[n].file, self.stored[n].offset))
        try:
            for name in order:
                file = self.stored[name].file
                self.release([f for f in self.handles if f != file])
                self.read_into(name, targets[name])
        finally:
            self.release()
