"""Kills, interrupts and full disks while writing (session 36's crash audit; each test failed before its fix): a
save killed at its last rename leaves nothing the next save keeps; a user's hidden folders that only look like a
save's leftovers are never touched; a training run killed while `latest` is replaced resumes from the state it
left aside; compare's tables and eval's results file survive a failed rewrite; a full disk is a one-line error."""
import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

import mcsmoe_fast as mf
from mcsmoe_fast.checkpoint import atomic_directory
from mcsmoe_fast.checkpoint.atomic import restore_previous, write_text_atomic
from mcsmoe_fast.compare import write_tables
from mcsmoe_fast.tiny import tiny_mixtral
from mcsmoe_fast.train import resumable_step
from mcsmoe_fast.train.loop import check_output_dir
from test_cli_merge import LINES, tiny_tokenizer
from train_helpers import run_tiny_job


def run_child(code: str, *args) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *map(str, args)], env=env,
                          capture_output=True, text=True, timeout=600)


KILLED_AT_RENAME = """
    import os, signal, sys
    import mcsmoe_fast.checkpoint.atomic as atomic
    real = os.rename
    def rename(a, b):
        if ".tmp-" in str(a):  # the rename that moves the finished temporary into place
            os.kill(os.getpid(), signal.SIGKILL)
        return real(a, b)
    atomic.os.rename = rename
    with atomic.atomic_directory(sys.argv[1]) as tmp:
        (tmp / "config.json").write_text("{}")
        (tmp / "model.safetensors").write_bytes(b"x" * 100_000)
"""


@pytest.mark.parametrize("previous", [False, True], ids=["new", "replacing"])
def test_a_save_killed_at_its_last_rename_leaves_nothing_the_next_save_keeps(tmp_path, previous):
    """The owner file stays in the temporary until it is in place: a writer killed before that is seen dead."""
    out = tmp_path / "out"
    if previous:
        with atomic_directory(out) as tmp:
            (tmp / "config.json").write_text('{"old": 1}')
    child = run_child(KILLED_AT_RENAME, out)
    assert child.returncode == -signal.SIGKILL, child.stderr
    assert [p for p in tmp_path.iterdir() if ".tmp-" in p.name]  # the kill left the temporary
    if previous:  # killed between the renames: the previous checkpoint is put back
        restore_previous(out)
        assert json.loads((out / "config.json").read_text()) == {"old": 1}
    with atomic_directory(out) as tmp:
        (tmp / "config.json").write_text('{"new": 1}')
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert sorted(p.name for p in out.iterdir()) == ["config.json"]  # no owner file left in the checkpoint


def test_a_finished_save_leaves_no_owner_file(tmp_path):
    mf.save_pretrained(tiny_mixtral(num_experts=4, num_layers=1), tmp_path / "out")
    assert not (tmp_path / "out" / ".mcsmoe-owner").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_users_hidden_folders_named_like_a_saves_leftovers_are_never_touched(tmp_path):
    model = tiny_mixtral(num_experts=4, num_layers=1)
    mf.save_pretrained(model, tmp_path / "out")
    for name in (".out.old-2024-06", ".out.trash-keep", ".out.old-abcdefgh"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "notes.txt").write_text("precious")
    mf.save_pretrained(model, tmp_path / "out")
    for name in (".out.old-2024-06", ".out.trash-keep", ".out.old-abcdefgh"):
        assert (tmp_path / name / "notes.txt").read_text() == "precious"
    # out absent: a user's `.out.old-mine` holding a checkpoint is not taken for the previous one and replaced
    other = tmp_path / "other"
    other.mkdir()
    (other / ".out.old-mine").mkdir()
    (other / ".out.old-mine" / "config.json").write_text('{"mine": 1}')
    mf.save_pretrained(model, other / "out")
    assert json.loads((other / ".out.old-mine" / "config.json").read_text()) == {"mine": 1}


