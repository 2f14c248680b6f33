"""mcsmoe_fast/train behaviours that no other test checked, each seen unnoticed under a one-line mutation
(benchmarks/MUTATION.md). Expected values are computed here independently, on tiny models and tensors."""
import json
import re
import types
import warnings

import pytest
import torch
import torch.nn.functional as F

from mcsmoe_fast import compress_experts
from mcsmoe_fast.tiny import tiny_mixtral, tiny_moe, tiny_switch
from mcsmoe_fast.train import TrainConfig, freeze_routers, kd_divergence, kd_loss, resumable_step, task_loss, train
from mcsmoe_fast.train.losses import hidden_loss
from mcsmoe_fast.train.state import read_progress
from mcsmoe_fast.train.text import Windows, perplexity
from train_helpers import collate, run_tiny_job, tiny_job_data, tiny_job_model


def exact(message):
    return "^" + re.escape(message) + "$"


class Out:
    def __init__(self, logits, hidden=None):
        self.logits, self.hidden_states = logits, hidden


# --- text.py ----------------------------------------------------------------------------------------------
def test_windows_cut_non_overlapping_rows_down_to_the_smallest_sizes():
    w = Windows(torch.arange(20), 6)
    assert len(w) == 3 and torch.equal(w[2], torch.arange(12, 18))
    assert len(Windows(torch.arange(6), 6)) == 1  # exactly one window of tokens
    assert len(Windows(torch.arange(5), 2)) == 2  # the shortest window: one next-token target
    with pytest.raises(ValueError, match=exact("window length must be >= 2, got 1")):
        Windows(torch.arange(5), 1)
    with pytest.raises(ValueError, match=exact("5 tokens are fewer than one window of 6")):
        Windows(torch.arange(5), 6)


def plain_perplexity(model, windows):
    with torch.no_grad():
        logits = model(input_ids=windows).logits[:, :-1]
        return torch.exp(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1))).item()


def test_perplexity_of_two_token_windows():
    model = tiny_job_model()
    windows = torch.randint(0, 40, (5, 2), generator=torch.Generator().manual_seed(0))
    assert perplexity(model, windows, batch_size=2) == pytest.approx(plain_perplexity(model, windows), rel=1e-5)


def test_perplexity_runs_batches_of_32_windows_by_default():
    model = tiny_job_model()
    sizes = []
    model.register_forward_pre_hook(lambda module, args, kwargs: sizes.append(kwargs["input_ids"].shape[0]),
                                    with_kwargs=True)
    windows = torch.randint(0, 40, (40, 4), generator=torch.Generator().manual_seed(1))
    assert perplexity(model, windows) == pytest.approx(plain_perplexity(model, windows), rel=1e-5)
    assert sizes == [32, 8] + [40]  # the last call is plain_perplexity's own


@pytest.mark.parametrize("shape", [(0, 5), (3, 1), (5,), (2, 3, 4)])
def test_perplexity_refuses_windows_it_cannot_score(shape):
    with pytest.raises(ValueError, match=exact(f"perplexity needs windows [N >= 1, L >= 2], got {shape}")):
        perplexity(tiny_job_model(), torch.zeros(shape, dtype=torch.long))


def test_perplexity_of_one_window():
    model = tiny_job_model()
    window = torch.randint(0, 40, (1, 6), generator=torch.Generator().manual_seed(2))
    assert perplexity(model, window) == pytest.approx(plain_perplexity(model, window), rel=1e-5)


