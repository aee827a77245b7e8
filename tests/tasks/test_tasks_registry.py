"""Suites and names: what ships, how names resolve, errors with suggestions, and the CLI commands."""

import os
from pathlib import Path

import pytest
from fixtures.fake_bigbench import fake_tasks, write_fake_bigbench

from metaspo_hf.errors import MetaspoError
from metaspo_hf.tasks import (
    commands,
    fetch_bigbench,
    list_suites,
    list_tasks,
    load_suite,
    load_task,
    suite_task_names,
)
from metaspo_hf.tasks.registry import resolve_task, suite_definition

FIXTURES = Path(__file__).parent.parent / "fixtures"
OFFLINE_SUITES = ["bigbench-reasoning", "bigbench-ethics", "bigbench-knowledge", "bigbench-reading",
                  "bigbench-emotion"]


@pytest.fixture
def fake_bigbench(tmp_path, monkeypatch):
    monkeypatch.setenv("METASPO_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("METASPO_BIGBENCH_ARCHIVE", str(write_fake_bigbench(tmp_path)))


def test_shipped_suites():
    assert set(OFFLINE_SUITES + ["paper", "paper-medical", "paper-reviews", "paper-reasoning", "paper-safety",
                                 "paper-grounding", "bigbench-all"]) <= set(list_suites())
    for name in OFFLINE_SUITES:
        definition = suite_definition(name)
        assert len(definition.train) >= 4 and len(definition.test) >= 2, name
        # Every offline task is a BIG-bench task, and no unseen task is also a training task.
        assert all(str(ref.source).startswith("bigbench:") for ref in definition.train + definition.test)
        assert not {ref.source for ref in definition.train} & {ref.source for ref in definition.test}
    train, test = suite_task_names("bigbench-reasoning")
    assert train == ["logic_grid_puzzle", "tracking_shuffled_objects", "logical_deduction", "temporal_sequences"]
    assert test == ["object_counting", "reasoning_about_colored_objects", "epistemic_reasoning"]
    assert resolve_task("logical_deduction").source == "bigbench:logical_deduction/three_objects"
    assert [len(names) for names in suite_task_names("paper")] == [16, 14]


def test_every_listed_name_resolves():
    for suite in list_suites():
        for name in list_tasks(suite):
            assert resolve_task(name).name == name.split("/")[-1] or name.startswith("bigbench:")
    assert "medicine" in list_tasks() and "bigbench:navigate" not in list_tasks()


@pytest.mark.parametrize("call, message, suggestion", [
    (lambda: load_task("logical_deductoin"), "unknown task 'logical_deductoin'", "logical_deduction"),
    (lambda: load_suite("bigbench-reasonin"), "unknown suite 'bigbench-reasonin'", "bigbench-reasoning"),
    (lambda: suite_task_names("paper-safty"), "unknown suite 'paper-safty'", "paper-safety"),
    (lambda: load_suite("paper", domains=["medicin"]), "no domain 'medicin'", "medical"),
])
def test_unknown_names_suggest_close_ones(call, message, suggestion):
    with pytest.raises(MetaspoError, match=message) as error:
        call()
    assert suggestion in error.value.hint and error.value.exit_code == 2


def test_bad_suite_files_name_the_key(tmp_path):
    (tmp_path / "typo.yaml").write_text("domian: {}\n")
    with pytest.raises(MetaspoError, match="typo.yaml: unknown key 'domian'") as error:
        suite_task_names(str(tmp_path / "typo.yaml"))
    assert "domains" in error.value.hint
    (tmp_path / "entry.yaml").write_text("domains:\n  d:\n    meta_train:\n      - [1, 2]\n")
    with pytest.raises(MetaspoError, match=r"domains.d.meta_train: expected a task name"):
        suite_task_names(str(tmp_path / "entry.yaml"))


def test_own_suite_mixes_names_from_everywhere(tmp_path, fake_bigbench):
    (tmp_path / "mine.yaml").write_text(
        "domains:\n  mixed:\n    meta_train: [bigbench:navigate, logical_deduction]\n"
        "    meta_test:\n      - capitals: bigbench:toy_capitals\n")
    suite = load_suite(str(tmp_path / "mine.yaml"), train_size=3, test_size=2)
    assert [task.name for task in suite.meta_train] == ["bigbench:navigate", "logical_deduction"]
    assert suite.meta_test[0].name == "capitals" and suite.meta_test[0].answer_kind == "open"
    assert list(dict.fromkeys(t.domain for t in suite.meta_train + suite.meta_test)) == ["mixed"]


def test_tasks_ls(capsys):
    commands.tasks_ls(None)
    listing = capsys.readouterr().out
    for name in list_suites():
        assert f"  {name} " in listing
    commands.tasks_ls("paper-medical")
    listing = capsys.readouterr().out
    assert "domain medical" in listing and "unseen     dental" in listing
    assert "datasets:openlifescienceai/medmcqa" in listing


def test_tasks_show_bigbench(fake_bigbench, capsys):
    commands.tasks_show("logical_deduction")
    shown = capsys.readouterr().out
    assert "Source:      bigbench:logical_deduction/three_objects" in shown
    assert "12 examples in one pool, split by seed" in shown and "11 train, 1 test" in shown
    assert "Metric:      accuracy: the option letter" in shown
    assert "| (A) The " in shown and "Gold answer: " in shown and "{question}" in shown
    commands.tasks_show("bigbench:navigate")
    shown = capsys.readouterr().out
    assert "labels True, False" in shown and "If you follow these instructions" in shown


def test_tasks_show_reference_file(capsys):
    commands.tasks_show("squad", data_dir=str(FIXTURES / "reference"))
    shown = capsys.readouterr().out
    assert "6 train and 1 test examples" in shown and "contains-match" in shown
    assert "Gold answer: Tower" in shown


def test_data_fetch(fake_bigbench, capsys):
    commands.data_fetch("bigbench")
    assert f"BIG-bench fetched: {len(fake_tasks())} tasks and subtasks" in capsys.readouterr().out
    commands.data_fetch("bigbench")
    assert "already in the cache" in capsys.readouterr().out
    with pytest.raises(MetaspoError, match="cannot fetch 'bigbenh'") as error:
        commands.data_fetch("bigbenh")
    assert "bigbench" in error.value.hint


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("METASPO_BIGBENCH_ARCHIVE"), reason="needs the real bigbench archive")
def test_offline_suites_on_the_real_archive():
    """Every offline suite loads with the paper's sizes (train 50, up to 500 test)."""
    for name in OFFLINE_SUITES:
        suite = load_suite(name)
        for task in suite.meta_train + suite.meta_test:
            assert len(task.train) == 50 and len(task.test) >= 20, task.name


def test_plain_bigbench_names_suggest_the_prefix(fake_bigbench):
    fetch_bigbench()
    with pytest.raises(MetaspoError, match="unknown task 'navigate'") as error:
        load_task("navigate")
    assert "bigbench:navigate" in error.value.hint
