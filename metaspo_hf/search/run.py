"""The one entry point: run a registered search method and collect what it made."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

from ..models.base import LM
from ..tasks.task import Task
from .budget import SearchBudget
from .context import EventSink, SearchContext
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

    def reference_result(self) -> dict:
        """The paper code's result shape."""
        from ..reference_files import reference_result

        return reference_result(self.system_prompt, self.nodes)

    def to_dict(self) -> dict:
        return asdict(self)


def run_search(
    method_name: str,
    tasks: Sequence[Task],
    base: LM,
    optimizer: LM,
    budget: SearchBudget,
    seed: int,
    on_event: EventSink | None = None,
) -> SearchResult:
    """Run ``method_name`` on ``tasks``; a deterministic function of its arguments and the LM outputs."""
    method = get_method(method_name)
    ctx = SearchContext(method_name, tasks, base, optimizer, budget, seed, on_event)
    outcome = method.run(ctx, list(tasks))
    return SearchResult(
        method_name,
        outcome.system_prompt,
        outcome.user_prompts,
        outcome.history,
        ctx.nodes.as_dicts(),
        ctx.counts(),
    )
