"""Scoring one response against one example's gold answers, for each answer kind.

| kind   | extracted answer                          | score                                            |
|--------|-------------------------------------------|--------------------------------------------------|
| choice | option letter (letter or option text)     | 1 if the letter is a gold letter                 |
| label  | one of the task's labels                  | 1 if it equals a gold label (case-insensitive)   |
| number | a number in digits or words (0-99)        | 1 if numerically equal to a gold answer          |
| rating | a whole number 1-5                        | 1 if equal to the gold rating                    |
| open   | the answer text                           | the task's open metric, best over gold answers   |

Open answers (several gold strings) default to **contains-match**: 1 when a normalized gold answer
appears, as whole words, inside the normalized predicted answer. It forgives the extra words small
models add ("The capital is Paris.") while staying binary, so scores are accuracies like every other
kind. A task may choose ``exact`` (normalized exact match) or ``f1`` (SQuAD token F1, graded) through
``Task.meta["metric"]``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Protocol

from .extract import (
    extract_choice,
    extract_label,
    extract_number,
    extract_open,
    extract_rating,
    find_answer_segment,
    normalize_text,
    parse_number,
)


# What scoring reads of a task and an example (task.py's Task and Example; task.py imports this module).
class Task(Protocol):
    name: str
    answer_kind: str
    labels: tuple[str, ...]
    meta: dict


class Example(Protocol):
    answers: tuple[str, ...]
    options: tuple[str, ...]


OPEN_METRICS = ("contains", "exact", "f1")
# contains-match: binary like the other kinds, and fair to verbose small models (see the module doc).
DEFAULT_OPEN_METRIC = "contains"


def exact_match(prediction: str, gold: str) -> float:
    return float(bool(normalize_text(gold)) and normalize_text(prediction) == normalize_text(gold))


def contains_match(prediction: str, gold: str) -> float:
    gold_text = normalize_text(gold)
    return float(bool(gold_text) and f" {gold_text} " in f" {normalize_text(prediction)} ")


def token_f1(prediction: str, gold: str) -> float:
    predicted, expected = normalize_text(prediction).split(), normalize_text(gold).split()
    common = sum((Counter(predicted) & Counter(expected)).values())
    if not predicted or not expected or not common:
        return 0.0
    precision, recall = common / len(predicted), common / len(expected)
    return 2 * precision * recall / (precision + recall)


_OPEN_SCORERS = {"contains": contains_match, "exact": exact_match, "f1": token_f1}


def open_score(prediction: str, golds: Sequence[str], metric: str = DEFAULT_OPEN_METRIC) -> float:
    """The best score of ``prediction`` over all gold answers under ``metric``."""
    scorer = _OPEN_SCORERS[metric]
    return max((scorer(prediction, gold) for gold in golds), default=0.0)


def _same_number(predicted: str | None, golds: Sequence[str]) -> float:
    if predicted is None:
        return 0.0
    value = float(predicted)
    for gold in golds:
        expected = parse_number(gold)
        if expected is not None and abs(value - expected) <= 1e-6 * max(1.0, abs(expected)):
            return 1.0
    return 0.0


def score_response(task: Task, response: str, example: Example) -> float:
    """Score in [0, 1] of ``response`` for ``example`` under ``task``'s answer kind (table above)."""
    segment = find_answer_segment(response)
    kind = task.answer_kind
    if kind == "choice":
        letter = extract_choice(segment, example.options)
        return float(letter is not None and letter in {gold.strip().upper() for gold in example.answers})
    if kind == "label":
        label = extract_label(segment, task.labels)
        return float(label is not None and label.lower() in {gold.strip().lower() for gold in example.answers})
    if kind == "number":
        return _same_number(extract_number(segment), example.answers)
    if kind == "rating":
        return _same_number(extract_rating(segment), example.answers)
    if kind == "open":
        return open_score(extract_open(segment), example.answers, task.meta.get("metric", DEFAULT_OPEN_METRIC))
    raise ValueError(f"task {task.name}: unknown answer kind {kind!r}")


def describe_metric(task: Task) -> str:
    """One line saying how ``task`` is scored (for `metaspo tasks show` and reports)."""
    if task.answer_kind == "open":
        metric = task.meta.get("metric", DEFAULT_OPEN_METRIC)
        names = {"contains": "contains-match", "exact": "normalized exact match", "f1": "token F1"}
        return f"{names[metric]} against any gold answer (open answer)"
    return {
        "choice": "accuracy: the option letter (or the option's text) must be a gold option",
        "label": f"accuracy: the label must equal the gold label (one of {', '.join(task.labels)})",
        "number": "accuracy: the number (digits or words) must equal the gold number",
        "rating": "accuracy: the rating 1-5 must equal the gold rating",
    }[task.answer_kind]
