"""Scoring (system prompt, user prompt, task, examples) combinations with the base LM, in one batch."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from statistics import fmean

from ..models.base import LM, make_chat
from ..tasks.task import Example, Task


@dataclass(frozen=True)
class Trial:
    """One combination to score: a prompt pair on some examples of a task."""

    system_prompt: str
    user_prompt: str
    task: Task
    examples: Sequence[Example]


@dataclass(frozen=True)
class WrongExample:
    """A question the base model got wrong, as shown to the optimizer."""

    index: int  # position among the trial's examples (the task's train split for search nodes)
    question: str
    user_text: str  # the full user turn the model saw
    response: str
    answers: tuple[str, ...]


@dataclass
class TrialScore:
    mean: float
    scores: list[float]  # one per example, in [0, 1]
    responses: list[str]
    wrong: list[WrongExample] = field(default_factory=list)


class Scorer:
    """Scores many trials in one ``base`` call and counts what it generated."""

    def __init__(self, base: LM):
        self.base = base
        self.generations = 0
        self.batches = 0

    def __call__(self, trials: Sequence[Trial], desc: str | None = None) -> list[TrialScore]:
        user_texts = [[t.task.render(t.user_prompt, ex) for ex in t.examples] for t in trials]
        chats = [
            make_chat(t.system_prompt, text)
            for t, texts in zip(trials, user_texts, strict=True)
            for text in texts
        ]
        responses = iter(self._generate(chats, desc))
        return [
            _score_trial(t, texts, [next(responses) for _ in texts])
            for t, texts in zip(trials, user_texts, strict=True)
        ]

    def _generate(self, chats: list, desc: str | None) -> list[str]:
        if not chats:
            return []
        if self.base.settings.greedy:
            unique, positions = _dedupe(chats)
        else:
            unique, positions = chats, list(range(len(chats)))
        outputs = self.base(unique, desc=desc)
        self.generations += len(unique)
        self.batches += 1
        return [outputs[i] for i in positions]


def _dedupe(chats: list) -> tuple[list, list[int]]:
    """Distinct chats and, for each chat, its position among them.

    Only for greedy decoding, where identical chats give identical answers: a sampled base model must
    give each copy its own sample.
    """
    index: dict[str, int] = {}
    unique, positions = [], []
    for chat in chats:
        key = repr(chat)
        if key not in index:
            index[key] = len(unique)
            unique.append(chat)
        positions.append(index[key])
    return unique, positions


def _score_trial(trial: Trial, user_texts: list[str], responses: list[str]) -> TrialScore:
    scores = [float(trial.task.score(r, ex)) for r, ex in zip(responses, trial.examples, strict=True)]
    wrong = [
        WrongExample(i, ex.question, text, r, ex.answers)
        for i, (ex, text, r, s) in enumerate(zip(trial.examples, user_texts, responses, scores, strict=True))
        if s < 1.0  # partial credit still leaves something for the optimizer to fix
    ]
    return TrialScore(fmean(scores) if scores else 0.0, scores, responses, wrong)
