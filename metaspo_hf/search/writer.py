"""The optimizer client: seeded batched calls, analyses, and prompts parsed with bounded re-asks."""

from __future__ import annotations

from collections import Counter

from ..models.base import LM, Chat, stable_hash
from . import prompts
from .parsing import parse_analysis, parse_prompt


class PromptWriter:
    """Sends one batch per call to the optimizer LM, each batch with its own sampling seed.

    The seed mixes the run seed with the step's name, so that the same request in a later step (or a
    re-ask) draws a fresh sample, and a replayed run draws exactly the same ones.
    """

    def __init__(
        self, optimizer: LM, seed: int, namespace: str, max_parse_retries: int, max_prompt_chars: int
    ):
        self.optimizer = optimizer
        self.seed = seed
        self.namespace = namespace
        self.max_parse_retries = max_parse_retries
        self.max_prompt_chars = max_prompt_chars
        self.calls = 0  # optimizer generations (one per chat)
        self.batches = 0
        self.retries = 0  # rows re-asked because their reply was unusable
        self.failures = 0  # rows still unusable after every re-ask (their parent is kept)
        self.failure_reasons: Counter[str] = Counter()  # why, as the last re-ask's reply was refused

    def generate(self, chats: list[Chat], *step: object) -> list[str]:
        if not chats:
            return []
        seed = stable_hash(self.seed, self.optimizer.settings.seed, self.namespace, *step) % 2**31
        lm = self.optimizer.with_seed(seed)
        self.calls += len(chats)
        self.batches += 1
        return lm(chats, desc=f"{self.namespace} {' '.join(map(str, step))}")

    def analyses(self, chats: list[Chat], *step: object) -> list[str]:
        """One analysis per chat; an unusable reply gives "" (the rewrite then goes without one)."""
        return [
            parse_analysis(text, self.max_prompt_chars) for text in self.generate(chats, *step, "analysis")
        ]

    def prompts(self, chats: list[Chat], kind: str, *step: object, shown: list[list[str]] | None = None,
                ignore: list[frozenset] | None = None) -> list[str | None]:
        """One prompt per chat, or None where every attempt was unusable; ``shown``: per chat, the
        questions its request was written from (the prompt must not quote them), and ``ignore`` the word
        runs it may quote all the same (parsing.shared_runs of the task's questions).

        Unusable rows are re-asked together, with a note on what was wrong, at most
        ``max_parse_retries`` times.
        """
        shown = shown or [[] for _ in chats]
        ignore = ignore or [frozenset() for _ in chats]
        request = prompts.request_word_runs() if kind == "user" else frozenset()
        parsed = [
            parse_prompt(text, kind, self.max_prompt_chars, shown[i], ignore[i], request)
            for i, text in enumerate(self.generate(chats, *step, "write"))
        ]
        for attempt in range(1, self.max_parse_retries + 1):
            failed = [i for i, p in enumerate(parsed) if p.prompt is None]
            if not failed:
                break
            self.retries += len(failed)
            retry_chats = [prompts.with_format_reminder(chats[i], parsed[i].reason, kind) for i in failed]
            for i, text in zip(failed, self.generate(retry_chats, *step, "retry", attempt), strict=True):
                parsed[i] = parse_prompt(text, kind, self.max_prompt_chars, shown[i], ignore[i], request)
        for p in parsed:
            if p.prompt is None:
                self.failures += 1
                self.failure_reasons[p.reason.split(" (")[0]] += 1
        return [p.prompt for p in parsed]

    def counts(self) -> dict:
        return {
            "optimizer_calls": self.calls,
            "optimizer_batches": self.batches,
            "parse_retries": self.retries,
            "parse_failures": self.failures,
        }
