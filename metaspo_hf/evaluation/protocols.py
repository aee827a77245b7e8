"""The two evaluation protocols on unseen (meta-test) tasks.

- Unseen generalization: each compared system prompt is paired with the same set of user prompts per
  task (written once by the optimizer from input/output demos and saved to JSON); the test score of
  each user prompt is one sample, reported as mean and sd.
- Test-time adaptation: ProTeGi-style user-prompt search under each fixed system prompt, selecting
  on the training split and reporting the test score of the best prompt after every iteration.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from statistics import fmean

from ..errors import MetaspoError
from ..files import write_json_atomic
from ..models.base import LM
from ..scoring import Scorer, Trial
from ..search import EventSink, SearchConfig, adapt_user_prompts
from ..stats import spread
from ..tasks.task import QUESTION_SLOT, Example, Task
from .config import EvaluationConfig


def save_user_prompts(path: str | Path, user_prompts: dict[str, list[str]]) -> None:
    """Written atomically: a run killed mid-write must not leave a truncated file to resume from."""
    write_json_atomic(path, user_prompts)


def load_user_prompts(path: str | Path) -> dict[str, list[str]]:
    """User prompts saved by ``save_user_prompts`` (task name -> prompts, each with the slot)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise MetaspoError(f"{path}: cannot read user prompts ({error})") from error
    if not isinstance(data, dict):
        raise MetaspoError(f"{path}: expected an object mapping task names to lists of user prompts")
    for task, task_prompts in data.items():
        if (
            not isinstance(task_prompts, list)
            or not task_prompts
            or not all(isinstance(p, str) for p in task_prompts)
        ):
            raise MetaspoError(f"{path}: task {task!r} needs a non-empty list of user prompts")
        for p in task_prompts:
            if QUESTION_SLOT not in p:
                raise MetaspoError(
                    f"{path}: a user prompt of task {task!r} has no {QUESTION_SLOT} slot: {p[:60]!r}"
                )
    return data


def unseen_generalization(
    tasks: Sequence[Task],
    system_prompts: dict[str, str],
    user_prompts: dict[str, list[str]],
    base: LM,
    test_size: int | None = None,
    on_event: EventSink | None = None,
) -> dict[str, dict[str, dict]]:
    """Task -> label -> {"mean", "sd", "n", "scores"}: each user prompt's test score is one sample.

    One base batch per task covers every system prompt x user prompt x test question.
    """
    scorer = Scorer(base)
    results: dict[str, dict[str, dict]] = {}
    for task in tasks:
        task_prompts = user_prompts.get(task.name)
        if not task_prompts:
            raise MetaspoError(
                f"no user prompts for unseen task {task.name!r}",
                hint="write them with write_user_prompts and save them with the run",
            )
        examples = _test_examples(task, test_size)
        trials = [
            Trial(system, user, task, examples) for system in system_prompts.values() for user in task_prompts
        ]
        scored = iter(scorer(trials, desc=f"unseen {task.name}"))
        results[task.name] = {}
        for label in system_prompts:
            per_prompt = [next(scored) for _ in task_prompts]
            # Per-question scores, one list per user prompt: the items paired comparisons rest on.
            results[task.name][label] = {**summarize([s.mean for s in per_prompt]),
                                         "items": [s.scores for s in per_prompt]}
        if on_event:
            on_event(
                {
                    "event": "unseen_generalization",
                    "task": task.name,
                    "scores": {label: s["mean"] for label, s in results[task.name].items()},
                    "base_generations": scorer.generations,
                }
            )
    return results


def summarize(scores: list[float]) -> dict:
    """Mean, sample sd and n of per-user-prompt scores, and the scores."""
    return {**spread(scores), "scores": scores}


def item_rows(tasks: Sequence[Task], results: dict[str, dict[str, dict]], seed: int) -> list[dict]:
    """One row per (label, user prompt, test question) of ``unseen_generalization``'s results, with the
    columns of ``stats.ITEM_FIELDS``; a question is named by a digest of its text, so that the rows of
    several seeds can be pooled by question."""
    by_name = {task.name: task for task in tasks}
    rows = []
    for task_name, by_label in results.items():
        examples = by_name[task_name].test
        for label, summary in by_label.items():
            for user_index, scores in enumerate(summary["items"]):
                rows += [{"seed": seed, "task": task_name, "user_prompt": user_index,
                          "question": question_id(example), "label": label, "score": score}
                         for example, score in zip(examples, scores, strict=False)]
    return rows


def question_id(example: Example) -> str:
    return hashlib.sha256(example.question.encode()).hexdigest()[:12]


def overall_scores(results: dict[str, dict[str, dict]]) -> dict[str, float]:
    """Label -> mean over tasks of the per-task mean score."""
    labels = next(iter(results.values()), {})
    return {label: fmean(per_label[label]["mean"] for per_label in results.values()) for label in labels}


def test_time_adaptation(
    tasks: Sequence[Task],
    system_prompts: dict[str, str],
    base: LM,
    optimizer: LM,
    config: EvaluationConfig,
    seed: int,
    on_event: EventSink | None = None,
    search: SearchConfig | None = None,
    test_size: int | None = None,
) -> dict[str, dict[str, list[float]]]:
    """Task -> label -> test score of the best-on-train user prompt after each iteration (0 = initial).

    ``search`` supplies the writer settings (failures shown, re-asks, length limit) and the training size.
    Every (system prompt, task) beam advances together: one optimizer batch per phase, one scoring
    batch per iteration, and one test batch at the end.
    """
    # Labels with the same text (a run that returned the default) share one search: the same experiment
    # run twice would only differ by the optimizer's sampling and cost its calls twice.
    distinct = list(dict.fromkeys(system_prompts.values()))
    tracks = [(system, task) for system in distinct for task in tasks]
    per_iteration, counts = adapt_user_prompts(
        tasks, tracks, base, optimizer, search or SearchConfig(), seed, config.adapt_iterations, config.beam,
        config.adapt_candidates, lambda task: _test_examples(task, test_size), on_event)
    results: dict[str, dict[str, list[float]]] = {task.name: {} for task in tasks}
    for label, system in system_prompts.items():
        for k, task in enumerate(tasks):
            track = distinct.index(system) * len(tasks) + k
            results[task.name][label] = [scores[track] for scores in per_iteration]
    if on_event:
        on_event({"event": "test_time_adaptation", "scores": results, **counts})
    return results


test_time_adaptation.__test__ = (
    False  # its name starts with "test": keep pytest from collecting it when imported
)


def _test_examples(task: Task, test_size: int | None):
    examples = task.test[:test_size]
    if not examples:
        raise MetaspoError(f"unseen task {task.name!r} has no test examples")
    return examples
