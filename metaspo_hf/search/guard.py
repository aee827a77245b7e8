"""The validation guard: a searched system prompt is kept only if it beats the initial one on
training questions the search never saw.

The search scores candidates on the first ``train_size`` training questions of each task and adopts
one on a gain there, which on a few dozen questions can be one lucky answer. The guard takes the
next ``validation_size`` questions of each task, scores the initial and the searched system prompt on
the same (task, user prompt, question) items — each task's initial user prompt and the best user
prompt the search kept — and keeps the searched prompt only when its mean paired difference (or, with
``guard_rule: low``, the low end of its 95% interval) exceeds ``guard_margin``. Otherwise the search
returns the initial prompt, and says so.
"""

from __future__ import annotations

from ..scoring import Trial
from ..stats import paired_difference
from .context import SearchContext

INITIAL, SEARCHED = "initial", "searched"


def validation_examples(ctx: SearchContext, task: str) -> list:
    start = ctx.config.train_size
    return ctx.tasks[task].train[start : start + ctx.config.validation_size]


def validation_guard(ctx: SearchContext, system_prompt: str, user_prompts: dict[str, list[str]]) -> dict:
    """The guard's decision on ``system_prompt`` (the search's result) with the kept ``user_prompts``:
    {"kept", "difference" (stats.paired_difference of searched minus initial), "rule", "margin"}."""
    initial = ctx.config.initial_system_prompt
    rows, trials = [], []
    for name, task in ctx.tasks.items():
        # The initial user prompt and the search's best one: the pairs a user of either prompt would run.
        prompts = list(dict.fromkeys([task.initial_prompt, *user_prompts.get(name, [])[:1]]))
        examples = validation_examples(ctx, name)
        for label, system in ((INITIAL, initial), (SEARCHED, system_prompt)):
            for index, user in enumerate(prompts):
                trials.append(Trial(system, user, task, examples))
                rows.append((name, index, label, examples))
    scores = ctx.scorer(trials, desc=f"{ctx.method} validation guard")
    items = [
        {"seed": ctx.seed, "task": name, "user_prompt": index, "question": str(q), "label": label, "score": score}
        for (name, index, label, _), result in zip(rows, scores, strict=True)
        for q, score in enumerate(result.scores)
    ]
    difference = paired_difference(items, SEARCHED, INITIAL, seed=ctx.seed)
    overall = difference["overall"]
    rule = ctx.config.guard_rule
    kept = overall[rule] > ctx.config.guard_margin
    decision = {"kept": kept, "rule": rule, "margin": ctx.config.guard_margin, "difference": difference}
    ctx.emit(ctx.config.iterations, "guard", kept=kept, difference=round(overall["mean"], 4),
             low=round(overall["low"], 4), high=round(overall["high"], 4), items=overall["items"])
    return decision
