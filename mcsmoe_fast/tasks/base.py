"""A text-to-text task: where its data lives, the raw columns it reads, its prompt, metrics and the paper's
fine-tuning batch size and learning rate."""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

CLASSIFICATION = "classification"  # the target is one of a few answer choices (fixed label words, or COPA's)
GENERATIVE = "generative"  # the target is free text (SQuAD, HotpotQA): exact match and token F1


_KINDS = {"text": ("a string", "strings"), "int": ("an integer", "integers"), "dict": ("an object", "objects")}


@dataclass(frozen=True)
class Column:
    """A raw column of a task's data, as the hub dataset has it, or a key of a "dict" column.

    kind: "text" (a string), "int" (an integer; a CSV cell holds its digits), "dict" (a JSON object with at
    least the `keys`, each a Column of its own; a CSV cell holds it as JSON text), or "list[...]" of one of
    these ("list[list[text]]": a list of lists of strings). aligned: the keys of a "dict" column are lists
    with one entry per item (HotpotQA's titles and their sentences)."""

    name: str
    kind: str
    keys: tuple[Column, ...] = ()
    aligned: bool = False
    doc: str = ""

    def __post_init__(self):
        inner = self.kind
        while inner.startswith("list[") and inner.endswith("]"):
            inner = inner[5:-1]
        if inner not in _KINDS:
            raise ValueError(f"column {self.name!r}: kind must be 'text', 'int', 'dict' or 'list[...]' of one, "
                             f"got {self.kind!r}")

    @property
    def expected(self) -> str:
        """What a value of this column must be, in words ("a list of strings")."""
        return _describe(self.kind)

    def accepts(self, value) -> bool:
        """Whether `value` has this column's kind, all the way down (a dict's own keys are not looked into)."""
        return _has_kind(value, self.kind)


def _describe(kind: str, plural: bool = False) -> str:
    if kind.startswith("list["):
        return ("lists of " if plural else "a list of ") + _describe(kind[5:-1], plural=True)
    return _KINDS[kind][plural]


def _has_kind(value, kind: str) -> bool:
    if kind.startswith("list["):
        return isinstance(value, list) and all(_has_kind(v, kind[5:-1]) for v in value)
    if kind == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, {"text": str, "dict": dict}[kind])


@dataclass(frozen=True)
class Task:
    """One of the paper's downstream tasks, as text-to-text.

    render(example) -> (source, target or None when the example is unlabelled) is the paper's prompt (see
    prompts.py). label_words are the fixed answer choices, indexed by the dataset's label; COPA has none
    and gives each example's choices through example_choices. metrics: names of what score_predictions
    returns, the first one being the one the original selected checkpoints by."""

    name: str
    hub_id: str
    hub_config: str | None
    columns: tuple[Column, ...]
    render: Callable[[Mapping], tuple[str, str | None]]
    prompt_name: str
    kind: str
    metrics: tuple[str, ...]
    batch_size: int
    learning_rate: float
    label_words: tuple[str, ...] = ()
    example_choices: Callable[[Mapping], tuple[str, ...]] | None = None
    positive_label: str | None = None  # the positive class of binary F1
    answers: Callable[[Mapping], list[str]] | None = None  # all gold answers of a generative example
    optional_columns: tuple[Column, ...] = ()
    train_split: str = "train"
    eval_split: str = "validation"
    max_new_tokens: int = 32
    description: str = field(default="", compare=False)

    def __post_init__(self):
        if self.kind not in (CLASSIFICATION, GENERATIVE):
            raise ValueError(f"task {self.name!r}: kind must be {CLASSIFICATION!r} or {GENERATIVE!r}, "
                             f"got {self.kind!r}")
        if self.kind == CLASSIFICATION and not self.label_words and self.example_choices is None:
            raise ValueError(f"task {self.name!r}: a classification task needs label_words or example_choices")
        if self.positive_label is not None and self.positive_label not in self.label_words:
            raise ValueError(f"task {self.name!r}: positive_label {self.positive_label!r} is not a label word")

    @property
    def is_classification(self) -> bool:
        return self.kind == CLASSIFICATION

    @property
    def primary_metric(self) -> str:
        return self.metrics[0]

    @property
    def column_names(self) -> tuple[str, ...]:
        """The raw columns the prompt and the metrics read (a data file must have them all)."""
        return tuple(c.name for c in self.columns)

    def source(self, example: Mapping) -> str:
        """The prompt the model reads (no label needed)."""
        return self.render(example)[0]

    def to_text(self, example: Mapping) -> tuple[str, str]:
        """(source, target) of a labelled example; a ValueError for an unlabelled one."""
        source, target = self.render(example)
        if target is None:
            raise ValueError(f"{self.name}: the example has no label/answer (test splits of GLUE, SuperGLUE and "
                             f"WinoGrande are unlabelled; use {self.eval_split!r} to evaluate): {_short(example)}")
        return source, target

    def choices(self, example: Mapping) -> tuple[str, ...]:
        """The answer choices of a classification example (its label words, or COPA's two alternatives)."""
        if not self.is_classification:
            raise ValueError(f"task {self.name!r} is generative: it has no answer choices")
        return tuple(self.example_choices(example)) if self.example_choices is not None else self.label_words

    def references(self, example: Mapping) -> list[str]:
        """Every acceptable answer: all gold answers of a generative example (SQuAD lists several), the
        target itself otherwise."""
        if self.answers is not None:
            found = [a.strip() for a in self.answers(example)]
            if found:
                return found
        return [self.to_text(example)[1]]


def _short(example: Mapping, width: int = 200) -> str:
    text = repr(dict(example))
    return text if len(text) <= width else text[:width] + "...}"
