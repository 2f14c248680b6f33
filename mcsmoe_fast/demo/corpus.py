"""The demo's corpus, which every Python installation has: the standard library's own source files,
read as bytes. Files are split by a hash of their path, so the held-out files are never trained on and
the split is the same on every machine with the same Python."""
from __future__ import annotations

import sysconfig
import zlib
from pathlib import Path

import torch


def stdlib_files(root: Path | None = None) -> list[Path]:
    root = Path(root or sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py")
                   if not {"site-packages", "dist-packages", "test", "tests", "idlelib"} & set(p.relative_to(root).parts))
    if not files:
        raise RuntimeError(f"no Python source files under {root}: the demo's corpus is the standard library's source")
    return files


def is_held_out(path: Path, root: Path, every: int = 10) -> bool:
    return zlib.crc32(str(path.relative_to(root)).encode()) % every == 0


def read_bytes(files: list[Path], limit: int) -> torch.Tensor:
    """The files' bytes, concatenated, up to `limit` bytes, as int64 token ids in [0, 256)."""
    out = bytearray()
    for path in files:
        out += path.read_bytes()
        if len(out) >= limit:
            break
    return torch.frombuffer(bytearray(out[:limit]), dtype=torch.uint8).long()  # a writable copy


def spread_windows(tokens: torch.Tensor, length: int, count: int) -> torch.Tensor:
    """`count` windows [count, length] spread evenly over the whole stream: every part of it is sampled, not
    just its first bytes."""
    rows = tokens[: tokens.numel() // length * length].view(-1, length)
    if not 1 <= count <= rows.shape[0]:
        raise ValueError(f"{count} windows of {length} tokens asked from a stream of {rows.shape[0]} windows")
    return rows[torch.linspace(0, rows.shape[0] - 1, count).round().long()]


def split_corpus(train_bytes: int, eval_windows: int, length: int,
                 root: Path | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(the training files' first `train_bytes` bytes, `eval_windows` windows of `length` bytes spread evenly
    over all the held-out files)."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    files = stdlib_files(root)
    held = [p for p in files if is_held_out(p, root)]
    train = [p for p in files if not is_held_out(p, root)]
    return read_bytes(train, train_bytes), spread_windows(read_bytes(held, sum(p.stat().st_size for p in held)),
                                                          length, eval_windows)
