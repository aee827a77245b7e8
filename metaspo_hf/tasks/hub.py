"""Tasks from any ``datasets`` source: a hub id (when online or cached) or local json/jsonl/csv/parquet files.

A suite YAML describes each such task with a spec (every key optional except where noted):

```yaml
dataset: openlifescienceai/medmcqa   # hub id, or a builder (json, csv, parquet); inferred from data_files
config: null                         # the dataset's configuration name
data_files: null                     # a path/URL or {split: path}; relative paths are relative to the YAML
load_kwargs: {}                      # more datasets.load_dataset arguments for hub ids and URLs: only revision, streaming, data_dir, keep_in_memory, num_proc
train_split: train                   # where training questions come from
test_split: validation               # null: a single split, divided by seed into train and test
max_rows: null                       # read at most this many rows per split (for huge or streamed sources)
filter: {subject_name: Anatomy}      # keep rows whose top-level column equals the value (or is in the list)
question: "{question}"               # template; {column} or {column.field} slots, lists are joined
answer: cop                          # column (dotted path) of the gold answer or list of answers
answer_map: {0: A, 1: B}             # gold value -> answer; rows whose gold value is not listed are left out
options: [opa, opb, opc, opd]        # option columns, or one column holding a list: a choice task
shuffle_options: false               # shuffle options in an order fixed per question (when gold is always first)
answer_kind: choice                  # choice, label, number, rating or open (inferred when absent)
labels: [yes, no]                    # the label set of a label task
metric: contains                     # open tasks: contains, exact or f1
prompt: "...{question}..."           # the initial user prompt (a default per answer kind otherwise)
description: ""
local: medmcqa                       # local copy: <data_dir>/<local>/<split>.<ext> (default: the id's last part[/config])
reference_name: null                 # the task's file name in the reference layout, when it differs from its name
```

When ``data_dir`` is given and holds a local copy (``<data_dir>/<local>/<split>.jsonl``, or ``.json``,
``.csv``, ``.parquet``, or shards ``<split>-*.<ext>``), it is read instead of the hub, with the same
column mapping: that is how the shipped hub suites run on machines without the hub. Local files are
read with the ``datasets`` readers (``Dataset.from_json`` and friends), which never contact the Hub.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from ..errors import MetaspoError, did_you_mean
from .build import (
    TaskData,
    answer_strings,
    check_kind,
    check_metric,
    check_prompt,
    clean_question,
    infer_kind,
)
from .choices import format_choice_question, gold_letters, stable_shuffle
from .extract import LETTERS
from .task import Example

LOCAL_EXTENSIONS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
# The datasets.load_dataset arguments a suite may set. An allowlist, not a blocklist: a suite file is
# data, and arguments such as trust_remote_code would let it run code from the hub.
LOAD_KWARGS = ("revision", "streaming", "data_dir", "keep_in_memory", "num_proc")


@dataclass(frozen=True)
class DatasetSpec:
    dataset: str | None = None
    config: str | None = None
    data_files: Any = None
    load_kwargs: dict = field(default_factory=dict)
    train_split: str = "train"
    test_split: str | None = "test"
    max_rows: int | None = None
    filter: dict = field(default_factory=dict)
    question: str = "{question}"
    answer: str = "answer"
    answer_map: dict | None = None
    options: Any = None
    shuffle_options: bool = False
    answer_kind: str | None = None
    labels: tuple = ()
    metric: str | None = None
    prompt: str | None = None
    description: str = ""
    local: str | None = None
    reference_name: str | None = None
    # The folder of the YAML that defined the spec (relative data_files resolve against it).
    base_dir: str = "."


SPEC_KEYS = tuple(item.name for item in fields(DatasetSpec) if item.name != "base_dir")


def spec_from_mapping(mapping: dict, where: str, base_dir: Path) -> DatasetSpec:
    """A DatasetSpec from a suite YAML mapping; unknown keys and bad values name ``where`` and the key."""
    unknown = [key for key in mapping if key not in SPEC_KEYS]
    if unknown:
        raise MetaspoError(f"{where}: unknown key {unknown[0]!r}", hint=did_you_mean(unknown[0], SPEC_KEYS)
                           or f"known keys: {', '.join(SPEC_KEYS)}")
    values = dict(mapping)
    if values.get("answer_map") is not None:
        if not isinstance(values["answer_map"], dict):
            raise MetaspoError(f"{where}.answer_map: expected a mapping of gold value -> answer")
        # YAML reads `0: A` with an int key; rows are matched on the value's text.
        values["answer_map"] = {_key_text(key): str(value) for key, value in values["answer_map"].items()}
    for key in ("filter", "load_kwargs"):
        if not isinstance(values.get(key, {}), dict):
            raise MetaspoError(f"{where}.{key}: expected a mapping")
    refused = [key for key in values.get("load_kwargs", {}) if key not in LOAD_KWARGS]
    if refused:
        raise MetaspoError(f"{where}.load_kwargs: {refused[0]!r} is not allowed",
                           hint=f"allowed: {', '.join(LOAD_KWARGS)}")
    labels = values.get("labels") or ()
    if not isinstance(labels, (list, tuple)):
        raise MetaspoError(f"{where}.labels: expected a list of labels")
    values["labels"] = tuple(str(label) for label in labels)
    # YAML 1.1 reads unquoted yes/no/true/false/on/off as booleans, losing the spelling.
    for key, items in (("labels", labels), ("answer_map", (mapping.get("answer_map") or {}).values())):
        if any(isinstance(item, bool) for item in items):
            raise MetaspoError(f"{where}.{key}: write yes/no/true/false in quotes",
                               hint="unquoted, YAML reads them as booleans")
    spec = DatasetSpec(**values, base_dir=str(base_dir))
    if spec.dataset is None and spec.data_files is None:
        raise MetaspoError(f"{where}: a dataset spec needs 'dataset' (a hub id) or 'data_files'")
    if spec.answer_kind is not None:
        check_kind(spec.answer_kind, spec.labels, f"{where}.answer_kind")
    check_metric(spec.metric, f"{where}.metric")
    check_prompt(spec.prompt, f"{where}.prompt")
    return spec


def _key_text(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value)


def describe_source(spec: DatasetSpec) -> str:
    if spec.dataset and spec.dataset not in LOCAL_EXTENSIONS.values():
        return f"datasets:{spec.dataset}" + (f" ({spec.config})" if spec.config else "")
    return f"datasets:{spec.data_files}"


# ---- reading rows ---------------------------------------------------------------------------------

def local_name(spec: DatasetSpec) -> str | None:
    if spec.local:
        return spec.local
    if spec.dataset and spec.dataset not in LOCAL_EXTENSIONS.values():
        return spec.dataset.split("/")[-1] + (f"/{spec.config}" if spec.config else "")
    return None


def local_copy(spec: DatasetSpec, split: str, data_dir: str | None) -> list[Path]:
    """The files of a local copy of ``split`` under ``data_dir`` (empty when there is none)."""
    name = local_name(spec)
    if not data_dir or not name:
        return []
    folder = Path(data_dir) / name
    for extension in LOCAL_EXTENSIONS:
        files = sorted(folder.glob(f"{split}{extension}")) or sorted(folder.glob(f"{split}-*{extension}"))
        if files:
            return files
    return []


_URL = re.compile(r"^[a-z][a-z0-9+.-]*://")


def _split_files(task_name: str, spec: DatasetSpec, split: str) -> list[str]:
    """The data_files of ``split``, local paths made relative to the suite file; URLs pass through."""
    if isinstance(spec.data_files, dict):
        if split not in spec.data_files:
            raise MetaspoError(f"task {task_name}: data_files has no {split!r} split "
                               f"(it has {', '.join(map(str, spec.data_files))})")
        files = spec.data_files[split]
    elif split == spec.train_split:
        files = spec.data_files
    else:
        raise MetaspoError(f"task {task_name}: data_files is a single set of files, so there is no {split!r} split",
                           hint="set test_split: null to split it by seed, or give data_files as {train: ..., test: ...}")
    files = files if isinstance(files, (list, tuple)) else [files]
    base = Path(spec.base_dir)
    return [str(path) if _URL.match(str(path)) else str((base / str(path)).expanduser()) for path in files]


def _builder_for(files: list[str]) -> str | None:
    for extension, builder in LOCAL_EXTENSIONS.items():
        if files[0].endswith(extension) or files[0].endswith(extension + ".gz"):
            return builder
    return None


def _read_local(files: list[str]):
    """Local files through the datasets readers (unlike load_dataset, they never contact the Hub)."""
    import datasets  # not at the top: slow to load, and only the Hugging Face tasks need it

    readers = {"json": datasets.Dataset.from_json, "csv": datasets.Dataset.from_csv,
               "parquet": datasets.Dataset.from_parquet}
    builder = _builder_for(files)
    if builder is None:
        raise MetaspoError(f"{files[0]}: unknown file type", hint="use .json, .jsonl, .csv or .parquet files")
    return readers[builder](files)


def read_rows(task_name: str, spec: DatasetSpec, split: str, data_dir: str | None) -> list[dict]:
    """The rows of one split after ``filter`` and ``max_rows``, from a local copy, files or the hub."""
    files = [str(path) for path in local_copy(spec, split, data_dir)]
    if not files and spec.data_files is not None:
        files = _split_files(task_name, spec, split)
    what = ", ".join(files) if files else (f"dataset {spec.dataset!r}" + (f" config {spec.config!r}" if spec.config
                                                                           else "") + f" split {split!r}")
    try:
        return _select_rows(_load_split(spec, split, files), spec)
    except MetaspoError:
        raise
    except Exception as exc:  # network, missing files, bad configs: all mean "not available here"
        copy = local_name(spec)
        detail = str(exc).splitlines()[0] if str(exc) else ""
        raise MetaspoError(
            f"task {task_name}: cannot load {what}: {type(exc).__name__}: {detail}",
            hint=(f"put a local copy at <data_dir>/{copy}/{split}.jsonl (or .json, .csv, .parquet) and pass "
                  f"--data-dir, or run once with Hugging Face Hub access" if copy else None),
        ) from None


def _load_split(spec: DatasetSpec, split: str, files: list[str]):
    import datasets  # not at the top: slow to load, and only the Hugging Face tasks need it

    if files and not any(_URL.match(path) for path in files):
        return _read_local(files)
    if files:
        return datasets.load_dataset(spec.dataset or _builder_for(files), data_files={split: files}, split=split,
                                     **spec.load_kwargs)
    return datasets.load_dataset(spec.dataset, spec.config, split=split, **spec.load_kwargs)


def _select_rows(loaded, spec: DatasetSpec) -> list[dict]:
    import datasets  # not at the top: slow to load, and only the Hugging Face tasks need it

    if isinstance(loaded, datasets.IterableDataset):
        rows = []
        for index, row in enumerate(loaded):
            if spec.max_rows is not None and index >= spec.max_rows:
                break
            if _keep(row, spec.filter):
                rows.append(row)
        return rows
    if spec.max_rows is not None:
        loaded = loaded.select(range(min(spec.max_rows, len(loaded))))
    if spec.filter:
        missing = [column for column in spec.filter if column not in loaded.column_names]
        if missing:
            raise MetaspoError(f"filter: no column {missing[0]!r} (columns: {', '.join(loaded.column_names)})")
        columns = {column: list(loaded[column]) for column in spec.filter}
        keep = [index for index in range(len(loaded))
                if _keep({column: values[index] for column, values in columns.items()}, spec.filter)]
        loaded = loaded.select(keep)
    return loaded.to_list()


def _keep(row: dict, conditions: dict) -> bool:
    for column, wanted in conditions.items():
        allowed = wanted if isinstance(wanted, list) else [wanted]
        if _key_text(row.get(column)) not in {_key_text(value) for value in allowed}:
            return False
    return True


# ---- rows to examples -----------------------------------------------------------------------------

def field_value(row: dict, path: str, where: str) -> Any:
    """``row["a"]["b"]`` for "a.b"; across a list of records, the list of their values."""
    value: Any = row
    for part in path.split("."):
        if isinstance(value, list):
            value = [item.get(part) if isinstance(item, dict) else None for item in value]
        elif isinstance(value, dict) and part in value:
            value = value[part]
        else:
            known = ", ".join(value) if isinstance(value, dict) else type(value).__name__
            raise MetaspoError(f"{where}: no field {path!r} in the rows (fields here: {known})")
    return value


def _as_text(value: Any) -> str:
    if isinstance(value, list):
        if any(isinstance(item, list) for item in value):
            # Paragraphs of sentences (e.g. HotpotQA contexts): one paragraph per line.
            return "\n".join(" ".join(" ".join(_as_text(part) for part in item).split()) for item in value)
        return ", ".join(_as_text(item) for item in value)
    return "" if value is None else str(value)


def render_template(template: str, row: dict, where: str) -> str:
    return re.sub(r"\{([^{}]+)\}", lambda match: _as_text(field_value(row, match.group(1), where)), template)


def _mapped_answers(raw: Any, answer_map: dict | None) -> tuple[str, ...]:
    values = raw if isinstance(raw, list) else [raw]
    if answer_map is not None:
        values = [answer_map[_key_text(value)] for value in values if _key_text(value) in answer_map]
    return answer_strings(values)


def _option_texts(row: dict, spec: DatasetSpec, where: str) -> list[str]:
    if isinstance(spec.options, str):
        return [_as_text(item) for item in field_value(row, spec.options, where)]
    return [_as_text(field_value(row, column, where)) for column in spec.options]


def load_dataset_data(task_name: str, spec: DatasetSpec, data_dir: str | None) -> TaskData:
    """The train (and test) pools of a datasets-backed task."""
    where = f"task {task_name}"
    splits = [spec.train_split] + ([spec.test_split] if spec.test_split else [])
    records = {split: [] for split in splits}
    for split in splits:
        for row in read_rows(task_name, spec, split, data_dir):
            answers = _mapped_answers(field_value(row, spec.answer, f"{where}.answer"), spec.answer_map)
            if answers:
                records[split].append((row, answers))
    kind, labels = spec.answer_kind, spec.labels
    if kind is None:
        if spec.options:
            kind = "choice"
        else:
            sample = [(render_template(spec.question, row, where), answers, isinstance(
                field_value(row, spec.answer, where), list)) for rows in records.values() for row, answers in rows]
            kind, labels = infer_kind(sample)
    pools = {split: [_example(task_name, spec, kind, labels, row, answers) for row, answers in rows]
             for split, rows in records.items()}
    return TaskData(
        train=pools[spec.train_split],
        test=pools[spec.test_split] if spec.test_split else None,
        answer_kind=kind,
        labels=tuple(labels),
        source=describe_source(spec),
        prompt=spec.prompt,
        description=spec.description,
        meta={"metric": spec.metric} if spec.metric else {},
    )


def _example(task_name: str, spec: DatasetSpec, kind: str, labels: tuple, row: dict, answers: tuple) -> Example:
    where = f"task {task_name}"
    question = clean_question(render_template(spec.question, row, f"{where}.question"))
    if kind == "label":
        by_lower = {label.lower(): label for label in labels}
        unknown = [answer for answer in answers if answer.lower() not in by_lower]
        if unknown:
            raise MetaspoError(f"{where}: gold answer {unknown[0]!r} is not one of the labels {list(labels)}",
                               hint="map it with answer_map, or add it to labels")
        return Example(question, tuple(by_lower[answer.lower()] for answer in answers))
    if kind != "choice":
        return Example(question, answers)
    if not spec.options:
        raise MetaspoError(f"{where}: a choice task needs 'options' (option columns)")
    options = _option_texts(row, spec, f"{where}.options")
    letters = [gold_letters(answer, options) for answer in answers]
    if None in letters:
        raise MetaspoError(f"{where}: gold answer {answers[letters.index(None)]!r} names none of the options {options}")
    if spec.shuffle_options:
        correct = [options[LETTERS.index(letter)] for letter in letters]
        options, letters = stable_shuffle(options, correct, f"{task_name}\n{question}")
    return Example(format_choice_question(question, options), tuple(letters), tuple(options))
