"""Scoring (system prompt, user prompt, task, examples) combinations with the base LM, in one batch.

Two ways to answer a question (the recipe's top-level ``scoring`` key, carried by the base ``LM``):

- ``generate`` (default): the base model generates a response; the task extracts and scores its answer.
- ``loglik``: for a multiple-choice example (``answer_kind == "choice"`` and listed options), no
  generation: each option X is scored by the log-likelihood of ``(X)`` right after the prompt, i.e.
  at the start of the assistant turn, and the option with the highest summed log-probability is the
  answer (ties go to the earlier letter). ``(X)`` is how every source lists options in the question,
  and of the continuations measured it agrees best with generative scoring (docs/method.md). All
  options' continuations have the same tokens but the letter, so the sum needs no length
  normalization. The recorded response is the chosen option written as an answer,
  ``<answer>(C) its text</answer>``, scored by the task like a generated one (and shown to the
  optimizer when wrong). Other examples (non-multiple-choice tasks in the same run) are generated.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from statistics import fmean

from .models.base import LM, chat_key, make_chat
from .tasks.extract import LETTERS
from .tasks.task import Example, Task

# The recipe's `scoring` values.
SCORING_MODES = ("generate", "loglik")
# What `scoring: loglik` scores after the prompt for the option of letter X (module doc, docs/method.md),
# and the response it records for the chosen option.
LOGLIK_CONTINUATION = "({letter})"
LOGLIK_RESPONSE = "<answer>({letter}) {option}</answer>"


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

    def __init__(self, base: LM, dedupe: bool = True, scoring: str | None = None):
        self.base = base
        # "generate" or "loglik" (module doc); by default the base LM's, which the recipe sets.
        self.scoring = scoring if scoring is not None else getattr(base, "scoring", "generate")
        if self.scoring not in SCORING_MODES:
            raise ValueError(f"unknown scoring {self.scoring!r}; expected one of {SCORING_MODES}")
        # Generate each distinct greedy chat of a batch once. Off only to model code that has no such
        # step (the benchmark's reference way, like the paper code, generates every copy).
        self.dedupe = dedupe
        self.generations = 0
        self.batches = 0
        # Under `scoring: loglik`: distinct multiple-choice chats answered by log-likelihood, and calls.
        self.loglik_questions = 0
        self.loglik_batches = 0

    def __call__(self, trials: Sequence[Trial], desc: str | None = None) -> list[TrialScore]:
        user_texts = [[t.task.render(t.user_prompt, ex) for ex in t.examples] for t in trials]
        chats = [
            make_chat(t.system_prompt, text)
            for t, texts in zip(trials, user_texts, strict=True)
            for text in texts
        ]
        responses = iter(self._answer(trials, chats, desc))
        return [
            _score_trial(t, texts, [next(responses) for _ in texts])
            for t, texts in zip(trials, user_texts, strict=True)
        ]

    def _answer(self, trials: Sequence[Trial], chats: list, desc: str | None) -> list[str]:
        """One response per chat: the likeliest option's answer for multiple-choice examples under
        ``loglik``, a generated one for every other example (in one generation batch)."""
        examples = [ex for t in trials for ex in t.examples]
        tasks = [t.task for t in trials for _ in t.examples]
        chosen = [i for i, (task, ex) in enumerate(zip(tasks, examples, strict=True))
                  if self.scoring == "loglik" and is_multiple_choice(task, ex)]
        if not chosen:
            return self._generate(chats, desc)
        responses: list[str] = [""] * len(chats)
        taken = set(chosen)
        rest = [i for i in range(len(chats)) if i not in taken]
        for i, text in zip(rest, self._generate([chats[i] for i in rest], desc), strict=True):
            responses[i] = text
        picks = self._choose([chats[i] for i in chosen], [examples[i] for i in chosen], desc)
        for i, text in zip(chosen, picks, strict=True):
            responses[i] = text
        return responses

    def _choose(self, chats: list, examples: list[Example], desc: str | None) -> list[str]:
        """The answer of the likeliest option for each (chat, multiple-choice example), in one engine call;
        identical chats are scored once."""
        unique, positions = dedupe(chats)
        options: dict[int, tuple[str, ...]] = {}  # distinct chat -> its example's options
        for position, example in zip(positions, examples, strict=True):
            options.setdefault(position, tuple(example.options[: len(LETTERS)]))
        requests = [(unique[p], LOGLIK_CONTINUATION.format(letter=letter)) for p, texts in options.items()
                    for letter in LETTERS[: len(texts)]]
        values = iter(self.base.loglikelihood(requests, desc=desc))
        answers = {}
        for p, texts in options.items():
            scores = [next(values) for _ in texts]
            best = scores.index(max(scores))
            answers[p] = LOGLIK_RESPONSE.format(letter=LETTERS[best], option=texts[best])
        self.loglik_questions += len(unique)
        self.loglik_batches += 1
        return [answers[p] for p in positions]

    def _generate(self, chats: list, desc: str | None) -> list[str]:
        if not chats:
            return []
        if self.base.settings.greedy and self.dedupe:
            unique, positions = dedupe(chats)
        else:
            unique, positions = chats, list(range(len(chats)))
        outputs = self.base(unique, desc=desc)
        self.generations += len(unique)
        self.batches += 1
        return [outputs[i] for i in positions]


def is_multiple_choice(task: Task, example: Example) -> bool:
    """Whether ``scoring: loglik`` answers this example by its options' likelihood."""
    return task.answer_kind == "choice" and bool(example.options)


def dedupe(chats: list) -> tuple[list, list[int]]:
    """Distinct chats and, for each chat, its position among them.

    Only for greedy decoding, where identical chats give identical answers: a sampled base model must
    give each copy its own sample.
    """
    index: dict[str, int] = {}
    unique, positions = [], []
    for chat in chats:
        key = chat_key(chat)
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
