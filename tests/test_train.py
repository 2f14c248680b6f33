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
from mcsmoe_fast.modules.compressed import CompressedMoEExperts
from mcsmoe_fast.train import TrainConfig, kd_loss, resumable_step, train
from mcsmoe_fast.pruner import CompressionPruner
from mcsmoe_fast.tiny import tiny_moe
from mcsmoe_fast.train.loop import _optimizer, _scheduler
from train_helpers import collate, perplexity_on, run_tiny_job, tiny_job_data, tiny_job_model

HERE = Path(__file__).parent


class Out:
    def __init__(self, logits, hidden=None, encoder_hidden=None, decoder_hidden=None):
        self.logits, self.hidden_states = logits, hidden
        self.encoder_hidden_states, self.decoder_hidden_states = encoder_hidden, decoder_hidden


def original_kd_term(student_logits, teacher_logits, temperature):
    """The original's KD term, transcribed: KLDivLoss(batchmean) over the whole [B, L, V] logits."""
    criterion = torch.nn.KLDivLoss(reduction="batchmean")
    return criterion(F.log_softmax(student_logits / temperature, dim=-1), F.softmax(teacher_logits / temperature, dim=-1))


def original_hidden_term(student_states, teacher_states):
    """The original's hidden-state MSE, transcribed: stacked states after the embeddings, mean MSE."""
    return torch.nn.MSELoss(reduction="none")(torch.stack(student_states[1:]), torch.stack(teacher_states[1:])).mean()


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("temperature,kd_lambda,task_lambda,hd_lambda", [(2.0, 0.2, 1.0, 0.0), (1.0, 1.0, 0.0, 0.5),
                                                                          (3.0, 0.7, 0.3, 0.0)])
def test_kd_loss_is_the_original_formula(causal, temperature, kd_lambda, task_lambda, hd_lambda):
    """The KD term is the original's batchmean over [B, L, V] (summed over positions, divided by B), with
    padding positions left out: where the teacher equals the student at every padding position, the two
    are equal. Encoder-decoder models average the encoder's and decoder's hidden-state MSEs."""
    g = torch.Generator().manual_seed(3)
    B, L, V = 4, 8, 11
    s, t = torch.randn(B, L, V, generator=g), torch.randn(B, L, V, generator=g)
    labels = torch.randint(0, V, (B, L), generator=g)
    for b, n in enumerate((2, 3, 8, 5)):  # target tokens per sequence, padding after them
        labels[b, n:] = -100
    padding = labels == -100
    if causal:  # position t predicts labels[t + 1]: the last position and those before padding are no targets
        padding = torch.cat([padding[:, 1:], torch.ones(B, 1, dtype=torch.bool)], dim=1)
    t = torch.where(padding.unsqueeze(-1), s, t)
    states = [torch.randn(B, L, 5, generator=g) for _ in range(6)]
    if causal:
        out_s, out_t = Out(s, hidden=states[:3]), Out(t, hidden=states[3:])
        hidden = original_hidden_term(states[:3], states[3:])
    else:
        out_s, out_t = Out(s, encoder_hidden=states[:2], decoder_hidden=states[2:4]), \
            Out(t, encoder_hidden=states[4:5] + states[1:2], decoder_hidden=states[5:6] + states[0:1])
        hidden = (original_hidden_term(states[:2], states[4:5] + states[1:2])
                  + original_hidden_term(states[2:4], states[5:6] + states[0:1])) / 2
    total, parts = kd_loss(out_s, out_t, labels, causal, kd_lambda, temperature, task_lambda, hd_lambda)

    kd = original_kd_term(s, t, temperature)
    if causal:
        task = F.cross_entropy(s[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1), ignore_index=-100)
    else:
        task = F.cross_entropy(s.reshape(-1, V), labels.reshape(-1), ignore_index=-100)
    expected = task_lambda * task + kd_lambda * kd + (hd_lambda * torch.log(hidden) if hd_lambda else 0)
    torch.testing.assert_close(total, expected, rtol=1e-5, atol=1e-6)
    assert parts["kd"] == pytest.approx(kd.item(), rel=1e-5)
    assert ("hd" in parts) == bool(hd_lambda)
    if hd_lambda:
        assert parts["hd"] == pytest.approx(torch.log(hidden).item(), rel=1e-5)


