"""The contract every generation backend meets: chats in, texts out, in one batched call.

Search and protocol code only ever sees an ``LM`` (an engine bound to one role's settings), so the
real transformers engine and the scripted fake used in tests are interchangeable.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Protocol

Message = dict  # {"role": "system" | "user" | "assistant", "content": str}
Chat = list  # list[Message]
# (chat, continuation): score the continuation's tokens right after the chat rendered with the
# generation prompt (the start of the assistant turn). See ``Engine.loglikelihood``.
LoglikRequest = tuple  # tuple[Chat, str]


@dataclass(frozen=True)
class GenerationSettings:
    max_new_tokens: int = 256
    # 0.0 means greedy decoding (the base role); > 0 samples (the optimizer role).
    temperature: float = 0.0
    top_p: float = 1.0
    # Generation stops once any of these strings appears; the string is kept in the text.
    stop: tuple[str, ...] = ()
    # Seeds sampling; each row draws from its own generator so batching never changes results.
    seed: int = 0

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0

    def key(self) -> dict:
        return asdict(self)


@dataclass
class EngineStats:
    """Running counters, reported in the run folder and by ``metaspo bench``."""

    calls: int = 0
    prompts: int = 0
    prefill_tokens: int = 0
    generated_tokens: int = 0
    cache_hits: int = 0
    seconds: float = 0.0
    oom_retries: int = 0
    # Continuations scored by log-likelihood (distinct (chat, continuation) pairs computed).
    scored_continuations: int = 0

    def as_dict(self) -> dict:
        return asdict(self)

    def add(self, other: EngineStats) -> None:
        for name, value in asdict(other).items():
            setattr(self, name, getattr(self, name) + value)


class Engine(Protocol):
    """A loaded model that turns a batch of chats into completions."""

    name: str
    stats: EngineStats

    def generate(self, chats: Sequence[Chat], settings: GenerationSettings, desc: str | None = None) -> list[str]:
        """One completion per chat, in order. Identical chats in one call with sampling get
        different samples (the k-th copy uses sample index k), deterministically by seed."""
        ...

    def loglikelihood(self, requests: Sequence[LoglikRequest], desc: str | None = None) -> list[float]:
        """For each (chat, continuation): the summed log-probability of the continuation's tokens after
        the chat rendered with the generation prompt, in order; no generation. Deterministic."""
        ...


@dataclass
class LM:
    """An engine bound to one role's generation settings (the base LM or the optimizer LM)."""

    engine: Engine
    settings: GenerationSettings = field(default_factory=GenerationSettings)
    role: str = "base"
    # How a Scorer built on this LM scores multiple-choice tasks: "generate" (generate, then extract the
    # answer) or "loglik" (pick the likeliest option). The recipe's top-level ``scoring`` key sets it for
    # the base role, so every Scorer (search and both protocols) scores the same way.
    scoring: str = "generate"
    # Chats sent through this role (one chat = one generation), shared with reseeded copies.
    usage: RoleUsage = field(default_factory=lambda: RoleUsage())

    def __call__(self, chats: Sequence[Chat], desc: str | None = None) -> list[str]:
        self.usage.chats += len(chats)
        return self.engine.generate(list(chats), self.settings, desc=desc)

    def loglikelihood(self, requests: Sequence[LoglikRequest], desc: str | None = None) -> list[float]:
        """The engine's ``loglikelihood`` (generation settings play no part in it)."""
        self.usage.continuations += len(requests)
        return self.engine.loglikelihood(list(requests), desc=desc)

    def with_seed(self, seed: int) -> LM:
        """The same role with another sampling seed (e.g. one per search step); counts stay shared."""
        return replace(self, settings=replace(self.settings, seed=seed))


@dataclass
class RoleUsage:
    chats: int = 0
    # (chat, continuation) pairs scored by log-likelihood.
    continuations: int = 0


def make_chat(system_prompt: str | None, user_text: str) -> Chat:
    """A chat with an optional system turn; an empty or None system prompt means no system turn."""
    chat: Chat = []
    if system_prompt:
        chat.append({"role": "system", "content": system_prompt})
    chat.append({"role": "user", "content": user_text})
    return chat


def cut_at_stop(text: str, stops: Sequence[str]) -> str:
    """The text up to and including the earliest stop string, or all of it."""
    ends = [text.find(s) + len(s) for s in stops if s in text]
    return text[: min(ends)] if ends else text


def chat_key(chat: Chat) -> str:
    """The chat as canonical JSON: equal chats give equal strings, whatever their key order."""
    return json.dumps(chat, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


def sample_indices(chats: Sequence[Chat]) -> list[int]:
    """The sample index of each chat of one call: k for the k-th identical chat (by ``chat_key``).

    The one rule behind sampled answers: the engine seeds copy k of a chat with k, the response cache
    stores it under k, and the fake engine passes k to its responder."""
    seen: dict[str, int] = {}
    indices = []
    for chat in chats:
        key = chat_key(chat)
        indices.append(seen.get(key, 0))
        seen[key] = indices[-1] + 1
    return indices


def stable_hash(*parts: object) -> int:
    """A hash that is the same in every process (Python's ``hash`` of str is salted)."""
    digest = hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "big")
