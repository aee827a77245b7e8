"""The run folder: everything one run writes, laid out so that a killed run can be resumed.

Durability rules: the event log is append-only and every line is flushed and fsync'd before
``log`` returns; every JSON file (checkpoints, nodes, costs, result) is replaced atomically, so a
reader sees either the previous or the new version, never half a file. Nothing taken from the
environment (tokens, keys, passwords) is ever written: see ``scrub``.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shlex
import sys
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

from . import __version__
from .errors import MetaspoError
from .files import TEMP_SUFFIX, atomic_file, read_json, write_json_atomic
from .runlock import LOCK_NAME, RunLock
from .stats import ITEM_FIELDS

# The documented default location, relative to the folder the command runs in.
RUNS_ROOT = Path("runs")

# Key names whose values are credentials: "token", "hf_token", "api_key", "password", ...
# Anchored at the end so that counters such as "generated_tokens" or "max_new_tokens" stay.
_SECRET_NAME = re.compile(
    r"(^|[_\-.])(token|api[_-]?key|apikey|password|passwd|secret|secret[_-]?key|private[_-]?key"
    r"|access[_-]?key|credentials?)$",
    re.IGNORECASE,
)
REDACTED = "<redacted>"
# Shorter environment values ("1", "true") are settings, not secrets, and would redact common words.
_MIN_SECRET_LENGTH = 8


def scrub(value: Any) -> Any:
    """``value`` with credentials removed: string values under secret-looking keys are redacted, and
    any text equal to or containing a secret environment variable's value (HF_TOKEN, ...) is masked."""
    return _scrub(value, _secret_environment_values())


def _secret_environment_values() -> list[str]:
    # Only values are kept, to mask them; the environment itself is never written anywhere.
    return [v for k, v in os.environ.items() if _SECRET_NAME.search(k) and len(v) >= _MIN_SECRET_LENGTH]


def _scrub(value: Any, secrets: list[str]) -> Any:
    if isinstance(value, dict):
        return {
            k: REDACTED if isinstance(v, str) and _SECRET_NAME.search(str(k)) else _scrub(v, secrets)
            for k, v in value.items()
        }
    if isinstance(value, (list, tuple)):
        return [_scrub(v, secrets) for v in value]
    if isinstance(value, str):
        for secret in secrets:
            value = value.replace(secret, REDACTED)
    return value


def scrub_argv(argv: list[str]) -> list[str]:
    """A command line with credential values redacted: ``--token X``, ``--api-key=X``, ``model.hf_token=X``."""
    cleaned: list[str] = []
    redact_next = False
    for arg in argv:
        if redact_next:
            cleaned.append(REDACTED)
            redact_next = False
            continue
        name, sep, _ = arg.partition("=")
        if sep and _SECRET_NAME.search(name.lstrip("-")):
            cleaned.append(f"{name}={REDACTED}")
        elif arg.startswith("-") and _SECRET_NAME.search(arg.lstrip("-")):
            cleaned.append(arg)
            redact_next = True
        else:
            cleaned.append(arg)
    return _scrub(cleaned, _secret_environment_values())


# ---- the run folder -------------------------------------------------------------------------------


