"""One training loop for fine-tuning and KD recovery, on `accelerate`: `accelerate launch` spreads the
same code over GPUs and machines (N processes train as one process on the global batch: processes.py), and mixed
precision is accelerate's.

    result = train(model, dataset, TrainConfig(steps=300), collate_fn=..., eval_fn=..., teacher=full_model,
                   output_dir="runs/msmoe-kd")

With a teacher the loss is the KD loss (losses.py) and the student runs in eval mode (no dropout, no
router jitter: the original's "accurate distillation"); without one it is the model's own loss
(fine-tuning, in train mode). The routers are frozen in both unless `config.train_routers`. A student with
compressed experts still in pruning state gets a CompressionPruner, called after every optimizer step
(without a score update when mixed precision skipped the step). Every `eval_every` steps (and at the end) the
model is evaluated, `output_dir/latest` is replaced by a checkpoint with everything needed to resume,
and `output_dir/best` when the metric improved (for a pruned student: only once the pruning schedule
reached its final keep ratio, saved finalized). `resume=True` continues from `latest` with the saved run's
settings (only `steps` and `eval_every` may change): same data order, optimizer and schedule, so the resumed run
ends where an uninterrupted one would. Without `resume`, an output_dir that holds a run is refused, as is one that
overlaps the directory the model or the teacher was loaded from. A non-finite loss stops the run before its update
(fp16 mixed precision aside, where the loss scaler skips such steps; fp16 is refused where nothing scales the
loss, on a CPU).
"""
from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from ..checkpoint import from_pretrained, save_pretrained
from ..checkpoint.atomic import check_replaceable, previous_aside, restore_previous
from ..checkpoint.run_lock import run_lock
from ..modules.compressed import CompressedMoEExperts
from ..models import moe_layers, unwrap
from ..pruner import CompressionPruner
from .config import TrainConfig
from .losses import fine_tuning_loss, kd_loss
from .processes import (PROCESSES_KEY, accelerator_options, across, check_batches_per_epoch, check_resumed_processes,
                        check_world, mean_over_processes, rank_rng_states)
from .state import STATE_JSON, check_student_shapes, read_progress, restore_state, write_state

BEST, LATEST = "best", "latest"


@dataclass
class TrainResult:
    step: int
    best_step: int | None
    best_metric: float | None
    history: list[dict] = field(default_factory=list)  # one record per evaluation: step, loss, metrics
    output_dir: Path | None = None


def freeze_routers(model: nn.Module) -> int:
    """Stop gradients to every MoE router: the module holding each router weight, its bias included
    (training keeps the routing as it was); returns the count."""
    layers = moe_layers(model, allow_empty=True)
    for layer in layers:
        weight = layer.router_weight()
        for module in layer.module.modules():
            if any(p is weight for p in module.parameters(recurse=False)):
                module.requires_grad_(False)
        weight.requires_grad_(False)
    return len(layers)


def decays(name: str, param: torch.Tensor) -> bool:
    """Weight decay on matrices only: not on norms, nor on any parameter whose name holds "bias" (the original's
    rule: stacked [E, F] expert biases, and Switch's relative_attention_bias tables), nor on the merged /
    compressed slots' b_in [S, F] and b_out [S, d]."""
    return param.dim() >= 2 and "bias" not in name and name.rsplit(".", 1)[-1] not in ("b_in", "b_out")


