"""Fakes shared by the search and evaluation tests (a helper module, not tests): tiny tasks and scripted base/optimizer models.

Questions carry their gold answer in brackets ("... [t0-a3]"), so a scripted base model can answer
right or wrong on purpose.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from metaspo_hf.models.base import LM, GenerationSettings, stable_hash
from metaspo_hf.models.fake import FakeEngine
from metaspo_hf.tasks.task import Example, Task


class TagTask(Task):
    """Exact match on the last <answer> tag: independent of the project's metrics module."""

    def score(self, response: str, example: Example) -> float:
        found = re.findall(r"<answer>(.*?)</answer>", response, re.S)
        return float(bool(found) and found[-1].strip() == example.answers[0])


def make_task(name: str, n_train: int = 4, n_test: int = 4) -> TagTask:
    def examples(split: str, n: int) -> list[Example]:
        return [
            Example(f"{name} {split} question {i} [{name}-{split}-{i}]", (f"{name}-{split}-{i}",))
            for i in range(n)
        ]

    return TagTask(
        name=name,
        domain="test",
        train=examples("train", n_train),
        test=examples("test", n_test),
        initial_prompt=f"Answer this {name} question: {{question}}",
        answer_kind="open",
    )


def turns(chat) -> tuple[str, str]:
    """(system prompt or "", user text) of a chat."""
    system = chat[0]["content"] if chat[0]["role"] == "system" else ""
    return system, chat[-1]["content"]


def question_index(user_text: str) -> int:
    return int(re.search(r"question (\d+) \[", user_text).group(1))


def base_lm(correct: Callable[[str, str], bool]) -> LM:
    """A greedy base model that answers right exactly when ``correct(system_prompt, user_text)``."""

    def respond(chat, settings, k):
        system, user = turns(chat)
        gold = re.search(r"\[([^\]]+)\]", user).group(1)
        return f"<answer>{gold if correct(system, user) else 'wrong'}</answer>"

    return LM(FakeEngine(respond), GenerationSettings(temperature=0.0), role="base")


def is_analysis_request(request: str) -> bool:
    return "<analysis>" in request


def is_user_prompt_request(request: str) -> bool:
    # Requests for a user prompt mention the slot, except APE's for one task, which asks for its instruction;
    # system-prompt requests do neither.
    return "{question}" in request or "What instruction were these outputs following?" in request


def candidate_id(chat, settings: GenerationSettings, k: int) -> int:
    """Different for every distinct request, sampling seed and copy index."""
    return stable_hash(repr(chat), settings.seed, k) % 10**6


def optimizer_lm(
    system_text: Callable[[int], str] = lambda h: f"Be careful and precise ({h}).",
    user_text: Callable[[int], str] = lambda h: f"Think it through ({h}): {{question}}",
) -> LM:
    """A sampled optimizer that writes a distinct, well-formed candidate for every request."""

    def respond(chat, settings, k):
        request = chat[-1]["content"]
        if is_analysis_request(request):
            return "<analysis>The prompt does not ask the model to check its answer.</analysis>"
        h = candidate_id(chat, settings, k)
        return f"<prompt>{user_text(h) if is_user_prompt_request(request) else system_text(h)}</prompt>"

    return LM(FakeEngine(respond), GenerationSettings(temperature=1.0, seed=7), role="optimizer")


def batch_sizes(lm: LM) -> list[int]:
    return [len(chats) for chats, _ in lm.engine.calls]
