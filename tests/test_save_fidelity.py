"""A save replaces exactly the checkpoint it wrote before, and nothing else of the user's (session 34's audit of
the save side; each test failed before its fix): a replaced checkpoint whose removal was interrupted is never put
back, `~` names the same directory in every guard, only the file names the writers produce count as a
checkpoint's, a mount point is refused up front, and a size that is not a whole finite number of bytes is refused
by the option's name."""
import argparse
import os
import re

import pytest

import mcsmoe_fast as mf
import mcsmoe_fast.checkpoint.atomic as atomic
from mcsmoe_fast.checkpoint import parse_size
from mcsmoe_fast.cli.common import refuse_overwriting_input
from mcsmoe_fast.tiny import tiny_mixtral
from test_atomic_replace_safety import checkpoint, write_new


def hidden(directory):
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


# --- 1: a replaced checkpoint is garbage once the new one is in place -------------------------------------------
def test_a_replaced_checkpoint_whose_removal_was_interrupted_is_never_put_back(tmp_path, monkeypatch):
    target = checkpoint(tmp_path / "out")
    (target / "generation_config.json").write_text("{}")
    real_unlink, interrupted = os.unlink, []

    def unlink(path, *args, **kwargs):  # Ctrl-C while rmtree deletes the replaced checkpoint, after its first file
        real_unlink(path, *args, **kwargs)
        if "dir_fd" in kwargs and not interrupted:
            interrupted.append(path)
            raise KeyboardInterrupt

    monkeypatch.setattr(os, "unlink", unlink)
    with pytest.raises(KeyboardInterrupt):
        write_new(target)
    monkeypatch.setattr(os, "unlink", real_unlink)
    assert (target / "config.json").read_text() == '{"new": 1}'  # the new checkpoint is in place
    for file in target.iterdir():  # the user discards it and saves again
        file.unlink()
    target.rmdir()
    write_new(target)
    assert sorted(p.name for p in target.iterdir()) == ["config.json", "model.safetensors"]
    assert hidden(tmp_path) == []


def test_a_replaced_checkpoint_that_cannot_be_renamed_aside_is_removed_where_it_is(tmp_path, monkeypatch):
    target = checkpoint(tmp_path / "out")
    real_rename = os.rename

    def rename(src, dst):
        if ".trash-" in os.fspath(dst):
            raise OSError(28, "No space left on device")
        return real_rename(src, dst)

    monkeypatch.setattr(atomic.os, "rename", rename)
    write_new(target)  # the new checkpoint is in place: the save succeeds
    assert (target / "model.safetensors").read_bytes() == b"new weights"
    assert hidden(tmp_path) == []


