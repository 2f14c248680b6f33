"""Atomic directories: a checkpoint is written into a temporary directory next to its target, then renamed
into place, so an interrupted save leaves the previous checkpoint as it was; temporaries of dead writers
are removed. A target is replaced only when it holds nothing but a checkpoint's files (the exact names this
package, transformers and tokenizers write: CHECKPOINT_FILES): anything else in it is the user's, and the save is
refused by the file's name. A mount point is refused too (it cannot be renamed), and so is a write-protected
directory (the user protected it). The tokenizer, chat template and generation files of the replaced checkpoint
that the new save does not write are kept (KEPT_FILES), as transformers' save_pretrained leaves them; its weights,
index and config files are not."""
from __future__ import annotations

import fnmatch
import os
import re
import shutil
import tempfile
import uuid
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .run_lock import refuse_locked
from .source_stamp import check_inputs


OWNER_FILE = ".mcsmoe-owner"  # the pid that writes a temporary directory
_SHARD = "-[0-9][0-9][0-9][0-9][0-9]-of-[0-9][0-9][0-9][0-9][0-9]"  # ShardWriter's and transformers' shard numbers
# The weights files the writers produce: ours (format.WEIGHTS_NAME), transformers' (safetensors, older .bin), each
# in one file or as shards plus their index.
WEIGHTS_FILES = ("mcsmoe_model.safetensors", f"mcsmoe_model{_SHARD}.safetensors", "mcsmoe_model.safetensors.index.json",
                 "model.safetensors", f"model{_SHARD}.safetensors", "model.safetensors.index.json",
                 "pytorch_model.bin", f"pytorch_model{_SHARD}.bin", "pytorch_model.bin.index.json")
# What a checkpoint directory holds: weights, configs, a tokenizer's files, the trainer's state (train/state.py).
CHECKPOINT_FILES = ("config.json", "generation_config.json", *WEIGHTS_FILES, "tokenizer*", "special_tokens_map.json",
                    "added_tokens.json", "vocab.*", "merges.txt", "spiece.model", "sentencepiece.bpe.model",
                    "chat_template.*", "preprocessor_config.json", "trainer_state.json", "trainer_state.safetensors",
                    OWNER_FILE)
# What a save into a checkpoint directory keeps of the previous checkpoint there when it does not write it itself.
KEPT_FILES = ("generation_config.json", "tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab.*",
              "merges.txt", "spiece.model", "sentencepiece.bpe.model", "chat_template.*", "preprocessor_config.json")


def keep_files(previous: Path, tmp: Path) -> None:
    """Copy into `tmp` the KEPT_FILES of the checkpoint directory `previous` that `tmp` does not hold."""
    if not previous.is_dir():
        return
    for file in previous.iterdir():
        if (file.is_file() and not (tmp / file.name).exists()
                and any(fnmatch.fnmatch(file.name, pattern) for pattern in KEPT_FILES)):
            shutil.copy2(file, tmp / file.name)


def write_text_atomic(path, text: str) -> None:
    """Write `text` to the file `path` through a temporary file beside it and one rename: a kill or a full disk
    leaves the previous file whole (a results table rewritten after every row must not lose the earlier rows).
    A path that is not a regular file (/dev/stdout, a pipe) is written directly."""
    if Path(path).exists() and not Path(path).is_file():  # /dev/stdout, a pipe: written as they are
        Path(path).write_text(text, encoding="utf-8")
        return
    path = Path(os.path.realpath(path))  # a symlink's target is rewritten, not the link replaced
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        tmp.write_text(text, encoding="utf-8")
        if path.exists():
            shutil.copymode(path, tmp)  # the file's permissions stay the user's
        check_inputs()
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def refuse_out_at_source(source, out) -> None:
    """ValueError when writing checkpoint `out` would replace or land inside the input checkpoint `source`, or
    replace a directory that holds it. Paths are compared resolved ('..', symlinks): the atomic replace resolves
    them too, so an out that only looks different could otherwise replace the input."""
    out_real, source_real = (Path(os.path.realpath(os.path.expanduser(p))) for p in (out, source))
    if out_real == source_real or source_real in out_real.parents:
        raise ValueError(f"out ({out}) must not be the input checkpoint directory ({source}) or inside it")
    if out_real in source_real.parents:
        raise ValueError(f"out ({out}) holds the input checkpoint {source}: replacing it would delete the input")


