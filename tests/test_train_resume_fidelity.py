"""Training runs that must neither lose nor misread a run: a resume with other settings than the saved run's is
refused by name (steps and eval_every may change, and a changed steps is the new run's schedule from the first
resumed step), a new run into a directory that holds one is refused, train() never writes into or over the
directory its model was loaded from, a non-finite loss stops the run before its update (the checkpoints stay as
they were), pruning warm-ups that cannot fit are refused at once naming the given and the derived values, and no
parameter whose name holds "bias" (Switch's relative_attention_bias) is weight-decayed, as in the original."""
import hashlib
import re

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

import mcsmoe_fast.loading
from mcsmoe_fast import from_pretrained, save_pretrained
from mcsmoe_fast.checkpoint.run_lock import LOCK_FILE
from mcsmoe_fast.tiny import tiny_switch
from mcsmoe_fast.train import TrainConfig, train
from mcsmoe_fast.train.loop import _optimizer
from test_cli_merge import run as cli
from test_cli_train import space  # noqa: F401  (the fixture)
from train_helpers import collate, perplexity_on, tiny_job_data, tiny_job_model


def exact(message):
    return "^" + re.escape(message) + "$"


def digest(directory):
    """The run directory's files and their hashes, but the run lock (held while the run runs, removed after it)."""
    return {p.relative_to(directory).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file() and p.name != LOCK_FILE}


class Stop(Exception):
    pass


def stop_at(step, then=None):
    def callback(model, record):
        if record["step"] == step:
            if then is not None:
                then(model)
            raise Stop
    return callback


def job(output_dir, config, model=None, **kwargs):
    data = tiny_job_data()
    return train(tiny_job_model() if model is None else model, data, config, collate_fn=collate,
                 eval_fn=perplexity_on(data), output_dir=output_dir, progress=False, **kwargs)


# --- resume: the saved run's settings ------------------------------------------------------------------------
def test_a_resume_with_other_settings_is_refused_naming_each(tmp_path):
    """Stopped at step 3 of 6 with lr 1e-3 and weight decay 0.01, resumed with 1e-2, 0.5 and trained routers:
    refused by name before anything is loaded (the saved optimizer's learning rate and weight decay used to
    win without a word, and the routers gave torch's bare param-group error)."""
    settings = dict(steps=6, batch_size=8, eval_every=3, learning_rate=1e-3, warmup_steps=0)
    with pytest.raises(Stop):
        job(tmp_path, TrainConfig(**settings), callback=stop_at(3))
    before = digest(tmp_path)
    changed = TrainConfig(**{**settings, "learning_rate": 1e-2, "weight_decay": 0.5, "train_routers": True})
    with pytest.raises(ValueError, match=exact(
            f"resume: {tmp_path / 'latest'} holds a run with other settings: learning_rate 0.001 there, 0.01 now; "
            "train_routers False there, True now; weight_decay 0.01 there, 0.5 now; resume with the saved settings "
            "(only steps and eval_every may change) or start a new run in another output_dir")):
        job(tmp_path, changed, resume=True)
    assert digest(tmp_path) == before


def test_a_resume_may_extend_the_run_and_follows_the_longer_schedule_from_its_first_step(tmp_path):
    """Stopped at step 3 of 6 (lr 1e-3, no warm-up), resumed for 8 steps evaluating every 4: steps 4 to 8 run at
    the longer run's linear decay, 1e-3 * (8 - s) / 8 for s = 3 .. 7 (step 4 used to run at the saved 6-step
    schedule's 5e-4)."""
    with pytest.raises(Stop):
        job(tmp_path, TrainConfig(steps=6, batch_size=8, eval_every=3, learning_rate=1e-3, warmup_steps=0),
            callback=stop_at(3))
    lrs = []
    hook = register_optimizer_step_pre_hook(
        lambda optimizer, args, kwargs: lrs.append(optimizer.param_groups[0]["lr"]))
    try:
        result = job(tmp_path, TrainConfig(steps=8, batch_size=8, eval_every=4, learning_rate=1e-3, warmup_steps=0),
                     resume=True)
    finally:
        hook.remove()
    assert lrs == [1e-3 * ((8 - s) / 8) for s in range(3, 8)]
    assert [r["step"] for r in result.history] == [3, 4, 8]


# --- a new run into a directory that holds one --------------------------------------------------------------
def test_a_new_run_into_a_directory_holding_a_run_is_refused_and_replaces_nothing(tmp_path):
    job(tmp_path, TrainConfig(steps=6, batch_size=8, eval_every=3, learning_rate=5e-3, warmup_steps=0))
    before = digest(tmp_path)
    with pytest.raises(ValueError, match=exact(
            f"output_dir {tmp_path} holds a training run (latest/ at step 6): resume=True continues it; choose "
            "another output_dir to start a new run")):
        job(tmp_path, TrainConfig(steps=1, batch_size=8, eval_every=1, learning_rate=1e-6, warmup_steps=0))
    assert digest(tmp_path) == before


