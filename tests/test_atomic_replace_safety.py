"""A save replaces a previous checkpoint, and nothing else: files a checkpoint does not hold are refused by name
before any work, a symlink's target is updated in place of the link, and an interruption between the two renames
puts the previous checkpoint back (session 31's audit; each test failed before its fix)."""
import argparse
import os
import subprocess
import sys

import pytest
import torch

import mcsmoe_fast as mf
import mcsmoe_fast.checkpoint.atomic as atomic
from mcsmoe_fast.checkpoint import atomic_directory
from mcsmoe_fast.cli.common import refuse_overwriting_input
from mcsmoe_fast.tiny import tiny_mixtral


def checkpoint(directory, weights=b"old weights"):
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text("{}")
    (directory / "model.safetensors").write_bytes(weights)
    return directory


def write_new(target):
    with atomic_directory(target) as tmp:
        (tmp / "config.json").write_text('{"new": 1}')
        (tmp / "model.safetensors").write_bytes(b"new weights")


def test_a_previous_checkpoint_is_replaced_keeping_its_tokenizer(tmp_path):
    """The weights, index and trainer state of the previous checkpoint go; the tokenizer and generation files the new
    save does not write stay, as transformers' save_pretrained leaves them."""
    target = checkpoint(tmp_path / "ckpt")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
                 "model-00001-of-00002.safetensors", "model.safetensors.index.json", "trainer_state.json"):
        (target / name).write_text("x")
    write_new(target)
    assert sorted(p.name for p in target.iterdir()) == [
        "config.json", "generation_config.json", "model.safetensors", "special_tokens_map.json", "tokenizer.json",
        "tokenizer_config.json"]


@pytest.mark.parametrize("foreign", ["notes.txt", "README.md", ".git", "data"])
def test_a_directory_holding_the_users_files_is_refused_before_any_work(tmp_path, foreign):
    target = checkpoint(tmp_path / "project")
    if foreign in (".git", "data"):
        (target / foreign).mkdir()
        (target / foreign / "f").write_text("precious")
    else:
        (target / foreign).write_text("precious")
    before = sorted(str(p.relative_to(target)) for p in target.rglob("*"))
    worked = []
    with pytest.raises(FileExistsError, match=f"holds {foreign}, which a checkpoint does not"):
        with atomic_directory(target):
            worked.append(True)
    assert not worked  # refused up front
    assert sorted(str(p.relative_to(target)) for p in target.rglob("*")) == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_save_pretrained_refuses_a_project_directory_and_keeps_it(tmp_path):
    model = tiny_mixtral()
    project = checkpoint(tmp_path / "project")
    (project / "notes.txt").write_text("months of notes")
    with pytest.raises(FileExistsError, match="notes.txt"):
        mf.save_pretrained(model, project)
    assert (project / "notes.txt").read_text() == "months of notes"
    assert (project / "model.safetensors").read_bytes() == b"old weights"


def test_the_cli_refuses_an_out_directory_holding_the_input_model(tmp_path):
    ckpt = checkpoint(tmp_path / "ckpt")
    checkpoint(ckpt / "original")
    with pytest.raises(ValueError, match="holds the input model"):
        refuse_overwriting_input(argparse.Namespace(out=str(ckpt), model=str(ckpt / "original")))
    refuse_overwriting_input(argparse.Namespace(out=str(tmp_path / "elsewhere"), model=str(ckpt / "original")))


def test_a_symlinked_target_is_updated_where_it_points(tmp_path):
    real = checkpoint(tmp_path / "big_disk" / "ckpt")
    link = tmp_path / "ckpt"
    os.symlink(real, link)
    write_new(link)
    write_new(link)
    assert link.is_symlink() and os.path.realpath(link) == str(real)
    assert (real / "model.safetensors").read_bytes() == b"new weights"
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_an_interrupted_replace_puts_the_previous_checkpoint_back(tmp_path, monkeypatch):
    target = checkpoint(tmp_path / "ckpt")
    real_rename, calls = os.rename, []

    def rename(src, dst):
        calls.append(dst)
        if len(calls) == 2:  # tmp -> target, after target -> .old
            raise KeyboardInterrupt("between the two renames")
        return real_rename(src, dst)

    monkeypatch.setattr(atomic.os, "rename", rename)
    with pytest.raises(KeyboardInterrupt):
        write_new(target)
    monkeypatch.setattr(atomic.os, "rename", real_rename)
    assert (target / "model.safetensors").read_bytes() == b"old weights"
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_a_checkpoint_a_killed_writer_left_aside_is_restored(tmp_path):
    """Killed between the renames: no target, the previous checkpoint under .ckpt.old-*. The next save to it
    restores it first, so a save that then fails leaves it where it was."""
    checkpoint(tmp_path / ".ckpt.old-0123abcd")
    target = tmp_path / "ckpt"
    with pytest.raises(RuntimeError, match="failed"):
        with atomic_directory(target):
            raise RuntimeError("failed")
    assert (target / "model.safetensors").read_bytes() == b"old weights"
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    checkpoint(tmp_path / ".ckpt.old-4567cdef", b"older")  # with a target there, a leftover is removed
    write_new(target)
    assert (target / "model.safetensors").read_bytes() == b"new weights"
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_a_live_writers_set_aside_checkpoint_is_left_to_it(tmp_path, monkeypatch):
    """Another save to the target starting while this one is between its renames (its restore_previous on entry)
    leaves the previous checkpoint this writer set aside: this save ends in place (it lost its output before). A
    set-aside directory whose writer is dead is put back as before."""
    target = checkpoint(tmp_path / "out", b"previous")
    rename, raced = os.rename, []

    def between_the_renames(src, dst):
        rename(src, dst)
        if not raced and ".out.old-" in str(dst):
            raced.append(dst)
            subprocess.run([sys.executable, "-c", "import sys; from pathlib import Path; from mcsmoe_fast.checkpoint."
                            "atomic import restore_previous; restore_previous(Path(sys.argv[1]))", str(target)],
                           check=True)  # the other save, in its own process, entering atomic_directory

    monkeypatch.setattr(atomic.os, "rename", between_the_renames)
    write_new(target)
    monkeypatch.setattr(atomic.os, "rename", rename)
    assert raced and str(raced[0]).endswith(f"-{os.getpid()}")
    assert (target / "model.safetensors").read_bytes() == b"new weights"
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    for name, pid in (("dead", 999999999), ("reused", os.getpid())):  # no such pid; a killed writer's pid reused
        checkpoint(tmp_path / f".{name}.old-0123abcd-{pid}")
        atomic.restore_previous(tmp_path / name)
        assert (tmp_path / name / "model.safetensors").read_bytes() == b"old weights"


def test_a_model_saved_twice_to_one_directory_is_replaced(tmp_path):
    model = tiny_mixtral()
    first = mf.save_pretrained(model, tmp_path / "ckpt")
    with torch.no_grad():
        next(model.parameters()).add_(1)
    mf.save_pretrained(model, tmp_path / "ckpt")
    loaded = mf.from_pretrained(first)
    torch.testing.assert_close(next(loaded.parameters()), next(model.parameters()))
