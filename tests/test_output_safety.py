"""A user's files around the outputs (session 39's audit): eval --json never overwrites an input of the evaluation, a
training run directory is written by one run at a time, and an output whose directory cannot be written is refused
before any work (it failed after the work, naming a hidden temporary)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

import mcsmoe_fast.checkpoint.atomic as atomic
from mcsmoe_fast.cli import main
from mcsmoe_fast.tiny import tiny_mixtral, tiny_tokenizer
from mcsmoe_fast.checkpoint.run_lock import LOCK_FILE, refuse_locked, run_lock
from test_cli_merge import LINES


@pytest.fixture
def space(tmp_path):
    tiny_mixtral().save_pretrained(tmp_path / "model")
    tiny_tokenizer().save_pretrained(tmp_path / "model")
    (tmp_path / "text.txt").write_text(" ".join(LINES * 8))
    return tmp_path


def run(argv, capsys):
    rc = main([str(a) for a in argv])
    return rc, capsys.readouterr().err


@pytest.mark.parametrize("target", ["model/config.json", "model/results.json", "text.txt", "model"])
def test_eval_json_never_overwrites_an_input(space, capsys, target):
    before = {p: p.read_bytes() for p in space.rglob("*") if p.is_file()}
    rc, err = run(["eval", "--model", space / "model", "--eval-text", space / "text.txt", "--length", 8, "--json",
                   space / target], capsys)
    assert rc == 2 and "would overwrite an input of this evaluation" in err, err
    assert {p: p.read_bytes() for p in space.rglob("*") if p.is_file()} == before
    rc, err = run(["eval", "--model", space / "model", "--eval-text", space / "text.txt", "--length", 8, "--json",
                   space / "results.json"], capsys)
    assert rc == 0 and (space / "results.json").is_file(), err


@pytest.fixture
def held(tmp_path):
    """Another process holding the run lock of tmp_path/run (killed at the end)."""
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom mcsmoe_fast.checkpoint.run_lock import "
                               f"run_lock\nwith run_lock({str(tmp_path / 'run')!r}):\n    print('held', flush=True)\n"
                               "    time.sleep(120)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        yield holder.pid
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()


def test_one_run_at_a_time_in_a_directory(tmp_path, held):
    with pytest.raises(ValueError, match=rf"{tmp_path / 'run'} is being written by another run \(pid {held}\)"):
        with run_lock(tmp_path / "run"):
            pass
    with pytest.raises(ValueError, match=rf"saving here: {tmp_path / 'run'} is being written by a running process "
                                         rf"\(pid {held}\)"):
        refuse_locked(tmp_path / "run", "saving here")
    with run_lock(tmp_path / "mine"), run_lock(tmp_path / "mine"):  # re-entrant in one process (CLI, then train())
        refuse_locked(tmp_path / "mine", "this process")  # its own saves into it
        assert (tmp_path / "mine" / LOCK_FILE).read_text() == str(os.getpid())
    assert not (tmp_path / "mine").exists()  # created for the run, removed with the lock: nothing was written
    (tmp_path / "kept").mkdir()
    with run_lock(tmp_path / "kept"):  # released at the end of the block, and its file removed
        pass
    assert (tmp_path / "kept").is_dir() and not list((tmp_path / "kept").iterdir())


def test_a_killed_run_does_not_keep_the_lock(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import time\nfrom mcsmoe_fast.checkpoint.run_lock import run_lock\n"
                               f"with run_lock({str(tmp_path / 'run')!r}):\n    print('held', flush=True)\n"
                               "    time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    with run_lock(tmp_path / "run"):
        pass


def test_train_refuses_a_directory_another_run_writes(tmp_path, held):
    import torch

    from mcsmoe_fast.train import TrainConfig, train

    data = [{"input_ids": torch.arange(3, 11), "labels": torch.arange(3, 11)}] * 4
    with pytest.raises(ValueError, match="is being written by another run"):
        train(tiny_mixtral(), data, TrainConfig(steps=1, batch_size=2, eval_every=0), output_dir=tmp_path / "run",
              progress=False, collate_fn=lambda rows: {k: torch.stack([r[k] for r in rows]) for k in rows[0]})
    assert not (tmp_path / "run" / "latest").exists()


@pytest.mark.parametrize("command", ["finetune", "finetune --resume", "compare", "merge into its best/"])
def test_commands_refuse_a_run_directory_another_process_writes_before_any_work(space, capsys, monkeypatch, held,
                                                                               command):
    import mcsmoe_fast.loading

    def no_work(*args, **kwargs):
        raise AssertionError("the model was loaded before the refusal")

    monkeypatch.setattr(mcsmoe_fast.loading, "open_model", no_work)
    calib = space / "calib.txt"
    calib.write_text("\n".join(LINES))
    run_dir = space / "run"
    argv = {"finetune": ["finetune", "--text", space / "text.txt", "--length", 8, "--steps", 1, "--out", run_dir],
            "compare": ["compare", "--calib", calib, "--eval-text", space / "text.txt", "--methods", "m-smoe",
                        "--ratios", 0.5, "--out", run_dir],
            "merge into its best/": ["merge", "--calib", calib, "--num-groups", 2, "--out", run_dir / "best"]}
    argv["finetune --resume"] = [*argv["finetune"], "--resume"]
    if command.startswith("merge"):
        monkeypatch.undo()  # merge loads the model first: the refusal comes before anything is written
    rc, err = run([*argv[command], "--model", space / "model"], capsys)
    assert rc == 2 and f"(pid {held})" in err, err
    assert sorted(p.name for p in run_dir.iterdir()) == [LOCK_FILE]


def test_a_comparison_removes_an_earlier_runs_plot_with_its_first_table(tmp_path):
    from mcsmoe_fast.compare import write_tables

    (tmp_path / "perplexity.png").write_bytes(b"another run's plot")
    full = {"method": "full", "experts": 8, "expert_share": 1.0, "form": "exact", "perplexity": 12.5}
    write_tables({"experts": 8, "rows": [full]}, tmp_path)
    assert not (tmp_path / "perplexity.png").exists() and (tmp_path / "results.json").is_file()


@pytest.mark.parametrize("command", ["merge", "finetune", "compare"])
def test_an_output_in_a_place_that_cannot_be_written_is_refused_before_any_work(space, capsys, monkeypatch, command):
    """A read-only parent (os.access says so; the tests may run as root, which writes anywhere)."""
    readonly = space / "readonly"
    readonly.mkdir()
    access = os.access
    monkeypatch.setattr(atomic.os, "access", lambda path, mode, **kw: os.path.realpath(path) != str(readonly)
                        and access(path, mode, **kw))
    calib = space / "calib.txt"
    calib.write_text("\n".join(LINES))
    argv = {"merge": ["merge", "--calib", calib, "--num-groups", 2],
            "finetune": ["finetune", "--text", space / "text.txt", "--length", 8, "--steps", 1],
            "compare": ["compare", "--calib", calib, "--eval-text", space / "text.txt", "--methods", "m-smoe",
                        "--ratios", 0.5]}[command]
    import mcsmoe_fast.loading

    def no_work(*args, **kwargs):
        raise AssertionError("the model was loaded before the refusal")

    monkeypatch.setattr(mcsmoe_fast.loading, "open_model", no_work)
    rc, err = run([*argv, "--model", space / "model", "--out", readonly / "out"], capsys)
    assert rc == 2 and f"its directory {readonly} is not writable by you" in err, err
    assert list(readonly.iterdir()) == []
