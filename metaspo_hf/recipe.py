"""Recipes: one YAML file per model and setting, loaded into typed dataclasses.

A recipe may start with ``inherit: _base.yaml`` (a path relative to the recipe); its keys are merged
over the parent's, section by section. Unknown keys and bad values are errors that name the file,
the dotted key and the value. ``--set section.key=value`` overrides are applied after inheritance.
Relative paths among the values (``PATH_KEYS``) are relative to the file that holds them, like
``inherit:``; those of ``--set`` are relative to the working directory.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import importlib.util
import json
import os
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .errors import MetaspoError, did_you_mean
from .evaluation.config import EvaluationConfig
from .models.loading import ModelSpec
from .scoring import SCORING_MODES
from .search.config import SearchConfig

# The recipes shipped with the package (`metaspo ls`): see ``shipped_recipes``.
RECIPES_PACKAGE = "metaspo_hf.recipes"
# (section, key) of the recipe values that name files or folders; relative ones are relative to the recipe.
PATH_KEYS = (("tasks", "suite"), ("tasks", "data_dir"), ("evaluation", "user_prompts_dir"))


@dataclass
class GenerationSpec:
    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise MetaspoError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}", key="max_new_tokens")
        if self.temperature < 0:
            raise MetaspoError(f"temperature must be >= 0, got {self.temperature}", key="temperature")
        if not 0 < self.top_p <= 1:
            raise MetaspoError(f"top_p must be in (0, 1], got {self.top_p}", key="top_p")


def _base_generation() -> GenerationSpec:
    # Greedy, as in the paper's code; stopping at </answer> skips tokens that are never scored.
    return GenerationSpec(max_new_tokens=256, temperature=0.0, stop=["</answer>"])


def _optimizer_generation() -> GenerationSpec:
    # Temperature 1.0 (the paper's setting) keeps the m candidates of one step diverse; 768 new tokens hold
    # an analysis plus a rewritten prompt.
    return GenerationSpec(max_new_tokens=768, temperature=1.0)


@dataclass
class GenerationRoles:
    base: GenerationSpec = field(default_factory=_base_generation)
    optimizer: GenerationSpec = field(default_factory=_optimizer_generation)


@dataclass
class TaskSpec:
    # A suite shipped with the package (`metaspo tasks ls`) or a task-list YAML in the reference layout.
    suite: str = "bigbench-reasoning"
    # The folder of a reference-layout dataset (`<data_dir>/<benchmark>/<task>.json`).
    data_dir: str | None = None
    # Explicit task lists replace the suite's; names may be registry names or `bigbench:<task>`.
    meta_train: list[str] | None = None
    meta_test: list[str] | None = None
    # Keep only these domains of the suite (None = all).
    domains: list[str] | None = None

    def __post_init__(self):
        for key in ("meta_train", "meta_test"):
            if getattr(self, key) == []:  # not silently "the suite's tasks"
                raise MetaspoError(f"{key} is an empty list", hint="leave it out to use the suite's tasks", key=key)


@dataclass
class Recipe:
    model: ModelSpec = field(default_factory=ModelSpec)
    # None: the optimizer role uses the base model (one loaded copy serves both roles).
    optimizer_model: ModelSpec | None = None
    generation: GenerationRoles = field(default_factory=GenerationRoles)
    tasks: TaskSpec = field(default_factory=TaskSpec)
    search: SearchConfig = field(default_factory=SearchConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    seed: int = 0
    # How the base model answers multiple-choice questions: "generate" (generate, extract the answer) or
    # "loglik" (the option X whose "(X)" is likeliest after the prompt; no generation).
    # Other tasks are generated either way. See docs/method.md.
    scoring: str = "generate"
    # Run folders go to <output_dir>/<recipe name>/<timestamp>/ unless --output-dir is given.
    output_dir: str = "runs"
    # Free text shown by `metaspo ls`.
    description: str = ""
    # Set by the loader, not by the file.
    name: str = field(default="recipe", metadata={"internal": True})
    path: str = field(default="", metadata={"internal": True})

    def __post_init__(self):
        if self.scoring not in SCORING_MODES:
            raise MetaspoError(
                f"scoring must be one of {', '.join(map(repr, SCORING_MODES))}, got {self.scoring!r}",
                hint=did_you_mean(self.scoring, SCORING_MODES),
                key="scoring",
            )

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        for f in dataclasses.fields(self):
            if f.metadata.get("internal"):
                data.pop(f.name)
        return data

    def fingerprint(self) -> str:
        """Hash of everything that decides a run's results (not where it is written)."""
        data = result_settings(self.to_dict())
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def result_settings(resolved: dict) -> dict:
    """The keys of a resolved recipe (``Recipe.to_dict``, a run folder's recipe.yaml) that decide a run's
    results: not where it is written or how it is described."""
    data = copy.deepcopy(resolved)
    data.pop("output_dir", None)
    data.pop("description", None)
    # Keys added after run folders existed count only when set, so those folders still resume (and
    # compare with newer ones, whose recipe.yaml holds the default).
    for section, key, default in _LATER_KEYS:
        holder = (data.get(section) or {}) if section else data  # optimizer_model may be None
        if holder.get(key, default) == default:
            holder.pop(key, None)
    return data


