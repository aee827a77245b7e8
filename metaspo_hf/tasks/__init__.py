"""Tasks: examples, prompts and metrics; sources (reference layout, datasets, BIG-bench); named suites."""

from .bigbench import fetch_bigbench
from .metrics import score_response
from .registry import Suite, list_suites, list_tasks, load_suite, load_task, suite_task_names
from .task import Example, Task

__all__ = [
    "Example",
    "Suite",
    "Task",
    "fetch_bigbench",
    "list_suites",
    "list_tasks",
    "load_suite",
    "load_task",
    "score_response",
    "suite_task_names",
]
