"""Atomic directories: a checkpoint is written into a temporary directory next to its target, then renamed
into place, so an interrupted save leaves the previous checkpoint as it was; temporaries of dead writers
are removed."""
from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


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
