"""Training settings: the paper's defaults (AdamW eps 1e-6 for KD and 1e-8 for plain fine-tuning, betas
0.9/0.98, weight decay 0.01, linear decay after a linear warm-up of 16 steps; KD alpha 0.2 at temperature
2, task-loss weight 1, no hidden-state loss; routers frozen; the compression pruner's warm-ups 1x and 4x
the learning-rate warm-up) in one dataclass that a YAML/JSON config file can fill."""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from ..compress import CompressOptions, check_keep_ratio


@dataclass
class TrainConfig:
    steps: int = 1000  # optimizer steps of this run (a resumed run ends at the same step)
    batch_size: int = 16  # per process: N processes train on global batches of N x batch_size
    learning_rate: float = 1e-4
    warmup_steps: int = 16
    weight_decay: float = 0.01
    adam_eps: float | None = None  # None: 1e-6 with a teacher (KD), 1e-8 without (fine-tuning), as the original
    adam_betas: tuple[float, float] = (0.9, 0.98)
    max_grad_norm: float | None = 1.0  # the original never clips (docs/training.md says why we do)
    train_routers: bool = False  # the original freezes the routers for fine-tuning and KD alike
    # knowledge distillation (used when a teacher is given)
    kd_lambda: float = 0.2
    temperature: float = 2.0
    task_lambda: float = 1.0
    hd_lambda: float = 0.0
    # evaluation and checkpoints
    eval_every: int = 100  # steps between evaluations (and "latest" checkpoints); 0: only at the end
    metric: str = "perplexity"  # the key of eval_fn's result that picks the best checkpoint
    greater_is_better: bool = False
    # compression pruner (used when the student has compressed experts in pruning state)
    keep_ratio: float = CompressOptions.keep_ratio
    prune_initial_warmup: int | None = None  # steps before any row is pruned; None: warmup_steps
    prune_final_warmup: int | None = None  # last steps held at keep_ratio; None: 4 * warmup_steps
    seed: int = 0
    mixed_precision: str = "no"  # accelerate's: "no", "fp16", "bf16"

    def __post_init__(self):
        problems = []
        if self.steps < 1:
            problems.append(f"steps must be >= 1, got {self.steps}")
        if self.batch_size < 1:
            problems.append(f"batch_size must be >= 1, got {self.batch_size}")
        if not self.learning_rate > 0:
            problems.append(f"learning_rate must be > 0, got {self.learning_rate}")
        if self.warmup_steps < 0 or self.eval_every < 0:
            problems.append("warmup_steps and eval_every must be >= 0")
        if not self.temperature > 0:
            problems.append(f"temperature must be > 0, got {self.temperature}")
        if min(self.kd_lambda, self.task_lambda, self.hd_lambda) < 0:
            problems.append("kd_lambda, task_lambda and hd_lambda must be >= 0")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:  # negative: clipping would flip gradients
            problems.append(f"max_grad_norm must be > 0 (None: no clipping), got {self.max_grad_norm}")
        if self.adam_eps is not None and not self.adam_eps > 0:
            problems.append(f"adam_eps must be > 0, got {self.adam_eps}")
        if any(w is not None and w < 0 for w in (self.prune_initial_warmup, self.prune_final_warmup)):
            problems.append("prune_initial_warmup and prune_final_warmup must be >= 0")
        try:
            check_keep_ratio(self.keep_ratio)
        except ValueError as exc:
            problems.append(str(exc))
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            problems.append(f"mixed_precision must be 'no', 'fp16' or 'bf16', got {self.mixed_precision!r}")
        if not problems:  # the warm-ups are derived from the settings above
            problems += self._warmup_problems()
        if problems:
            raise ValueError("TrainConfig: " + "; ".join(problems))
        self.adam_betas = tuple(self.adam_betas)

    def optimizer_eps(self, distilling: bool) -> float:
        if self.adam_eps is not None:
            return self.adam_eps
        return 1e-6 if distilling else 1e-8

    def pruning_warmups(self) -> tuple[int, int]:
        """(initial, final) warm-ups of the compression pruner. The defaults, 1x and 4x the learning-rate
        warm-up (the original's 50 and 200 steps), are scaled by steps / (2 * their sum) when the two
        would leave no pruning stretch; given values are taken as they are (warm-ups that do not fit are
        refused when the config is made)."""
        given = (self.prune_initial_warmup, self.prune_final_warmup)
        initial, final = (self.warmup_steps if given[0] is None else given[0],
                          4 * self.warmup_steps if given[1] is None else given[1])
        total = initial + final
        if None in given and total >= self.steps:
            initial = initial * self.steps // (2 * total) if given[0] is None else initial
            final = final * self.steps // (2 * total) if given[1] is None else final
        return initial, final

    def _warmup_problems(self) -> list[str]:
        """The pruning warm-ups must fit in the run, and pruning to keep_ratio < 1 must start before it ends;
        a warm-up left to its default is named with the default it was derived from."""
        names, defaults = ("prune_initial_warmup", "prune_final_warmup"), ("warmup_steps", "4 x warmup_steps")
        given, warmups = (self.prune_initial_warmup, self.prune_final_warmup), self.pruning_warmups()
        if sum(warmups) > self.steps:
            terms = " + ".join(f"{names[i]} {warmups[i]} (given)" if given[i] is not None else
                               f"{names[i]} {warmups[i]} (not given: {defaults[i]} = "
                               f"{(1, 4)[i] * self.warmup_steps}, scaled down)" for i in (0, 1))
            remedy = "pass smaller ones"
            if None in given:  # exactly one side was derived (two defaults always fit)
                i = given.index(None)
                remedy = (f"pass {names[i]} (at most {max(0, self.steps - warmups[1 - i])}) or a smaller "
                          f"{names[1 - i]}")
            return [f"the pruning warm-ups do not fit in steps={self.steps}: {terms} = {sum(warmups)}; {remedy}"]
        if self.keep_ratio < 1 and warmups[0] >= self.steps:  # the student would come back unpruned
            return [f"prune_initial_warmup ({warmups[0]}) must be below steps ({self.steps}): pruning to keep_ratio "
                    f"{self.keep_ratio} starts after the initial warm-up, which would end with the run"]
        return []

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"TrainConfig: unknown settings {unknown}; known: {sorted(known)}")
        return cls(**values)