def test_a_saves_own_leftover_is_still_put_back(tmp_path):
    """The names _replace_dir gives (8 hex digits) are still read: a kill between its renames is undone."""
    target = tmp_path / "out"
    with atomic_directory(target) as tmp:
        (tmp / "config.json").write_text('{"old": 1}')
    os.rename(target, tmp_path / ".out.old-0123abcd")
    with pytest.raises(RuntimeError):
        with atomic_directory(target):
            raise RuntimeError("the next save fails")
    assert json.loads((target / "config.json").read_text()) == {"old": 1}


def test_a_run_killed_while_latest_is_replaced_resumes_from_the_state_left_aside(tmp_path, monkeypatch):
    """Between _replace_dir's renames `latest` is absent and the previous one is `.latest.old-*`: the resume starts
    from it (it restarted from step 0), and a new run is refused as for a run in place."""
    out = tmp_path / "run"
    run_tiny_job(out, steps=6)
    os.rename(out / "latest", out / ".latest.old-0123abcd")  # the kill's state
    assert resumable_step(out) == 6
    with pytest.raises(ValueError, match="holds a training run"):
        check_output_dir(out, None, resume=False)
    os.rename(out / "latest", out / ".latest.old-0123abcd")
    import mcsmoe_fast.train.loop as loop

    seen, real = [], loop._optimizer_step

    def spy(run, *args):
        seen.append(run.step)
        return real(run, *args)

    monkeypatch.setattr(loop, "_optimizer_step", spy)
    resumed, _ = run_tiny_job(out, steps=9, resume=True)
    assert seen == [6, 7, 8]
    monkeypatch.setattr(loop, "_optimizer_step", real)
    run_tiny_job(tmp_path / "whole", steps=6)  # the same two runs, nothing killed
    uninterrupted, _ = run_tiny_job(tmp_path / "whole", steps=9, resume=True)
    for a, b in zip(resumed.state_dict().values(), uninterrupted.state_dict().values()):
        assert torch.equal(a, b)


FULL_DISK_TABLES = """
    import resource, signal, sys
    from pathlib import Path
    from mcsmoe_fast.compare import write_tables
    out = Path(sys.argv[1])
    row = {"method": "full", "ratio": 0.0, "perplexity": 10.0, "expert_share": 1.0, "experts": 8, "form": "full"}
    more = [dict(row, method=f"m{i}", ratio=0.25) for i in range(3)]
    result = {"model": "x", "experts": 8, "rows": [row, more[0]], "kd_steps": 0}
    write_tables(result, out)
    size = (out / "results.json").stat().st_size
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (size + 10, size + 10))  # the disk fills up
    result["rows"] = [row, *more]
    try:
        write_tables(result, out)
    except OSError as exc:
        print("write failed:", exc)
"""


def test_compares_tables_survive_a_failed_rewrite(tmp_path):
    child = run_child(FULL_DISK_TABLES, tmp_path / "cmp")
    assert "write failed" in child.stdout, child.stderr
    assert len(json.loads((tmp_path / "cmp" / "results.json").read_text())["rows"]) == 2
    assert "m0" in (tmp_path / "cmp" / "results.md").read_text()
    assert sorted(p.name for p in (tmp_path / "cmp").iterdir()) == ["results.json", "results.md"]


def test_write_text_atomic_keeps_the_previous_file_and_writes_through_a_link(tmp_path, monkeypatch):
    path = tmp_path / "results.json"
    path.write_text("previous")
    link = tmp_path / "link.json"
    link.symlink_to(path)
    write_text_atomic(link, "new")
    assert link.is_symlink() and path.read_text() == "new"
    monkeypatch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(OSError("no space left")))
    with pytest.raises(OSError, match="no space"):
        write_text_atomic(path, "newer")
    assert path.read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.json", "results.json"]


FULL_DISK_MERGE = """
    import resource, signal, sys
    from mcsmoe_fast.cli import main
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))
    sys.exit(main(sys.argv[1:]))
"""


