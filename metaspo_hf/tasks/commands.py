"""The `metaspo tasks ...` and `metaspo data fetch` commands (they print to stdout)."""

from __future__ import annotations

import textwrap

from ..errors import MetaspoError, did_you_mean
from .bigbench import bigbench_task_names, fetch_bigbench, is_fetched
from .build import DEFAULT_TEST_SIZE, DEFAULT_TRAIN_SIZE, build_task
from .hub import DatasetSpec, describe_source
from .metrics import describe_metric
from .registry import TaskRef, list_suites, resolve_task, suite_definition, task_data

FETCHABLE = ("bigbench",)


def _source_text(ref: TaskRef) -> str:
    if isinstance(ref.source, DatasetSpec):
        return describe_source(ref.source)
    return str(ref.source)


def tasks_ls(suite: str | None) -> None:
    """All suites with their domains and sizes, or one suite's tasks per domain."""
    if suite is None:
        print("Suites (`metaspo tasks ls --suite NAME` lists a suite's tasks):")
        for name in list_suites():
            definition = suite_definition(name)
            domains = ", ".join(dict.fromkeys(ref.domain for ref in definition.train + definition.test))
            print(f"  {name:20s} {len(definition.train):2d} meta-train, {len(definition.test):2d} unseen  "
                  f"[{domains}]  {definition.description}")
        print("Any BIG-bench task also works as bigbench:<task>[/<subtask>] (`metaspo data fetch bigbench`).")
        return
    definition = suite_definition(suite)
    print(f"{definition.name}: {definition.description}".rstrip(": "))
    for domain in dict.fromkeys(ref.domain for ref in definition.train + definition.test):
        print(f"  domain {domain or '(from the data folder)'}")
        for label, refs in (("meta-train", definition.train), ("unseen", definition.test)):
            for ref in refs:
                if ref.domain == domain:
                    source = _source_text(ref)
                    print(f"    {label:10s} {ref.name:32s} {'' if source == ref.name else source}".rstrip())


def tasks_show(name: str, data_dir: str | None = None) -> None:
    """A task's source, sizes, metric, initial prompt and one example as the model sees it."""
    ref = resolve_task(name, data_dir)
    data = task_data(ref, data_dir)
    if data.test is None:
        pools = f"{len(data.train)} examples in one pool, split by seed"
        train_size = min(DEFAULT_TRAIN_SIZE, len(data.train) - 1)
    else:
        pools = f"{len(data.train)} train and {len(data.test)} test examples"
        train_size = min(DEFAULT_TRAIN_SIZE, len(data.train))
    task = build_task(ref.name, ref.domain, data, seed=0, train_size=train_size, test_size=DEFAULT_TEST_SIZE)
    example = (task.train or task.test)[0]
    gold = ", ".join(f"{answer} ({example.options[ord(answer) - ord('A')]})" if example.options else answer
                     for answer in example.answers)
    print(f"Task:        {task.name} (domain {task.domain})")
    print(f"Source:      {task.source}")
    print(f"Answers:     {task.answer_kind}" + (f" — labels {', '.join(task.labels)}" if task.labels else ""))
    print(f"Metric:      {describe_metric(task)}")
    print(f"Examples:    {pools}; with seed 0, train_size {train_size} and test_size {DEFAULT_TEST_SIZE}: "
          f"{len(task.train)} train, {len(task.test)} test")
    if task.description:
        print("Description: " + textwrap.shorten(task.description, 300))
    print("\nInitial user prompt:")
    print(textwrap.indent(task.initial_prompt, "  | ", lambda line: True))
    print("\nOne example, as the user turn the model sees:")
    print(textwrap.indent(task.render(task.initial_prompt, example), "  | ", lambda line: True))
    print(f"\nGold answer: {gold}")


def data_fetch(what: str) -> None:
    """Download a dataset into the user cache (only BIG-bench needs fetching; hub data goes through datasets)."""
    if what not in FETCHABLE:
        raise MetaspoError(f"cannot fetch {what!r}", hint=did_you_mean(what, FETCHABLE)
                           or f"fetchable: {', '.join(FETCHABLE)}; hub datasets load through `datasets`")
    already = is_fetched()
    root = fetch_bigbench()
    state = "already in the cache" if already else "fetched"
    print(f"BIG-bench {state}: {len(bigbench_task_names())} tasks and subtasks in {root}")
