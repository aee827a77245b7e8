"""Task and suite names: the shipped suites, ad-hoc BIG-bench names, reference-layout folders.

A task name resolves, in this order:

1. ``bigbench:<task>[/<subtask>]``: that BIG-bench task (fetched on first use);
2. with ``data_dir``: a reference-layout file ``<data_dir>/<benchmark>/<name>.json`` (``name`` may be
   ``benchmark/task``; a registry task may name its file with ``reference_name``), so pointing
   ``data_dir`` at the original code's datasets folder makes the paper suites read its files. The
   domain of such a task is its benchmark folder, unless a suite lists it under a domain;
3. a task of a shipped suite (``list_tasks()``).

A suite is a shipped name (``list_suites()``), a path to a suite YAML in this package's format, or a
path to a reference-layout task list (``meta_train_tasks``/``meta_test_tasks``), all loaded by the
same code. Suite YAML format (see ``suites/*.yaml``):

```yaml
description: One line about the suite.
include: [other-suite]              # optional: all domains of shipped suites
defaults: {dataset: ..., ...}       # optional: merged under every dataset spec of this file
domains:
  reasoning:                        # the domain of the tasks below
    meta_train:
      - bigbench:navigate                                # an ad-hoc name
      - logical_deduction: bigbench:logical_deduction/three_objects   # name: another name
      - medicine: {dataset: openlifescienceai/medmcqa, ...}           # name: dataset spec (hub.py)
    meta_test: [...]
```
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from ..errors import MetaspoError, did_you_mean
from .bigbench import PREFIX as BIGBENCH_PREFIX
from .bigbench import bigbench_task_names, is_fetched, load_bigbench_data
from .build import DEFAULT_TEST_SIZE, DEFAULT_TRAIN_SIZE, TaskData, build_task
from .hub import DatasetSpec, load_dataset_data, spec_from_mapping
from .reference import (
    find_reference_file,
    is_task_list,
    load_reference_data,
    read_yaml,
    reference_tasks,
    task_list_entries,
)
from .task import Task

SUITES_DIR = Path(__file__).parent / "suites"
SUITE_KEYS = ("description", "include", "defaults", "domains")
SPLIT_KEYS = ("meta_train", "meta_test")
# The domain of ad-hoc BIG-bench names outside any suite.
BIGBENCH_DOMAIN = "bigbench"

# Where a task's examples come from: a task name (ad-hoc "bigbench:..." or another registry name),
# a dataset spec, or a reference-layout JSON file.
Source = str | DatasetSpec | Path


@dataclass(frozen=True)
class TaskRef:
    name: str
    domain: str
    source: Source


@dataclass
class Suite:
    name: str
    meta_train: list[Task]
    meta_test: list[Task]
    description: str = ""


@dataclass
class SuiteDefinition:
    name: str
    description: str = ""
    train: list[TaskRef] = field(default_factory=list)
    test: list[TaskRef] = field(default_factory=list)
    # A reference-layout task list: names are resolved against a data_dir when loading.
    task_list_dir: Path | None = None
    task_list_data_dir: str | None = None


# ---- shipped suites and the task registry --------------------------------------------------------

def list_suites() -> list[str]:
    return sorted(path.stem for path in SUITES_DIR.glob("*.yaml"))


def list_tasks(suite: str | None = None) -> list[str]:
    """The registry's task names, or the meta-train then meta-test names of one suite."""
    if suite is None:
        return sorted(_registry())
    train, test = suite_task_names(suite)
    return train + test


def suite_task_names(name: str) -> tuple[list[str], list[str]]:
    """(meta-train names, meta-test names) of a suite, without loading any data."""
    definition = suite_definition(name)
    return [ref.name for ref in definition.train], [ref.name for ref in definition.test]


@lru_cache(maxsize=1)
def _registry() -> dict[str, TaskRef]:
    registry: dict[str, TaskRef] = {}
    for suite in list_suites():
        definition = suite_definition(suite)
        for ref in definition.train + definition.test:
            # Ad-hoc BIG-bench names and bare references to tasks defined elsewhere define nothing.
            if ref.name.startswith(BIGBENCH_PREFIX) or ref.source == ref.name:
                continue
            known = registry.setdefault(ref.name, ref)
            if known.source != ref.source:
                raise ValueError(f"suite {suite}: task {ref.name!r} is defined differently in another suite")
    return registry


