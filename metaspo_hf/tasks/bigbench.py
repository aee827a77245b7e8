"""BIG-bench tasks offline, from the PyPI source distribution ``bigbench==1.0.0``.

The sdist (~360 MB) holds every task as ``bigbench/benchmark_tasks/<task>/task.json`` and
``<task>/<subtask>/task.json``. ``fetch_bigbench`` downloads it as a plain file from PyPI (not with
pip, whose ``pip download`` of an sdist may build it, running its ``setup.py``) and checks it against
its pinned SHA-256, or takes the file named by ``$METASPO_BIGBENCH_ARCHIVE``; it keeps only those task
files, each gzip-compressed (~400 MB instead of 1.7 GB), under ``metaspo_hf.paths.cache_dir("bigbench")``,
then deletes the downloaded archive. An archive member with an absolute path, ``..`` or an empty path
component is refused. Loading a task fetches first when needed.

How a BIG-bench example becomes an Example:

- The question is the task's own ``task_prefix``, then ``example_input_prefix`` and the
  input, then ``example_output_prefix`` when it says more than a bare "A:" cue (in several tasks it
  carries the actual question, e.g. "Does the preceding sentence contain anachronistic elements?").
- Multiple-choice examples (``target_scores``): the options with the highest score are correct. When
  every example offers the same few short options (True/False, yes/no, entailment/...), the task is a
  ``label`` task and the labels are named in the answer format. Otherwise it is a ``choice`` task:
  options that are the same number in digits and words are merged, the options are shuffled in an
  order fixed per question, and listed as "(A) ..." lines; examples with more than 26 options are
  left out.
- Generative examples (``target``): every target is an accepted answer; the task is ``number`` when
  all targets are numbers, else ``open``.
- ``bigbench:<task>`` for a task made of subtasks pools all its subtasks, each with its own prefixes.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from tqdm.auto import tqdm

from ..errors import MetaspoError, did_you_mean
from ..paths import cache_dir
from .build import TaskData, answer_strings, clean_question
from .choices import format_choice_question, merge_number_options, stable_shuffle
from .extract import LETTERS, number_value
from .task import Example

PREFIX = "bigbench:"
BIGBENCH_VERSION = "1.0.0"
ARCHIVE_ENV = "METASPO_BIGBENCH_ARCHIVE"
ARCHIVE_NAME = f"bigbench-{BIGBENCH_VERSION}.tar.gz"
# The sdist's SHA-256, as PyPI listed it when it was pinned: a changed file on the index is refused.
ARCHIVE_SHA256 = "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2"
# What to do when the index cannot serve the archive.
_BY_HAND = (f"copy {ARCHIVE_NAME} (SHA-256 {ARCHIVE_SHA256}) from a machine or mirror that has it and set "
            f"${ARCHIVE_ENV} to the file")


@lru_cache(maxsize=1)
def index_url() -> str:
    """The bigbench project page on the package index pip uses (PIP_INDEX_URL, else pip's own default), read
    through the simple API in its JSON form (PEP 691): each file's URL and SHA-256. pip's default is asked of
    pip in a child process: pip, once imported, turns setuptools' distutils off for the whole process, and
    torch's C++ extension builder (models/decode_kernel.py) then fails to import."""
    configured = os.environ.get("PIP_INDEX_URL")
    if not configured:
        try:
            asked = subprocess.run([sys.executable, "-c", "from pip._internal.models.index import PyPI; print(PyPI.simple_url)"],
                                   capture_output=True, text=True, timeout=120)
        except (OSError, subprocess.TimeoutExpired):
            asked = None
        configured = asked.stdout.strip() if asked else ""
        if not asked or asked.returncode != 0 or not configured:
            raise MetaspoError("could not ask pip for its package index (is pip installed?)",
                               hint=f"set PIP_INDEX_URL, or download {ARCHIVE_NAME} and set ${ARCHIVE_ENV} to the file")
    return configured.rstrip("/") + "/bigbench/"


_INDEX_ACCEPT = "application/vnd.pypi.simple.v1+json"
_MEMBER = re.compile(r"(?:^|/)bigbench/benchmark_tasks/(.+)/task\.json$")
_COMPLETE_MARKER = ".complete"
# gzip level 1: a quarter of the raw size, and extraction stays about as fast as reading the archive.
_GZIP_LEVEL = 1


def tasks_root() -> Path:
    return cache_dir("bigbench") / "benchmark_tasks"


def is_fetched() -> bool:
    return (tasks_root() / _COMPLETE_MARKER).is_file()


def fetch_bigbench(force: bool = False) -> Path:
    """The folder of extracted BIG-bench task files, fetching and extracting the archive when needed."""
    root = tasks_root()
    if is_fetched() and not force:
        return root
    given = os.environ.get(ARCHIVE_ENV)
    # A file the user names is taken as theirs to vouch for (small fakes in tests, copies on air-gapped
    # machines): its members are checked, its hash is not.
    if given:
        archive = Path(given).expanduser()
        if not archive.is_file():
            raise MetaspoError(f"${ARCHIVE_ENV}={given}: no such file",
                               hint=f"point it at bigbench-{BIGBENCH_VERSION}.tar.gz, or unset it to download")
        _extract(archive, root)
        return root
    with tempfile.TemporaryDirectory(dir=root.parent, prefix="download-") as download_dir:
        _extract(_download(Path(download_dir)), root)
    return root


def _download(folder: Path) -> Path:
    """The sdist as a file in ``folder``, checked against the SHA-256 that the index lists and the
    pinned one: read as an archive only, never built."""
    url, listed = _archive_url()
    if listed != ARCHIVE_SHA256:
        raise MetaspoError(f"{index_url()} lists SHA-256 {listed} for {ARCHIVE_NAME}, not the pinned {ARCHIVE_SHA256}",
                           hint="the file on the index changed; do not use it")
    target = folder / ARCHIVE_NAME
    print(f"Downloading the BIG-bench task files: {url}", file=sys.stderr)
    digest = hashlib.sha256()
    try:
        with urllib.request.urlopen(url) as response, open(target, "wb") as out, tqdm(
            total=int(response.headers.get("Content-Length") or 0) or None, unit="B", unit_scale=True,
            desc=f"downloading {ARCHIVE_NAME}"
        ) as progress:
            for chunk in iter(lambda: response.read(1 << 20), b""):
                digest.update(chunk)
                out.write(chunk)
                progress.update(len(chunk))
    except (urllib.error.URLError, OSError) as exc:
        raise _download_error(exc) from None
    if digest.hexdigest() != ARCHIVE_SHA256:
        raise MetaspoError(f"{url}: the downloaded file has SHA-256 {digest.hexdigest()}, not the pinned "
                           f"{ARCHIVE_SHA256}", hint="the download was altered or cut short; fetch again")
    return target


def _archive_url() -> tuple[str, str]:
    """(URL, listed SHA-256) of the sdist, from the index's JSON page."""
    request = urllib.request.Request(index_url(), headers={"Accept": _INDEX_ACCEPT})
    try:
        with urllib.request.urlopen(request) as response:
            files = json.load(response)["files"]
    except (urllib.error.URLError, OSError, ValueError, KeyError, TypeError) as exc:
        raise _download_error(exc) from None
    for entry in files:
        if entry.get("filename") == ARCHIVE_NAME:
            # The index may give URLs relative to its own page.
            return urllib.parse.urljoin(index_url(), entry["url"]), entry.get("hashes", {}).get("sha256")
    # What PyPI itself now answers (docs/tasks.md, "BIG-bench offline").
    raise MetaspoError(f"{index_url()} does not list {ARCHIVE_NAME}", hint=_BY_HAND)


def _download_error(exc: Exception) -> MetaspoError:
    return MetaspoError(
        f"could not download bigbench=={BIGBENCH_VERSION} from {index_url()} ({type(exc).__name__}: {exc})",
        hint=_BY_HAND)


def _check_member(archive: Path, name: str) -> None:
    # Such a name could place a file outside the cache folder; no genuine sdist member has one.
    parts = name.split("/")
    if name.startswith("/") or "" in parts or ".." in parts:
        raise MetaspoError(f"{archive}: refused: member {name!r} has an absolute path, '..' or an empty component",
                           hint=f"use the {ARCHIVE_NAME} source archive from PyPI")


def _extract(archive: Path, root: Path) -> None:
    """Every task.json of the archive into ``root`` (gzip-compressed), atomically."""
    staging = root.with_name(root.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    count = 0
    try:
        with open(archive, "rb") as handle, tarfile.open(fileobj=handle, mode="r|gz") as tar, tqdm(
            total=archive.stat().st_size, unit="B", unit_scale=True, desc="extracting BIG-bench tasks"
        ) as progress:
            for member in tar:
                progress.update(handle.tell() - progress.n)
                _check_member(archive, member.name)
                match = _MEMBER.search(member.name)
                if not (member.isfile() and match):
                    continue
                target = staging / match.group(1) / "task.json.gz"
                target.parent.mkdir(parents=True, exist_ok=True)
                with gzip.open(target, "wb", compresslevel=_GZIP_LEVEL) as out:
                    shutil.copyfileobj(tar.extractfile(member), out)
                count += 1
            progress.update(progress.total - progress.n)
    except BaseException as exc:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(exc, (tarfile.TarError, EOFError, OSError)):  # gzip.BadGzipFile is an OSError
            raise MetaspoError(f"{archive}: cannot read the archive ({exc})") from None
        raise
    if count == 0:
        shutil.rmtree(staging, ignore_errors=True)
        raise MetaspoError(f"{archive}: no BIG-bench task files in it",
                           hint=f"expected the bigbench-{BIGBENCH_VERSION} source archive from PyPI")
    (staging / _COMPLETE_MARKER).write_text(BIGBENCH_VERSION + "\n")
    shutil.rmtree(root, ignore_errors=True)
    staging.rename(root)


def bigbench_task_names() -> list[str]:
    """Every task and subtask name ("task", "task/subtask") of the fetched archive."""
    root = fetch_bigbench()
    return sorted(path.parent.relative_to(root).as_posix() for path in root.glob("**/task.json.gz"))


def load_bigbench_data(task: str) -> TaskData:
    """The examples of ``task`` ("navigate", "logical_deduction/three_objects"), fetching if needed."""
    return _load(str(fetch_bigbench()), task)


@lru_cache(maxsize=32)
def _load(root: str, task: str) -> TaskData:
    files = _task_files(Path(root), task)
    items = [item for name, path in files for item in _items(_read(path), name)]
    if not items:
        raise MetaspoError(f"BIG-bench task {task!r} has no examples")
    data = _task_data(task, items)
    top = _read(Path(root) / task.split("/")[0] / "task.json.gz")
    data.description = " ".join(str(top.get("description", "")).split())
    data.meta["keywords"] = list(top.get("keywords", []))
    return data


def _task_files(root: Path, task: str) -> list[tuple[str, Path]]:
    """(name, file) pairs: the task's own file, or all its subtasks when its own file has no examples."""
    own = root / task / "task.json.gz"
    if ".." in task.split("/") or not own.is_file():
        names = sorted(path.parent.relative_to(root).as_posix() for path in root.glob("**/task.json.gz"))
        raise MetaspoError(f"unknown BIG-bench task {task!r}",
                           hint=did_you_mean(task, names) or "`metaspo tasks ls` lists suites of known tasks")
    subtasks = sorted((root / task).glob("*/task.json.gz"))
    # A parent file with subtasks is usually metadata only; reading it is cheap.
    if not subtasks or _read(own).get("examples"):
        return [(task, own)]
    return [(f"{task}/{path.parent.name}", path) for path in subtasks]


def _read(path: Path) -> dict:
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        return json.load(handle)


@dataclass
class _Item:
    key: str  # identifies the question for its option order
    stem: str
    options: list[str]
    correct: list[str]
    targets: tuple[str, ...]


# An output prefix that only cues the answer ("A:", "Answer:") adds nothing to a chat question.
_GENERIC_CUE = re.compile(r"(?i)(?:a|answer|output|label|target)?\s*:?")


def _items(data: dict, name: str) -> list[_Item]:
    # Not "prefix": where set, it is a tag ("bbq-lite-json:"), not text for the model.
    task_prefix = str(data.get("task_prefix") or "").strip()
    input_prefix = str(data.get("example_input_prefix") or "").strip()
    output_prefix = str(data.get("example_output_prefix") or "").strip()
    if _GENERIC_CUE.fullmatch(output_prefix):
        output_prefix = ""
    items = []
    for example in data.get("examples", []):
        body = " ".join(part for part in (input_prefix, str(example.get("input", "")).strip()) if part)
        stem = clean_question("\n\n".join(part for part in (task_prefix, body) if part)
                              + (f"\n{output_prefix}" if output_prefix else ""))
        scores = example.get("target_scores") or {}
        options = [str(option).strip() for option in scores]
        best = max(scores.values(), default=0)
        correct = [str(option).strip() for option, score in scores.items() if score == best and best > 0]
        items.append(_Item(f"{name}\n{stem}", stem, options, correct, answer_strings(example.get("target"))))
    return items


def _is_label_set(options: list[str]) -> bool:
    # A few short options shared by every example read better as named labels than as letters.
    return len(options) <= 6 and all(len(option.split()) <= 4 and len(option) <= 40 for option in options)


def _task_data(task: str, items: list[_Item]) -> TaskData:
    source = f"{PREFIX}{task}"
    if all(item.options for item in items):
        # A multiple-choice example without any positive score cannot be graded.
        items = [item for item in items if item.correct]
        option_sets = {frozenset(option.lower() for option in item.options) for item in items}
        if len(option_sets) == 1 and _is_label_set(items[0].options):
            labels = tuple(items[0].options)
            by_lower = {label.lower(): label for label in labels}
            examples = [Example(item.stem, tuple(by_lower[option.lower()] for option in item.correct))
                        for item in items]
            return TaskData(train=examples, test=None, answer_kind="label", labels=labels, source=source)
        examples, dropped = [], 0
        for item in items:
            options, correct = merge_number_options(item.options, item.correct)
            if len(options) > len(LETTERS):
                dropped += 1
                continue
            options, letters = stable_shuffle(options, correct, item.key)
            examples.append(Example(format_choice_question(item.stem, options), tuple(letters), tuple(options)))
        return TaskData(train=examples, test=None, answer_kind="choice", source=source,
                        meta={"dropped_examples": dropped} if dropped else {})
    generative = [item for item in items if item.targets]
    if not generative:
        raise MetaspoError(f"BIG-bench task {task!r}: its examples have neither target_scores nor targets")
    numeric = all(number_value(target) is not None for item in generative for target in item.targets)
    examples = [Example(item.stem, item.targets) for item in generative]
    return TaskData(train=examples, test=None, answer_kind="number" if numeric else "open", source=source)
