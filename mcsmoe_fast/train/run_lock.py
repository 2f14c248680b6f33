"""One training run at a time in an output directory: two runs sharing it would replace each other's best/ and
latest/ (one run's best model lost, the other's printout pointing at it). A run holds an exclusive lock (flock) on
`<output_dir>/.mcsmoe-run.lock` from its start to its end; the system drops it when the process ends, killed or
not, so a crashed run never blocks the next one. Only the main process of a distributed run (RANK 0) takes it:
the ranks of one run share the directory by design. Where flock does not exist (Windows), no lock is taken."""
from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

LOCK_FILE = ".mcsmoe-run.lock"


@contextmanager
def run_lock(output_dir) -> Iterator[None]:
    """Hold the run lock of `output_dir` (created if missing) for the block; ValueError naming the process that
    holds it when another run does."""
    try:
        import fcntl
    except ImportError:  # no flock on this system
        yield
        return
    if int(os.environ.get("RANK", "0")) != 0:
        yield
        return
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(output_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "another process"
            raise ValueError(f"{output_dir} is being written by another training run (pid {holder}): two runs in one "
                             "directory would replace each other's best/ and latest/; choose another directory") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock
