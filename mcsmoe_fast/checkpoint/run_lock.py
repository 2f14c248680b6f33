"""One run at a time in an output directory: two training runs sharing it would replace each other's best/ and
latest/ (one run's best model lost, the other's printout pointing at it), two comparisons each other's tables. A run
holds an exclusive lock (flock) on `<directory>/.mcsmoe-run.lock` from its start to its end; the system drops it
when the process ends, killed or not, so a crashed run never blocks the next one. The lock is re-entrant within a
process (the CLI takes it before loading the model, train() again inside), and a save into a locked run directory
from another process (a merge --out run/best while the run trains) is refused (refuse_locked). Only the main
process of a distributed run (RANK 0) takes it: the ranks of one run share the directory by design. Where flock
does not exist (Windows), no lock is taken."""
from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

LOCK_FILE = ".mcsmoe-run.lock"
_HELD: dict[Path, int] = {}  # directories this process holds the lock of -> how many nested blocks


def _fcntl():
    try:
        import fcntl
    except ImportError:  # no flock on this system
        return None
    return fcntl


def _holder(fd: int) -> str:
    return os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"


@contextmanager
def run_lock(directory) -> Iterator[None]:
    """Hold the run lock of `directory` (created if missing) for the block; ValueError naming the process that
    holds it when another one does."""
    fcntl, key = _fcntl(), Path(os.path.realpath(os.path.expanduser(directory)))
    if fcntl is None or int(os.environ.get("RANK", "0")) != 0 or key in _HELD:
        _HELD[key] = _HELD.get(key, 0) + 1
        try:
            yield
        finally:
            _HELD[key] -= 1
            if not _HELD[key]:
                del _HELD[key]
        return
    created = not key.exists()
    key.mkdir(parents=True, exist_ok=True)
    fd = os.open(key / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _holder(fd)
        os.close(fd)
        raise ValueError(f"{directory} is being written by another run (pid {holder}): two runs in one directory "
                         "would replace each other's outputs; choose another directory") from None
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        _HELD[key] = 1
        yield
    finally:
        _HELD.pop(key, None)
        (key / LOCK_FILE).unlink(missing_ok=True)  # no trace left (a killed run's file is taken over next time)
        os.close(fd)  # releases the lock
        if created and not any(key.iterdir()):  # a run refused before writing anything leaves no directory
            key.rmdir()


def refuse_locked(directory, what: str) -> None:
    """ValueError when another process holds the run lock of `directory` (`what` is about to write into it)."""
    fcntl, key = _fcntl(), Path(os.path.realpath(os.path.expanduser(directory)))
    if fcntl is None or key in _HELD or not (key / LOCK_FILE).is_file():
        return
    fd = os.open(key / LOCK_FILE, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        raise ValueError(f"{what}: {directory} is being written by a running process (pid {_holder(fd)}); write "
                         "elsewhere or wait for it to end") from None
    finally:
        os.close(fd)
