"""A scripted stand-in for a real model, with the same interface as the transformers engine.

Tests use it to pin exact call counts and to feed adversarial optimizer outputs, in milliseconds.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from .base import (  # noqa: F401 (re-export)
    Chat,
    EngineStats,
    GenerationSettings,
    LoglikRequest,
    cut_at_stop,
    sample_indices,
    stable_hash,
)

Responder = Callable[[Chat, GenerationSettings, int], str]
# (chat, continuation) -> the continuation's log-likelihood.
LoglikFn = Callable[[Chat, str], float]


def hashed_loglik(chat: Chat, continuation: str) -> float:
    """The default fake log-likelihood: a fixed pseudo-random value in (-10, 0] per request."""
    return -(stable_hash(repr(chat), continuation) % 10_000) / 1000


class FakeEngine:
    """Answers each chat with ``responder(chat, settings, sample_index)``.

    ``sample_index`` is k for the k-th identical chat within one call (as in the real engine), so a
    responder can make sampled candidates differ. Every call is recorded in ``calls``.
    """

    def __init__(self, responder: Responder, name: str = "fake", loglik: LoglikFn = hashed_loglik):
        self.responder = responder
        self.name = name
        # Answers ``loglikelihood``: ``loglik(chat, continuation)`` per request.
        self.loglik = loglik
        self.stats = EngineStats()
        self.calls: list[tuple[list[Chat], GenerationSettings]] = []
        self.loglik_calls: list[list[LoglikRequest]] = []

    def generate(self, chats: Sequence[Chat], settings: GenerationSettings, desc: str | None = None) -> list[str]:
        chats = list(chats)
        self.calls.append((chats, settings))
        outputs = []
        for chat, k in zip(chats, sample_indices(chats), strict=True):
            text = self.responder(chat, settings, k)
            if settings.stop:
                text = cut_at_stop(text, settings.stop)
            outputs.append(text)
        self.stats.calls += 1
        self.stats.prompts += len(chats)
        self.stats.generated_tokens += sum(len(o.split()) for o in outputs)
        return outputs

    def loglikelihood(self, requests: Sequence[LoglikRequest], desc: str | None = None) -> list[float]:
        requests = list(requests)
        self.loglik_calls.append(requests)
        self.stats.calls += 1
        self.stats.scored_continuations += len(requests)
        return [float(self.loglik(chat, continuation)) for chat, continuation in requests]
