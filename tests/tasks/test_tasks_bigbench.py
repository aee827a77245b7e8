"""BIG-bench offline, on a tiny fake of the bigbench-1.0.0 archive built with tarfile."""

import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from fixtures.fake_bigbench import COLORS, fake_tasks, write_fake_bigbench

from metaspo_hf.errors import MetaspoError
from metaspo_hf.tasks import fetch_bigbench, load_suite, load_task
from metaspo_hf.tasks.bigbench import bigbench_task_names, is_fetched, tasks_root


@pytest.fixture
def fake_bigbench(tmp_path, monkeypatch):
    """A private cache and $METASPO_BIGBENCH_ARCHIVE pointing at a fresh fake archive."""
    monkeypatch.setenv("METASPO_CACHE", str(tmp_path / "cache"))
    archive = write_fake_bigbench(tmp_path)
    monkeypatch.setenv("METASPO_BIGBENCH_ARCHIVE", str(archive))
    return archive


def test_fetch_extracts_only_task_files_and_keeps_the_given_archive(fake_bigbench):
    assert not is_fetched()
    root = fetch_bigbench()
    assert is_fetched() and fake_bigbench.exists()
    assert bigbench_task_names() == sorted(fake_tasks())
    assert sorted(path.name for path in (root / "navigate").iterdir()) == ["task.json.gz"]
    # A second fetch reuses the cache; force re-extracts.
    (root / "navigate" / "task.json.gz").unlink()
    assert fetch_bigbench() == root and not (root / "navigate" / "task.json.gz").exists()
    fetch_bigbench(force=True)
    assert (root / "navigate" / "task.json.gz").exists()


