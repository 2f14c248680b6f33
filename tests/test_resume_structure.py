"""A resume must continue the run it finds, not another: a run whose student was decomposed at one rank is not
resumed at another, or without --rank, and a run without --rank is not resumed with one (refused by the CLI before
the model is loaded; train() names the shapes that differ); a KD run is not resumed without its teacher, nor a plain
run with one (the loss would change half-way without a word)."""
import re

import pytest
import torch

import mcsmoe_fast.loading
from mcsmoe_fast import compress_experts
from mcsmoe_fast.train import TrainConfig, train
from test_cli_merge import LINES, run as cli
from test_cli_train import space  # noqa: F401  (the fixture)
from test_train_resume_fidelity import Stop, digest, stop_at
from train_helpers import collate, perplexity_on, tiny_job_data, tiny_job_model


@pytest.fixture
def merged(space, capsys):  # noqa: F811
    (space / "calib.txt").write_text("\n".join(LINES * 4))
    rc, _, err = cli(["merge", "--model", space / "mixtral", "--calib", space / "calib.txt", "--num-groups", 2,
                      "--out", space / "merged"], capsys)
    assert rc == 0, err
    return space


def finetune(space, capsys, *extra, steps=4, teacher=True):
    args = ["finetune", "--model", space / "merged", "--text", space / "train.txt", "--length", 16,
            "--batch-size", 4, "--steps", steps, "--eval-every", 2, "--warmup-steps", 1, "--lr", 1e-2,
            "--out", space / "run", *extra]
    return cli([*args, "--teacher", space / "mixtral"] if teacher else args, capsys)


def refused_before_loading(space, capsys, monkeypatch, *extra, teacher=True):
    """Resume with `extra`: the CLI's one-line error, nothing read from --model, the run's files unchanged."""
    before = digest(space / "run")
    with monkeypatch.context() as m:
        m.setattr(mcsmoe_fast.loading, "open_model", lambda *a, **k: pytest.fail("the model was loaded"))
        rc, _, err = finetune(space, capsys, "--resume", *extra, steps=8, teacher=teacher)
    assert rc == 2, err
    assert digest(space / "run") == before
    return err.strip().splitlines()[-1]


@pytest.mark.parametrize("resumed", [["--rank", "2"], []])
def test_a_rank_run_is_resumed_only_at_its_rank(merged, capsys, monkeypatch, resumed):
    rc, _, err = finetune(merged, capsys, "--rank", "4", "--keep-ratio", "0.25")
    assert rc == 0, err
    message = refused_before_loading(merged, capsys, monkeypatch, *resumed, "--keep-ratio", "0.25")
    latest = merged / "run" / "latest"
    if resumed:
        assert message.endswith(f"resume: {latest} holds a run decomposed with --rank 4, not 2: give the same --rank")
    else:
        assert message.endswith(f"resume: {latest} holds a run that pruned experts decomposed with --rank 4: give the "
                                "same --rank")
    rc, out, err = finetune(merged, capsys, "--resume", "--rank", "4", "--keep-ratio", "0.25", steps=8)
    assert rc == 0 and "trained to step 8" in out, err


def test_a_run_without_rank_is_not_resumed_with_one(merged, capsys, monkeypatch):
    rc, _, err = finetune(merged, capsys)
    assert rc == 0, err
    message = refused_before_loading(merged, capsys, monkeypatch, "--rank", "4")
    assert message.endswith(f"resume: {merged / 'run' / 'latest'} holds a run without --rank (no rows pruned): drop "
                            "--rank 4")


@pytest.mark.parametrize("first_with_teacher", [True, False])
def test_a_kd_run_is_resumed_only_with_a_teacher_and_a_plain_run_only_without(merged, capsys, monkeypatch,
                                                                               first_with_teacher):
    rc, _, err = finetune(merged, capsys, teacher=first_with_teacher)
    assert rc == 0, err
    message = refused_before_loading(merged, capsys, monkeypatch, teacher=not first_with_teacher)
    change = ("a --teacher distilled into the saved run, none is given now" if first_with_teacher else
              "the saved run had no --teacher, one is given now")
    assert f"holds a run with other settings: {change}; resume with the saved settings" in message
    rc, out, err = finetune(merged, capsys, "--resume", steps=8, teacher=first_with_teacher)
    assert rc == 0 and "trained to step 8" in out, err


def decomposed(rank):
    model = tiny_job_model()
    compress_experts(model, rank=rank, keep_ratio=0.5, importance="gradient", svd="exact", progress=False)
    return model


def job(tmp_path, model, teacher=None, **kwargs):
    data = tiny_job_data()
    config = TrainConfig(steps=6, batch_size=8, eval_every=3, learning_rate=1e-3, warmup_steps=0, keep_ratio=0.5,
                         prune_initial_warmup=0, prune_final_warmup=0)
    return train(model, data, config, collate_fn=collate, eval_fn=perplexity_on(data), output_dir=tmp_path,
                 progress=False, teacher=teacher, **kwargs)


def test_train_names_the_shapes_of_a_student_decomposed_at_another_rank(tmp_path):
    with pytest.raises(Stop):
        job(tmp_path, decomposed(4), callback=stop_at(3))
    before = digest(tmp_path)
    with pytest.raises(ValueError, match=re.escape(f"resume: {tmp_path / 'latest'} holds a student of other shapes (")
                       + r".*in_U \[\d+, \d+, 4\] there, \[\d+, \d+, 2\] now.*" + re.escape(
                           "): resume with the model, and the decomposition rank, the run started from")):
        job(tmp_path, decomposed(2), resume=True)
    assert digest(tmp_path) == before


@pytest.mark.parametrize("first_with_teacher", [True, False])
def test_train_refuses_a_resume_that_adds_or_drops_the_teacher(tmp_path, first_with_teacher):
    torch.manual_seed(0)
    teacher = tiny_job_model()
    with pytest.raises(Stop):
        job(tmp_path, tiny_job_model(), teacher if first_with_teacher else None, callback=stop_at(3))
    change = ("a teacher distilled into the saved run, none is given now" if first_with_teacher else
              "the saved run had no teacher, one is given now")
    with pytest.raises(ValueError, match=re.escape(f"holds a run with other settings: {change}; resume")):
        job(tmp_path, tiny_job_model(), None if first_with_teacher else teacher, resume=True)
    job(tmp_path, tiny_job_model(), teacher if first_with_teacher else None, resume=True)  # the same run resumes
