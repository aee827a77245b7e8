"""Search methods by name: each method module registers itself with ``@register``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..errors import MetaspoError, did_you_mean


@dataclass
class SearchOutcome:
    """What a method hands back; ``run_search`` adds the node log and the counts."""

    system_prompt: str
    # Task name -> the kept user prompts, best first.
    user_prompts: dict[str, list[str]]
    # One entry per iteration (0 = the starting point): iteration, incumbent_score,
    # best_candidate_score, adopted, optimizer_calls, base_generations.
    history: list[dict]


# A method: (SearchContext, the meta-train tasks) -> SearchOutcome. Typed loosely: the context imports this
# module's configuration through search/config.py, and a typed import back would close a cycle.
Method = Callable[..., SearchOutcome]


@dataclass(frozen=True)
class MethodInfo:
    name: str
    run: Method
    # True when the method's product is a system prompt (so it can be compared on unseen tasks).
    optimizes_system: bool


METHODS: dict[str, MethodInfo] = {}


def register(name: str, optimizes_system: bool) -> Callable[[Method], Method]:
    def add(run: Method) -> Method:
        METHODS[name] = MethodInfo(name, run, optimizes_system)
        return run

    return add


def get_method(name: str, key: str = "method") -> MethodInfo:
    if name not in METHODS:
        raise MetaspoError(
            f"{key}: unknown search method {name!r}",
            hint=did_you_mean(name, METHODS) or f"choose from {', '.join(METHODS)}",
        )
    return METHODS[name]


def system_prompt_methods() -> list[str]:
    return [name for name, info in METHODS.items() if info.optimizes_system]
