"""A scripted stand-in for a real model, with the same interface as the transformers engine.

Tests use it to pin exact call counts and to feed adversarial optimizer outputs, in milliseconds.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from .base import Chat, EngineStats, GenerationSettings, cut_at_stop, stable_hash  # noqa: F401 (re-export)

Responder = Callable[[Chat, GenerationSettings, int], str]


class FakeEngine:
    """Answers each chat with ``responder(chat, settings, sample_index)``.

    ``sample_index`` is k for the k-th identical chat within one call (as in the real engine), so a
    responder can make sampled candidates differ. Every call is recorded in ``calls``.
    """

    def __init__(self, responder: Responder, name: str = "fake"):
        self.responder = responder
        self.name = name
        self.stats = EngineStats()
        self.calls: list[tuple[list[Chat], GenerationSettings]] = []

    def generate(self, chats: Sequence[Chat], settings: GenerationSettings, desc: str | None = None) -> list[str]:
        chats = list(chats)
        self.calls.append((chats, settings))
        seen: dict[str, int] = {}
        outputs = []
        for chat in chats:
            key = repr(chat)
            k = seen.get(key, 0)
            seen[key] = k + 1
            text = self.responder(chat, settings, k)
            if settings.stop:
                text = cut_at_stop(text, settings.stop)
            outputs.append(text)
        self.stats.calls += 1
        self.stats.prompts += len(chats)
        self.stats.generated_tokens += sum(len(o.split()) for o in outputs)
        return outputs
