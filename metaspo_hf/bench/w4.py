"""Workload W4: optimizer-shaped requests, long distinct prompts and long replies.

What the optimizer LM sees during a search: one request per candidate, each a long analysis request
(the current system prompt, then several questions the base model got wrong with its replies), under
a short system prompt of its own. Unlike W1, the rows share only that short system prompt (25 tokens
with the chat template), so prefill is long and shared-prefix reuse has little to save. 8 requests of
about 1,450 tokens (SmolLM2's tokenizer) each, 256 new tokens.

The text is built deterministically from templates in this file: task names, people, items and
numbers vary with the request and the section, so every request differs from its first section on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..models.base import Chat, make_chat
from .w1 import SYSTEM_PROMPT, Workload

OPTIMIZER_SYSTEM_PROMPT = "You review instructions written for language models and explain how to make them better."

_TASKS = ["unit conversion", "sharing and division", "elapsed time", "shopping totals", "recipe scaling",
          "travel distances", "savings over months", "seating arrangements"]
_PEOPLE = ["Amara", "Bruno", "Chen", "Dalia", "Emeka", "Freya", "Goran", "Hana", "Ivo", "Jun"]
_THINGS = [("crates", "oranges"), ("shelves", "books"), ("trays", "cookies"), ("boxes", "candles"),
           ("bags", "marbles"), ("racks", "bottles")]


def _section(request: int, number: int) -> str:
    """One wrong answer: the question, the base model's flawed reply and what was expected."""
    k = request * 7 + number
    person, other = _PEOPLE[k % len(_PEOPLE)], _PEOPLE[(k + 3) % len(_PEOPLE)]
    holder, item = _THINGS[k % len(_THINGS)]
    groups, per_group, removed = 3 + k % 5, 4 + (k * 3) % 9, 2 + k % 4
    total = groups * per_group
    right = total - removed
    wrong = total + removed
    return (
        f"## Wrong answer {number + 1} (task: {_TASKS[(request + number) % len(_TASKS)]})\n"
        f"Question: {person} has {groups} {holder} with {per_group} {item} in each. {other} takes away "
        f"{removed} {item} to use at home, and nobody adds any more afterwards. How many {item} does "
        f"{person} have left? Give the number only.\n"
        f"Reply: Let me work through this carefully. There are {groups} {holder} and every one of them holds "
        f"{per_group} {item}, so together that makes {groups} times {per_group}, which is {total} {item}. "
        f"Since {other} is mentioned after the {holder} are counted, I think those {removed} {item} are "
        f"added to the collection rather than taken from it. Checking the arithmetic once more: {groups} "
        f"groups of {per_group} is {total}, and {total} plus {removed} is {wrong}. <answer>{wrong}</answer>\n"
        f"Expected answer: {right}\n"
        f"Why it failed: the reply read \"takes away\" as adding, and its check repeated the same reading "
        f"instead of testing it against the question's wording.\n"
    )


def optimizer_request(request: int, sections: int) -> str:
    """The ``request``-th analysis request, with ``sections`` wrong answers."""
    failures = "\n".join(_section(request, number) for number in range(sections))
    first, second = _TASKS[request % len(_TASKS)], _TASKS[(request + 3) % len(_TASKS)]
    return (
        # Request-specific from the first words: the rows share only the short system prompt.
        f"Review {request + 1}, on the tasks {first} and {second}. An assistant answers questions from many different tasks. Each conversation begins with the "
        "same system prompt, and the task's own question follows it. The system prompt is shown below, "
        "followed by questions that the assistant got wrong while using it. Read every reply closely: "
        "find the step where it went astray, and say what in the system prompt allowed that step.\n\n"
        f"# Current system prompt\n{SYSTEM_PROMPT}\n\n"
        f"# Questions answered wrongly (request {request + 1})\n{failures}\n"
        "Describe the weaknesses of the system prompt that these mistakes have in common. Consider "
        "general habits that help on every task, such as reading each phrase of the question literally, "
        "checking a result by a different route than the one that produced it, and keeping the reply "
        "short enough to reach the final answer. Leave out advice that only helps with a single task. "
        "Then propose one improved system prompt.\n\n"
        "Write your analysis between <analysis> and </analysis>, and the new prompt between <prompt> "
        "and </prompt>."
    )


@dataclass(frozen=True)
class OptimizerShaped(Workload):
    chats: int = 8
    new_tokens: int = 256
    # Wrong answers per request: 5 make about 1,450 tokens with SmolLM2's tokenizer (~210 per section).
    sections: int = 5
    system_prompt: ClassVar[str] = OPTIMIZER_SYSTEM_PROMPT

    def build(self) -> list[Chat]:
        return [make_chat(self.system_prompt, optimizer_request(i, self.sections)) for i in range(self.chats)]


W4 = OptimizerShaped()
QUICK = OptimizerShaped(chats=3, new_tokens=8, sections=1)