def check_writable_place(target: Path) -> None:
    """PermissionError (FileExistsError for a file in the way) unless the directory that will hold `target` can
    be written: its parent when it exists, else the nearest existing directory above it (where the missing ones
    are created). Checked before any work, not when the output is finally written."""
    place = next((p for p in Path(target).absolute().parents if p.exists()), None)
    if place is None:
        return
    if not place.is_dir():
        raise FileExistsError(f"{target} cannot be created: {place} is a file")
    if not os.access(place, os.W_OK | os.X_OK):
        raise PermissionError(f"{target} cannot be written: its directory {place} is not writable by you; choose "
                              "another place")


def check_replaceable(target: Path) -> None:
    """Raise FileExistsError unless `target` is absent, an empty directory, or a checkpoint directory holding
    only CHECKPOINT_FILES (then a save may replace it as a whole); a mount point is refused (renaming it fails),
    and a write-protected directory with PermissionError (renaming it needs only its parent writable, but the
    user protected it, and its files could not be removed afterwards), as is a place that cannot be written
    (check_writable_place)."""
    check_writable_place(target)
    if not target.exists():
        return
    if not target.is_dir():
        raise FileExistsError(f"{target} exists and is not a directory")
    if os.path.ismount(target):  # a volume or mounted disk: the replace would fail only after all the work
        raise FileExistsError(f"{target} is a mount point, which a save cannot replace (it renames the directory): "
                              "save into a subdirectory of it")
    if not os.access(target, os.W_OK | os.X_OK) or not target.stat().st_mode & 0o222:  # root passes os.access
        raise PermissionError(f"{target} is write-protected: a save cannot replace it; make it writable "
                              f"(chmod u+w {target}) or save elsewhere")
    entries = list(target.iterdir())
    if entries and not (target / "config.json").is_file():
        raise FileExistsError(f"{target} is a non-empty directory that is not a checkpoint; refusing to replace it")
    foreign = sorted(p.name for p in entries
                     if p.is_dir() or not any(fnmatch.fnmatch(p.name, pattern) for pattern in CHECKPOINT_FILES))
    if foreign:
        raise FileExistsError(f"{target} holds {', '.join(foreign[:5])}{' ...' if len(foreign) > 5 else ''}, which a "
                              "checkpoint does not: saving there would delete them; save elsewhere or move them first")


def _replace_dir(tmp: Path, target: Path) -> None:
    """Move the finished temporary directory to `target`, replacing a previous checkpoint there; when the
    second rename fails, the previous checkpoint is put back (a kill between the two: see restore_previous). Once
    the new checkpoint is in place the previous one is renamed to `.<name>.trash-*`, never put back, and removed."""
    if not target.exists():
        os.rename(tmp, target)
        return
    check_replaceable(target)
    old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}-{os.getpid()}")  # see restore_previous
    os.rename(target, old)
    try:
        os.rename(tmp, target)
    except BaseException:
        os.rename(old, target)
        raise
    trash = target.with_name(f".{target.name}.trash-{uuid.uuid4().hex[:8]}")
    try:
        os.rename(old, trash)  # replaced: an interrupted removal must not leave it for restore_previous
    except OSError:  # removed already by another save to `target`, or not renamed: the save is done all the same
        trash = old
    remove_replaced(trash)