# --- losses.py --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("causal", [True, False])
def test_task_loss_is_the_cross_entropy_over_the_target_tokens(causal):
    g = torch.Generator().manual_seed(3)
    B, L, V = 3, 7, 11
    logits, labels = torch.randn(B, L, V, generator=g), torch.randint(0, V, (B, L), generator=g)
    labels[0, 4:] = -100
    labels[2, :2] = -100
    rows, targets = (logits[:, :-1], labels[:, 1:]) if causal else (logits, labels)
    pairs = [(rows[b, t], targets[b, t]) for b in range(B) for t in range(rows.shape[1]) if targets[b, t] != -100]
    want = torch.stack([-F.log_softmax(r.double(), -1)[y] for r, y in pairs]).mean()
    got = task_loss(logits.bfloat16(), labels, causal)
    assert got.dtype == torch.float32  # computed in float32 from half-precision logits
    torch.testing.assert_close(task_loss(logits, labels, causal).double(), want, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(got.double(), want, rtol=2e-2, atol=1e-3)


@pytest.mark.parametrize("shape", [(6, 9), (2, 3, 9)])
def test_kd_divergence_takes_the_softmax_over_the_vocabulary_without_warnings(shape):
    """Rows [..., V] ([N, V], or [B, L, V] logits as they are): the tempered distributions are over V, the last
    dimension (losses.py `kd_divergence` 7, 15 of session 30: dim 1 is V only for 2-D rows). An implicit softmax
    dimension (deprecated in torch) would warn at every step."""
    g = torch.Generator().manual_seed(4)
    s, t = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = kd_divergence(s, t, 2.0, batch_size=3)
    p, q = F.softmax(t.double() / 2, -1), F.softmax(s.double() / 2, -1)
    torch.testing.assert_close(got.double(), (p * (p.log() - q.log())).sum() / 3, rtol=1e-5, atol=1e-7)


def test_hidden_loss_of_a_decoder_only_model_output():
    """A causal LM's output has no encoder_hidden_states attribute at all: the hidden-state loss of two real
    model outputs is log(MSE) over the states after the embeddings."""
    student, teacher = tiny_job_model(0), tiny_job_model(1)
    ids = torch.randint(0, 40, (2, 6), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        out_s, out_t = student(input_ids=ids, output_hidden_states=True), teacher(input_ids=ids, output_hidden_states=True)
    assert not hasattr(out_s, "encoder_hidden_states")
    pairs = list(zip(out_s.hidden_states, out_t.hidden_states))[1:]
    mse = sum(((a.double() - b.double()) ** 2).sum() for a, b in pairs) / sum(a.numel() for a, _ in pairs)
    torch.testing.assert_close(hidden_loss(out_s, out_t).double(), mse.log(), rtol=1e-5, atol=1e-6)


def test_hidden_loss_needs_a_state_after_the_embeddings():
    x = torch.zeros(1, 2, 3)
    with pytest.raises(ValueError, match=exact(
            "the hidden-state loss needs at least one hidden state after the embeddings")):
        hidden_loss(Out(x, hidden=[x]), Out(x, hidden=[x]))


def test_kd_loss_reports_its_parts_by_name():
    g = torch.Generator().manual_seed(6)
    s, t = torch.randn(2, 5, 7, generator=g), torch.randn(2, 5, 7, generator=g)
    states = [torch.randn(2, 5, 3, generator=g) for _ in range(4)]
    labels = torch.randint(0, 7, (2, 5), generator=g)
    total, parts = kd_loss(Out(s, states[:2]), Out(t, states[2:]), labels, True, 0.5, 2.0, 0.25, 0.125)
    assert sorted(parts) == ["hd", "kd", "task"]
    want = 0.25 * parts["task"] + 0.5 * parts["kd"] + 0.125 * parts["hd"]
    assert total.item() == pytest.approx(want, rel=1e-6)
    assert parts["task"] == pytest.approx(task_loss(s, labels, True).item(), rel=1e-6)


# --- config.py --------------------------------------------------------------------------------------------
def test_only_the_defaulted_warm_up_is_scaled_and_stays_a_whole_step_count():
    """steps=12, warm-up 4: the default final warm-up (16) and the given initial one (5) leave no pruning
    stretch; only the final one is scaled, 16 * 12 // (2 * 21) = 4 steps (an int, not 4.57)."""
    warmups = TrainConfig(steps=12, warmup_steps=4, prune_initial_warmup=5).pruning_warmups()
    assert warmups == (5, 4) and all(type(w) is int for w in warmups)
    warmups = TrainConfig(steps=12, warmup_steps=4, prune_final_warmup=10).pruning_warmups()
    assert warmups == (1, 10) and all(type(w) is int for w in warmups)  # 4 * 12 // 28


@pytest.mark.parametrize("settings, message", [
    (dict(batch_size=0), "batch_size must be >= 1, got 0"),
    (dict(learning_rate=0.0), "learning_rate must be > 0, got 0.0"),
    (dict(warmup_steps=-1), "warmup_steps and eval_every must be >= 0"),
    (dict(eval_every=-1), "warmup_steps and eval_every must be >= 0"),
    (dict(task_lambda=-0.1), "kd_lambda, task_lambda and hd_lambda must be >= 0"),
    (dict(hd_lambda=-0.1), "kd_lambda, task_lambda and hd_lambda must be >= 0"),
    (dict(adam_eps=0.0), "adam_eps must be > 0, got 0.0"),
    (dict(prune_final_warmup=-1), "prune_initial_warmup and prune_final_warmup must be >= 0"),
    (dict(steps=0, batch_size=0), "steps must be >= 1, got 0; batch_size must be >= 1, got 0"),
])
def test_each_bad_setting_is_refused_by_name_and_all_at_once(settings, message):
    """One message for all the problems, each named (config.py `__post_init__` survivors of session 30)."""
    with pytest.raises(ValueError, match=exact("TrainConfig: " + message)):
        TrainConfig(**settings)


def test_the_smallest_good_settings_are_taken():
    config = TrainConfig(steps=1, batch_size=1, learning_rate=1e-12, warmup_steps=0, eval_every=0, kd_lambda=0.0,
                         task_lambda=0.0, hd_lambda=0.0, adam_eps=1e-30, prune_initial_warmup=0, prune_final_warmup=0,
                         mixed_precision="fp16", adam_betas=[0.8, 0.9])
    assert (config.batch_size, config.mixed_precision, config.adam_betas) == (1, "fp16", (0.8, 0.9))


# --- loop.py: a tiny job whose batches are all the same -------------------------------------------------
def same_rows(n=8, length=10, seed=7):
    row = torch.randint(3, 40, (length,), generator=torch.Generator().manual_seed(seed))
    return [row.clone() for _ in range(n)]


def run(model, data, teacher=None, **settings):
    base = dict(steps=1, batch_size=8, eval_every=1, learning_rate=1e-3, warmup_steps=0)
    return train(model, data, TrainConfig(**(base | settings)), collate_fn=collate,
                 eval_fn=lambda m: {"perplexity": 1.0}, teacher=teacher, progress=False)


@pytest.mark.parametrize("family", ["mixtral", "switch"])
@pytest.mark.parametrize("hd_lambda", [0.0, 0.5])
def test_the_first_kd_loss_is_kd_loss_of_the_batch(family, hd_lambda):
    """Every batch is the same, so the loss recorded after step 1 is kd_loss of that batch with the initial
    student (in eval mode) and the teacher: causal for Mixtral (position t predicts label t + 1), not for
    Switch (an encoder-decoder); with hd_lambda the hidden states of both are asked for (student and teacher
    differ: were they equal, log(MSE) would be -inf and stop the run)."""
    def make(seed):
        if family == "mixtral":
            return tiny_mixtral(num_experts=4, hidden_size=32, intermediate_size=48, num_layers=2, seed=seed)
        return tiny_switch(num_experts=4, d_model=16, d_ff=24, num_layers=2, seed=seed)

    student, teacher, data = make(1), make(0), same_rows()
    batch = collate(data)
    with torch.no_grad():
        want, _ = kd_loss(student.eval()(**batch, output_hidden_states=bool(hd_lambda)),
                          teacher.eval()(**batch, output_hidden_states=bool(hd_lambda)), batch["labels"],
                          family == "mixtral", 0.5, 2.0, 0.7, hd_lambda)
    result = run(student, data, teacher, kd_lambda=0.5, temperature=2.0, task_lambda=0.7, hd_lambda=hd_lambda)
    assert result.history[0]["loss"] == pytest.approx(want.item(), rel=1e-5)


@pytest.mark.parametrize("with_teacher, hd_lambda, wanted", [(True, 0.0, False), (False, 0.5, False), (True, 0.5, True)])
def test_hidden_states_are_asked_for_only_when_the_hidden_loss_uses_them(with_teacher, hd_lambda, wanted):
    student = tiny_mixtral(num_experts=4, hidden_size=32, intermediate_size=48, num_layers=2, seed=1)
    teacher = tiny_job_model()  # seed 0: another model (a student equal to its teacher makes log(MSE) -inf)
    asked = []
    for m in (student, teacher):
        m.register_forward_pre_hook(lambda module, args, kwargs: asked.append(kwargs.get("output_hidden_states")),
                                    with_kwargs=True)
    run(student, same_rows(), teacher if with_teacher else None, hd_lambda=hd_lambda, eval_every=0)
    assert asked and set(asked) == {wanted}


def test_the_teacher_is_left_frozen():
    teacher = tiny_job_model(0)
    run(tiny_job_model(1), same_rows(), teacher)
    assert not any(p.requires_grad for p in teacher.parameters()) and not teacher.training


def test_batches_are_shuffled_and_partial_batches_dropped():
    """20 examples in batches of 8: two shuffled full batches per epoch, the last 4 examples left out."""
    data = [torch.full((6,), i + 3) for i in range(20)]
    seen = []
    model = tiny_job_model()
    model.register_forward_pre_hook(lambda module, args, kwargs: seen.append(kwargs["input_ids"][:, 0] - 3),
                                    with_kwargs=True)
    train(model, data, TrainConfig(steps=4, batch_size=8, eval_every=0), collate_fn=collate, progress=False)
    assert [len(b) for b in seen] == [8, 8, 8, 8]
    first_epoch = torch.cat(seen[:2]).tolist()
    assert len(set(first_epoch)) == 16 and first_epoch != list(range(16))


def test_bf16_mixed_precision_runs_the_student_under_autocast():
    """accelerate keeps one precision per process: its state is reset around each run (as its own tests do)."""
    from accelerate.state import AcceleratorState

    dtypes = {}
    try:
        for precision in ("no", "bf16"):
            AcceleratorState._reset_state(True)
            model = tiny_job_model()
            model.lm_head.register_forward_hook(lambda module, args, out, p=precision: dtypes.update({p: out.dtype}))
            run(model, same_rows(), mixed_precision=precision, eval_every=0)
    finally:
        AcceleratorState._reset_state(True)
    assert dtypes == {"no": torch.float32, "bf16": torch.bfloat16}


class Stop(Exception):
    pass


def test_a_run_stopped_mid_epoch_resumes_with_the_same_data_order(tmp_path):
    """48 examples in batches of 8 (6 per epoch), stopped after the checkpoint of step 4: the resumed run
    skips the 4 batches it saw and goes on in the same shuffled order (accelerate's seedable sampler), so it
    ends where an uninterrupted run does."""
    config = TrainConfig(steps=8, batch_size=8, eval_every=4, learning_rate=5e-3, warmup_steps=0)
    data = tiny_job_data()

    def stop_at_4(model, record):
        if record["step"] == 4:
            raise Stop

    with pytest.raises(Stop):
        train(tiny_job_model(), data, config, collate_fn=collate, eval_fn=lambda m: {"perplexity": 1.0},
              output_dir=tmp_path / "a", progress=False, callback=stop_at_4)
    resumed = tiny_job_model()
    train(resumed, data, config, collate_fn=collate, eval_fn=lambda m: {"perplexity": 1.0},
          output_dir=tmp_path / "a", resume=True, progress=False)
    straight = tiny_job_model()
    train(straight, data, config, collate_fn=collate, eval_fn=lambda m: {"perplexity": 1.0},
          output_dir=tmp_path / "b", progress=False)
    for (name, a), b in zip(resumed.state_dict().items(), straight.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_a_progress_bar_by_default(capsys):
    train(tiny_job_model(1), same_rows(), TrainConfig(steps=1, batch_size=8, eval_every=0), collate_fn=collate)
    assert re.search(r"(^|\r)training: .*1/1 \[[^\]]*(step/s|s/step)[,\]]", capsys.readouterr().err)  # unit: step
    train(tiny_job_model(1), same_rows(), TrainConfig(steps=1, batch_size=8, eval_every=0), collate_fn=collate,
          progress=False)
    assert capsys.readouterr().err == ""  # no bar (loop.py `train` mutants 55, 66 of session 29)
    train(tiny_job_model(1), same_rows(), TrainConfig(steps=1, batch_size=8, eval_every=0), collate_fn=collate,
          teacher=tiny_job_model(0))
    assert re.search(r"(^|\r)KD recovery: .*1/1", capsys.readouterr().err)


class OwnLoss(torch.nn.Module):
    """A model wrapper whose output carries no loss (`loss=None`) or a loss of its own making (`make_loss(out,
    step)`, step counting forwards from 1), for what the loop records and optimizes."""

    def __init__(self, inner, make_loss=None, bare=False):
        super().__init__()
        self.inner, self.config, self.make_loss, self.bare, self.calls = inner, inner.config, make_loss, bare, 0

    def forward(self, labels, **batch):
        self.calls += 1
        out = self.inner(labels=labels, **batch)
        if self.bare:  # an output with logits only, no `loss` attribute at all
            return types.SimpleNamespace(logits=out.logits)
        out.loss = None if self.make_loss is None else self.make_loss(out, self.calls)
        return out


@pytest.mark.parametrize("family, bare", [("mixtral", False), ("mixtral", True), ("switch", False)])
def test_a_model_output_without_a_loss_is_trained_on_the_cross_entropy_of_its_logits(family, bare):
    """The first recorded loss is the cross-entropy of the initial model's logits, written out here: shifted by
    one for a causal model (Mixtral), not for an encoder-decoder (Switch); the output's loss is None or it has
    no loss attribute (loop.py `_optimizer_step` 37, 42, 45-51 of session 29)."""
    model = tiny_job_model(1) if family == "mixtral" else tiny_switch(num_experts=4, d_model=16, d_ff=24, num_layers=2)
    for module in model.modules():  # Switch trains with dropout (modules, and a rate in its attention) and router
        if isinstance(module, torch.nn.Dropout):  # jitter: all off, so one forward says what the loop's first gives
            module.p = 0.0
        for name in ("jitter_noise", "dropout"):
            if isinstance(getattr(module, name, None), float):
                setattr(module, name, 0.0)
    data = same_rows()
    batch = collate(data)
    with torch.no_grad():
        logits = model.train()(**batch).logits
    if family == "mixtral":
        logits, labels = logits[:, :-1], batch["labels"][:, 1:]
    else:
        labels = batch["labels"]
    want = -torch.log_softmax(logits.double(), -1).gather(-1, labels[..., None]).mean()
    result = run(OwnLoss(model, bare=bare), data)
    assert result.history[0]["loss"] == pytest.approx(want.item(), rel=1e-5)


def test_a_model_output_with_its_own_loss_is_trained_on_that_loss():
    """A loss the model computes itself (here twice its cross-entropy plus 1) is the one optimized and recorded
    (loop.py `_optimizer_step` 36, 38, 42-44 of session 29: the fallback taken anyway)."""
    model, data = tiny_job_model(1), same_rows()
    with torch.no_grad():
        want = 2 * model.train()(**collate(data)).loss + 1
    result = run(OwnLoss(model, lambda out, step: 2 * out.loss + 1), data)
    assert result.history[0]["loss"] == pytest.approx(want.item(), rel=1e-5)


def test_each_record_holds_the_mean_loss_of_the_steps_since_the_last_one():
    """Losses 1, 2, ..., 7 (one per step, made by the model): evaluations every 3 steps and at the end record the
    means 2, 5 and 7 (loop.py `train` 84, 98-100, 108 of session 29: the last loss, a product, the wrong step
    count, a running sum not reset to 0)."""
    model = OwnLoss(tiny_job_model(1), lambda out, step: out.logits.sum() * 0 + step)
    result = train(model, same_rows(), TrainConfig(steps=7, batch_size=8, eval_every=3), collate_fn=collate,
                   eval_fn=lambda m: {"perplexity": 1.0}, progress=False)
    assert [(r["step"], r["loss"]) for r in result.history] == [(3, 2.0), (6, 5.0), (7, 7.0)]


def test_the_bar_shows_the_loss_and_metrics_and_a_resumed_run_starts_where_it_stopped(tmp_path, capsys):
    """The bar's postfix holds the record's floats, the step left out; a resumed run's bar counts on from the
    step it resumed at (loop.py `_evaluate` 69, 71 and `train` 52 of session 29)."""
    config = TrainConfig(steps=3, batch_size=8, eval_every=3, metric="score")
    train(tiny_job_model(), same_rows(), config, collate_fn=collate, eval_fn=lambda m: {"score": 0.123456},
          output_dir=tmp_path)
    err = capsys.readouterr().err
    assert re.search(r"loss=[0-9.]+, score=0\.1235\]?\s*$", err) and "step=" not in err
    longer = TrainConfig(steps=5, batch_size=8, eval_every=5, metric="score")
    train(tiny_job_model(), same_rows(), longer, collate_fn=collate, eval_fn=lambda m: {"score": 1.0},
          output_dir=tmp_path, resume=True)
    err = capsys.readouterr().err
    assert re.search(r" 3/5 ", err) and re.search(r" 5/5 ", err) and not re.search(r" [12]/5 ", err)


# --- loop.py: evaluation, checkpoints and resuming ----------------------------------------------------------
def scored_run(tmp_path, scores, greater=False):
    scores = iter(scores)
    return train(tiny_job_model(), tiny_job_data(), TrainConfig(steps=12, batch_size=8, eval_every=3,
                                                                metric="score", greater_is_better=greater),
                 collate_fn=collate, eval_fn=lambda m: {"score": next(scores)}, output_dir=tmp_path, progress=False)


@pytest.mark.parametrize("greater", [False, True])
def test_a_missing_or_nan_metric_is_never_the_best_and_ties_keep_the_first(tmp_path, greater):
    """After a best of 2 (3 when greater is better), a NaN and a missing value change nothing, and the
    worse last value does not take over; equal values keep the first."""
    best, worse = (2.0, 3.0) if not greater else (3.0, 2.0)
    result = scored_run(tmp_path / "nan", [best, float("nan"), None, worse], greater)
    assert (result.best_step, result.best_metric) == (3, best)
    result = scored_run(tmp_path / "first-nan", [float("nan"), None, worse, worse], greater)
    assert (result.best_step, result.best_metric) == (9, worse)
    result = scored_run(tmp_path / "tie", [3.0, 3.0, 3.0, 3.0], greater)
    assert (result.best_step, result.best_metric) == (3, 3.0)


def test_best_and_latest_hold_their_progress_records(tmp_path):
    """best/ records the step, the metric's name and its value (nothing a resume needs); latest/ the run's
    progress, its history and its whole config (loop.py `_evaluate` mutants 44-47, 66, 67 of session 29)."""
    result = scored_run(tmp_path, [2.0, 1.0, 1.5, 3.0])
    assert result.output_dir == tmp_path  # where the run wrote (`train` mutants 116, 121)
    best = read_progress(tmp_path / "best")
    assert best == {"step": 6, "metric": "score", "value": 1.0}
    latest = read_progress(tmp_path / "latest")
    assert (latest["step"], latest["best_metric"], latest["best_step"]) == (12, 1.0, 6)
    assert [r["score"] for r in latest["history"]] == [2.0, 1.0, 1.5, 3.0]
    want = TrainConfig(steps=12, batch_size=8, eval_every=3, metric="score").to_dict()
    assert latest["config"] == json.loads(json.dumps(want))  # as JSON keeps it: tuples become lists
    assert "optimizer" in latest and "optimizer" not in best


def test_the_optimizer_takes_the_configs_betas_and_weight_decay(tmp_path):
    """AdamW's betas and the decay group's weight decay come from the config (not AdamW's defaults, 0.999 and
    0.01), the no-decay group gets 0: read back from latest/'s optimizer state (loop.py `_optimizer` mutants 13,
    14, 31 of session 29)."""
    config = TrainConfig(steps=2, batch_size=8, eval_every=2, metric="score", adam_betas=(0.8, 0.9), weight_decay=0.3)
    train(tiny_job_model(), tiny_job_data(), config, collate_fn=collate, eval_fn=lambda m: {"score": 1.0},
          output_dir=tmp_path, progress=False)
    groups = read_progress(tmp_path / "latest")["optimizer"]["param_groups"]
    assert [(g["weight_decay"], g["betas"]) for g in groups] == [(0.3, [0.8, 0.9]), (0.0, [0.8, 0.9])]


def test_a_model_with_nothing_to_train_is_refused_by_name():
    with pytest.raises(ValueError, match=exact("train: the model has no parameter that requires grad")):
        train(tiny_job_model().requires_grad_(False), tiny_job_data(), TrainConfig(steps=1, batch_size=8, eval_every=0),
              collate_fn=collate, progress=False)


def test_a_plain_run_keeps_no_second_copy_of_the_weights_in_its_training_state(tmp_path):
    from safetensors import safe_open

    run_tiny_job(tmp_path, steps=3)
    with safe_open(str(tmp_path / "latest" / "trainer_state.safetensors"), "pt") as f:
        names = list(f.keys())
    assert names and not any(n.startswith("model.") for n in names)
    assert "model_tensors" not in json.loads((tmp_path / "latest" / "trainer_state.json").read_text())


def test_resuming_a_finished_run_returns_it_and_a_longer_run_is_refused(tmp_path):
    _, first = run_tiny_job(tmp_path, steps=3)
    _, again = run_tiny_job(tmp_path, steps=3, resume=True)
    assert again.step == 3 and again.history == first.history
    with pytest.raises(ValueError, match=exact("resume: the saved run is at step 3, past steps=2")):
        run_tiny_job(tmp_path, steps=2, resume=True)


def test_resumable_step_of_a_directory_without_a_run_is_none(tmp_path):
    assert resumable_step(tmp_path) is None
    (tmp_path / "latest").mkdir()
    assert resumable_step(tmp_path) is None


@pytest.mark.parametrize("saved_layers, resumed_layers", [(1, 2), (2, 1)])
def test_resuming_with_another_model_is_refused(tmp_path, saved_layers, resumed_layers):
    """A run saved from a model with one layer more or less than the one resumed with: the message lists
    three of the missing (or unexpected) weights."""
    data = tiny_job_data()
    config = TrainConfig(steps=2, batch_size=8, eval_every=2)
    saved = tiny_mixtral(num_experts=4, hidden_size=32, intermediate_size=48, num_layers=saved_layers)
    train(saved, data, config, collate_fn=collate, eval_fn=lambda m: {"perplexity": 1.0}, output_dir=tmp_path,
          progress=False)
    resumed = tiny_mixtral(num_experts=4, hidden_size=32, intermediate_size=48, num_layers=resumed_layers)
    three = r"\['[^']+', '[^']+', '[^']+'\]"
    missing, unexpected = (three, r"\[\]") if resumed_layers > saved_layers else (r"\[\]", three)
    message = (re.escape(f"resume: {tmp_path / 'latest'} does not hold this model's weights (missing ") + missing
               + re.escape(", unexpected ") + unexpected + re.escape("): resume with the model the run started from"))
    with pytest.raises(ValueError, match=f"^{message}$"):
        train(resumed, data, config, collate_fn=collate, eval_fn=lambda m: {"perplexity": 1.0}, output_dir=tmp_path,
              resume=True, progress=False)


def test_a_model_of_an_moe_family_without_moe_layers_trains():
    """Qwen2-MoE with every layer dense (mlp_only_layers): no router to freeze, and fine-tuning runs."""
    model = tiny_moe("qwen2_moe", num_experts=4, hidden_size=16, intermediate_size=24, num_layers=2,
                     mlp_only_layers=[0, 1])
    assert freeze_routers(model) == 0
    result = run(model, same_rows(), eval_every=0)
    assert result.step == 1


def test_clear_messages_for_a_missing_output_dir_or_eval_fn(tmp_path):
    model, data = tiny_job_model(), same_rows()
    with pytest.raises(ValueError, match=exact("resume=True needs the output_dir of the run to resume")):
        train(model, data, TrainConfig(steps=1, batch_size=8, eval_every=0), collate_fn=collate, resume=True)
    with pytest.raises(ValueError, match=exact("eval_every > 0 needs an eval_fn (or set eval_every=0)")):
        train(model, data, TrainConfig(steps=1, batch_size=8, eval_every=1), collate_fn=collate)


# --- state.py -----------------------------------------------------------------------------------------------
def test_optimizer_state_round_trips_through_plain_json_and_named_tensors():
    """Tensors go to the safetensors file as optimizer.<index>.<key>; everything else (numbers, lists, a dict that
    is not a tensor reference) stays in the JSON as it was (state.py `_flatten_optimizer` 1, 2, 24 and
    `_unflatten_optimizer` 7, 10 of session 30)."""
    from mcsmoe_fast.train.state import _flatten_optimizer, _unflatten_optimizer

    moment = torch.arange(3.0)
    state = {"state": {0: {"exp_avg": moment, "step": 7, "window": [1, 2], "extra": {"note": "kept"}}},
             "param_groups": [{"lr": 0.1, "params": [0]}]}
    tensors = {}
    plain = _flatten_optimizer(state, tensors)
    assert list(tensors) == ["optimizer.0.exp_avg"] and torch.equal(tensors["optimizer.0.exp_avg"], moment)
    assert plain["state"]["0"] == {"exp_avg": {"tensor": "optimizer.0.exp_avg"}, "step": 7, "window": [1, 2],
                                   "extra": {"note": "kept"}}
    back = _unflatten_optimizer(json.loads(json.dumps(plain)), tensors)
    assert back["param_groups"] == state["param_groups"] and list(back["state"]) == [0]
    assert {k: v for k, v in back["state"][0].items() if k != "exp_avg"} == \
        {"step": 7, "window": [1, 2], "extra": {"note": "kept"}}
    assert torch.equal(back["state"][0]["exp_avg"], moment)


def test_an_unreadable_training_state_names_the_file(tmp_path):
    (tmp_path / "trainer_state.json").write_text("{not json")
    with pytest.raises(ValueError, match="^" + re.escape(f"{tmp_path / 'trainer_state.json'}: no readable training state (")):
        read_progress(tmp_path)


def pruned_job(tmp_path, steps=2):
    model = tiny_job_model()
    compress_experts(model, rank=4, keep_ratio=0.5, importance="gradient", progress=False)
    return model, TrainConfig(steps=steps, batch_size=8, eval_every=2, prune_initial_warmup=0, prune_final_warmup=0)


def test_resuming_a_pruned_student_needs_its_saved_state(tmp_path):
    data = tiny_job_data()
    student, config = pruned_job(tmp_path)  # the same settings: only the student differs
    train(tiny_job_model(), data, config, collate_fn=collate, eval_fn=lambda m: {"perplexity": 1.0},
          output_dir=tmp_path / "plain", progress=False)
    with pytest.raises(ValueError, match=exact(
            f"{tmp_path / 'plain' / 'latest'}: the saved run holds no student state to resume a pruned student from")):
        train(student, data, config, collate_fn=collate, eval_fn=lambda m: {"perplexity": 1.0},
              output_dir=tmp_path / "plain", resume=True, progress=False)


@pytest.mark.parametrize("damage", ["no pruner", "a weight left out"])
def test_a_damaged_pruned_state_is_refused(tmp_path, damage):
    data = tiny_job_data()
    student, config = pruned_job(tmp_path)
    train(student, data, config, collate_fn=collate, eval_fn=lambda m: {"perplexity": 1.0}, output_dir=tmp_path,
          progress=False)
    path = tmp_path / "latest" / "trainer_state.json"
    record = json.loads(path.read_text())
    if damage == "no pruner":
        del record["pruner"]
        expected = pytest.raises(ValueError, match=exact(f"{tmp_path / 'latest'}: the saved run had no compression pruner"))
    else:
        record["model_tensors"].remove("lm_head.weight")
        expected = pytest.raises(RuntimeError, match="Missing key.*lm_head.weight")
    path.write_text(json.dumps(record))
    student, config = pruned_job(tmp_path, steps=4)
    with expected:
        train(student, data, config, collate_fn=collate, eval_fn=lambda m: {"perplexity": 1.0}, output_dir=tmp_path,
              resume=True, progress=False)


# --- text.py: files -----------------------------------------------------------------------------------------
def test_text_windows_hold_the_text_without_special_tokens(tmp_path):
    """A tokenizer whose template adds [EOS] in front of every text: the windows hold the words alone."""
    from tokenizers.processors import TemplateProcessing

    from mcsmoe_fast.tiny import tiny_tokenizer
    from mcsmoe_fast.train.text import text_windows

    tok = tiny_tokenizer()
    eos = tok.convert_tokens_to_ids("[EOS]")
    tok.backend_tokenizer.post_processor = TemplateProcessing(single="[EOS] $A", special_tokens=[("[EOS]", eos)])
    text = "the quick brown fox jumps over a lazy dog " * 3
    assert tok(text)["input_ids"][0] == eos  # the template is in effect by default
    words = tok(text, add_special_tokens=False)["input_ids"]
    (tmp_path / "t.txt").write_text(text)
    windows = text_windows(tmp_path / "t.txt", tok, 4)
    assert windows.rows.dtype == torch.long
    assert windows.rows.flatten().tolist() == words[: len(words) // 4 * 4]


def test_text_that_is_not_utf8_is_refused_by_name(tmp_path):
    from mcsmoe_fast.tiny import tiny_tokenizer
    from mcsmoe_fast.train.text import text_windows

    (tmp_path / "t.txt").write_bytes(b"caf\xe9 au lait")
    with pytest.raises(ValueError, match="^" + re.escape(f"{tmp_path / 't.txt'}: not UTF-8 text (")):
        text_windows(tmp_path / "t.txt", tiny_tokenizer(), 4)
