"""The statistics every comparison of prompts uses: mean/sd/n, and paired differences with a seeded
bootstrap confidence interval.

Two system prompts are compared on the same items: an item is one (seed, task, user prompt, question),
scored 0..1 under each prompt. The difference of a task is the mean over its items of
``score(label) - score(baseline)``; the overall difference is the mean over tasks of those (the same
weighting as the overall score). The interval resamples questions with replacement within each task
(all user prompts and seeds of one question move together, since they share its difficulty), so it
says how much the difference would move on other questions of the same tasks. An interval that
contains 0 is no evidence of a difference, and is reported as none.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Iterable, Sequence

import numpy as np

# Bootstrap resamples: the 2.5% and 97.5% percentiles of 2000 resamples move by < 0.005 between seeds.
RESAMPLES = 2000
LEVEL = 0.95
# The columns of a run folder's items.csv (one row per label and item); `question` is a stable id.
ITEM_FIELDS = ("seed", "task", "user_prompt", "question", "label", "score")
VERDICTS = ("better", "worse", "no difference")


def spread(values: Sequence[float]) -> dict:
    """Mean, sample sd (n - 1; 0 for one value) and n: the values are a sample of what could be drawn."""
    return {
        "mean": statistics.fmean(values),
        "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
        "n": len(values),
    }


def verdict(low: float, high: float) -> str:
    """"better" when the whole interval is above 0, "worse" when below, else "no difference"."""
    return "better" if low > 0 else "worse" if high < 0 else "no difference"


def paired_difference(items: Iterable[dict], label: str, baseline: str, seed: int = 0,
                      resamples: int = RESAMPLES, level: float = LEVEL) -> dict:
    """``label`` minus ``baseline`` on the items both were scored on (rows with ``ITEM_FIELDS``).

    Returns {"tasks": {task: stats}, "overall": stats}, each stats {"mean", "low", "high", "items",
    "questions", "verdict"}; an empty dict when the two share no item.
    """
    scores: dict[str, dict[tuple, float]] = {label: {}, baseline: {}}
    for row in items:
        if row["label"] in scores:
            key = (row["seed"], row["task"], row["user_prompt"], row["question"])
            scores[row["label"]][key] = float(row["score"])
    by_task: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for key, score in scores[label].items():
        if key in scores[baseline]:
            _, task, _, question = key
            by_task[task][question].append(score - scores[baseline][key])
    if not by_task:
        return {}
    rng = np.random.default_rng(seed)
    tail = (1 - level) / 2
    tasks, draws = {}, []
    for task, questions in by_task.items():
        sums = np.array([sum(diffs) for diffs in questions.values()])
        counts = np.array([len(diffs) for diffs in questions.values()])
        picks = rng.integers(0, len(sums), size=(resamples, len(sums)))
        draw = sums[picks].sum(axis=1) / counts[picks].sum(axis=1)
        draws.append(draw)
        tasks[task] = _interval(sums.sum() / counts.sum(), draw, tail, int(counts.sum()), len(sums))
    overall = np.mean(draws, axis=0)
    mean = float(np.mean([t["mean"] for t in tasks.values()]))
    return {"tasks": tasks, "overall": _interval(mean, overall, tail, sum(t["items"] for t in tasks.values()),
                                                 sum(t["questions"] for t in tasks.values()))}


def _interval(mean: float, draws: np.ndarray, tail: float, items: int, questions: int) -> dict:
    low, high = (float(v) for v in np.quantile(draws, [tail, 1 - tail]))
    return {"mean": float(mean), "low": low, "high": high, "items": items, "questions": questions,
            "verdict": verdict(low, high)}


def describe(difference: dict, label: str, baseline: str) -> str:
    """One sentence for a report: whether ``label`` is better, worse or not distinguishable."""
    o = difference["overall"]
    interval = f"{o['mean']:+.3f} (95% CI {o['low']:+.3f} to {o['high']:+.3f}; {o['items']} paired items)"
    if o["verdict"] == "no difference":
        return f"`{label}` is not distinguishable from `{baseline}`: paired difference {interval}."
    return f"`{label}` is {o['verdict']} than `{baseline}`: paired difference {interval}."