def test_a_full_disk_is_the_clis_one_line_error_and_writes_nothing(tmp_path):
    tiny_mixtral(num_experts=4, num_layers=2).save_pretrained(tmp_path / "model")
    tiny_tokenizer().save_pretrained(tmp_path / "model")
    (tmp_path / "calib.txt").write_text("\n".join(LINES * 2) + "\n")
    before = {p.name: p.read_bytes() for p in (tmp_path / "model").iterdir()}
    work = tmp_path / "work"
    work.mkdir()
    child = run_child(FULL_DISK_MERGE, "merge", "--model", tmp_path / "model", "--calib", tmp_path / "calib.txt",
                      "--num-groups", 2, "--out", work / "out", "--num-samples", 8, "--max-length", 16)
    assert child.returncode == 2, child.stderr
    assert "Traceback" not in child.stderr and "mcsmoe-fast merge: error:" in child.stderr
    assert not list(work.iterdir())
    assert {p.name: p.read_bytes() for p in (tmp_path / "model").iterdir()} == before


@pytest.mark.parametrize("name", ["best", "latest"])
def test_a_users_own_best_or_latest_folder_is_refused_before_any_step(tmp_path, name):
    """They were refused only when the first checkpoint replaced them, after the training up to it."""
    (tmp_path / "run" / name).mkdir(parents=True)
    (tmp_path / "run" / name / "notes.txt").write_text("precious")
    with pytest.raises(FileExistsError, match="not a checkpoint"):
        check_output_dir(tmp_path / "run", None, resume=False)
    import mcsmoe_fast.train.loop as loop

    steps = []
    real = loop._optimizer_step
    loop._optimizer_step = lambda run, *a: steps.append(run.step) or real(run, *a)
    try:
        with pytest.raises(FileExistsError, match="not a checkpoint"):
            run_tiny_job(tmp_path / "run", steps=6)
    finally:
        loop._optimizer_step = real
    assert steps == [] and (tmp_path / "run" / name / "notes.txt").read_text() == "precious"


def test_write_text_atomic_writes_a_pipe_directly_and_keeps_a_files_mode(tmp_path):
    """/dev/stdout (a pipe here) has no directory to hold a temporary: it is written as it is; a file keeps the
    permissions the user gave it."""
    child = run_child("""
        import sys
        from mcsmoe_fast.checkpoint.atomic import write_text_atomic
        write_text_atomic("/dev/stdout", '{"acc": 1.0}')
    """)
    assert child.returncode == 0 and child.stdout == '{"acc": 1.0}', child.stderr
    path = tmp_path / "results.json"
    path.write_text("old")
    path.chmod(0o640)
    write_text_atomic(path, "new")
    assert path.read_text() == "new" and path.stat().st_mode & 0o777 == 0o640


def test_ranks_putting_back_the_same_previous_checkpoint_do_not_fail(tmp_path, monkeypatch):
    """Every rank of a resumed multi-process run puts latest/ back: the ranks that lose the race go on."""
    import mcsmoe_fast.checkpoint.atomic as atomic

    target = tmp_path / "latest"
    (tmp_path / ".latest.old-0123abcd").mkdir()
    (tmp_path / ".latest.old-0123abcd" / "config.json").write_text("{}")
    real = os.rename

    def another_rank_was_first(a, b):  # the other rank's rename lands between this one's check and its rename
        real(a, b)
        raise FileNotFoundError(2, "No such file or directory", str(a))

    monkeypatch.setattr(atomic.os, "rename", another_rank_was_first)
    restore_previous(target)
    assert (target / "config.json").read_text() == "{}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest"]


def test_resumable_step_reads_a_latest_left_aside_without_moving_it(tmp_path):
    out = tmp_path / "run"
    run_tiny_job(out, steps=3)
    os.rename(out / "latest", out / ".latest.old-0123abcd")
    assert resumable_step(out) == 3
    assert not (out / "latest").exists() and (out / ".latest.old-0123abcd").is_dir()  # read-only