_MISSING = object()


def settings_differences(a: dict, b: dict) -> list[str]:
    """The result-deciding keys ("section.key") in which two resolved recipes differ, other than the seed;
    a data path counts by its last part, since the same folder sits elsewhere on another machine."""
    flat_a, flat_b = _comparable(a), _comparable(b)
    return sorted(key for key in flat_a.keys() | flat_b.keys()
                  if key != "seed" and flat_a.get(key, _MISSING) != flat_b.get(key, _MISSING))


def setting_shown(resolved: dict, key: str) -> str:
    """``key``'s value in a resolved recipe, for a message."""
    flat = _comparable(resolved)
    return repr(flat[key]) if key in flat else "not set"


def _comparable(resolved: dict) -> dict:
    flat = _dotted(result_settings(resolved))
    for section, key in PATH_KEYS:
        if isinstance(flat.get(f"{section}.{key}"), str):
            flat[f"{section}.{key}"] = Path(flat[f"{section}.{key}"]).name
    return flat


def _dotted(data: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(_dotted(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


# (section or "" for the top level, key, default) of recipe keys added after the first run folders.
_LATER_KEYS = (
    ("", "scoring", "generate"),
    ("evaluation", "user_prompts_dir", None),
    ("evaluation", "adapt_test_size", None),
    ("evaluation", "score_turned_down", False),
    ("search", "guard", False),
    ("search", "validation_size", 0),
    ("search", "guard_margin", 0.0),
    ("search", "guard_rule", "mean"),
    ("search", "system_edit", "rewrite"),
    ("search", "system_focus", False),
    ("search", "system_components", 0),
    ("model", "attention_kernel", True),
    ("optimizer_model", "attention_kernel", True),
)


def shipped_recipes() -> Path:
    """The folder of the recipes shipped with the package.

    pyproject.toml maps the package ``metaspo_hf.recipes`` onto the repository's top-level recipes/
    folder, so the import system finds that folder in an editable install and its copy inside the
    package in a regular one. A checkout run without installing it has no such package: its
    recipes/ folder beside the package is the same folder.
    """
    spec = importlib.util.find_spec(RECIPES_PACKAGE)
    # recipes/ has no __init__.py, so the package is a namespace package; an editable install adds a
    # placeholder entry to its locations that is not a folder.
    for location in (spec.submodule_search_locations or []) if spec else []:
        if Path(location).is_dir():
            return Path(location)
    return Path(__file__).resolve().parent.parent / "recipes"


def _recipe_folders() -> tuple[Path, ...]:
    # ./recipes first, so that a user's own recipes there shadow the shipped ones of the same name.
    return Path.cwd() / "recipes", shipped_recipes()


def find_recipe(name_or_path: str) -> Path:
    """A recipe path, or a recipe name looked up in ./recipes and the shipped recipes."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    for folder in _recipe_folders():
        for candidate in (folder / name_or_path, folder / f"{name_or_path}.yaml"):
            if candidate.is_file():
                return candidate
    hint = did_you_mean(path.stem, [p.stem for p in list_recipes()]) or "see `metaspo ls`"
    raise MetaspoError(f"recipe not found: {name_or_path}", hint=hint)


def list_recipes() -> list[Path]:
    """Every recipe ``find_recipe`` finds by name (``_base.yaml`` and other ``_`` files are parts, not recipes)."""
    seen: dict[str, Path] = {}
    for folder in _recipe_folders():
        if folder.is_dir():
            for path in sorted(folder.glob("*.yaml")):
                if not path.name.startswith("_"):
                    seen.setdefault(path.name, path)
    return list(seen.values())


def load_recipe(name_or_path: str, overrides: list[str] | None = None) -> Recipe:
    path = find_recipe(name_or_path)
    data = _read_with_inheritance(path, chain=())
    for item in overrides or []:
        _apply_override(data, item, path)
    recipe = build(Recipe, data, str(path), prefix="")
    recipe.name, recipe.path = path.stem, str(path)
    return recipe


def _read_yaml(path: Path) -> dict:
    try:
        text = path.read_text()
    except OSError as exc:
        raise MetaspoError(f"{path}: cannot read ({exc.strerror})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise MetaspoError(f"{path}: invalid YAML{where}: {getattr(exc, 'problem', exc)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise MetaspoError(f"{path}: a recipe must be a mapping of sections, got {type(data).__name__}")
    return data


def _read_with_inheritance(path: Path, chain: tuple) -> dict:
    if path.resolve() in chain:
        raise MetaspoError(f"{path}: inherit loop through {' -> '.join(str(p) for p in chain)}")
    data = _read_yaml(path)
    _resolve_paths(data, path)
    parent_name = data.pop("inherit", None)
    if parent_name is None:
        return data
    parent_path = (path.parent / str(parent_name))
    if not parent_path.is_file():
        raise MetaspoError(f"{path}: inherit: file not found: {parent_name}", hint="paths are relative to the recipe")
    return _merge(_read_with_inheritance(parent_path, chain + (path.resolve(),)), data)


def _resolve_paths(data: dict, path: Path) -> None:
    """Relative paths in a recipe file are read from the file's folder, as `inherit:` is (so a recipe
    works from any working directory); each file of an inherit chain resolves its own paths."""
    for section, key in PATH_KEYS:
        values = data.get(section)
        if isinstance(values, dict) and isinstance(values.get(key), str):
            values[key] = _beside(path, f"{section}.{key}", values[key])


def _beside(recipe: Path, key: str, value: str) -> str:
    target = Path(value).expanduser()
    if target.is_absolute():
        return str(target)
    # A suite value is a shipped suite's name unless it looks like a file.
    if key == "tasks.suite" and target.suffix not in (".yaml", ".yml") and len(target.parts) == 1:
        return value
    beside = Path(os.path.abspath(recipe.parent / target))
    if not beside.exists() and target.exists():
        # Recipes used to read these paths from the working directory: one that only exists there still works.
        print(f"metaspo: note: {recipe}: {key} {value} is read from the working directory, not the recipe's "
              f"folder; write it relative to the recipe", file=sys.stderr)
        return value
    return str(beside)


def _merge(parent: dict, child: dict) -> dict:
    merged = dict(parent)
    for key, value in child.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _apply_override(data: dict, item: str, path: Path) -> None:
    if "=" not in item:
        raise MetaspoError(f"--set {item!r}: expected section.key=value", hint="e.g. --set search.iterations=2")
    dotted, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        value = raw
    keys = dotted.strip().split(".")
    node = data
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise MetaspoError(f"--set {item!r}: {key} is not a section")
    node[keys[-1]] = value


def build(cls, data, file: str, prefix: str):
    """Construct dataclass ``cls`` from ``data``, checking keys and types; errors name file and key."""
    if not isinstance(data, dict):
        raise MetaspoError(f"{file}: {prefix.rstrip('.') or 'recipe'} must be a mapping, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    hints = typing.get_type_hints(cls)
    for key in data:
        if key not in fields:
            hint = did_you_mean(str(key), fields) or f"known keys: {', '.join(fields)}"
            raise MetaspoError(f"{file}: unknown key '{prefix}{key}'", hint=hint)
    kwargs = {key: _convert(hints[key], value, file, f"{prefix}{key}") for key, value in data.items()}
    try:
        return cls(**kwargs)
    except MetaspoError as exc:
        message = exc.message if not prefix or exc.message.startswith(prefix) else f"{prefix}{exc.message}"
        raise MetaspoError(f"{file}: {message}", hint=exc.hint) from None


def _convert(hint, value, file: str, key: str):
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        (inner,) = [o for o in options if o is not type(None)]
        return _convert(inner, value, file, key)
    if dataclasses.is_dataclass(hint):
        return build(hint, value if value is not None else {}, file, prefix=f"{key}.")
    if origin in (list, tuple):
        item_type = typing.get_args(hint)[0]
        if not isinstance(value, (list, tuple)):
            raise MetaspoError(f"{file}: {key} must be a list, got {value!r}")
        items = [_convert(item_type, v, file, f"{key}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is typing.Literal:
        if value not in typing.get_args(hint):
            raise MetaspoError(f"{file}: {key} must be one of {', '.join(map(repr, typing.get_args(hint)))}, got {value!r}")
        return value
    return _scalar(hint, value, file, key)


def _scalar(hint, value, file: str, key: str):
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, str),
    }.get(hint)
    if ok is None:
        raise TypeError(f"recipe field {key} has unsupported type {hint}")
    if not ok:
        raise MetaspoError(f"{file}: {key} must be {hint.__name__}, got {value!r}")
    return float(value) if hint is float else value