def test_finetune_refuses_a_second_run_into_its_out_before_loading_the_model(space, capsys, monkeypatch):  # noqa: F811
    args = ["finetune", "--model", space / "mixtral", "--text", space / "train.txt", "--length", 16, "--batch-size", 4,
            "--steps", 2, "--eval-every", 2, "--out", space / "lm"]
    rc, _, err = cli(args, capsys)
    assert rc == 0, err
    before = digest(space / "lm")
    monkeypatch.setattr(mcsmoe_fast.loading, "open_model", lambda *a, **k: pytest.fail("loaded before refusing"))
    rc, _, err = cli(args, capsys)
    assert rc == 2 and (f"--out {space / 'lm'} holds a training run (latest/ at step 2): --resume continues it; choose "
                        "another --out to start a new run") in err, err
    rc, _, err = cli([*args[:-4], "--eval-every", 1, "--lr", 0.5, "--resume", "--out", space / "lm"], capsys)
    assert rc == 2 and f"resume: {space / 'lm' / 'latest'} holds a run with other settings: learning_rate" in err, err
    assert digest(space / "lm") == before


# --- the model's own directory ------------------------------------------------------------------------------
@pytest.mark.parametrize("role", ["model", "teacher"])
@pytest.mark.parametrize("out, overlap", [("run", "holds"), ("run/best", "into"), ("run/best/again", "into")])
def test_train_refuses_an_output_dir_overlapping_the_directory_a_model_was_loaded_from(tmp_path, role, out, overlap):
    """A model loaded from run/best trained into run would have its own directory replaced by the run's best/
    (the CLI refused this, train() did not)."""
    source, output_dir = tmp_path / "run" / "best", tmp_path / out
    save_pretrained(tiny_job_model(), source)
    before = digest(source)
    loaded = from_pretrained(source)
    model, teacher = (loaded, None) if role == "model" else (tiny_job_model(), loaded)
    message = (f"output_dir {output_dir} holds the {role}'s own directory {source} (its name_or_path): the run's "
               "best/ and latest/ could replace it; choose another output_dir" if overlap == "holds" else
               f"output_dir {output_dir} would write into the {role}'s own directory {source} (its name_or_path): "
               "choose another output_dir")
    with pytest.raises(ValueError, match=exact(message)):
        job(output_dir, TrainConfig(steps=2, batch_size=8, eval_every=1, learning_rate=5e-3, warmup_steps=0),
            model=model, teacher=teacher)
    assert digest(source) == before


# --- a non-finite loss --------------------------------------------------------------------------------------
def test_a_hidden_state_term_of_minus_infinity_stops_the_run_before_any_update(tmp_path):
    """KD with hd_lambda > 0 of a student whose hidden states equal the teacher's: log(MSE) = log(0) = -inf (the
    original's formula). The run stops at step 1, naming the terms, with the student untouched and nothing saved
    (it used to train every weight into NaN and save them)."""
    student, teacher = tiny_job_model(), tiny_job_model()
    before = {k: v.clone() for k, v in student.state_dict().items()}
    with pytest.raises(FloatingPointError, match=r"^step 1: the loss is -inf \(task \d\.\d+, kd 0, hd -inf\); "
                       + re.escape("training stopped before this step's update: the model is as after step 0 and "
                                   "the checkpoints are as they were; the hidden-state term log(MSE) is -inf: the "
                                   "student's hidden states equal the teacher's (use hd_lambda=0 until they differ)")
                       + "$"):
        job(tmp_path, TrainConfig(steps=2, batch_size=8, eval_every=1, hd_lambda=0.1), model=student, teacher=teacher)
    assert all(torch.equal(v, before[k]) for k, v in student.state_dict().items())
    assert not (tmp_path / "latest").exists() and not (tmp_path / "best").exists()


