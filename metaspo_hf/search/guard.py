"""The validation guard: a searched system prompt is kept only if it beats the initial one on
training questions the search never saw.

The search scores candidates on the first ``train_size`` training questions of each task and adopts
one on a gain there, which on a few dozen questions can be one lucky answer. The guard takes the
next ``validation_size`` questions of each task, scores the initial and the searched system prompt on
the same (task, user prompt, question) items — each task's initial user prompt and the best user
prompt the search kept — and keeps the searched prompt only when its mean paired difference (or, with
``guard_rule: low``, the low end of its 95% interval) exceeds ``guard_margin``. With ``guard_rule: broad``
the low end must also exceed it on the items of the other tasks with each meta-train task left out in turn:
a pooled gain that one task carries (one task's answer format fixed, say) is not a gain to expect on unseen
tasks. Otherwise the search returns the initial prompt, and says so.
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
    {"kept", "difference" (stats.paired_difference of searched minus initial), "rule", "margin"}, and with the
    broad rule "task_left_out" ({task: the overall difference without it})."""
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
    rule, margin = ctx.config.guard_rule, ctx.config.guard_margin
    left_out = each_task_left_out(items, ctx.seed) if rule == "broad" else {}
    kept = (all(stats["low"] > margin for stats in (overall, *left_out.values())) if rule == "broad"
            else overall[rule] > margin)
    decision = {"kept": kept, "rule": rule, "margin": margin, "difference": difference,
                **({"task_left_out": left_out} if rule == "broad" else {})}
    weakest = min(left_out.items(), key=lambda pair: pair[1]["low"], default=None)
    ctx.emit(ctx.config.iterations, "guard", kept=kept, difference=round(overall["mean"], 4),
             low=round(overall["low"], 4), high=round(overall["high"], 4), items=overall["items"],
             **({"weakest_left_out": weakest[0], "weakest_left_out_low": round(weakest[1]["low"], 4)} if weakest else {}))
    return decision


def each_task_left_out(items: list[dict], seed: int) -> dict[str, dict]:
    """Searched minus initial on the pooled items of the other tasks, for each task left out in turn (none
    with a single task: there is nothing left to pool)."""
    tasks = list(dict.fromkeys(item["task"] for item in items))
    if len(tasks) < 2:
        return {}
    return {task: paired_difference([i for i in items if i["task"] != task], SEARCHED, INITIAL, seed=seed)["overall"]
            for task in tasks}