def _optimizer(model: nn.Module, config: TrainConfig, distilling: bool) -> torch.optim.Optimizer:
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError("train: the model has no parameter that requires grad")
    groups = [{"params": [p for n, p in named if decays(n, p)], "weight_decay": config.weight_decay},
              {"params": [p for n, p in named if not decays(n, p)], "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=config.learning_rate, betas=config.adam_betas,
                             eps=config.optimizer_eps(distilling))


def _scheduler(optimizer, config: TrainConfig):
    """Linear warm-up to the learning rate, then linear decay to 0 at the last step."""
    warm, total = config.warmup_steps, config.steps

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / (warm + 1)
        return max(0.0, (total - step) / max(1, total - warm))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _pruner(model: nn.Module, config: TrainConfig) -> CompressionPruner | None:
    pruning = [m for m in model.modules() if isinstance(m, CompressedMoEExperts) and m.pruning]
    if not pruning:
        return None
    initial, final = config.pruning_warmups()  # TrainConfig refused warm-ups that do not fit
    return CompressionPruner(model, config.keep_ratio, config.steps, initial, final)


def _improved(value: float, best: float | None, greater: bool) -> bool:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return False
    return best is None or (value > best if greater else value < best)


def _load_weights(model: nn.Module, checkpoint: Path) -> None:
    model = unwrap(model)  # a torch.compile'd model: its checkpoints hold the compiled module's names
    saved = from_pretrained(checkpoint).state_dict()
    check_student_shapes(checkpoint, model, saved)
    missing, unexpected = model.load_state_dict(saved, strict=False)
    if missing or unexpected:
        raise ValueError(f"resume: {checkpoint} does not hold this model's weights (missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}): resume with the model the run started from")


@dataclass
class _Run:
    """One training run: its parts (prepared by accelerate once _prepare ran) and its progress, shared by
    the steps, the evaluations and the checkpoints."""

    config: TrainConfig
    accelerator: object
    model: nn.Module
    teacher: nn.Module | None
    pruner: CompressionPruner | None
    loader: torch.utils.data.DataLoader
    optimizer: torch.optim.Optimizer
    scheduler: object
    output_dir: Path | None
    eval_fn: Callable[[nn.Module], dict[str, float]] | None
    callback: Callable[[nn.Module, dict], None] | None
    tokenizer: object
    causal: bool
    step: int = 0
    best_metric: float | None = None
    best_step: int | None = None
    history: list[dict] = field(default_factory=list)
    bar: object = None

    @property
    def training_mode(self) -> bool:
        return self.teacher is None  # KD runs the student in eval mode, as the original


def _check_arguments(models: dict, train_data, config: TrainConfig, eval_fn, output_dir: Path | None,
                     resume: bool) -> None:
    if resume and output_dir is None:
        raise ValueError("resume=True needs the output_dir of the run to resume")
    if eval_fn is None and config.eval_every:
        raise ValueError("eval_every > 0 needs an eval_fn (or set eval_every=0)")
    if len(train_data) < config.batch_size:
        raise ValueError(f"train_data has {len(train_data)} examples, fewer than one batch of {config.batch_size}")
    if output_dir is not None:
        _refuse_writing_over_sources(output_dir, models)
        check_output_dir(output_dir, config, resume, distilling=models["teacher"] is not None)


def _refuse_writing_over_sources(output_dir: Path, models: dict) -> None:
    """output_dir's best/ and latest/ must neither go into nor replace the directory a model was loaded from (its
    name_or_path), as the CLI refuses for --model and --teacher."""
    out = output_dir.absolute().resolve()
    for role, model in models.items():
        source = getattr(model, "name_or_path", None)
        if not isinstance(source, (str, Path)) or not str(source) or not Path(source).is_dir():
            continue  # built in memory, or a hub id
        path = Path(source).absolute().resolve()
        if out == path or path in out.parents:
            raise ValueError(f"output_dir {output_dir} would write into the {role}'s own directory {source} (its "
                             "name_or_path): choose another output_dir")
        if out in path.parents:
            raise ValueError(f"output_dir {output_dir} holds the {role}'s own directory {source} (its name_or_path): "
                             "the run's best/ and latest/ could replace it; choose another output_dir")


RESUMABLE_CHANGES = ("steps", "eval_every")  # the settings a resume may change (docs/training.md says why)


def check_output_dir(output_dir, config: TrainConfig, resume: bool, distilling: bool | None = None,
                     names=("output_dir", "resume=True", "teacher")) -> None:
    """Refuse, before any work, a run that would lose or misread the run already in output_dir: without resume,
    one that would replace its best/ and latest/; with resume, one whose settings differ from the saved run's in
    anything but RESUMABLE_CHANGES (the saved optimizer, data order and schedule are that run's), or that distils
    where the saved run did not or the reverse (`distilling`: whether a teacher is given; None: not checked).
    `names`: what the caller calls the directory, the resume option and the teacher (the CLI: --out, --resume,
    --teacher)."""
    output_dir = Path(output_dir)
    _put_back(output_dir)
    for name in (LATEST, BEST):  # a folder of the user's there: refused now, not at the first checkpoint
        check_replaceable(output_dir / name)
    if not resume:
        for name in (LATEST, BEST):
            if (output_dir / name / STATE_JSON).exists():
                step = read_progress(output_dir / name)["step"]
                raise ValueError(f"{names[0]} {output_dir} holds a training run ({name}/ at step {step}): {names[1]} "
                                 f"continues it; choose another {names[0]} to start a new run")
        return
    if not (output_dir / LATEST / "config.json").exists():
        return  # nothing to resume: the run starts
    record = read_progress(output_dir / LATEST)
    saved = record.get("config", {})
    now = json.loads(json.dumps(config.to_dict()))  # as the record keeps it: tuples become lists
    differ = [f"{key} {saved[key]!r} there, {now[key]!r} now" for key in sorted(now)
              if key in saved and key not in RESUMABLE_CHANGES and saved[key] != now[key]]
    if distilling is not None and record.get("distilling") not in (None, distilling):
        differ.append(f"a {names[2]} distilled into the saved run, none is given now" if record["distilling"] else
                      f"the saved run had no {names[2]}, one is given now")
    if differ:
        raise ValueError(f"resume: {output_dir / LATEST} holds a run with other settings: {'; '.join(differ)}; resume "
                         f"with the saved settings (only {' and '.join(RESUMABLE_CHANGES)} may change) or start a new "
                         f"run in another {names[0]}")


def _scales_loss(accelerator) -> bool:
    """Whether fp16 steps are loss-scaled, so that an overflowing step is skipped: accelerate's GradScaler (none on a
    CPU), or DeepSpeed's and Megatron-LM's own scalers (accelerate builds none for them)."""
    from accelerate.utils import DistributedType

    return accelerator.scaler is not None or accelerator.distributed_type in (DistributedType.DEEPSPEED,
                                                                             DistributedType.MEGATRON_LM)


def data_seed(seed: int) -> int:
    """The data order's seed for config.seed: accelerate's sampler shuffles epoch e with data_seed + e, so with the
    seed itself seed s's second epoch was seed s+1's first. A multiplicative (Fibonacci) hash sets different seeds'
    epochs ~2^61 apart."""
    return (seed * 0x9E3779B97F4A7C15) % 2**62


def _setup(model: nn.Module, train_data, config: TrainConfig, collate_fn, teacher: nn.Module | None,
           output_dir: Path | None, eval_fn, callback, tokenizer) -> _Run:
    """The accelerator (seeded), frozen routers and teacher, the pruner, the data loader, the optimizer and
    its schedule."""
    from accelerate import Accelerator, DataLoaderConfiguration
    from accelerate.utils import set_seed

    causal = not getattr(model.config, "is_encoder_decoder", False)
    _release_accelerator_state(config.mixed_precision)
    accelerator = Accelerator(mixed_precision=config.mixed_precision,
                              dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True,
                                                                        data_seed=data_seed(config.seed)),
                              **accelerator_options())
    check_world(accelerator)
    if config.mixed_precision == "fp16" and not _scales_loss(accelerator):
        raise ValueError(f"mixed_precision='fp16': accelerate runs no fp16 autocast and no loss scaler on "
                         f"{accelerator.device} (the run would train in the model's dtype, and a non-finite loss "
                         "would update the weights); use 'bf16' or 'no'")
    set_seed(config.seed)
    if not config.train_routers:
        freeze_routers(model)
    if teacher is not None:
        teacher.eval().requires_grad_(False)
    pruner = _pruner(model, config)
    # its own generator: starting an epoch's iterator draws a seed, which must not move the global RNG (a resumed run
    # restores that RNG before its first iterator: dropout and router jitter would be shifted from then on)
    loader = torch.utils.data.DataLoader(train_data, batch_size=config.batch_size, shuffle=True, drop_last=True,
                                         collate_fn=collate_fn, generator=torch.Generator().manual_seed(config.seed))
    optimizer = _optimizer(model, config, distilling=teacher is not None)
    return _Run(config, accelerator, model, teacher, pruner, loader, optimizer, _scheduler(optimizer, config),
                output_dir, eval_fn, callback, tokenizer, causal)