def test_bad_archives_are_input_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("METASPO_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("METASPO_BIGBENCH_ARCHIVE", str(tmp_path / "missing.tar.gz"))
    with pytest.raises(MetaspoError, match="no such file"):
        fetch_bigbench()
    empty = tmp_path / "empty.tar.gz"
    with tarfile.open(empty, "w:gz"):
        pass
    monkeypatch.setenv("METASPO_BIGBENCH_ARCHIVE", str(empty))
    with pytest.raises(MetaspoError, match="no BIG-bench task files"):
        fetch_bigbench()
    (tmp_path / "junk.tar.gz").write_bytes(b"not an archive")
    monkeypatch.setenv("METASPO_BIGBENCH_ARCHIVE", str(tmp_path / "junk.tar.gz"))
    with pytest.raises(MetaspoError, match="cannot read the archive"):
        fetch_bigbench()
    assert not is_fetched()


def test_multiple_choice_task_with_subtasks_shuffles_and_prefixes(fake_bigbench):
    task = load_task("bigbench:logical_deduction/three_objects", train_size=4, test_size=100)
    assert task.answer_kind == "choice" and task.source == "bigbench:logical_deduction/three_objects"
    assert len(task.train) == 4 and len(task.test) == 8
    for example in task.train + task.test:
        assert example.question.startswith("Each puzzle has 3 books.\n\n")
        assert example.question.count("\n(") == 3 and len(example.options) == 3
        index = int(example.question.split("arrangement ")[1].split(".")[0])
        assert example.options["ABC".index(example.answers[0])] == f"The {COLORS[index % 4]} book."
    # The source lists the correct option first; the fixed per-question order moves it around.
    assert {example.answers[0] for example in task.train + task.test} != {"A"}
    # The parent name pools every subtask, each with its own prefix.
    pooled = load_task("bigbench:logical_deduction", train_size=4, test_size=100)
    assert len(pooled.train) + len(pooled.test) == 24
    assert {example.question.split(".")[0] for example in pooled.test} >= {"Each puzzle has 3 books",
                                                                         "Each puzzle has 5 books"}


def test_shared_short_options_make_a_label_task(fake_bigbench):
    task = load_task("epistemic_reasoning", train_size=2, test_size=3)
    assert task.source == "bigbench:epistemic_reasoning" and task.domain == "reasoning"
    assert task.answer_kind == "label" and task.labels == ("entailment", "non-entailment")
    assert "one of: entailment, non-entailment" in task.answer_format
    example = task.test[0]
    assert example.question.startswith("Decide whether the premise entails the hypothesis.\n\nPremise:")
    assert example.question.endswith("\nRelation:") and example.options == ()
    assert task.score(f"<answer>{example.answers[0]}</answer>", example) == 1


def test_number_options_are_merged_and_generative_targets_kept(fake_bigbench):
    colors = load_task("reasoning_about_colored_objects", train_size=2, test_size=100)
    counting = [example for example in colors.train + colors.test if "pens" in example.question]
    assert counting
    for example in counting:
        # "2" and "two" were separate options, both correct: now one option, written in digits.
        assert sorted(example.options) == ["0", "1", "2", "3"] and len(example.answers) == 1
        count = example.question.split("there are ")[1].split(" ")[0]
        assert example.options["ABCD".index(example.answers[0])] == count
    objects = load_task("object_counting", train_size=2, test_size=3)
    assert objects.answer_kind == "number" and len(objects.test[0].answers) == 2
    capitals = load_task("bigbench:toy_capitals", train_size=2, test_size=3)
    assert capitals.answer_kind == "open" and capitals.test[0].question.startswith("Q: What is the capital")
    assert "\nA:" not in capitals.test[0].question


def test_default_suite_loads_from_the_fake_archive(fake_bigbench):
    suite = load_suite("bigbench-reasoning", train_size=5, test_size=4, seed=3)
    assert [task.name for task in suite.meta_train] == ["logic_grid_puzzle", "tracking_shuffled_objects",
                                                       "logical_deduction", "temporal_sequences"]
    assert [task.name for task in suite.meta_test] == ["object_counting", "reasoning_about_colored_objects",
                                                      "epistemic_reasoning"]
    assert all(len(task.train) == 5 and len(task.test) == 4 for task in suite.meta_train + suite.meta_test)
    again = load_suite("bigbench-reasoning", train_size=5, test_size=4, seed=3)
    assert [task.train for task in again.meta_train] == [task.train for task in suite.meta_train]
    assert "Possible times:" in suite.meta_train[3].train[0].question


def test_unknown_bigbench_names_suggest_close_ones(fake_bigbench):
    with pytest.raises(MetaspoError, match="unknown BIG-bench task 'navigat'") as error:
        load_task("bigbench:navigat")
    assert "navigate" in error.value.hint
    with pytest.raises(MetaspoError, match="train_size 50 is larger than the 12 examples"):
        load_task("bigbench:navigate")


def serve_index(tmp_path, monkeypatch, archive: Path | None, listed_sha256: str | None = None) -> None:
    """PyPI's JSON simple page for bigbench as a local file, listing ``archive`` by a relative URL (with no
    archive, only bigbench-0.0.1, as PyPI's own page reads now: a release that holds no task files)."""
    from metaspo_hf.tasks import bigbench

    index = tmp_path / "index" / "bigbench.json"
    index.parent.mkdir(exist_ok=True)
    files = [{"filename": "bigbench-0.0.1.tar.gz", "url": "elsewhere.tar.gz", "hashes": {"sha256": "0" * 64}}]
    if archive is not None:
        files.append({"filename": "bigbench-1.0.0.tar.gz", "url": os.path.relpath(archive, index.parent),
                      "hashes": {"sha256": listed_sha256 or hashlib.sha256(archive.read_bytes()).hexdigest()}})
    index.write_text(json.dumps({"files": files}))
    monkeypatch.setattr(bigbench, "index_url", index.as_uri)
    monkeypatch.setenv("METASPO_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("METASPO_BIGBENCH_ARCHIVE", raising=False)


def test_download_reads_the_pinned_archive_without_pip_then_deletes_it(tmp_path, monkeypatch):
    from metaspo_hf.tasks import bigbench

    archive = write_fake_bigbench(tmp_path / "served")
    serve_index(tmp_path, monkeypatch, archive)
    monkeypatch.setattr(bigbench, "ARCHIVE_SHA256", hashlib.sha256(archive.read_bytes()).hexdigest())
    monkeypatch.setattr(subprocess, "run", lambda *args, **kwargs: pytest.fail("no subprocess may run"))
    root = fetch_bigbench()
    assert (root / "navigate" / "task.json.gz").exists()
    assert sorted(path.name for path in root.parent.iterdir()) == ["benchmark_tasks"]
    assert archive.exists(), "the served file is only read"


def test_a_hash_other_than_the_pinned_one_is_refused(tmp_path, monkeypatch):
    from metaspo_hf.tasks import bigbench

    archive = write_fake_bigbench(tmp_path / "served")
    # The index lists the file's true hash, which is not the pinned one: refused before downloading.
    serve_index(tmp_path, monkeypatch, archive)
    with pytest.raises(MetaspoError, match=f"not the pinned {bigbench.ARCHIVE_SHA256}"):
        fetch_bigbench()
    # The index lists the pinned hash, but the file served is another: refused after downloading.
    serve_index(tmp_path, monkeypatch, archive, listed_sha256=bigbench.ARCHIVE_SHA256)
    with pytest.raises(MetaspoError, match="the downloaded file has SHA-256") as error:
        fetch_bigbench()
    assert "fetch again" in error.value.hint
    assert not is_fetched() and sorted(path.name for path in tasks_root().parent.iterdir()) == []


def test_an_unreachable_index_names_the_archive_to_fetch_by_hand(tmp_path, monkeypatch):
    from metaspo_hf.tasks import bigbench

    serve_index(tmp_path, monkeypatch, write_fake_bigbench(tmp_path / "served"))
    monkeypatch.setattr(bigbench, "index_url", (tmp_path / "no-index.json").as_uri)
    with pytest.raises(MetaspoError, match="could not download bigbench==1.0.0") as error:
        fetch_bigbench()
    assert "METASPO_BIGBENCH_ARCHIVE" in error.value.hint and bigbench.ARCHIVE_SHA256 in error.value.hint


def test_an_index_without_the_archive_names_it_to_fetch_by_hand(tmp_path, monkeypatch):
    from metaspo_hf.tasks import bigbench

    serve_index(tmp_path, monkeypatch, None)
    with pytest.raises(MetaspoError, match="does not list bigbench-1.0.0.tar.gz") as error:
        fetch_bigbench()
    assert "METASPO_BIGBENCH_ARCHIVE" in error.value.hint and bigbench.ARCHIVE_SHA256 in error.value.hint
    assert not is_fetched()


@pytest.mark.parametrize("name", [
    "bigbench-1.0.0/bigbench/benchmark_tasks//{outside}/task.json",  # absolute after benchmark_tasks/
    "/{outside}/task.json",
    "bigbench-1.0.0/bigbench/benchmark_tasks/../../{outside}/task.json",
    "bigbench-1.0.0//bigbench/benchmark_tasks/navigate/task.json",
])
def test_archive_members_with_unsafe_paths_are_refused(tmp_path, monkeypatch, name):
    archive = write_fake_bigbench(tmp_path / "archive")
    outside = tmp_path / "outside"
    with tarfile.open(archive, "r:gz") as source:
        members = [(member, source.extractfile(member).read()) for member in source.getmembers()]
    crafted = tarfile.TarInfo(name.format(outside=str(outside).lstrip("/")))
    crafted.size = 2
    with tarfile.open(archive, "w:gz") as out:
        for member, data in [(crafted, b"{}"), *members]:
            out.addfile(member, io.BytesIO(data))
    monkeypatch.setenv("METASPO_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("METASPO_BIGBENCH_ARCHIVE", str(archive))
    with pytest.raises(MetaspoError, match="refused: member .* has an absolute path, '..' or an empty component"):
        fetch_bigbench()
    assert not outside.exists() and not is_fetched()
    assert sorted(path.name for path in tasks_root().parent.iterdir()) == []


def test_asking_pip_for_its_index_leaves_setuptools_usable_in_this_process():
    """pip, imported, turns setuptools' distutils off for the whole process, and torch's C++ extension
    builder (the CPU decode kernel) then fails: the index is asked of pip in a child process."""
    env = {k: v for k, v in os.environ.items() if k != "PIP_INDEX_URL"}
    code = ("import sys; from metaspo_hf.tasks import bigbench; import metaspo_hf.pipeline; "
            "print(bigbench.index_url()); print('pip' in sys.modules); from torch.utils import cpp_extension")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    url, pip_imported = done.stdout.split()
    assert url.endswith("/simple/bigbench/") and pip_imported == "False"
