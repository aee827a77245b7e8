"""From a source's examples to a Task: answer kinds, default prompts, and the seeded train/test sample.

Task sizes (the same rule for every source):

- ``train_size`` larger than the examples available for training is an error (MetaspoError, exit 2)
  that names the task and both sizes: meta-training on fewer questions than asked would silently
  change the experiment.
- ``test_size`` is an upper bound ("up to N test questions"): it is capped to what is available,
  without an error, because several benchmarks have small test sets. A task left with no test
  question at all is an error.
- Sources with their own train/test split (reference layout, hub datasets with two splits) sample
  each split: shuffle it with ``random.Random(seed)``, keep the first ``train_size`` / ``test_size``.
- Sources without a split (BIG-bench, single-split datasets) are split by seed: shuffle all examples
  with ``random.Random(seed)``, the first ``train_size`` go to train, the next (up to ``test_size``)
  to test, so train and test never share a question.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import MetaspoError, did_you_mean
from .choices import gold_letters, parse_options
from .extract import number_value
from .metrics import OPEN_METRICS
from .task import QUESTION_SLOT, Example, Task

ANSWER_KINDS = ("choice", "label", "number", "rating", "open")
# The paper's settings: 50 training questions per task, up to 500 test questions.
DEFAULT_TRAIN_SIZE = 50
DEFAULT_TEST_SIZE = 500

# Our own default user prompts: short and neutral, so that the optimizer has room to improve them.
DEFAULT_PROMPTS = {
    "choice": f"Read the question and the options, then pick the best option.\n\n{QUESTION_SLOT}",
    "label": f"Read the input and decide which label fits it.\n\n{QUESTION_SLOT}",
    "number": f"Work out the answer to the question.\n\n{QUESTION_SLOT}",
    "rating": f"Read the customer review and predict its star rating.\n\n{QUESTION_SLOT}",
    "open": f"Answer the question.\n\n{QUESTION_SLOT}",
}


def answer_format(kind: str, labels: Sequence[str] = ()) -> str:
    """The fixed instruction appended after every user prompt (Task.answer_format)."""
    what = {
        "choice": "the letter of the correct option",
        "label": "one of: " + ", ".join(labels),
        "number": "the final number",
        "rating": "the rating as a whole number from 1 to 5",
        "open": "a short final answer",
    }[kind]
    return f"End your response with your answer ({what}) inside <answer></answer> tags."


@dataclass
class TaskData:
    """What a source provides: example pools and how to read answers. ``test`` is None when the
    source has no split of its own (then ``train`` holds every example and is split by seed)."""

    train: list[Example]
    test: list[Example] | None
    answer_kind: str
    source: str
    labels: tuple[str, ...] = ()
    prompt: str | None = None
    description: str = ""
    meta: dict[str, Any] = field(default_factory=dict)


def sample_examples(task_name: str, data: TaskData, *, seed: int, train_size: int,
                    test_size: int) -> tuple[list[Example], list[Example]]:
    """The seeded train and test samples (rules in the module doc)."""
    for label, size in (("train_size", train_size), ("test_size", test_size)):
        if size < 0:
            raise MetaspoError(f"task {task_name}: {label} must be >= 0, got {size}")
    if data.test is None:
        pool = list(data.train)
        random.Random(seed).shuffle(pool)
        train_pool, test_pool = pool, pool[train_size:]
        available = f"{len(pool)} examples it has in all (split by seed into train and test)"
    else:
        train_pool, test_pool = list(data.train), list(data.test)
        random.Random(seed).shuffle(train_pool)
        random.Random(seed).shuffle(test_pool)
        available = f"{len(train_pool)} examples of its training split"
    if train_size > len(train_pool):
        raise MetaspoError(f"task {task_name}: train_size {train_size} is larger than the {available}",
                           hint="lower train_size (search.train_size in a recipe), or pick a larger task")
    test = test_pool[:test_size]
    if test_size > 0 and not test:
        why = (f"all {len(train_pool)} examples went to training" if data.test is None
               else "its test split is empty")
        raise MetaspoError(f"task {task_name}: no test questions left ({why})",
                           hint="lower train_size, or pick a larger task")
    return train_pool[:train_size], test


def build_task(name: str, domain: str, data: TaskData, *, seed: int, train_size: int, test_size: int) -> Task:
    train, test = sample_examples(name, data, seed=seed, train_size=train_size, test_size=test_size)
    meta = dict(data.meta)
    meta["pool_sizes"] = {"all": len(data.train)} if data.test is None else {"train": len(data.train),
                                                                               "test": len(data.test)}
    return Task(
        name=name,
        domain=domain,
        train=train,
        test=test,
        initial_prompt=data.prompt or DEFAULT_PROMPTS[data.answer_kind],
        answer_kind=data.answer_kind,
        labels=tuple(data.labels),
        answer_format=answer_format(data.answer_kind, data.labels),
        description=data.description,
        source=data.source,
        meta=meta,
    )


def check_kind(kind: str, labels: Sequence[str], where: str) -> None:
    """MetaspoError naming ``where`` for an unknown kind, or a label task without labels."""
    if kind not in ANSWER_KINDS:
        raise MetaspoError(f"{where}: unknown answer_kind {kind!r}", hint=did_you_mean(kind, ANSWER_KINDS)
                           or f"one of {', '.join(ANSWER_KINDS)}")
    if kind == "label" and not labels:
        raise MetaspoError(f"{where}: answer_kind 'label' needs a list of labels")


def check_metric(metric: str | None, where: str) -> None:
    if metric is not None and metric not in OPEN_METRICS:
        raise MetaspoError(f"{where}: unknown metric {metric!r}", hint=did_you_mean(metric, OPEN_METRICS)
                           or f"one of {', '.join(OPEN_METRICS)}")


def check_prompt(prompt: str | None, where: str) -> None:
    if prompt is not None and QUESTION_SLOT not in prompt:
        raise MetaspoError(f"{where}: the prompt has no {QUESTION_SLOT} slot")


# ---- examples from plain question/answer records (reference layout, hub rows) ---------------------

def answer_strings(answer: Any) -> tuple[str, ...]:
    """Gold answers as strings: a list gives several, 5.0 reads "5", None gives none."""
    values = answer if isinstance(answer, (list, tuple)) else [answer]
    strings = []
    for value in values:
        if value is None:
            continue
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        text = str(value).strip()
        if text:
            strings.append(text)
    return tuple(strings)


# At most this many distinct answers make a closed label set, e.g. yes/no or a 3-way sentiment.
MAX_LABELS = 10


def infer_kind(records: Sequence[tuple[str, tuple[str, ...], bool]]) -> tuple[str, tuple[str, ...]]:
    """The answer kind (and labels) of (question, answers, answer_was_list) records, from the data alone:

    - every question lists options "(A) ..." and its one answer names one of them: ``choice``;
    - every answer one whole number 1-5, with at least four distinct values: ``rating``;
    - every answer (each item of answer lists included) a number: ``number``;
    - answers given as lists (several accepted answers): ``open``;
    - at most ten distinct short answers, each seen at least twice on average: ``label``;
    - anything else: ``open``.
    """
    if not records:
        return "open", ()
    single = all(len(answers) == 1 for _, answers, _ in records)
    if single and all((options := parse_options(question)) and gold_letters(answers[0], options)
                      for question, answers, _ in records):
        return "choice", ()
    values = [number_value(answer) for _, answers, _ in records for answer in answers]
    if all(value is not None for value in values):
        if single and all(value == int(value) and 1 <= value <= 5 for value in values) and len(set(values)) >= 4:
            return "rating", ()
        return "number", ()
    if any(was_list for _, _, was_list in records):
        return "open", ()
    distinct: dict[str, str] = {}
    for _, answers, _ in records:
        for answer in answers:
            distinct.setdefault(answer.lower(), answer)
    short = all(len(label.split()) <= 4 for label in distinct.values())
    if short and len(distinct) <= MAX_LABELS and len(distinct) * 2 <= len(records):
        return "label", tuple(sorted(distinct.values(), key=str.lower))
    return "open", ()


def record_example(question: str, answers: tuple[str, ...], kind: str, where: str) -> Example:
    """An Example from a question/answers record; for choice tasks, options are read from the question."""
    if kind != "choice":
        return Example(question=question, answers=answers)
    options = parse_options(question)
    letters = tuple(letter for letter in (gold_letters(answer, options) for answer in answers) if letter)
    if not letters:
        raise MetaspoError(f"{where}: the answer {answers!r} names none of the options {options!r}")
    return Example(question=question, answers=letters, options=options)


def clean_question(text: str) -> str:
    """Questions keep their inner layout; only surrounding blank space and runs of blank lines go."""
    return re.sub(r"\n{3,}", "\n\n", str(text).strip())
