"""Training: the KD loss against a plain computation, the schedule, evaluation and checkpoints, frozen
routers and teacher, the compression pruner in the loop, and resuming a run killed mid-save."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mcsmoe_fast import compress_experts, from_pretrained, moe_layers
from mcsmoe_fast.compressed import CompressedMoEExperts
from mcsmoe_fast.train import TrainConfig, kd_loss, resumable_step, train
from mcsmoe_fast.train.loop import _scheduler
from train_helpers import collate, perplexity_on, run_tiny_job, tiny_job_data, tiny_job_model

HERE = Path(__file__).parent


class Out:
    def __init__(self, logits, hidden=None):
        self.logits, self.hidden_states = logits, hidden


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("temperature,kd_lambda,task_lambda,hd_lambda", [(2.0, 0.2, 1.0, 0.0), (1.0, 1.0, 0.0, 0.5),
                                                                          (3.0, 0.7, 0.3, 0.0)])
def test_kd_loss_matches_plain_formula(causal, temperature, kd_lambda, task_lambda, hd_lambda):
    g = torch.Generator().manual_seed(3)
    B, L, V = 3, 7, 11
    s, t = torch.randn(B, L, V, generator=g), torch.randn(B, L, V, generator=g)
    labels = torch.randint(0, V, (B, L), generator=g)
    labels[0, 4:] = -100
    hs = [torch.randn(B, L, 5, generator=g) for _ in range(2)]
    ht = [torch.randn(B, L, 5, generator=g) for _ in range(2)]
    total, parts = kd_loss(Out(s, hs), Out(t, ht), labels, causal, kd_lambda, temperature, task_lambda, hd_lambda)

    rows_s, rows_t, targets = [], [], []
    for b in range(B):
        for i in range(L - 1 if causal else L):
            y = labels[b, i + 1] if causal else labels[b, i]
            if y != -100:
                rows_s.append(s[b, i]), rows_t.append(t[b, i]), targets.append(y)
    rows_s, rows_t, targets = torch.stack(rows_s), torch.stack(rows_t), torch.stack(targets)
    p_t = torch.softmax(rows_t / temperature, -1)
    kl = (p_t * (p_t.log() - torch.log_softmax(rows_s / temperature, -1))).sum(-1).mean()
    expected = task_lambda * F.cross_entropy(rows_s, targets) + kd_lambda * kl
    if hd_lambda:
        expected = expected + hd_lambda * torch.log(torch.stack([((a - b) ** 2).mean() for a, b in zip(hs, ht)]).mean())
        assert "hd" in parts
    torch.testing.assert_close(total, expected, rtol=1e-5, atol=1e-6)
    assert parts["kd"] == pytest.approx(kl.item(), rel=1e-5)


def test_schedule_warms_up_then_decays_to_zero():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=1.0)
    sched = _scheduler(opt, TrainConfig(steps=10, warmup_steps=3))
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    lrs.append(opt.param_groups[0]["lr"])
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert lrs[3:] == pytest.approx([(10 - s) / 7 for s in range(3, 11)])


@pytest.mark.parametrize("bad,match", [({"steps": 0}, "steps"), ({"temperature": 0}, "temperature"),
                                       ({"keep_ratio": 0}, "keep_ratio"), ({"mixed_precision": "fp8"}, "mixed_precision"),
                                       ({"kd_lambda": -1}, "kd_lambda")])
def test_config_refuses_bad_values(bad, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**bad)
    with pytest.raises(ValueError, match="unknown settings.*'lr'"):
        TrainConfig.from_dict({"lr": 1e-3})


def test_paper_defaults():
    c = TrainConfig()
    assert (c.adam_eps, c.adam_betas, c.weight_decay, c.warmup_steps) == (1e-6, (0.9, 0.98), 0.01, 16)
    assert (c.kd_lambda, c.temperature, c.task_lambda, c.hd_lambda) == (0.2, 2.0, 1.0, 0.0)


def test_fine_tuning_learns_evaluates_and_keeps_best_and_latest(tmp_path):
    model, result = run_tiny_job(tmp_path / "run", steps=12)
    ppl = [h["perplexity"] for h in result.history]
    assert [h["step"] for h in result.history] == [3, 6, 9, 12]
    assert ppl[-1] < 0.7 * ppl[0], ppl
    assert result.best_metric == min(ppl) and result.best_step == result.history[ppl.index(min(ppl))]["step"]
    best = from_pretrained(tmp_path / "run" / "best")
    assert perplexity_on(tiny_job_data())(best)["perplexity"] == pytest.approx(result.best_metric, rel=1e-4)
    assert json.loads((tmp_path / "run" / "best" / "trainer_state.json").read_text())["step"] == result.best_step
    latest = from_pretrained(tmp_path / "run" / "latest")
    for (name, a), b in zip(model.state_dict().items(), latest.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)
    assert resumable_step(tmp_path / "run") == 12


def test_greater_is_better_picks_the_highest(tmp_path):
    scores = iter([0.2, 0.9, 0.5, 0.4])
    model, data = tiny_job_model(), tiny_job_data()
    result = train(model, data, TrainConfig(steps=12, batch_size=8, eval_every=3, metric="accuracy",
                                            greater_is_better=True), collate_fn=collate,
                   eval_fn=lambda m: {"accuracy": next(scores)}, output_dir=tmp_path / "r", progress=False)
    assert (result.best_step, result.best_metric) == (6, 0.9)


def test_kd_freezes_routers_and_teacher(tmp_path):
    teacher, student, data = tiny_job_model(0), tiny_job_model(1), tiny_job_data()
    teacher_state = {k: v.clone() for k, v in teacher.state_dict().items()}
    routers = [layer.router_weight().detach().clone() for layer in moe_layers(student)]
    experts = [layer.expert_weights()[0].detach().clone() for layer in moe_layers(student)]
    train(student, data, TrainConfig(steps=4, batch_size=8, eval_every=0, learning_rate=1e-2), collate_fn=collate,
          teacher=teacher, progress=False)
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, teacher_state[k]), k
    for layer, r, w in zip(moe_layers(student), routers, experts):
        assert torch.equal(layer.router_weight(), r)
        assert not torch.equal(layer.expert_weights()[0], w)


def test_kd_pulls_the_student_towards_the_teacher():
    teacher, data = tiny_job_model(0), tiny_job_data()
    gaps = []
    for kd_lambda in (0.0, 1.0):
        student = tiny_job_model(1)
        train(student, data, TrainConfig(steps=10, batch_size=8, eval_every=0, learning_rate=1e-2, kd_lambda=kd_lambda,
                                         task_lambda=0.0 if kd_lambda else 1.0, temperature=1.0),
              collate_fn=collate, teacher=teacher, progress=False)
        batch = collate(data[:16])
        with torch.no_grad():
            gaps.append(F.kl_div(torch.log_softmax(student(**batch).logits, -1),
                                 torch.log_softmax(teacher(**batch).logits, -1), log_target=True,
                                 reduction="batchmean").item())
    assert gaps[1] < 0.5 * gaps[0], gaps


def test_compressed_student_is_pruned_on_schedule_and_best_is_final(tmp_path):
    model, data = tiny_job_model(), tiny_job_data()
    compress_experts(model, rank=4, keep_ratio=0.5, importance="gradient")
    config = TrainConfig(steps=12, batch_size=8, eval_every=3, keep_ratio=0.25, prune_final_warmup=3)
    result = train(model, data, config, collate_fn=collate, eval_fn=perplexity_on(data), output_dir=tmp_path / "r",
                   progress=False)
    modules = [m for m in model.modules() if isinstance(m, CompressedMoEExperts)]
    assert modules and not any(m.pruning for m in modules), "the pruner finalizes at the end"
    kept = sum(m.in_S_rows.numel() + m.out_S_rows.numel() for m in modules)
    dense = sum(m.in_U.shape[0] * (m.in_U.shape[1] * m.in_V.shape[2] + m.out_U.shape[1] * m.out_V.shape[2])
                for m in modules)
    assert kept <= 0.25 * dense + 64, (kept, dense)
    assert result.best_step is not None and result.best_step >= 9, "best only once the final keep ratio is reached"
    best = from_pretrained(tmp_path / "r" / "best")
    best_modules = [m for m in best.modules() if isinstance(m, CompressedMoEExperts)]
    assert sum(m.in_S_rows.numel() + m.out_S_rows.numel() for m in best_modules) <= 0.25 * dense + 64


def test_resume_after_kill_mid_save_reaches_the_same_model(tmp_path):
    run = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, str(HERE / "train_helpers.py"), str(run)], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert resumable_step(run) == 6, "the interrupted third save must leave the second one in place"
    best_before = (run / "best" / "mcsmoe_model.safetensors").read_bytes()
    from_pretrained(run / "best", verify=True)  # intact: the sha256 in config.json matches

    resumed, result = run_tiny_job(run, resume=True)
    uninterrupted, expected = run_tiny_job(tmp_path / "straight")
    assert result.step == expected.step == 12
    assert [h["step"] for h in result.history] == [3, 6, 9, 12]
    for (name, a), b in zip(resumed.state_dict().items(), uninterrupted.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    assert result.history[-1]["perplexity"] == pytest.approx(expected.history[-1]["perplexity"], rel=1e-4)
    if result.best_step == 6:
        assert (run / "best" / "mcsmoe_model.safetensors").read_bytes() == best_before


def test_errors_are_clear(tmp_path):
    model, data = tiny_job_model(), tiny_job_data()
    with pytest.raises(ValueError, match="resume=True needs the output_dir"):
        train(model, data, TrainConfig(steps=2, batch_size=8, eval_every=0), collate_fn=collate, resume=True)
    with pytest.raises(ValueError, match="eval_fn"):
        train(model, data, TrainConfig(steps=2, batch_size=8, eval_every=1), collate_fn=collate)
    with pytest.raises(ValueError, match="fewer than one batch"):
        train(model, data[:3], TrainConfig(steps=2, batch_size=8, eval_every=0), collate_fn=collate)
    with pytest.raises(ValueError, match="without the metric 'perplexity'"):
        train(model, data, TrainConfig(steps=2, batch_size=8, eval_every=1), collate_fn=collate,
              eval_fn=lambda m: {"ppl": 1.0})


def test_text_windows_and_perplexity_against_a_plain_loop(tmp_path):
    from mcsmoe_fast.tiny import tiny_tokenizer
    from mcsmoe_fast.train.text import Windows, perplexity, text_windows

    (tmp_path / "t.txt").write_text("the quick brown fox jumps over a lazy dog " * 20)
    windows = text_windows(tmp_path / "t.txt", tiny_tokenizer(), 9)
    assert windows.rows.shape[1] == 9 and len(windows) >= 4
    model = tiny_job_model()
    rows = tiny_job_data(n=5, length=10)
    losses = []
    with torch.no_grad():
        for r in rows:
            logits = model(input_ids=r[None]).logits[0, :-1]
            losses.append(F.cross_entropy(logits, r[1:], reduction="sum"))
    expected = torch.exp(torch.stack(losses).sum() / (5 * 9)).item()
    assert perplexity(model, torch.stack(rows), batch_size=2) == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError, match="fewer than one window"):
        Windows(torch.arange(5), 9)
    with pytest.raises(FileNotFoundError, match="no such text file"):
        text_windows(tmp_path / "missing.txt", tiny_tokenizer(), 9)