def test_kd_term_leaves_padding_out_and_scales_with_target_tokens():
    """Padding positions add nothing, whatever the teacher says there; the term grows with the number of
    target tokens (a sum over them divided by the batch size, not a mean over them)."""
    g = torch.Generator().manual_seed(0)
    B, L, V = 2, 6, 7
    s, t = torch.randn(B, L, V, generator=g), torch.randn(B, L, V, generator=g)
    labels = torch.randint(0, V, (B, L), generator=g)
    labels[:, 3:] = -100
    base = kd_loss(Out(s), Out(t), labels, False, 1.0, 2.0, 0.0, 0.0)[1]["kd"]
    t2 = t.clone()
    t2[:, 3:] = torch.randn(B, L - 3, V, generator=g) * 10
    assert kd_loss(Out(s), Out(t2), labels, False, 1.0, 2.0, 0.0, 0.0)[1]["kd"] == pytest.approx(base, rel=1e-6)
    per_token = F.kl_div(F.log_softmax(s[:, :3] / 2, -1), F.log_softmax(t[:, :3] / 2, -1), log_target=True,
                         reduction="none").sum(-1)
    assert base == pytest.approx(per_token.sum().item() / B, rel=1e-5)
    assert base == pytest.approx(3 * per_token.mean().item(), rel=1e-5)


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
    assert (c.adam_betas, c.weight_decay, c.warmup_steps) == ((0.9, 0.98), 0.01, 16)
    assert (c.optimizer_eps(distilling=True), c.optimizer_eps(distilling=False)) == (1e-6, 1e-8)
    assert TrainConfig(adam_eps=3e-7).optimizer_eps(distilling=False) == 3e-7
    assert (c.kd_lambda, c.temperature, c.task_lambda, c.hd_lambda, c.train_routers) == (0.2, 2.0, 1.0, 0.0, False)


@pytest.mark.parametrize("settings,warmups", [
    ({"steps": 1000, "warmup_steps": 50}, (50, 200)),  # the original's post-merging run: 1x and 4x the warm-up
    ({"steps": 1000}, (16, 64)),
    ({"steps": 100, "warmup_steps": 20}, (10, 40)),  # 20 + 80 leave no pruning stretch: half the run, same shares
    ({"steps": 100, "warmup_steps": 20, "prune_initial_warmup": 3}, (3, 80)),  # explicit values taken as they are
    ({"steps": 100, "prune_final_warmup": 0}, (16, 0)),
    ({"steps": 12, "prune_final_warmup": 3}, (5, 3)),  # only the defaulted one is scaled
])
def test_pruning_warmups_default_to_one_and_four_lr_warmups(settings, warmups):
    assert TrainConfig(**settings).pruning_warmups() == warmups


def _kept_share(model) -> float:
    modules = [m for m in model.modules() if isinstance(m, CompressedMoEExperts)]
    kept = sum(int(m.in_keep.sum()) * m.in_S_rows.shape[1] + int(m.out_keep.sum()) * m.out_S_rows.shape[1]
               for m in modules)
    return kept / sum(m.in_S_rows.numel() + m.out_S_rows.numel() for m in modules)


def test_training_prunes_on_the_default_warmups():
    """warmup_steps=2 over 12 steps: nothing pruned for 2 steps, the cubic ramp, then 8 steps at keep_ratio."""
    model, data = tiny_job_model(), tiny_job_data()
    compress_experts(model, rank=4, keep_ratio=0.5, importance="gradient", progress=False)
    shares = []
    train(model, data, TrainConfig(steps=12, batch_size=8, eval_every=1, warmup_steps=2, keep_ratio=0.25),
          collate_fn=collate, eval_fn=lambda m: {"perplexity": 1.0},
          callback=lambda m, r: shares.append(_kept_share(m)), progress=False)
    expected = [1.0, 1.0, 0.25 + 0.75 * 0.5 ** 3] + [0.25] * 9
    assert shares == pytest.approx(expected, abs=0.03), shares


def test_kd_runs_the_student_in_eval_mode_and_fine_tuning_in_train_mode():
    teacher, data = tiny_job_model(0), tiny_job_data()
    for with_teacher, expected in ((True, False), (False, True)):
        student, modes = tiny_job_model(1), []
        student.register_forward_pre_hook(lambda m, args: modes.append(m.training))
        train(student, data, TrainConfig(steps=3, batch_size=8, eval_every=2), collate_fn=collate,
              eval_fn=lambda m: {"perplexity": 1.0}, teacher=teacher if with_teacher else None, progress=False)
        assert modes and set(modes) == {expected}, (with_teacher, modes)


@pytest.mark.parametrize("train_routers", [False, True])
def test_fine_tuning_freezes_the_routers_unless_asked(train_routers):
    model, data = tiny_moe("gpt_oss", num_experts=4, hidden_size=32, intermediate_size=24), tiny_job_data()
    routers = {n: p.detach().clone() for n, p in model.named_parameters() if ".router." in n}
    assert any(n.endswith("router.bias") for n in routers)
    train(model, data, TrainConfig(steps=3, batch_size=8, eval_every=0, learning_rate=1e-2,
                                   train_routers=train_routers), collate_fn=collate, progress=False)
    changed = {n for n, p in model.named_parameters() if n in routers and not torch.equal(p, routers[n])}
    assert changed == (set(routers) if train_routers else set()), changed


