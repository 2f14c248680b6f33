"""The tasks' metrics in pure Python, as fractions in [0, 1].

accuracy; binary F1 (MRPC's f1, MultiRC's f1_a); MultiRC's per-question f1_m and exact_match (SuperGLUE's
definitions, as evaluate's super_glue metric computes them with scikit-learn); SQuAD-style exact match and
token F1 with the usual answer normalisation (lower case, no punctuation, no articles a/an/the, single
spaces), taking the best match over all gold answers.
"""
from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Hashable, Sequence

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = set(string.punctuation)


def _check_lengths(predictions: Sequence, references: Sequence) -> None:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if not predictions:
        raise ValueError("no predictions to score")


def accuracy(predictions: Sequence[Hashable], references: Sequence[Hashable]) -> float:
    """Fraction of predictions equal to their reference."""
    _check_lengths(predictions, references)
    return sum(p == r for p, r in zip(predictions, references)) / len(predictions)


def _f1(tp: int, fp: int, fn: int) -> float:
    # scikit-learn's convention: 0 when there is no true positive (precision or recall undefined or zero)
    return 0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn)


def binary_f1(predictions: Sequence[Hashable], references: Sequence[Hashable], positive: Hashable = 1) -> float:
    """F1 of the `positive` class; anything else (including an invalid prediction) is negative."""
    _check_lengths(predictions, references)
    tp = sum(p == positive and r == positive for p, r in zip(predictions, references))
    fp = sum(p == positive and r != positive for p, r in zip(predictions, references))
    fn = sum(p != positive and r == positive for p, r in zip(predictions, references))
    return _f1(tp, fp, fn)


def macro_f1(predictions: Sequence[Hashable], references: Sequence[Hashable]) -> float:
    """Mean F1 over every class seen in the predictions or the references (scikit-learn's average="macro")."""
    _check_lengths(predictions, references)
    classes = set(predictions) | set(references)
    return sum(binary_f1(predictions, references, c) for c in classes) / len(classes)


def multirc_scores(predictions: Sequence[Hashable], references: Sequence[Hashable],
                   question_ids: Sequence[Hashable], positive: Hashable = 1) -> dict[str, float]:
    """MultiRC: f1_a, binary F1 over all answer options; f1_m, the mean over questions of the macro F1 of
    their options; exact_match, the fraction of questions with every option right."""
    _check_lengths(predictions, references)
    if len(question_ids) != len(predictions):
        raise ValueError(f"{len(question_ids)} question ids for {len(predictions)} predictions")
    questions: dict[Hashable, tuple[list, list]] = {}
    for p, r, q in zip(predictions, references, question_ids):
        preds, refs = questions.setdefault(q, ([], []))
        preds.append(p)
        refs.append(r)
    f1_m = sum(macro_f1(p, r) for p, r in questions.values()) / len(questions)
    em = sum(p == r for p, r in questions.values()) / len(questions)
    return {"f1_a": binary_f1(predictions, references, positive), "f1_m": f1_m, "exact_match": em}


def normalize_answer(text: str) -> str:
    """SQuAD's answer normalisation: lower case, punctuation removed, articles removed, whitespace folded."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def _best(score, prediction: str, references: Sequence[str]) -> float:
    if isinstance(references, str):
        raise TypeError("references must be a list of gold answers, not a string")
    if not references:
        raise ValueError("no gold answer to compare the prediction with")
    return max(score(prediction, r) for r in references)


def _exact(prediction: str, reference: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(reference))


def _token_f1(prediction: str, reference: str) -> float:
    pred, gold = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not pred or not gold:  # SQuAD 2.0's rule: an empty answer scores 1 only against an empty answer
        return float(pred == gold)
    same = sum((Counter(pred) & Counter(gold)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(gold)
    return 2 * precision * recall / (precision + recall)


def exact_match(prediction: str, references: Sequence[str]) -> float:
    """1.0 when the normalised prediction equals a normalised gold answer, else 0.0."""
    return _best(_exact, prediction, references)


def token_f1(prediction: str, references: Sequence[str]) -> float:
    """The best bag-of-tokens F1 between the normalised prediction and a normalised gold answer."""
    return _best(_token_f1, prediction, references)


def squad_scores(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """Mean exact_match and f1 over examples; references[i] lists every gold answer of example i."""
    _check_lengths(predictions, references)
    n = len(predictions)
    return {"exact_match": sum(exact_match(p, r) for p, r in zip(predictions, references)) / n,
            "f1": sum(token_f1(p, r) for p, r in zip(predictions, references)) / n}