def test_a_leftover_replaced_checkpoint_is_removed_by_the_next_save(tmp_path):
    checkpoint(tmp_path / ".out.trash-0123abcd")
    write_new(tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["config.json", "model.safetensors"]
    assert hidden(tmp_path) == []


# --- 2: ~ is the home directory in every guard, as the loader opens it -----------------------------------------
@pytest.fixture
def home(tmp_path, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)
    return home


def test_the_cli_refuses_an_out_that_is_the_input_model_named_with_tilde(home):
    checkpoint(home / "m")
    with pytest.raises(ValueError, match="would write into the input model's directory"):
        refuse_overwriting_input(argparse.Namespace(out=str(home / "m"), model="~/m"))
    with pytest.raises(ValueError, match="holds the input model"):
        refuse_overwriting_input(argparse.Namespace(out="~", model=str(home / "m")))


def test_refuse_out_at_source_expands_tilde(home):
    checkpoint(home / "m")
    with pytest.raises(ValueError, match="must not be the input checkpoint directory"):
        atomic.refuse_out_at_source("~/m", home / "m")
    with pytest.raises(ValueError, match="must not be the input checkpoint directory"):
        atomic.refuse_out_at_source(home / "m", "~/m/out")


def test_save_pretrained_writes_tilde_into_the_home_directory(home, tmp_path):
    assert mf.save_pretrained(tiny_mixtral(), "~/x") == home / "x"
    assert (home / "x" / "config.json").is_file()
    assert not (tmp_path / "~").exists()


# --- 3: only what the writers produce is a checkpoint's -------------------------------------------------------
@pytest.mark.parametrize("users", ["router_stats.safetensors", "pytorch_model_original_fp32.bin",
                                   "backup.safetensors.index.json", "model-1-of-2.safetensors",
                                   "mcsmoe_model.safetensors.bak.safetensors", "trainer_state.old"])
def test_a_users_own_weights_file_in_a_checkpoint_is_refused_by_name(tmp_path, users):
    target = checkpoint(tmp_path / "ckpt")
    (target / users).write_bytes(b"the user's data")
    with pytest.raises(FileExistsError, match=f"holds {re.escape(users)}, which a checkpoint does not"):
        write_new(target)
    assert sorted(p.name for p in target.iterdir()) == sorted(["config.json", "model.safetensors", users])
    assert (target / users).read_bytes() == b"the user's data"


def test_save_pretrained_over_a_transformers_checkpoint_keeps_the_users_files(tmp_path):
    model = tiny_mixtral()
    out = tmp_path / "ckpt"
    model.save_pretrained(out)
    (out / "router_stats.safetensors").write_bytes(b"the user's data")
    (out / "pytorch_model_original_fp32.bin").write_bytes(b"backup")
    with pytest.raises(FileExistsError, match="pytorch_model_original_fp32.bin, router_stats.safetensors"):
        mf.save_pretrained(model, out)
    assert (out / "router_stats.safetensors").read_bytes() == b"the user's data"
    assert (out / "pytorch_model_original_fp32.bin").read_bytes() == b"backup"


@pytest.mark.parametrize("names", [
    ["mcsmoe_model-00001-of-00012.safetensors", "mcsmoe_model.safetensors.index.json"],
    ["model-00002-of-00003.safetensors", "model.safetensors.index.json"],
    ["pytorch_model.bin"], ["pytorch_model-00001-of-00002.bin", "pytorch_model.bin.index.json"],
    ["mcsmoe_model.safetensors", "trainer_state.json", "trainer_state.safetensors", "generation_config.json"]])
def test_the_files_the_writers_produce_are_replaced(tmp_path, names):
    target = checkpoint(tmp_path / "ckpt")
    for name in names:
        (target / name).write_text("x")
    write_new(target)
    kept = ["generation_config.json"] if "generation_config.json" in names else []
    assert sorted(p.name for p in target.iterdir()) == sorted(["config.json", "model.safetensors", *kept])


def test_sharded_saves_replace_each_other(tmp_path):
    model, out = tiny_mixtral(), tmp_path / "ckpt"
    mf.save_pretrained(model, out, max_shard_size=2000)
    mf.save_pretrained(model, out, export_dense=True, max_shard_size=2000)
    assert "model.safetensors.index.json" in os.listdir(out)
    mf.save_pretrained(model, out, max_shard_size=2000)
    assert sorted(n for n in os.listdir(out) if not n.startswith("mcsmoe_model-")) == [
        "config.json", "generation_config.json", "mcsmoe_model.safetensors.index.json"]


# --- 4: a mount point cannot be renamed: refused before any work ---------------------------------------------
@pytest.fixture
def volume(tmp_path, monkeypatch):
    volume = tmp_path / "vol"
    volume.mkdir()
    real_ismount = os.path.ismount
    monkeypatch.setattr(os.path, "ismount", lambda p: os.fspath(p) == str(volume) or real_ismount(p))
    return volume


def test_save_pretrained_refuses_a_mount_point_before_any_work(volume, tmp_path):
    with pytest.raises(FileExistsError, match=f"{re.escape(str(volume))} is a mount point.*subdirectory"):
        mf.save_pretrained(tiny_mixtral(), volume)
    assert os.listdir(volume) == [] and hidden(tmp_path) == []


def test_the_cli_refuses_an_out_that_is_a_mount_point(volume, tmp_path):
    model = checkpoint(tmp_path / "m")
    with pytest.raises(FileExistsError, match="is a mount point"):
        refuse_overwriting_input(argparse.Namespace(out=str(volume), model=str(model)))
    refuse_overwriting_input(argparse.Namespace(out=str(volume / "out"), model=str(model)))


# --- 5: sizes are whole, finite numbers of bytes -------------------------------------------------------------
@pytest.mark.parametrize("size", [float("inf"), "inf", float("nan"), "nan", "1e400", 1.5, "1.5", "1.0005KB"])
def test_a_size_that_is_not_a_whole_finite_number_of_bytes_is_refused_by_name(size):
    with pytest.raises(ValueError, match="^max_shard_size: "):
        parse_size(size, "max_shard_size")


@pytest.mark.parametrize("size, expected", [(1e15, 10**15), ("1.1KB", 1100), ("1.5GB", 1_500_000_000),
                                            ("2GiB", 2 * 2**30), ("0.5KiB", 512), (7, 7), ("7", 7)])
def test_sizes_in_units_are_exact(size, expected):
    assert parse_size(size, "max_shard_size") == expected


def test_save_pretrained_refuses_an_infinite_shard_size_pointing_to_none(tmp_path):
    with pytest.raises(ValueError, match=r"max_shard_size: .*None for no limit"):
        mf.save_pretrained(tiny_mixtral(), tmp_path / "out", max_shard_size=float("inf"))
    assert not (tmp_path / "out").exists()