def test_a_nan_loss_after_a_checkpoint_leaves_the_checkpoints_and_the_other_weights_as_they_were(tmp_path):
    """The head turned NaN after the checkpoint of step 2: step 3's loss is NaN, the run stops before its update,
    best/ and latest/ still hold step 2 and every other weight is as after step 2."""
    seen = {}

    def poison(model):
        seen["files"] = digest(tmp_path)
        with torch.no_grad():
            model.lm_head.weight.fill_(float("nan"))
        seen["weights"] = {k: v.clone() for k, v in model.state_dict().items() if k != "lm_head.weight"}

    model = tiny_job_model()
    with pytest.raises(FloatingPointError, match=exact(
            "step 3: the loss is nan (the fine-tuning loss); training stopped before this step's update: the model "
            "is as after step 2 and the checkpoints are as they were")):
        job(tmp_path, TrainConfig(steps=4, batch_size=8, eval_every=2, learning_rate=5e-3, warmup_steps=0),
            model=model, callback=lambda m, r: poison(m) if r["step"] == 2 else None)
    assert digest(tmp_path) == seen["files"]
    assert all(torch.equal(v, seen["weights"][k]) for k, v in model.state_dict().items() if k != "lm_head.weight")
    assert from_pretrained(tmp_path / "latest").lm_head.weight.isfinite().all()


# --- pruning warm-ups ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("settings, message", [
    (dict(steps=100, prune_initial_warmup=90),
     "prune_initial_warmup 90 (given) + prune_final_warmup 20 (not given: 4 x warmup_steps = 64, scaled down) = 110; "
     "pass prune_final_warmup (at most 10) or a smaller prune_initial_warmup"),
    (dict(steps=100, warmup_steps=40, prune_final_warmup=95),
     "prune_initial_warmup 14 (not given: warmup_steps = 40, scaled down) + prune_final_warmup 95 (given) = 109; "
     "pass prune_initial_warmup (at most 5) or a smaller prune_final_warmup"),
    (dict(steps=100, prune_initial_warmup=60, prune_final_warmup=50),
     "prune_initial_warmup 60 (given) + prune_final_warmup 50 (given) = 110; pass smaller ones"),
])
def test_pruning_warmups_that_do_not_fit_are_refused_naming_the_given_and_the_derived(settings, message):
    """steps=100 with a given initial warm-up of 90: the default final one, 4 x 16 = 64, is scaled to
    64 * 100 // (2 * 154) = 20, which does not fit the 10 steps left; refused when the config is made (it used to
    be refused by the pruner, after the model was loaded and decomposed, as "final_warmup=20")."""
    expected = f"TrainConfig: the pruning warm-ups do not fit in steps=100: {message}"
    with pytest.raises(ValueError, match=exact(expected)):
        TrainConfig(**settings)


def test_finetune_refuses_pruning_warmups_that_do_not_fit_before_loading_the_model(space, capsys,  # noqa: F811
                                                                                  monkeypatch):
    monkeypatch.setattr(mcsmoe_fast.loading, "open_model", lambda *a, **k: pytest.fail("loaded before refusing"))
    rc, _, err = cli(["finetune", "--model", space / "mixtral", "--text", space / "train.txt", "--rank", 2, "--steps",
                      100, "--prune-initial-warmup", 90, "--out", space / "o"], capsys)
    assert rc == 2 and "prune_initial_warmup 90 (given) + prune_final_warmup 20 (not given: 4 x warmup_steps = 64, " \
                       "scaled down) = 110" in err, err


# --- weight decay -------------------------------------------------------------------------------------------
def test_switch_parameters_are_decayed_as_the_originals_no_decay_names_say():
    """The original's Switch scripts: no weight decay on any parameter whose name holds one of these substrings,
    so not on the relative_attention_bias tables ([buckets, heads] matrices) either."""
    no_decay = ["bias", "layer_norm.weight", "LayerNorm", "layernorm", "layer_norm", "ln"]
    model = tiny_switch(num_experts=4, d_model=16, d_ff=32, num_layers=2, seed=0)
    optimizer = _optimizer(model, TrainConfig(steps=10, weight_decay=0.01), distilling=True)
    decay = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    got = {n: decay[id(p)] for n, p in model.named_parameters()}
    assert got == {n: 0.0 if any(word in n for word in no_decay) else 0.01 for n, _ in model.named_parameters()}
    assert [w for n, w in got.items() if "relative_attention_bias" in n] == [0.0, 0.0]


def test_finetune_reports_a_non_finite_loss_in_one_line(space, capsys):  # noqa: F811
    rc, _, err = cli(["finetune", "--model", space / "mixtral", "--teacher", space / "mixtral", "--hd-lambda", 0.1,
                      "--text", space / "train.txt", "--length", 16, "--batch-size", 4, "--steps", 2, "--out",
                      space / "kd"], capsys)
    errors = [line for line in err.splitlines() if "error:" in line]  # the progress bar's line aside
    assert rc == 2 and len(errors) == 1 and "Traceback" not in err, err
    line = errors[0]
    assert line.startswith("mcsmoe-fast finetune: error: step 1: the loss is -inf (task ") and "hd -inf)" in line
    assert line.endswith("(use hd_lambda=0 until they differ)"), err
