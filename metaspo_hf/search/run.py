"""The one entry point: run a registered search method and collect what it made."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

from ..errors import MetaspoError
from ..models.base import LM
from ..tasks.task import Task
from .config import SearchConfig
from .context import EventSink, SearchContext
from .guard import validation_examples, validation_guard
from .registry import get_method


@dataclass
class SearchResult:
    method: str
    system_prompt: str
    # Task name -> the kept user prompts, best first.
    user_prompts: dict[str, list[str]]
    # Per iteration (0 = the start): iteration, incumbent_score (of the prompt kept at the end of it),
    # best_candidate_score, adopted, and the optimizer_calls and base_generations it made.
    history: list[dict]
    # Every node made, in creation order (Node.to_dict).
    nodes: list[dict]
    # optimizer_calls, optimizer_batches, parse_retries, parse_failures, base_generations, base_batches.
    counts: dict
    # The validation guard's decision (search/guard.py), when the config asks for one and the search
    # returned a new system prompt; when it was not kept, ``system_prompt`` is the initial one.
    guard: dict | None = None
    # The searched system prompt the guard turned down.
    rejected_system_prompt: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def run_search(
    method_name: str,
    tasks: Sequence[Task],
    base: LM,
    optimizer: LM,
    config: SearchConfig,
    seed: int,
    on_event: EventSink | None = None,
    dedupe: bool = True,
) -> SearchResult:
    """Run ``method_name`` on ``tasks``; a deterministic function of its arguments and the LM outputs.

    ``dedupe=False`` scores every copy of identical greedy chats (the benchmark's reference way)."""
    method = get_method(method_name)
    ctx = SearchContext(method_name, tasks, base, optimizer, config, seed, on_event, dedupe)
    guarded = config.guard and method.optimizes_system
    if guarded:
        check_validation_split(ctx)
    outcome = method.run(ctx, list(tasks))
    system_prompt, guard, rejected = outcome.system_prompt, None, None
    if guarded and system_prompt != config.initial_system_prompt:
        guard = validation_guard(ctx, system_prompt, outcome.user_prompts)
        if not guard["kept"]:
            system_prompt, rejected = config.initial_system_prompt, system_prompt
    return SearchResult(
        method_name,
        system_prompt,
        outcome.user_prompts,
        outcome.history,
        ctx.nodes.as_dicts(),
        ctx.counts(),
        guard,
        rejected,
    )


def check_validation_split(ctx: SearchContext) -> None:
    """Before any work: every task has ``validation_size`` questions after its ``train_size`` ones."""
    for name in ctx.tasks:
        have = len(validation_examples(ctx, name))
        if have < ctx.config.validation_size:
            raise MetaspoError(
                f"task {name!r} has {have} training questions left for the validation guard after the "
                f"{ctx.config.train_size} the search uses; search.validation_size asks for {ctx.config.validation_size}",
                hint="lower search.validation_size or search.train_size, or pick a larger task")
