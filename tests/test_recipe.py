"""Recipes: inheritance, overrides, and errors that name the file, the key and the value."""

import dataclasses
import json
from pathlib import Path

import pytest
import yaml

from metaspo_hf.errors import MetaspoError
from metaspo_hf.recipe import find_recipe, list_recipes, load_recipe, shipped_recipes

REPO = Path(__file__).resolve().parent.parent


def write(tmp_path, text, name="r.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_every_shipped_recipe_loads():
    names = {p.stem for p in list_recipes()}
    assert {
        "smollm2-135m-cpu",
        "llama-3.2-3b-instruct",
        "llama-3.1-8b-instruct-nf4",
        "qwen2.5-7b-instruct-nf4",
    } <= names
    for path in list_recipes():
        recipe = load_recipe(str(path))
        assert recipe.name == path.stem


def test_shipped_recipes_are_found_by_name_from_any_folder(tmp_path, monkeypatch):
    """`metaspo ls` and recipe names work away from the repository (no ./recipes): the CLI's own lookup,
    through the package metaspo_hf.recipes, with `inherit: _base.yaml` resolved beside the recipe."""
    monkeypatch.chdir(tmp_path)
    listed = {p.name for p in list_recipes()}
    assert listed == {p.name for p in (REPO / "recipes").glob("*.yaml") if not p.name.startswith("_")}
    assert all(p.parent == shipped_recipes() for p in list_recipes())
    assert find_recipe("smoke") == shipped_recipes() / "smoke.yaml"
    assert load_recipe("smoke").search.iterations == load_recipe(str(REPO / "recipes" / "smoke.yaml")).search.iterations


def test_pyproject_lists_every_package_folder():
    """pyproject.toml lists the packages (so that it can map metaspo_hf.recipes onto recipes/): a new
    folder of metaspo_hf/ must be listed there, or an installed copy would lack it."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    folders = {
        ".".join(path.relative_to(REPO).parts)
        for path in [REPO / "metaspo_hf", *(REPO / "metaspo_hf").rglob("*")]
        if path.is_dir() and path.name != "__pycache__" and any(p.is_file() for p in path.iterdir())
    }
    assert set(setuptools["packages"]) == folders | {"metaspo_hf.recipes"}
    assert setuptools["package-dir"] == {"metaspo_hf.recipes": "recipes"}


def test_gpu_recipes_keep_the_paper_budget():
    for name in ("llama-3.2-3b-instruct", "llama-3.1-8b-instruct-nf4", "qwen2.5-7b-instruct-nf4"):
        s = load_recipe(name).search
        assert (s.iterations, s.system_candidates, s.user_candidates, s.top_k, s.train_size) == (
            3,
            9,
            3,
            3,
            50,
        )
    assert load_recipe("llama-3.1-8b-instruct-nf4").model.quantization == "4bit"


def test_inherit_merges_sections_and_child_wins(tmp_path):
    write(tmp_path, "search:\n  iterations: 5\n  top_k: 2\nseed: 3\n", "_base.yaml")
    recipe = load_recipe(str(write(tmp_path, "inherit: _base.yaml\nsearch:\n  top_k: 1\n")))
    assert (recipe.search.iterations, recipe.search.top_k, recipe.seed) == (5, 1, 3)


def test_overrides_are_typed_and_applied_last(tmp_path):
    path = write(tmp_path, "search:\n  iterations: 5\n")
    recipe = load_recipe(
        str(path), ["search.iterations=2", "model.dtype=bfloat16", "generation.base.stop=['</a>']"]
    )
    assert recipe.search.iterations == 2 and recipe.model.dtype == "bfloat16"
    assert recipe.generation.base.stop == ["</a>"]


@pytest.mark.parametrize(
    "text,expected",
    [
        ("serch:\n  iterations: 2\n", "unknown key 'serch'"),
        ("search:\n  iteratons: 2\n", "unknown key 'search.iteratons'"),
        ("search:\n  iterations: three\n", "search.iterations"),
        ("search:\n  iterations: 0\n", "search.iterations must be >= 1, got 0"),
        ("model:\n  quantization: 3bit\n", "model.quantization must be one of"),
        ("model:\n  batch_size: -4\n", "model.batch_size must be >= 1, got -4"),
        ("generation:\n  base:\n    temperature: -1\n", "generation.base.temperature must be >= 0"),
        ("seed: [1, 2]\n", "seed must be int"),
        ("model: [1]\n", "model must be a mapping"),
        ("search: {iterations: 2\n", "invalid YAML"),
    ],
)
def test_bad_recipes_name_the_file_and_key(tmp_path, text, expected):
    path = write(tmp_path, text)
    with pytest.raises(MetaspoError) as err:
        load_recipe(str(path))
    line = err.value.one_line()
    assert expected in line and str(path) in line and "\n" not in line


def test_unknown_key_suggests_the_right_one(tmp_path):
    with pytest.raises(MetaspoError) as err:
        load_recipe(str(write(tmp_path, "search:\n  iteratons: 2\n")))
    assert "did you mean 'iterations'" in err.value.one_line()


def test_missing_recipe_suggests_a_close_name():
    with pytest.raises(MetaspoError) as err:
        load_recipe("smollm2-135m-cp")
    assert "smollm2-135m-cpu" in err.value.one_line()


def test_fingerprint_ignores_where_the_run_is_written(tmp_path):
    path = write(tmp_path, "seed: 1\n")
    a = load_recipe(str(path))
    b = load_recipe(str(path), ["output_dir=elsewhere"])
    c = load_recipe(str(path), ["seed=2"])
    assert a.fingerprint() == b.fingerprint() != c.fingerprint()


# The search and evaluation keys that existed when the first run folders were written; any key added since
# must be in recipe._LATER_KEYS, or every older run folder would stop resuming (its recipe hash would change).
FIRST_KEYS = {
    "search": {
        "method", "iterations", "system_candidates", "user_candidates", "top_k", "train_size", "test_size",
        "wrong_examples", "wrong_examples_per_task", "ape_demos", "ape_demos_per_task", "max_parse_retries",
        "max_prompt_chars", "initial_system_prompt", "sprig_max_components", "racing", "racing_rounds",
    },
    "evaluation": {"user_prompts_per_task", "demos", "adapt_iterations", "beam", "adapt_candidates", "compare",
                   "adapt_compare"},
    "model": {"name_or_path", "gguf_file", "dtype", "device_map", "quantization", "bnb_4bit_quant_type",
              "trust_remote_code", "revision", "batch_size", "prefix_reuse", "packed_linears"},
}


@pytest.mark.parametrize(("section", "changed"), [("search", "search.system_components=3"),
                                                  ("evaluation", "evaluation.score_turned_down=true"),
                                                  ("model", "model.attention_kernel=false")])
def test_keys_added_after_the_first_run_folders_leave_the_fingerprint_alone_at_their_default(tmp_path, section,
                                                                                             changed):
    from metaspo_hf.evaluation import EvaluationConfig
    from metaspo_hf.models.loading import ModelSpec
    from metaspo_hf.recipe import _LATER_KEYS
    from metaspo_hf.search import SearchConfig

    config = {"search": SearchConfig, "evaluation": EvaluationConfig, "model": ModelSpec}[section]
    later = {key: default for where, key, default in _LATER_KEYS if where == section}
    assert {f.name for f in dataclasses.fields(config)} - FIRST_KEYS[section] == set(later)
    path = write(tmp_path, "seed: 1\n")
    plain = load_recipe(str(path)).fingerprint()
    for key, default in later.items():
        assert load_recipe(str(path), [f"{section}.{key}={json.dumps(default)}"]).fingerprint() == plain
    assert load_recipe(str(path), [changed]).fingerprint() != plain


def test_a_model_key_added_later_leaves_the_optimizer_models_fingerprint_alone_at_its_default(tmp_path):
    path = write(tmp_path, "optimizer_model: {name_or_path: smollm2-135m-instruct}\n")
    plain = load_recipe(str(path)).fingerprint()
    assert load_recipe(str(path), ["optimizer_model.attention_kernel=true"]).fingerprint() == plain
    assert load_recipe(str(path), ["optimizer_model.attention_kernel=false"]).fingerprint() != plain


def reference_recipe_folder(tmp_path):
    """A recipe folder holding a copy of the reference-layout fixture, named by relative paths."""
    import shutil
    from pathlib import Path

    folder = tmp_path / "project" / "recipes"
    shutil.copytree(Path(__file__).parent / "fixtures" / "reference", folder / "data")
    write(folder, "search: {train_size: 2, test_size: 1}\n", "_base.yaml")
    return folder


def test_relative_paths_are_read_from_the_recipe_folder_in_any_working_directory(tmp_path, monkeypatch, capsys):
    from metaspo_hf.pipeline import load_tasks

    folder = reference_recipe_folder(tmp_path)
    path = write(folder, "inherit: _base.yaml\ntasks: {suite: data/task_list.yaml, data_dir: data}\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    recipe = load_recipe(str(path))
    assert recipe.tasks.suite == str(folder / "data" / "task_list.yaml")
    assert recipe.tasks.data_dir == str(folder / "data")
    suite = load_tasks(recipe)
    assert [t.name for t in suite.meta_train] == ["logic_grid_puzzle", "amazon/beauty", "ethos"]
    assert [t.name for t in suite.meta_test] == ["object_counting", "squad"]
    assert capsys.readouterr().err == ""


def test_a_parent_recipe_resolves_its_own_paths_and_set_values_stay_relative_to_the_working_directory(
        tmp_path, monkeypatch):
    folder = reference_recipe_folder(tmp_path)
    write(folder, "tasks: {data_dir: data}\n", "_base.yaml")
    child = tmp_path / "project" / "experiments"
    child.mkdir()
    path = write(child, "inherit: ../recipes/_base.yaml\n")
    monkeypatch.chdir(tmp_path)
    assert load_recipe(str(path)).tasks.data_dir == str(folder / "data")
    assert load_recipe(str(path), ["tasks.data_dir=mine"]).tasks.data_dir == "mine"
    # A bare suite name is a shipped suite, not a file beside the recipe.
    assert load_recipe(str(path), []).tasks.suite == "bigbench-reasoning"


def test_a_path_found_only_in_the_working_directory_still_works_with_a_note(tmp_path, monkeypatch, capsys):
    reference_recipe_folder(tmp_path)
    path = write(tmp_path, "tasks: {data_dir: recipes/data}\n", "elsewhere.yaml")
    monkeypatch.chdir(tmp_path / "project")  # recipes/data is there, not beside the recipe
    assert load_recipe(str(path)).tasks.data_dir == "recipes/data"
    note = capsys.readouterr().err.strip().splitlines()
    assert len(note) == 1 and note[0] == (
        f"metaspo: note: {path}: tasks.data_dir recipes/data is read from the working directory, "
        "not the recipe's folder; write it relative to the recipe")


def test_base_recipe_never_silently_disagrees_with_the_dataclass_defaults():
    """The dataclasses hold the defaults; recipes/_base.yaml documents them and may override one only on
    a line whose comment says it is the paper's value."""
    import dataclasses

    from metaspo_hf.recipe import Recipe, shipped_recipes

    base = shipped_recipes() / "_base.yaml"
    defaults = Recipe().to_dict()
    lines = base.read_text().splitlines()

    def walk(data, default, path):
        for key, value in data.items():
            if isinstance(value, dict):
                walk(value, default[key], (*path, key))
            elif value != (list(default[key]) if isinstance(default[key], tuple) else default[key]):
                line = next(line for line in lines if line.strip().startswith(f"{key}:"))
                assert "paper" in line.partition("#")[2], f"_base.yaml sets {'.'.join((*path, key))} to {value!r}, not the default " \
                                    f"{default[key]!r}, without a comment saying it is the paper's value"

    walk(yaml.safe_load(base.read_text()), defaults, ())
    assert dataclasses.is_dataclass(Recipe)


def test_settings_differences_ignore_the_seed_where_data_sits_and_unrecorded_later_keys_at_their_default():
    from metaspo_hf.recipe import setting_shown, settings_differences

    def resolved(seed, **changes):
        data = load_recipe("smoke", [f"seed={seed}"]).to_dict()
        for dotted, value in changes.items():
            section, key = dotted.split(".")
            if value is None:
                data[section].pop(key)  # a run folder written before the key existed
            else:
                data[section][key] = value
        return data

    same = settings_differences(resolved(1, **{"tasks.data_dir": "/checkout-1/data", "search.guard_rule": None}),
                                resolved(2, **{"tasks.data_dir": "/elsewhere/data", "search.guard_rule": "mean"}))
    assert same == []
    older, newer = resolved(1, **{"search.guard_rule": None}), resolved(2, **{"search.guard_rule": "low"})
    assert settings_differences(older, newer) == ["search.guard_rule"]
    assert (setting_shown(older, "search.guard_rule"), setting_shown(newer, "search.guard_rule")) == ("not set", "'low'")
    assert settings_differences(resolved(1, **{"tasks.suite": "bigbench-ethics"}),
                                resolved(1, **{"tasks.suite": "bigbench-knowledge", "search.test_size": 99})) == [
        "search.test_size", "tasks.suite"]
