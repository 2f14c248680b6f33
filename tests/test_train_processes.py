"""Training with more than one process (two CPU processes under torchrun, gloo; train/processes.py): a run of
2 processes x batch 4 trains as one process on batch 8 (schedule, weights, recorded loss); a resume continues on
as many processes as the run was trained by, each with its own random state; a Switch model whose experts some
process's tokens never reach trains; a launch accelerate did not join and data short of one global batch are
refused by name."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from processes_worker import job

HERE = Path(__file__).parent
pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="torch built without torch.distributed / gloo")


def torchrun(*args, cpu: bool = True, script=HERE / "processes_worker.py"):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k != "ACCELERATE_USE_CPU"}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(HERE), env.get("PYTHONPATH", "")]))
    if cpu:
        env["ACCELERATE_USE_CPU"] = "true"  # accelerate joins a torchrun launch on CPUs only with it
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           str(script), *map(str, args)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def records(path):
    return [torch.load(f"{path}.rank{r}") for r in (0, 1)]


def max_difference(a: dict, b: dict) -> float:
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    """A 2-process run of 6 steps, batch 4 each, and the 1-process run of batch 8 on the same data."""
    root = tmp_path_factory.mktemp("processes")
    proc = torchrun(root / "two", root / "two.pt", 4)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return root, records(root / "two.pt"), job(root / "one", 8)


def test_two_processes_train_as_one_process_on_the_global_batch(two_processes):
    _, (rank0, rank1), one = two_processes
    warmup, steps, lr = 2, 6, 5e-3  # processes_worker's schedule: linear warm-up, then linear decay to 0
    expected = [lr * ((s + 1) / (warmup + 1) if s < warmup else (steps - s) / (steps - warmup)) for s in range(steps)]
    for rank in (rank0, rank1):
        assert rank["lrs"] == pytest.approx(expected, rel=1e-12, abs=0)  # once per optimizer step, not per process
        assert max_difference(rank["state"], one["state"]) < 1e-5
        # the recorded loss is the global batch's (the mean over the processes), not the process's own part
        assert [h["loss"] for h in rank["history"]] == pytest.approx([h["loss"] for h in one["history"]], rel=1e-5)
    assert one["lrs"] == pytest.approx(expected, rel=1e-12, abs=0)


LOSSES = {"fine-tuning": ["--padded"], "kd-task": ["--padded", "--kd"], "kd-hidden": ["--kd", "--hidden"]}


@pytest.mark.parametrize("kind", sorted(LOSSES))
def test_the_losses_are_the_global_batch_s(tmp_path, kind):
    """Batches padded to their longest example: the processes' parts hold different numbers of target tokens, so
    per-process means weighted them unequally (fine-tuning's own loss, KD's task term); KD's hidden-state term is
    the log of the global batch's mean squared error, not the mean of the processes' logs (unpadded batches: the
    padding positions' states depend on how far each part is padded)."""
    options = LOSSES[kind]
    proc = torchrun(tmp_path / "two", tmp_path / "two.pt", 4, *options)
    assert proc.returncode == 0, proc.stderr[-4000:]
    one = job(tmp_path / "one", 8, padded="--padded" in options, kd="--kd" in options, hidden="--hidden" in options)
    for rank in records(tmp_path / "two.pt"):
        assert max_difference(rank["state"], one["state"]) < 1e-5
        assert [h["loss"] for h in rank["history"]] == pytest.approx([h["loss"] for h in one["history"]], rel=1e-5)


def test_a_resume_on_another_process_count_is_refused(two_processes):
    root, _, _ = two_processes
    with pytest.raises(ValueError, match=r"resume: .*latest holds a run trained by 2 process\(es\), 1 now: resume it "
                                         r"on 2"):
        job(root / "two", 4, steps=8, resume=True)


def test_a_resumed_run_continues_each_process_s_random_state(tmp_path):
    """Dropout on batches padded to their longest example: the processes draw different numbers of values, so
    their random states differ at a checkpoint; a resume gives each its own and ends where the uninterrupted run
    ends."""
    for args in ((tmp_path / "full", tmp_path / "full.pt", 4, "--steps", 8, "--dropout"),
                 (tmp_path / "run", tmp_path / "part.pt", 4, "--steps", 8, "--dropout", "--stop-at", 4),
                 (tmp_path / "run", tmp_path / "resumed.pt", 4, "--steps", 8, "--dropout", "--resume")):
        proc = torchrun(*args)
        assert proc.returncode == 0, proc.stderr[-4000:]
    full, part, resumed = (records(tmp_path / f"{n}.pt")[0] for n in ("full", "part", "resumed"))
    assert max_difference(full["state"], part["state"]) > 1e-4  # steps 5-8 moved the weights
    assert max_difference(full["state"], resumed["state"]) == 0


def test_a_launch_accelerate_did_not_join_is_refused(tmp_path):
    proc = torchrun(tmp_path / "run", tmp_path / "r.pt", 4, cpu=False)
    assert proc.returncode != 0
    assert "WORLD_SIZE=2, but accelerate runs 1 process(es)" in proc.stderr and "ACCELERATE_USE_CPU=true" in proc.stderr
    assert not (tmp_path / "run" / "latest").exists()


def test_data_short_of_one_global_batch_is_refused(tmp_path):
    proc = torchrun(tmp_path / "run", tmp_path / "r.pt", 4, "--examples", 6)
    assert proc.returncode != 0
    assert ("train_data has 6 examples, fewer than one global batch of 8 (batch_size 4 x 2 processes)"
            in proc.stderr), proc.stderr[-3000:]


def test_a_switch_model_whose_experts_some_tokens_never_reach_trains(tmp_path):
    """transformers' Switch block runs only the experts its tokens reach: most decoder experts get no gradient from
    a process's part of a batch of short targets, which DDP refused at the next step unless told."""
    script = tmp_path / "switch_worker.py"
    script.write_text(
        "import torch\n"
        "from mcsmoe_fast.tiny import tiny_switch\n"
        "from mcsmoe_fast.train import TrainConfig, train\n"
        "torch.set_num_threads(1)\n"
        "g = torch.Generator().manual_seed(0)\n"
        "data = [(torch.randint(2, 128, (10,), generator=g), torch.randint(2, 128, (2,), generator=g))\n"
        "        for _ in range(24)]\n"
        "def collate(rows):\n"
        "    return {'input_ids': torch.stack([r[0] for r in rows]), 'labels': torch.stack([r[1] for r in rows])}\n"
        "result = train(tiny_switch(), data, TrainConfig(steps=4, batch_size=3, eval_every=0, warmup_steps=1),\n"
        "               collate_fn=collate, progress=False)\n"
        "assert result.step == 4\n")
    proc = torchrun(script=script)
    assert proc.returncode == 0, proc.stderr[-4000:]


def test_a_run_saved_with_the_schedule_stepped_per_process_resumes_on_its_steps_schedule(tmp_path):
    """Runs saved by N processes before the loop stepped the schedule itself hold last_epoch = N x step: the resume
    takes the step's schedule (it took factor(N x step): 0 past half the run)."""
    import json

    from mcsmoe_fast.train.state import STATE_JSON

    full = job(tmp_path / "full", 8)
    job(tmp_path / "run", 8, stop_at=2)
    state = tmp_path / "run" / "latest" / STATE_JSON
    record = json.loads(state.read_text())
    assert record["scheduler"]["last_epoch"] == 2
    record["scheduler"]["last_epoch"] = 4  # as 2 processes recorded it
    state.write_text(json.dumps(record))
    resumed = job(tmp_path / "run", 8, resume=True)
    assert resumed["lrs"] == pytest.approx(full["lrs"][2:], rel=1e-12, abs=0)
    assert max_difference(resumed["state"], full["state"]) == 0


class _OtherProcess:
    """Across for a test in one process: another process holding `others` of each summed quantity."""

    def __init__(self, others: float):
        self.processes, self.others = 2, others

    def sum(self, tensor):
        return tensor + self.others


def test_fine_tuning_loss_weights_the_model_s_own_by_the_process_s_share_of_target_tokens():
    from types import SimpleNamespace

    from mcsmoe_fast.train.losses import fine_tuning_loss, task_loss

    logits = torch.randn(2, 5, 11, requires_grad=True)
    labels = torch.randint(0, 11, (2, 5))
    labels[1, 3:] = -100  # 4 + 2 = 6 target tokens after the causal shift
    own = task_loss(logits, labels, True)
    out = SimpleNamespace(loss=own, logits=logits)
    got = fine_tuning_loss(out, labels, True, _OtherProcess(10.0))
    assert got.item() == pytest.approx(own.item() * 6 * 2 / 16, rel=1e-6)
    assert fine_tuning_loss(out, labels, True) is own  # one process: the model's own loss as it is
    none = torch.full_like(labels, -100)  # a part without a target token: nothing, not NaN
    empty = fine_tuning_loss(SimpleNamespace(loss=task_loss(logits, none, True), logits=logits), none, True,
                             _OtherProcess(10.0))
    assert empty.item() == 0 and empty.requires_grad
    empty.backward()
    assert torch.count_nonzero(logits.grad) == 0


def test_equal_hidden_states_give_minus_infinity_across_processes_as_in_one():
    from types import SimpleNamespace

    from mcsmoe_fast.train.losses import hidden_loss

    states = [torch.randn(2, 3, 4) for _ in range(3)]
    out = SimpleNamespace(hidden_states=states)
    assert hidden_loss(out, out).item() == float("-inf")
    assert hidden_loss(out, out, _OtherProcess(0.0)).item() == float("-inf")  # was 0 / 0 = NaN: no hint