class RunDir:
    """One run's folder. Create it with ``RunDir.create``; reopen it (to resume) with ``RunDir.open``.

    A process that works in the folder passes ``lock=True``: it then holds the folder's lock
    (``metaspo_hf.runlock``) until ``unlock``, and a second process is refused.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._lock: RunLock | None = None

    def __fspath__(self) -> str:
        return str(self.path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    # ---- files ------------------------------------------------------------------------------------
    # Every name in a run folder, spelled here only (docs/run-folder.md); the properties below join
    # them to the folder. ``write_json`` takes the names, which are relative to the folder.
    RECIPE = "recipe.yaml"
    RUN = "run.json"
    LOCK = LOCK_NAME
    EVENTS = "events.jsonl"
    RESPONSES = "responses.sqlite"
    USER_PROMPTS = "user_prompts.json"
    NODES = "nodes.json"
    CHECKPOINTS = "checkpoints"
    RESULT = "result.json"
    ITEMS = "items.csv"
    # Rebuilt from result.json (+ nodes.json) by the report.
    REPORT = "report.md"
    SCORES_CSV = "scores.csv"
    ADAPTATION_CSV = "adaptation.csv"
    META_TRAIN_CSV = "meta_train.csv"
    SCORES_PLOT = "unseen_generalization.png"
    ADAPTATION_PLOT = "test_time_adaptation.png"
    META_TRAIN_PLOT = "meta_train.png"
    SYSTEM_PROMPT = "system_prompt.txt"
    MODELFILE = "Modelfile"
    CHAT_SNIPPET = "chat_template_snippet.json"
    REFERENCE_RESULT = "metaspo_result.json"

    def file(self, name: str) -> Path:
        """``name`` (one of the names above) inside this folder."""
        return self.path / name

    @property
    def recipe_file(self) -> Path:
        """The resolved recipe (every default filled in), as YAML."""
        return self.file(self.RECIPE)

    @property
    def run_file(self) -> Path:
        """Recipe name and hash, package versions, creation time and the command line."""
        return self.file(self.RUN)

    @property
    def events_file(self) -> Path:
        return self.file(self.EVENTS)

    @property
    def responses_db(self) -> Path:
        """The CachedEngine's SQLite file: every completion of the run, replayed on resume."""
        return self.file(self.RESPONSES)

    @property
    def user_prompts_file(self) -> Path:
        """The unseen-generalization protocol's user prompts, reused by every compared system prompt."""
        return self.file(self.USER_PROMPTS)

    @property
    def nodes_file(self) -> Path:
        """All search candidates with scores and parents."""
        return self.file(self.NODES)

    @property
    def result_file(self) -> Path:
        return self.file(self.RESULT)

    @property
    def items_file(self) -> Path:
        """Every unseen-generalization item's score (``stats.ITEM_FIELDS``): paired analyses start here."""
        return self.file(self.ITEMS)

    @property
    def report_file(self) -> Path:
        return self.file(self.REPORT)

    @property
    def checkpoints_dir(self) -> Path:
        return self.file(self.CHECKPOINTS)

    # ---- creating and reopening -------------------------------------------------------------------
    @classmethod
    def create(
        cls,
        output_dir: str | Path | None,
        recipe_name: str,
        resolved_recipe: dict,
        recipe_hash: str,
        root: str | Path = RUNS_ROOT,
        lock: bool = False,
    ) -> RunDir:
        """A new run folder at ``output_dir``, or at ``<root>/<recipe_name>/<UTC timestamp>/``.

        Writes ``recipe.yaml`` and then ``run.json``; a folder counts as a run once ``run.json`` exists.
        """
        if output_dir is not None:
            path = Path(output_dir)
            path.mkdir(parents=True, exist_ok=True)
        else:
            path = _fresh_timestamped_dir(Path(root) / _safe_name(recipe_name))
        run = cls(path)
        if lock:
            run.lock()
        # Checked under the lock: another process may have made a run here since the caller looked.
        if run.run_file.exists():
            run.unlock()
            raise MetaspoError(f"{path} already holds a run", hint="resume it, or choose another --output-dir")
        with atomic_file(run.recipe_file) as fh:
            yaml.safe_dump(scrub(resolved_recipe), fh, sort_keys=False, allow_unicode=True)
        run.write_json(
            cls.RUN,
            {
                "recipe": recipe_name,
                "recipe_hash": recipe_hash,
                "created": _utc_now(),
                "command": shlex.join(scrub_argv([Path(sys.argv[0]).name, *sys.argv[1:]])),
                "versions": _versions(),
            },
        )
        return run

    @classmethod
    def open(cls, path: str | Path, recipe_hash: str | None = None, lock: bool = False) -> RunDir:
        """An existing run folder; with ``recipe_hash``, check that the same recipe made it.

        ``recipe_hash`` is None for commands that only read the folder (report, status). With ``lock``
        (to resume the run) the folder is also locked, its checkpoints are checked, and what a killed
        process left half-written is removed; without it nothing is changed, since another process
        may be writing there.
        """
        run = cls(path)
        if not run.path.is_dir():
            raise MetaspoError(f"run folder {run.path} does not exist", hint="check the path")
        if not run.run_file.exists():
            raise MetaspoError(
                f"{run.path} is not a run folder (it has no run.json)",
                hint="pass the folder that a metaspo command printed as its last line",
            )
        info = read_json(run.run_file)
        if recipe_hash is not None and info.get("recipe_hash") != recipe_hash:
            raise MetaspoError(
                f"run folder {run.path} was made by recipe {info.get('recipe')!r} with hash "
                f"{info.get('recipe_hash')}, not by this recipe (hash {recipe_hash})",
                hint="resume with the recipe and --set overrides that made the run, or start a new run folder",
            )
        if lock:
            run.lock()
            try:
                for leftover in run.path.rglob(f".*{TEMP_SUFFIX}"):  # from atomic writes cut short by a kill
                    leftover.unlink()
                for checkpoint in sorted(run.checkpoints_dir.glob("*.json")):  # before any model is loaded
                    run._read_checkpoint(checkpoint)
            except BaseException:
                run.unlock()
                raise
        return run

    @classmethod
    def open_or_create(
        cls,
        output_dir: str | Path | None,
        recipe_name: str,
        resolved_recipe: dict,
        recipe_hash: str,
        root: str | Path = RUNS_ROOT,
        lock: bool = False,
    ) -> RunDir:
        """Resume the run in ``output_dir`` when it holds one (same recipe only), else start one there."""
        if output_dir is not None and cls(output_dir).run_file.exists():
            return cls.open(output_dir, recipe_hash, lock=lock)
        return cls.create(output_dir, recipe_name, resolved_recipe, recipe_hash, root, lock=lock)

    def lock(self) -> None:
        """Hold this folder's lock until ``unlock`` or the end of the process; refused (MetaspoError
        naming the holder's PID) while another process holds it. Taking over the lock of a process
        that was killed is logged as a ``lock_taken_over`` event."""
        lock = RunLock(self.path)
        killed = lock.acquire()
        self._lock = lock
        self._drop_torn_event()  # before anything is appended to the log
        if killed is not None:
            self.log({"event": "lock_taken_over", "pid": killed})

    def unlock(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    @property
    def info(self) -> dict:
        """The content of run.json."""
        return read_json(self.run_file)

    # ---- event log --------------------------------------------------------------------------------
    def log(self, event: dict) -> dict:
        """Append one event (a dict, by convention with an ``"event"`` name) as a JSON line, with
        its UTC time; the line is on disk when this returns."""
        record = scrub({"time": _utc_now(), **event})
        line = json.dumps(record, ensure_ascii=False) + "\n"
        with open(self.events_file, "a", encoding="utf-8") as fh:
            fh.write(line)
            fh.flush()
            os.fsync(fh.fileno())
        return record

    def events(self) -> list[dict]:
        """Every logged event, in order; a last line cut short by a kill is left out."""
        if not self.events_file.exists():
            return []
        lines = self.events_file.read_text(encoding="utf-8").split("\n")
        # Only the text after the last newline can be torn; every earlier line was fsync'd whole.
        events = []
        for number, line in enumerate(lines[:-1], start=1):
            try:
                events.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise MetaspoError(
                    f"{self.events_file} line {number} is not valid JSON ({error.msg})",
                    hint="the event log was edited by hand; restore it or start a new run folder",
                ) from None
        return events

    def process_seconds(self) -> list[float]:
        """Wall seconds of each process that worked in this folder, oldest first, from the event log: each
        one's "start" to its last logged event (where a killed process stopped; pauses count). A log
        edited by hand times nothing: this is asked at the end of a run, whose result matters more."""
        try:
            events = self.events()
        except MetaspoError:
            return []
        spans: list[list[datetime]] = []
        for event in events:
            try:
                stamp = datetime.fromisoformat(str(event.get("time")).replace("Z", "+00:00"))
            except ValueError:
                continue
            if event.get("event") == "start":
                spans.append([stamp, stamp])
            elif spans and event.get("event") != "lock_taken_over":  # logged by the next process, on opening
                spans[-1][1] = stamp
        return [round((end - begin).total_seconds(), 2) for begin, end in spans]

    def _drop_torn_event(self) -> None:
        # A kill during `log` can leave a last line without its newline; appending after it would glue
        # the next event onto it, so it is cut off before the run continues.
        if not self.events_file.exists():
            return
        data = self.events_file.read_bytes()
        if data and not data.endswith(b"\n"):
            with open(self.events_file, "r+b") as fh:
                fh.truncate(data.rfind(b"\n") + 1)
                fh.flush()
                os.fsync(fh.fileno())

    # ---- JSON files and checkpoints ---------------------------------------------------------------
    def write_json(self, path: str | Path, obj: Any) -> Path:
        """Write ``obj`` (scrubbed of credentials) atomically; ``path`` is relative to the run folder
        unless absolute."""
        return write_json_atomic(self.path / path, scrub(obj))

    def write_items(self, rows: list[dict]) -> Path:
        with atomic_file(self.items_file) as fh:
            writer = csv.DictWriter(fh, fieldnames=ITEM_FIELDS, lineterminator="\n")
            writer.writeheader()
            writer.writerows(rows)
        return self.items_file

    def read_recipe(self) -> dict | None:
        """The resolved recipe the run was made with; None for a copy of a run folder kept without it."""
        if not self.recipe_file.exists():
            return None
        try:
            data = yaml.safe_load(self.recipe_file.read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            raise MetaspoError(f"{self.recipe_file}: invalid YAML: {getattr(exc, 'problem', exc)}") from None
        if not isinstance(data, dict):
            raise MetaspoError(f"{self.recipe_file}: expected a mapping of recipe sections")
        return data

    def read_items(self) -> list[dict]:
        """The rows of items.csv, typed as written; none for a run without unseen-generalization scores."""
        if not self.items_file.exists():
            return []
        with open(self.items_file, newline="", encoding="utf-8") as fh:
            return [{**row, "seed": int(row["seed"]), "user_prompt": int(row["user_prompt"]),
                     "score": float(row["score"])} for row in csv.DictReader(fh)]

    def save_checkpoint(self, name: str, state: Any) -> Path:
        """Atomically store ``state`` as ``checkpoints/<name>.json``."""
        return self.write_json(Path(self.CHECKPOINTS, f"{_safe_name(name)}.json"), state)

    def load_checkpoint(self, name: str) -> Any | None:
        """The state saved under ``name``, or None when the run has not reached that point yet."""
        path = self.checkpoints_dir / f"{_safe_name(name)}.json"
        return self._read_checkpoint(path) if path.exists() else None

    def _read_checkpoint(self, path: Path) -> Any:
        try:
            return read_json(path)
        except MetaspoError as error:
            raise MetaspoError(
                f"checkpoint {error.message}",
                hint=f"delete {path} and resume: that step is then redone, its finished generations "
                     f"replayed from {self.responses_db.name}",
            ) from None


def _utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _safe_name(name: str) -> str:
    """``name`` usable as one path component (recipe names may be paths such as recipes/smoke.yaml)."""
    stem = Path(name).stem if name.endswith((".yaml", ".yml")) else name
    return re.sub(r"[^A-Za-z0-9._-]+", "_", stem).strip("._") or "run"


def _fresh_timestamped_dir(parent: Path) -> Path:
    """Create and return ``parent/<UTC timestamp>``; runs started in the same second get -2, -3, ..."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%SZ")
    parent.mkdir(parents=True, exist_ok=True)
    path, n = parent / stamp, 1
    while True:
        try:
            path.mkdir()  # atomic: two processes never claim the same folder
            return path
        except FileExistsError:
            n += 1
            path = parent / f"{stamp}-{n}"


def _versions() -> dict:
    versions = {"metaspo-hf": __version__, "python": sys.version.split()[0]}
    for package in ("torch", "transformers"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return versions
