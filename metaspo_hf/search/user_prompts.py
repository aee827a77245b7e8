"""What evaluation asks of the search: user prompts written by the optimizer from demos, and
ProTeGi-style user-prompt search under fixed system prompts (test-time adaptation)."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

from ..models.base import LM, stable_hash
from ..scoring import Trial
from ..tasks.task import Example, Task
from . import prompts
from .config import SearchConfig
from .context import EventSink, SearchContext
from .methods.unilevel import user_prompt_search
from .parsing import shared_runs
from .proposals import rewrite_user_prompts
from .writer import PromptWriter


def write_user_prompts(
    tasks: Sequence[Task],
    optimizer: LM,
    n: int,
    seed: int,
    demos: int,
    search: SearchConfig | None = None,
    on_event: EventSink | None = None,
) -> dict[str, list[str]]:
    """About ``n`` user prompts per task, each written by the optimizer from ``demos`` training pairs.

    All requests go in one optimizer batch (re-asks for unusable replies in one more each). Failed and
    duplicate prompts are dropped; a task left with fewer than ``n`` also gets its initial prompt, so that
    a failing optimizer costs the comparison items but not a whole user prompt's worth of them.
    """
    search = search or SearchConfig()
    writer = PromptWriter(optimizer, seed, "user_prompts", search.max_parse_retries, search.max_prompt_chars)
    jobs = [(task, _demos(task, demos, seed, j)) for task in tasks for j in range(n)]
    texts = writer.prompts([prompts.ape_user(shown) for _, shown in jobs], "user", "unseen",
                           shown=[[ex.question for ex in shown] for _, shown in jobs],
                           ignore=[shared_runs([ex.question for ex in task.train]) for task, _ in jobs])
    written, topped_up = {}, []
    for i, task in enumerate(tasks):
        kept = list(dict.fromkeys(t for t in texts[i * n : (i + 1) * n] if t is not None))
        if len(kept) < n:
            kept = list(dict.fromkeys([*kept, task.initial_prompt]))
            topped_up.append(task.name)
        written[task.name] = kept
    if on_event:
        on_event(
            {
                "event": "user_prompts_written",
                "prompts_per_task": {k: len(v) for k, v in written.items()},
                **writer.counts(),
                # Which tasks got their initial prompt for want of written ones, and why replies were refused.
                "initial_prompt_added": topped_up,
                "refused_because": dict(writer.failure_reasons),
            }
        )
    return written


def _demos(task: Task, k: int, seed: int, j: int):
    return random.Random(stable_hash(seed, "user_prompts", task.name, j)).sample(
        task.train, min(k, len(task.train))
    )


def adapt_user_prompts(
    tasks: Sequence[Task],
    tracks: Sequence[tuple[str, Task]],
    base: LM,
    optimizer: LM,
    config: SearchConfig,
    seed: int,
    iterations: int,
    beam: int,
    candidates: int,
    test_examples: Callable[[Task], Sequence[Example]],
    on_event: EventSink | None = None,
) -> tuple[list[list[float]], dict]:
    """ProTeGi-style search of each track's user prompt, its (system prompt, task) fixed, selecting on the
    training split; then the test score (on ``test_examples(task)``) of each track's best prompt after
    every iteration (0 = the task's initial prompt), and the calls made.

    ``config`` supplies the writer settings (failures shown, re-asks, length limit) and the training size.
    Every track advances together: one optimizer batch per phase, one scoring batch per iteration, and
    one test batch at the end.
    """
    ctx = SearchContext("adapt", tasks, base, optimizer, config, seed, on_event)
    starts = [ctx.nodes.new(task.name, system_prompt, task.initial_prompt, 0, "initial")
              for system_prompt, task in tracks]
    _, trail = user_prompt_search(ctx, starts, iterations, beam, candidates, rewrite_user_prompts)
    trials = [
        Trial(node.system_prompt, node.user_prompt, ctx.tasks[node.task], test_examples(ctx.tasks[node.task]))
        for best_nodes in trail
        for node in best_nodes
    ]
    means = iter(score.mean for score in ctx.scorer(trials, desc="adapt test"))
    return [[next(means) for _ in tracks] for _ in trail], ctx.counts()
