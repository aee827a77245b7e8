"""The Task: examples, an initial user prompt, and how a response is scored."""

from __future__ import annotations

from dataclasses import dataclass, field

from .metrics import score_response

QUESTION_SLOT = "{question}"


@dataclass(frozen=True)
class Example:
    # The text that fills the user prompt's {question} slot (options already listed for multiple choice).
    question: str
    # Gold answers: one or more accepted strings; for multiple choice, the gold option letter(s).
    answers: tuple[str, ...]
    # Option texts in letter order (A, B, ...) for multiple choice; empty otherwise.
    options: tuple[str, ...] = ()


@dataclass
class Task:
    name: str
    domain: str
    train: list[Example]
    test: list[Example]
    # The starting user prompt; must contain the {question} slot.
    initial_prompt: str
    # How answers are extracted and compared: "choice", "number", "label", "rating", "open".
    answer_kind: str
    # The closed label set for "label" tasks (e.g. ("yes", "no")); empty otherwise.
    labels: tuple[str, ...] = ()
    # Fixed instruction appended to every rendered prompt, so that scoring never depends on whether
    # an optimized user prompt still asks for the tags.
    answer_format: str = "Give your final answer inside <answer></answer> tags."
    description: str = ""
    source: str = ""
    meta: dict = field(default_factory=dict)

    def render(self, user_prompt: str, example: Example) -> str:
        """The user turn for one example: the prompt with its slot filled, then the answer format."""
        body = user_prompt.replace(QUESTION_SLOT, example.question)
        return f"{body}\n\n{self.answer_format}" if self.answer_format else body

    def score(self, response: str, example: Example) -> float:
        """Score in [0, 1] of one response against one example's gold answers."""
        return score_response(self, response, example)
