"""The hidden states carried from one decoder layer to the next: one tensor [B, L, d] per calibration
batch, in the model's dtype, in memory or in one file.

Layer l reads batch b's input and writes its output over it (the input is not needed again), so the
store holds one copy of the calibration activations. The file is read and written with plain file
I/O rather than a memory map: mapped pages count as resident memory, the page cache does not.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch


def check_offload_dir(offload_dir) -> None:
    """Refuse an offload_dir that is an existing file, before a run does any work (a missing one is created)."""
    if offload_dir is not None and Path(offload_dir).exists() and not Path(offload_dir).is_dir():
        raise ValueError(f"offload_dir {offload_dir} is a file, not a directory: give a directory for the offloaded "
                         "hidden states (created if missing)")


class ActivationStore:
    """Hidden states of every calibration batch; `shapes` [(B, L, d), ...]. With `directory` they live
    in a temporary file there (removed by close()), else in memory."""

    def __init__(self, shapes: list[tuple[int, ...]], dtype: torch.dtype, directory=None):
        self.shapes, self.dtype = [tuple(s) for s in shapes], dtype
        sizes = [self._numel(s) * dtype.itemsize for s in self.shapes]
        self.offsets = [sum(sizes[:i]) for i in range(len(sizes))]
        self.nbytes = sum(sizes)
        self.tensors: list[torch.Tensor | None] = [None] * len(shapes)
        self.file = None
        self.path: Path | None = None
        if directory is not None:
            Path(directory).mkdir(parents=True, exist_ok=True)
            fd, name = tempfile.mkstemp(prefix="mcsmoe-activations-", suffix=".bin", dir=str(directory))
            self.path = Path(name)
            self.file = os.fdopen(fd, "r+b", buffering=0)

    @staticmethod
    def _numel(shape) -> int:
        n = 1
        for s in shape:
            n *= s
        return n

    @property
    def offloaded(self) -> bool:
        return self.file is not None

    def put(self, b: int, hidden: torch.Tensor) -> None:
        if tuple(hidden.shape) != self.shapes[b]:
            raise ValueError(f"batch {b}: hidden states of shape {tuple(hidden.shape)}, expected {self.shapes[b]}")
        hidden = hidden.detach().to(self.dtype).contiguous()
        if self.file is None:
            self.tensors[b] = hidden
            return
        self.file.seek(self.offsets[b])
        data = memoryview(hidden.reshape(-1).view(torch.uint8).numpy())
        written = 0
        while written < len(data):
            written += self.file.write(data[written:])

    def get(self, b: int) -> torch.Tensor:
        if self.file is None:
            if self.tensors[b] is None:
                raise ValueError(f"batch {b}: no hidden states stored yet")
            return self.tensors[b]
        out = torch.empty(self.shapes[b], dtype=self.dtype)
        view = memoryview(out.reshape(-1).view(torch.uint8).numpy())
        self.file.seek(self.offsets[b])
        done = 0
        while done < len(view):
            n = self.file.readinto(view[done:])
            if not n:
                raise OSError(f"{self.path}: activation file ended early (batch {b})")
            done += n
        return out

    def close(self) -> None:
        self.tensors = [None] * len(self.shapes)
        if self.file is not None:
            self.file.close()
            self.file = None
            self.path.unlink(missing_ok=True)
