"""The data layout of the original MetaSPO code, read as is.

``<data_dir>/<benchmark>/<task>.json`` holds ``{"train": [...], "test": [...]}``, lists of
``{"question": ..., "answer": ...}`` records; the answer is a string, a number or a list of accepted
strings (``"answers"`` is read too). A task-list YAML names the tasks:

```yaml
meta_train_tasks: [logic_grid_puzzle, bigbench/temporal_sequences]   # bare or benchmark/task names
meta_test_tasks:
  bigbench: [object_counting]                                         # or benchmark -> tasks
```

A bare name is looked up in every benchmark folder (it must be found in exactly one); the benchmark
folder is the task's domain. The answer kind is inferred from the data (``build.infer_kind``) unless
the JSON file says ``"answer_kind"`` (and ``"labels"``) at its top level.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from ..errors import MetaspoError
from .build import TaskData, answer_strings, check_kind, clean_question, infer_kind, record_example

TASK_LIST_KEYS = ("meta_train_tasks", "meta_test_tasks")
# The record keys read as the question and the answer, first found wins (the paper code uses the first).
QUESTION_KEYS = ("question", "input", "query", "text")
ANSWER_KEYS = ("answer", "answers", "target", "label")


def reference_tasks(data_dir: str | Path) -> list[str]:
    """Every ``benchmark/task`` name in a reference-layout folder."""
    root = Path(data_dir)
    return sorted(f"{path.parent.name}/{path.stem}" for path in root.glob("*/*.json"))


def find_reference_file(data_dir: str | Path, name: str) -> Path | None:
    """The JSON file of ``name`` ("task" or "benchmark/task") under ``data_dir``, or None."""
    root = Path(data_dir)
    if "/" in name:
        path = root / f"{name}.json"
        return path if path.is_file() else None
    matches = sorted(root.glob(f"*/{name}.json"))
    if len(matches) > 1:
        options = ", ".join(f"{path.parent.name}/{name}" for path in matches)
        raise MetaspoError(f"task {name!r} is in several benchmark folders of {root}", hint=f"name one of {options}")
    return matches[0] if matches else None


def is_task_list(mapping: Any) -> bool:
    return isinstance(mapping, dict) and any(key in mapping for key in TASK_LIST_KEYS)


def task_list_entries(mapping: dict, path: Path) -> tuple[list[tuple[str, str | None]], list[tuple[str, str | None]]]:
    """(name, benchmark or None) for the meta-train and the meta-test tasks of a task-list YAML."""
    unknown = set(mapping) - set(TASK_LIST_KEYS) - {"data_dir", "description"}
    if unknown:
        raise MetaspoError(f"{path}: unknown key(s) {', '.join(sorted(unknown))} in a task list",
                           hint=f"a task list has {' and '.join(TASK_LIST_KEYS)} (and optionally data_dir)")
    train_key, test_key = TASK_LIST_KEYS
    return (_entries(mapping.get(train_key), f"{path}: {train_key}"),
            _entries(mapping.get(test_key), f"{path}: {test_key}"))


def _entries(value: Any, where: str) -> list[tuple[str, str | None]]:
    if value is None:
        return []
    if isinstance(value, dict):
        entries = []
        for benchmark, names in value.items():
            names = [names] if isinstance(names, str) else names
            if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
                raise MetaspoError(f"{where}.{benchmark}: expected a list of task names, got {names!r}")
            entries += [(name, str(benchmark)) for name in names]
        return entries
    if isinstance(value, list) and all(isinstance(name, str) for name in value):
        return [(name, None) for name in value]
    raise MetaspoError(f"{where}: expected a list of task names or a mapping of benchmark -> task names")


def read_yaml(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as handle:
            return yaml.safe_load(handle)
    except OSError as exc:
        raise MetaspoError(f"{path}: cannot read ({exc.strerror})") from None
    except yaml.YAMLError as exc:
        raise MetaspoError(f"{path}: not valid YAML ({exc})") from None


def load_reference_data(path: Path) -> TaskData:
    """The train and test pools of one reference-layout task file."""
    try:
        with open(path, encoding="utf-8") as handle:
            content = json.load(handle)
    except OSError as exc:
        raise MetaspoError(f"{path}: cannot read ({exc.strerror})") from None
    except json.JSONDecodeError as exc:
        raise MetaspoError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(content, dict) or not all(isinstance(content.get(key), list) for key in ("train", "test")):
        raise MetaspoError(f"{path}: expected an object with 'train' and 'test' lists of question/answer records")
    splits = {key: [_record(row, f"{path}: {key}[{index}]") for index, row in enumerate(content[key])]
              for key in ("train", "test")}
    kind, labels = infer_kind(splits["train"] + splits["test"])
    if "answer_kind" in content:
        kind, labels = content["answer_kind"], tuple(content.get("labels", ()))
        check_kind(kind, labels, f"{path}: answer_kind")
    examples = {key: [record_example(question, answers, kind, f"{path}: {key}[{index}]")
                      for index, (question, answers, _) in enumerate(records)]
                for key, records in splits.items()}
    return TaskData(train=examples["train"], test=examples["test"], answer_kind=kind, labels=labels,
                    source=f"reference:{path}", description=str(content.get("description", "")))


def _record(row: Any, where: str) -> tuple[str, tuple[str, ...], bool]:
    if not isinstance(row, dict):
        raise MetaspoError(f"{where}: expected an object with 'question' and 'answer', got {type(row).__name__}")
    question_key = next((key for key in QUESTION_KEYS if key in row), None)
    answer_key = next((key for key in ANSWER_KEYS if key in row), None)
    if question_key is None or answer_key is None:
        raise MetaspoError(f"{where}: expected keys 'question' and 'answer', found {', '.join(row) or 'none'}")
    answers = answer_strings(row[answer_key])
    if not answers:
        raise MetaspoError(f"{where}: the answer is empty")
    return clean_question(row[question_key]), answers, isinstance(row[answer_key], list)
