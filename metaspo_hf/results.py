"""A run's result: the one owner of result.json's schema (docs/run-folder.md).

``build_result`` puts the dict together from the parts the pipeline computed, ``validate_result``
checks a dict (or a file read back) against the schema, and ``read_result`` reads a run folder's
result for the report and the seed comparison.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .errors import MetaspoError
from .evaluation.protocols import overall_scores
from .files import read_json
from .runs import RunDir
from .search import SearchResult

COST_KEYS = (
    "base_generations",
    "generated_tokens",
    "prefill_tokens",
    "optimizer_calls",
    "cache_hits",
    "seconds",
)
META_TRAIN_KEYS = ("iteration", "incumbent_score", "best_candidate_score", "adopted")
# Per-iteration call counts the search adds to its history entries; shown when present.
STEP_CALL_COUNTS = ("optimizer_calls", "base_generations")


def build_result(
    *,
    recipe: str,
    model: str,
    seed: int,
    method: str,
    main_label: str,
    system_prompts: dict[str, str],
    scores: dict,
    comparisons: dict,
    adaptation: dict,
    searches: dict[str, SearchResult],
    costs: dict,
    wall_seconds: float,
    earlier_processes_seconds: list[float],
) -> dict:
    """result.json's content: the run's parts, with what follows from them (the optimized prompt, the
    overall scores, each search's history and validation guard)."""
    return {
        "recipe": recipe,
        "model": model,
        "seed": seed,
        "method": method,
        "optimized_system_prompt": system_prompts.get(main_label, ""),
        "main_label": main_label,
        "system_prompts": system_prompts,
        "scores": scores,
        "overall": overall_scores(scores) if scores else {},
        "comparisons": comparisons,
        "adaptation": adaptation,
        "meta_train": {name: search.history for name, search in searches.items()},
        "guard": {name: {**search.guard, "rejected_system_prompt": search.rejected_system_prompt}
                  for name, search in searches.items() if search.guard},
        "costs": costs,
        "wall_seconds": wall_seconds,
        # A resumed run's earlier processes (events.jsonl), so its report states all the time it took.
        "earlier_processes_seconds": earlier_processes_seconds,
    }


def read_result(folder: str | Path, hint: str = "the run has not finished yet; resume it to write its result") -> dict:
    """The checked result.json of run folder ``folder``; a MetaspoError with ``hint`` when it has none."""
    path = RunDir(folder).result_file
    if not path.exists():
        raise MetaspoError(f"{path} does not exist", hint=hint)
    return validate_result(read_json(path), source=str(path))


def _is_number(value: Any) -> bool:
    # JSON numbers: integers count, booleans (a subclass of int in Python) do not.
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# What a value must be, by the phrase the error message uses.
STRING, INTEGER, NUMBER, NUMBER_OR_NULL = "a string", "an integer", "a number", "a number or null"
BOOLEAN, OBJECT, LIST = "true or false", "a JSON object", "a list"
_KINDS = {
    STRING: lambda v: isinstance(v, str),
    INTEGER: lambda v: isinstance(v, int) and not isinstance(v, bool),
    NUMBER: _is_number,
    NUMBER_OR_NULL: lambda v: v is None or _is_number(v),
    BOOLEAN: lambda v: isinstance(v, bool),
    OBJECT: lambda v: isinstance(v, dict),
    LIST: lambda v: isinstance(v, list),
}


def validate_result(obj: Any, source: str = RunDir.RESULT) -> dict:
    """``obj`` if it has the shape of a run's result.json; otherwise a MetaspoError naming the key.

    Extra keys are allowed (the pipeline may add per-prompt scores or per-iteration call counts).
    """
    check = _Checker(source)
    check.value(obj, "the top level", OBJECT)
    for key in ("recipe", "model", "method", "optimized_system_prompt"):
        check.field(obj, key, STRING)
    check.field(obj, "seed", INTEGER)
    check.field(obj, "wall_seconds", NUMBER)
    if "earlier_processes_seconds" in obj:  # absent from results written before resumes were timed
        for i, seconds in enumerate(check.field(obj, "earlier_processes_seconds", LIST)):
            check.value(seconds, f"earlier_processes_seconds.{i}", NUMBER)
    for label in check.field(obj, "system_prompts", OBJECT):
        check.field(obj["system_prompts"], label, STRING, "system_prompts.")
    for task in check.field(obj, "scores", OBJECT):
        for label in check.field(obj["scores"], task, OBJECT, "scores."):
            check.field(obj["scores"][task], label, OBJECT, f"scores.{task}.")
            for key, kind in (("mean", NUMBER), ("sd", NUMBER), ("n", INTEGER)):
                check.field(obj["scores"][task][label], key, kind, f"scores.{task}.{label}.")
    for label in check.field(obj, "overall", OBJECT):
        check.field(obj["overall"], label, NUMBER, "overall.")
    for task in check.field(obj, "adaptation", OBJECT):
        for label in check.field(obj["adaptation"], task, OBJECT, "adaptation."):
            for i, score in enumerate(
                check.field(obj["adaptation"][task], label, LIST, f"adaptation.{task}.")
            ):
                check.value(score, f"adaptation.{task}.{label}.{i}", NUMBER)
    for method in check.field(obj, "meta_train", OBJECT):
        for i, step in enumerate(check.field(obj["meta_train"], method, LIST, "meta_train.")):
            where = f"meta_train.{method}.{i}"
            check.value(step, where, OBJECT)
            # best_candidate_score is null where an iteration wrote no candidate (0 is the starting point).
            for key, kind in zip(META_TRAIN_KEYS, (INTEGER, NUMBER, NUMBER_OR_NULL, BOOLEAN), strict=True):
                check.field(step, key, kind, f"{where}.")
    check.field(obj, "costs", OBJECT)
    for key in COST_KEYS:
        check.field(obj["costs"], key, NUMBER, "costs.")
    return obj


class _Checker:
    """Type checks that name the file and the dotted key of the first problem."""

    def __init__(self, source: str):
        self.source = source

    def field(self, container: dict, key: str, kind: str, prefix: str = "") -> Any:
        if key not in container:
            raise MetaspoError(
                f"{self.source}: missing key {prefix + key!r}",
                hint=f"{RunDir.RESULT} is written whole at the end of a run; was this one edited by hand?",
            )
        return self.value(container[key], prefix + key, kind)

    def value(self, value: Any, name: str, kind: str) -> Any:
        if not _KINDS[kind](value):
            raise MetaspoError(f"{self.source}: {name!r} should be {kind}, not {json.dumps(value)[:60]}")
        return value