def test_weight_decay_skips_biases_norms_and_stacked_expert_biases():
    model = tiny_moe("gpt_oss", num_experts=4, hidden_size=32, intermediate_size=24)
    compress_experts(model, rank=4, keep_ratio=0.5, layers=[0], importance="weight", progress=False)
    opt = _optimizer(model, TrainConfig(weight_decay=0.1, train_routers=True), distilling=False)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    not_decayed = {names[id(p)] for g in opt.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    stacked = [n for n in not_decayed if n.endswith("_bias") and dict(model.named_parameters())[n].dim() == 2]
    assert len(stacked) >= 2, not_decayed  # the dense layer's [E, F] biases and the compressed module's [S, F]
    assert not any(n.endswith("bias") or "norm" in n for n in decayed), decayed
    assert {"model.embed_tokens.weight", "model.layers.1.mlp.experts.gate_up_proj"} <= decayed
    assert opt.param_groups[0]["eps"] == 1e-8


def test_checkpointed_optimizer_uses_the_recipes_eps(tmp_path):
    teacher, data = tiny_job_model(0), tiny_job_data()
    for name, kwargs, eps in (("ft", {}, 1e-8), ("kd", {"teacher": teacher}, 1e-6)):
        train(tiny_job_model(1), data, TrainConfig(steps=2, batch_size=8, eval_every=2), collate_fn=collate,
              eval_fn=lambda m: {"perplexity": 1.0}, output_dir=tmp_path / name, progress=False, **kwargs)
        groups = json.loads((tmp_path / name / "latest" / "trainer_state.json").read_text())["optimizer"]["param_groups"]
        assert {g["eps"] for g in groups} == {eps}, name


def test_pruner_never_takes_a_non_finite_score():
    """An overflowed step (inf/NaN gradients) leaves the EMA as it was; the rows kept at the end are the
    most important ones, not the first in storage order."""
    model = tiny_job_model()
    compress_experts(model, rank=4, keep_ratio=0.5, importance="gradient", progress=False)
    pruner = CompressionPruner(model, keep_ratio=0.5, total_steps=4, initial_warmup=0, final_warmup=0)
    mats = [getattr(m, f"{side}_S_rows") for m in pruner.modules for side in ("in", "out")]
    g = torch.Generator().manual_seed(0)
    importance = [torch.rand(r.shape[0], generator=g) + 0.1 for r in mats]  # a known score per row
    for rows, score in zip(mats, importance):
        rows.data.fill_(1.0)
        rows.grad = score[:, None].expand_as(rows).clone()
    pruner.step()
    before = [e.clone() for e in pruner.ema]
    mats[0].grad[0, 0] = float("inf")
    mats[1].grad[1, 0] = float("nan")
    pruner.step()
    assert pruner.skipped == 1
    for e, b in zip(pruner.ema, before):
        assert torch.equal(e, b) and torch.isfinite(e).all()
    pruner.step(update_scores=False)  # what the loop does on a step the optimizer skipped
    assert pruner.skipped == 1 and all(torch.equal(e, b) for e, b in zip(pruner.ema, before))
    pruner.step()
    scores = torch.cat(importance)
    kept = torch.cat([getattr(m, f"{side}_keep") for m in pruner.modules for side in ("in", "out")])
    threshold = scores.sort(descending=True).values[int(kept.sum()) - 1]
    assert torch.equal(kept, scores >= threshold)


def test_loop_does_not_score_steps_the_optimizer_skipped(monkeypatch):
    import accelerate

    model, data = tiny_job_model(), tiny_job_data()
    compress_experts(model, rank=4, keep_ratio=0.5, importance="gradient", progress=False)
    calls, step = [], {"n": 0}
    real_step = CompressionPruner.step

    def record(self, update_scores=True):
        calls.append(update_scores)
        return real_step(self, update_scores)

    def skipped(self):
        step["n"] += 1
        return step["n"] == 2

    scheduled = []
    real_lambda = torch.optim.lr_scheduler.LambdaLR.step

    def count(self, *args):
        scheduled.append(1)
        return real_lambda(self, *args)
    monkeypatch.setattr(CompressionPruner, "step", record)
    monkeypatch.setattr(accelerate.Accelerator, "optimizer_step_was_skipped", property(skipped))
    monkeypatch.setattr(torch.optim.lr_scheduler.LambdaLR, "step", count)
    train(model, data, TrainConfig(steps=4, batch_size=8, eval_every=0, prune_initial_warmup=0, prune_final_warmup=0),
          collate_fn=collate, progress=False)
    assert calls == [True, False, True, True]
    assert len(scheduled) == 1 + 3  # the schedule's initial step, then once per step taken (the skipped one not)


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