def _release_accelerator_state(mixed_precision: str) -> None:
    """accelerate keeps one state per process: a run in another mixed precision than the last one resets it
    (accelerate would refuse the new Accelerator)."""
    from accelerate.state import AcceleratorState

    if AcceleratorState._shared_state and AcceleratorState().mixed_precision != mixed_precision:
        AcceleratorState._reset_state()


def _hand_back(*models) -> None:
    """The models as they came: accelerate's mixed-precision forward wrappers removed (the caller's later forwards
    would otherwise still run under its autocast)."""
    from accelerate.utils import extract_model_from_parallel

    for model in models:
        if model is not None and "_original_forward" in vars(model):
            extract_model_from_parallel(model, keep_fp32_wrapper=False)
            vars(model).pop("forward", None)


def _resume(run: _Run) -> None:
    """Continue from output_dir/latest: weights (a pruned student's masked rows come with the state),
    optimizer, schedule, pruner and the progress record."""
    latest = run.output_dir / LATEST
    check_resumed_processes(read_progress(latest), run.accelerator, latest)
    if run.pruner is None:
        _load_weights(run.model, latest)
    record = restore_state(latest, run.optimizer, run.scheduler, run.pruner, run.model if run.pruner else None,
                           rank=run.accelerator.process_index)
    run.step, run.best_metric, run.best_step, run.history = (record["step"], record["best_metric"],
                                                             record["best_step"], record["history"])
    # the saved run's data order: runs saved before data_seed existed shuffled with the seed itself
    run.accelerator.dataloader_config.data_seed = record.get("data_seed", run.config.seed)
    if run.step > run.config.steps:
        raise ValueError(f"resume: the saved run is at step {run.step}, past steps={run.config.steps}")
    # the next step's learning rate from this run's schedule (the saved one's to the bit when steps is unchanged;
    # a resume with other steps follows its own decay from the first resumed step)
    scheduler = run.scheduler
    # one schedule step per optimizer step (fewer where mixed precision skipped one); runs saved by N processes
    # before processes.py stepped it N times a step
    scheduler.last_epoch = min(scheduler.last_epoch, run.step)
    for group, base, factor in zip(run.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base * factor(scheduler.last_epoch)


def _prepare(run: _Run) -> None:
    """Hand the model, optimizer, loader, schedule (and teacher) to accelerate."""
    run.model, run.optimizer, run.loader, run.scheduler = run.accelerator.prepare(
        run.model, run.optimizer, run.loader, run.scheduler)
    if run.teacher is not None:
        run.teacher = run.accelerator.prepare_model(run.teacher, evaluation_mode=True)


def _checkpoint(run: _Run, name: str, progress_record: dict, with_state: bool) -> None:
    """Write output_dir/name (main process only): the model (a pruned student finalized), and with_state
    everything a resume needs."""
    rng = rank_rng_states(run.accelerator) if with_state else {}  # every process takes part
    if not run.accelerator.is_main_process:
        return
    plain = saved = run.accelerator.unwrap_model(run.model)
    if run.pruner is not None:  # checkpoints hold the compact, finalized form; a resume needs the masked rows too
        saved = copy.deepcopy(plain)
        for m in saved.modules():
            if isinstance(m, CompressedMoEExperts) and m.pruning:
                m.finalize()
    if with_state:
        model_state = plain.state_dict() if run.pruner is not None else None
        state = (run.optimizer, run.scheduler, run.pruner, model_state, rng)
    else:
        state = ()
    save_pretrained(saved, run.output_dir / name, tokenizer=run.tokenizer,
                    extra=lambda d: write_state(d, progress_record, *state))


def _evaluate(run: _Run, loss: float) -> None:
    """Evaluate, keep the record, write `best` when the metric improved and `latest`, call the callback."""
    config, record = run.config, {"step": run.step, "loss": loss}
    if run.eval_fn is not None:
        plain = run.accelerator.unwrap_model(run.model)
        plain.eval()
        with torch.no_grad():
            record.update(run.eval_fn(plain))
        plain.train(run.training_mode)
        if config.metric not in record:
            raise ValueError(f"eval_fn returned {sorted(record)}, without the metric {config.metric!r}")
    run.history.append(record)
    final_keep = run.pruner is None or run.pruner.kept_fraction(run.step) <= config.keep_ratio
    value = record.get(config.metric)
    if run.eval_fn is not None and final_keep and _improved(value, run.best_metric, config.greater_is_better):
        run.best_metric, run.best_step = value, run.step
        if run.output_dir is not None:
            _checkpoint(run, BEST, {"step": run.step, "metric": config.metric, "value": value}, with_state=False)
    if run.output_dir is not None:
        _checkpoint(run, LATEST, {"step": run.step, "best_metric": run.best_metric, "best_step": run.best_step,
                                  "history": run.history, "config": config.to_dict(),
                                  "data_seed": run.accelerator.dataloader_config.data_seed,
                                  "distilling": run.teacher is not None,
                                  PROCESSES_KEY: run.accelerator.num_processes}, with_state=True)
    run.bar.set_postfix({k: f"{v:.4g}" for k, v in record.items() if k != "step" and isinstance(v, float)})
    if run.callback is not None:
        run.callback(run.accelerator.unwrap_model(run.model), record)


def _optimizer_step(run: _Run, batch: dict, params: list[torch.Tensor]) -> torch.Tensor:
    """Forward (and the teacher's), loss, backward, clipping, optimizer, schedule and pruner; returns the loss."""
    config, labels = run.config, batch["labels"]
    want_hidden = run.teacher is not None and config.hd_lambda > 0
    out = run.model(**batch, output_hidden_states=want_hidden)
    parts, processes = None, across(run.accelerator)
    if run.teacher is not None:
        with torch.no_grad():
            teacher_out = run.teacher(**batch, output_hidden_states=want_hidden)
        loss, parts = kd_loss(out, teacher_out, labels, run.causal, config.kd_lambda, config.temperature,
                              config.task_lambda, config.hd_lambda, processes)
    else:
        loss = fine_tuning_loss(out, labels, run.causal, processes)
    if config.mixed_precision != "fp16" and not torch.isfinite(loss):  # fp16 (loss-scaled: _setup) skips such a step
        raise FloatingPointError(_non_finite(run.step + 1, loss, parts))
    run.accelerator.backward(loss)
    if config.max_grad_norm is not None:
        run.accelerator.clip_grad_norm_(params, config.max_grad_norm)
    run.optimizer.step()
    skipped = run.accelerator.optimizer_step_was_skipped  # fp16: the loss scaler skipped an overflowing step
    if not skipped:  # the schedule follows the steps taken
        run.scheduler.step()
    if run.pruner is not None:
        run.pruner.step(update_scores=not skipped)
    run.optimizer.zero_grad(set_to_none=True)
    return loss


def _non_finite(step: int, loss: torch.Tensor, parts: dict | None) -> str:
    """What a non-finite loss at `step` is made of, and that nothing of the step was applied."""
    terms = ", ".join(f"{name} {value:.4g}" for name, value in parts.items()) if parts else "the fine-tuning loss"
    message = (f"step {step}: the loss is {loss.item()} ({terms}); training stopped before this step's update: the "
               f"model is as after step {step - 1} and the checkpoints are as they were")
    if parts and parts.get("hd") == float("-inf"):
        message += ("; the hidden-state term log(MSE) is -inf: the student's hidden states equal the teacher's "
                    "(use hd_lambda=0 until they differ)")
    return message


def _batches(run: _Run):
    """The rest of the current epoch's batches: the epoch's seeded order, those already trained skipped."""
    epoch, skip = divmod(run.step, len(run.loader))
    run.loader.set_epoch(epoch)
    return run.accelerator.skip_first_batches(run.loader, skip) if skip else run.loader


def train(
    model: nn.Module,
    train_data,
    config: TrainConfig,
    *,
    collate_fn: Callable | None = None,
    eval_fn: Callable[[nn.Module], dict[str, float]] | None = None,
    teacher: nn.Module | None = None,
    output_dir=None,
    resume: bool = False,
    progress: bool = True,
    callback: Callable[[nn.Module, dict], None] | None = None,
    tokenizer=None,
) -> TrainResult:
    """Train `model` in place for config.steps optimizer steps on `train_data` (a map-style dataset
    whose batches, made by `collate_fn`, are model input dicts with `labels`). See the module doc.
    `callback(model, record)` runs after every evaluation (record: step, loss, metrics); `tokenizer`
    is saved into every checkpoint."""
    output_dir = Path(output_dir) if output_dir is not None else None
    _check_arguments({"model": model, "teacher": teacher}, train_data, config, eval_fn, output_dir, resume)
    with run_lock(output_dir) if output_dir is not None else nullcontext():  # one run at a time there
        return _train(model, train_data, config, collate_fn, eval_fn, teacher, output_dir, resume, progress, callback,
                      tokenizer)


def _train(model, train_data, config, collate_fn, eval_fn, teacher, output_dir, resume, progress, callback,
           tokenizer) -> TrainResult:
    run = _setup(model, train_data, config, collate_fn, teacher, output_dir, eval_fn, callback, tokenizer)
    if resume and (output_dir / LATEST / "config.json").exists():
        _resume(run)
    _prepare(run)
    check_batches_per_epoch(run.loader, len(train_data), config.batch_size, run.accelerator.num_processes)
    try:
        _train_steps(run, progress)
    finally:
        _hand_back(model, teacher)
    if run.pruner is not None:
        run.pruner.finalize()
    run.accelerator.wait_for_everyone()
    return TrainResult(run.step, run.best_step, run.best_metric, run.history, output_dir)


def _train_steps(run: _Run, progress: bool) -> None:
    """The optimizer steps from run.step to config.steps, evaluating and checkpointing on the way."""
    config, teacher = run.config, run.teacher
    params = [p for p in run.model.parameters() if p.requires_grad]
    run.bar = tqdm(total=config.steps, initial=run.step, desc="training" if teacher is None else "KD recovery",
                   unit="step", disable=not progress or not run.accelerator.is_main_process)
    run.model.train(run.training_mode)
    running = 0.0
    try:
        while run.step < config.steps:
            for batch in _batches(run):
                loss = _optimizer_step(run, batch, params)
                run.step += 1
                running += mean_over_processes(run.accelerator, loss)
                run.bar.update(1)
                if (config.eval_every and run.step % config.eval_every == 0) or run.step == config.steps:
                    _evaluate(run, running / (run.step - (run.history[-1]["step"] if run.history else 0)))
                    running = 0.0
                if run.step >= config.steps:
                    break
    finally:
        run.bar.close()  # before an error is printed


def _put_back(output_dir: Path) -> None:
    """A run killed while a checkpoint replaced best/ or latest/ left the previous one aside (atomic.py's
    restore_previous): put it back before reading what the directory holds, so a resume starts from it."""
    for name in (LATEST, BEST):
        restore_previous(output_dir / name)


def resumable_step(output_dir) -> int | None:
    """The step a run in output_dir would resume from (None: nothing to resume); read-only (a latest/ left aside
    by a kill is read where it is: the resume puts it back)."""
    path = Path(output_dir) / LATEST
    path = previous_aside(path) or path
    return read_progress(path)["step"] if (path / "config.json").exists() else None