def remove_replaced(trash: Path) -> None:
    """Remove a replaced checkpoint; one that cannot be removed (permissions changed since the save started) is
    named in a warning rather than left hidden: the save itself is done."""
    try:
        shutil.rmtree(trash)
    except FileNotFoundError:  # removed already by another save to the same target
        pass
    except OSError as exc:
        warnings.warn(f"the replaced checkpoint {trash} could not be removed ({exc}); delete it by hand",
                      stacklevel=3)


def _set_aside(target: Path, kind: str) -> list[Path]:
    """The directories _replace_dir names `.<name>.<kind>-<8 hex digits>[-<writer's pid>]` next to `target`; a
    user's own `.<name>.old-notes` does not match and is never touched."""
    pattern = re.compile(rf"\.{re.escape(target.name)}\.{kind}-[0-9a-f]{{8}}(-[0-9]+)?")
    return sorted(p for p in target.parent.glob(f".{target.name}.{kind}-*") if pattern.fullmatch(p.name))


def _writer_alive(aside: Path) -> bool:
    """Whether another process that set `aside` aside still runs (it is between its two renames: its own except
    branch puts the directory back if its second rename fails). A name without a pid is a dead writer's, and so is
    one with this process's pid: a killed writer whose pid came back (a fresh container starts at pid 1)."""
    pid = re.search(r"-[0-9a-f]{8}-([0-9]+)$", aside.name)
    return pid is not None and int(pid.group(1)) != os.getpid() and _pid_alive(int(pid.group(1)))


def restore_previous(target: Path) -> None:
    """A writer killed between _replace_dir's two renames left no `target` and the previous checkpoint under
    `.<name>.old-*`: put it back. Once `target` is there, such leftovers are removed, as are replaced checkpoints
    whose removal was interrupted (`.<name>.trash-*`). Only the names _replace_dir gives are read (_set_aside), and
    a directory set aside by a writer that still runs (another save to `target`, between its renames) is left to it."""
    for trash in _set_aside(target, "trash"):
        shutil.rmtree(trash, ignore_errors=True)
    for old in _set_aside(target, "old"):
        if _writer_alive(old):  # another save to `target` is between its renames: its previous checkpoint
            continue
        if not target.exists():
            try:
                os.rename(old, target)
                continue
            except OSError:  # another process (a rank of the same run) put it back first
                if not target.exists():
                    raise
        shutil.rmtree(old, ignore_errors=True)


def previous_aside(target: Path) -> Path | None:
    """The previous checkpoint a writer killed between _replace_dir's renames left aside, which restore_previous
    would put back (None when `target` is in place or nothing is aside); read-only."""
    target = Path(target)
    aside = _set_aside(target, "old")
    return aside[0] if aside and not target.exists() else None


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
    `target` (a previous checkpoint there, or nothing; a symlink's target), when it raises it is removed and
    `target` is left as it was. Temporary directories left by a killed earlier run are removed first, and a
    previous checkpoint it left aside is put back. Refused up front when `target` holds more than a checkpoint,
    is a mount point or is write-protected (check_replaceable). The previous checkpoint's tokenizer, chat
    template and generation files that the block did not write are copied in before the replacement
    (keep_files). "~" is the home directory, as the loader reads it."""
    target = Path(os.path.realpath(os.path.expanduser(target)))  # "~", symlinks and "..": replace what it names
    refuse_locked(target.parent, f"saving {target}")  # a run directory another process writes (its best/, latest/)
    target.parent.mkdir(parents=True, exist_ok=True)
    restore_previous(target)
    remove_stale_temporaries(target)
    check_replaceable(target)  # before any work: a refused target costs nothing
    tmp = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        (tmp / OWNER_FILE).write_text(str(os.getpid()))
        yield tmp
        keep_files(target, tmp)
        check_inputs()  # the inputs read are still what the command began with: else two checkpoints in one
        _replace_dir(tmp, target)  # the owner file goes last: a temporary killed before its rename stays removable
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    (target / OWNER_FILE).unlink(missing_ok=True)