def suite_definition(name_or_path: str) -> SuiteDefinition:
    """A suite's task references (names, domains, sources) without loading any data."""
    if name_or_path in list_suites():
        return _parse_suite(SUITES_DIR / f"{name_or_path}.yaml", name_or_path)
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return _parse_suite(path, path.stem)
    raise MetaspoError(f"unknown suite {name_or_path!r}",
                       hint=did_you_mean(name_or_path, list_suites())
                       or "`metaspo tasks ls` lists the suites; a path to a suite or task-list YAML works too")


def _parse_suite(path: Path, name: str) -> SuiteDefinition:
    content = read_yaml(path)
    if is_task_list(content):
        train, test = task_list_entries(content, path)
        data_dir = content.get("data_dir")
        return SuiteDefinition(
            name=name, description=str(content.get("description", "")),
            train=[_listed(task, benchmark) for task, benchmark in train],
            test=[_listed(task, benchmark) for task, benchmark in test],
            task_list_dir=path.parent,
            task_list_data_dir=str(path.parent / data_dir) if data_dir else None,
        )
    if not isinstance(content, dict):
        raise MetaspoError(f"{path}: expected a suite (description, domains) or a task list "
                           f"(meta_train_tasks, meta_test_tasks)")
    unknown = [key for key in content if key not in SUITE_KEYS]
    if unknown:
        raise MetaspoError(f"{path}: unknown key {unknown[0]!r}",
                           hint=did_you_mean(unknown[0], SUITE_KEYS) or f"known keys: {', '.join(SUITE_KEYS)}")
    definition = SuiteDefinition(name=name, description=str(content.get("description", "")))
    for included in content.get("include") or []:
        other = suite_definition(str(included))
        definition.train += other.train
        definition.test += other.test
    defaults = content.get("defaults") or {}
    domains = content.get("domains") or {}
    if not isinstance(domains, dict):
        raise MetaspoError(f"{path}: domains: expected a mapping of domain -> meta_train/meta_test lists")
    for domain, splits in domains.items():
        where = f"{path}: domains.{domain}"
        if not isinstance(splits, dict) or set(splits) - set(SPLIT_KEYS):
            raise MetaspoError(f"{where}: expected meta_train and meta_test lists")
        definition.train += [_entry(item, str(domain), defaults, f"{where}.meta_train", path.parent)
                             for item in splits.get("meta_train") or []]
        definition.test += [_entry(item, str(domain), defaults, f"{where}.meta_test", path.parent)
                            for item in splits.get("meta_test") or []]
    return definition


def _listed(task: str, benchmark: str | None) -> TaskRef:
    # The domain is settled when the name is resolved: the benchmark folder the file is found in.
    return TaskRef(task, benchmark or "", f"{benchmark}/{task}" if benchmark else task)


def _entry(item, domain: str, defaults: dict, where: str, base_dir: Path) -> TaskRef:
    if isinstance(item, str):
        return TaskRef(item, domain, item)
    if isinstance(item, dict) and len(item) == 1:
        (name, source), = item.items()
        if isinstance(source, str):
            return TaskRef(str(name), domain, source)
        if isinstance(source, dict):
            return TaskRef(str(name), domain, spec_from_mapping({**defaults, **source}, f"{where}.{name}", base_dir))
    raise MetaspoError(f"{where}: expected a task name, `name: other-name` or `name: {{dataset spec}}`, got {item!r}")


# ---- loading ------------------------------------------------------------------------------------

def load_task(name: str, *, seed: int = 0, train_size: int = DEFAULT_TRAIN_SIZE, test_size: int = DEFAULT_TEST_SIZE,
              data_dir: str | None = None) -> Task:
    """One task by name (resolution order in the module doc), sampled by seed (rules in ``build``)."""
    ref = resolve_task(name, data_dir)
    return build_task(ref.name, ref.domain, task_data(ref, data_dir), seed=seed, train_size=train_size,
                      test_size=test_size)


def load_suite(name_or_path: str, *, seed: int = 0, train_size: int = DEFAULT_TRAIN_SIZE,
               test_size: int = DEFAULT_TEST_SIZE,
               data_dir: str | None = None, domains: list[str] | None = None,
               meta_train_size: int | None = None) -> Suite:
    """A suite's meta-train and meta-test tasks, optionally only those of ``domains``; the meta-train
    tasks take ``meta_train_size`` training examples when given (the search's plus held-out ones)."""
    definition = suite_definition(name_or_path)
    data_dir = data_dir or definition.task_list_data_dir
    if definition.task_list_dir is not None and data_dir is None:
        data_dir = _guess_data_dir(definition)
    refs = {"train": [_suite_ref(ref, data_dir) for ref in definition.train],
            "test": [_suite_ref(ref, data_dir) for ref in definition.test]}
    if domains is not None:
        known = list(dict.fromkeys(ref.domain for group in refs.values() for ref in group))
        for domain in domains:
            if domain not in known:
                raise MetaspoError(f"suite {definition.name}: no domain {domain!r} (domains: {', '.join(known)})",
                                   hint=did_you_mean(domain, known))
        refs = {key: [ref for ref in group if ref.domain in domains] for key, group in refs.items()}

    def build(ref: TaskRef, size: int) -> Task:
        return build_task(ref.name, ref.domain, task_data(ref, data_dir), seed=seed, train_size=size,
                          test_size=test_size)

    return Suite(name=definition.name, meta_train=[build(ref, meta_train_size or train_size) for ref in refs["train"]],
                 meta_test=[build(ref, train_size) for ref in refs["test"]], description=definition.description)


def resolve_task(name: str, data_dir: str | None = None) -> TaskRef:
    if name.startswith(BIGBENCH_PREFIX):
        return TaskRef(name, BIGBENCH_DOMAIN, name)
    registered = _registry().get(name)
    if data_dir:
        reference_name = registered.source.reference_name if registered and isinstance(
            registered.source, DatasetSpec) and registered.source.reference_name else name
        path = find_reference_file(data_dir, reference_name)
        if path is not None:
            return TaskRef(name.split("/")[-1], path.parent.name, path)
    if registered is not None:
        return registered
    listed = reference_tasks(data_dir) if data_dir else []
    choices = list(_registry()) + listed + [entry.split("/")[-1] for entry in listed]
    if is_fetched():
        choices += [BIGBENCH_PREFIX + task for task in bigbench_task_names()]
    raise MetaspoError(f"unknown task {name!r}" + (f" (also looked in {data_dir})" if data_dir else ""),
                       hint=did_you_mean(name, choices)
                       or "`metaspo tasks ls --suite NAME` lists a suite's tasks; "
                          "bigbench:<task> names any BIG-bench task")


def _suite_ref(ref: TaskRef, data_dir: str | None) -> TaskRef:
    """A suite entry with a reference-layout file under ``data_dir`` taking precedence, as for names."""
    if isinstance(ref.source, str):
        resolved = resolve_task(ref.source, data_dir)
        return TaskRef(ref.name, ref.domain or resolved.domain, resolved.source)
    if data_dir and isinstance(ref.source, DatasetSpec):
        path = find_reference_file(data_dir, ref.source.reference_name or ref.name)
        if path is not None:
            return TaskRef(ref.name, ref.domain, path)
    return ref


def _guess_data_dir(definition: SuiteDefinition) -> str:
    """For a task list without data_dir: the first nearby folder holding its first task's file."""
    folder = definition.task_list_dir
    first = next((ref.name for ref in definition.train + definition.test
                  if not ref.name.startswith(BIGBENCH_PREFIX)), None)
    candidates = [folder, folder / "datasets", folder.parent / "datasets", folder.parent]
    for candidate in candidates:
        if first is None or (candidate.is_dir() and find_reference_file(candidate, first)):
            return str(candidate)
    raise MetaspoError(f"task list {definition.name}: no data folder found for task {first!r}",
                       hint="pass the reference-layout folder as data_dir (--data-dir, or data_dir in the recipe)")


def task_data(ref: TaskRef, data_dir: str | None) -> TaskData:
    """The example pools behind a resolved task reference."""
    source = ref.source
    if isinstance(source, Path):
        return load_reference_data(source)
    if isinstance(source, DatasetSpec):
        return load_dataset_data(ref.name, source, data_dir)
    if source.startswith(BIGBENCH_PREFIX):
        return load_bigbench_data(source[len(BIGBENCH_PREFIX):])
    return task_data(resolve_task(source, data_dir), data_dir)
