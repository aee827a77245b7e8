"""Bad input of every kind: exit code 2, one line naming the file, key or value, no traceback,
and nothing half-written (no run folder at all)."""

import json

import pytest
from fixtures.fake_bigbench import write_fake_bigbench

from metaspo_hf.cli import main

TINY_SEARCH = "search: {iterations: 1, system_candidates: 1, user_candidates: 1, top_k: 1, train_size: 2, test_size: 2}\n"


@pytest.fixture(autouse=True)
def offline_bigbench(tmp_path, monkeypatch):
    monkeypatch.setenv("METASPO_BIGBENCH_ARCHIVE", str(write_fake_bigbench(tmp_path / "archive")))
    monkeypatch.setenv("METASPO_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def recipe(tmp_path, body: str, name: str = "bad.yaml") -> str:
    path = tmp_path / name
    path.write_text(body)
    return str(path)


def reference_data(tmp_path, task_json: str | None, list_yaml: str = "meta_train_tasks: [toy/t]\nmeta_test_tasks: [toy/t]\n"):
    """A reference-layout folder with one task file (raw text, so it can be broken) and a task list."""
    root = tmp_path / "data"
    (root / "toy").mkdir(parents=True)
    if task_json is not None:
        (root / "toy" / "t.json").write_text(task_json)
    (root / "tasks.yaml").write_text(list_yaml)
    return root


def local_suite(tmp_path, rows: list[dict], spec: str) -> str:
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    path = tmp_path / "suite.yaml"
    path.write_text("domains:\n  d:\n    meta_train:\n      - t:\n          data_files: rows.jsonl\n          test_split: null\n"
                    + "".join(f"          {line}\n" for line in spec.splitlines())
                    + "    meta_test: [bigbench:navigate]\n")
    return str(path)


def run_and_check(capsys, tmp_path, argv: list[str], expected: str):
    out = tmp_path / "run"
    code = main([*argv, "--output-dir", str(out)] if argv[0] in ("train", "reproduce", "evaluate", "adapt") else argv)
    err = capsys.readouterr().err
    # Progress bars may precede it (e.g. while data is read); the error itself is one line.
    lines = [line for line in err.splitlines() if line.startswith("metaspo: error: ")]
    assert code == 2, err
    assert len(lines) == 1 and "Traceback" not in err, err
    assert expected in lines[0], lines[0]
    assert not out.exists(), "a failed start must not leave a run folder"
    return lines[0]


RECIPE_CASES = {
    "unknown top-level key": ("serch: {iterations: 1}\n", "unknown key 'serch'"),
    "unknown nested key": ("search: {iteratons: 1}\n", "unknown key 'search.iteratons'"),
    "string for an int": ("search: {iterations: three}\n", "search.iterations must be int, got 'three'"),
    "string for a list": ("tasks: {meta_train: navigate}\n", "tasks.meta_train must be a list"),
    "zero iterations": ("search: {iterations: 0}\n", "search.iterations must be >= 1, got 0"),
    "negative train size": ("search: {train_size: -5}\n", "search.train_size must be >= 1, got -5"),
    "zero system candidates": ("search: {system_candidates: 0}\n", "search.system_candidates must be >= 1"),
    "zero user prompts per task": ("evaluation: {user_prompts_per_task: 0}\n", "evaluation.user_prompts_per_task must be >= 1"),
    "negative batch size": ("model: {batch_size: -1}\n", "model.batch_size must be >= 1, got -1"),
    "bad dtype": ("model: {dtype: float8}\n", "model.dtype must be one of"),
    "bad quantization": ("model: {quantization: 3bit}\n", "model.quantization must be one of"),
    "negative temperature": ("generation: {optimizer: {temperature: -0.5}}\n", "generation.optimizer.temperature must be >= 0"),
    "top_p above one": ("generation: {base: {top_p: 1.5}}\n", "generation.base.top_p must be in (0, 1]"),
    "zero max_new_tokens": ("generation: {base: {max_new_tokens: 0}}\n", "generation.base.max_new_tokens must be >= 1"),
    "unknown method": ("search: {method: metaspoo}\n", "unknown search method 'metaspoo'"),
    "unknown compared prompt": ("evaluation: {compare: [default, cott]}\n", "unknown system prompt 'cott'"),
    "missing model folder": ("model: {name_or_path: ./no/such/model}\n", "model folder not found: ./no/such/model"),
    "missing gguf file": ("model: {name_or_path: /tmp/none/model.gguf}\n", "model file not found"),
    "unknown task": ("tasks: {meta_train: [logical_deductoin], meta_test: [navigate]}\n", "logical_deductoin"),
    "unknown suite": ("tasks: {suite: bigbench-reasoningg}\n", "unknown suite 'bigbench-reasoningg'"),
    "unknown bigbench task": ("tasks: {meta_train: ['bigbench:navigat'], meta_test: [object_counting]}\n", "navigat"),
    "train_size larger than the data": ("search: {train_size: 500}\n", "train_size 500 is larger than"),
    "bad yaml": ("search: {iterations: 2\n", "invalid YAML"),
    "a section that is not a mapping": ("evaluation: 3\n", "evaluation must be a mapping"),
    "seed as text": ("seed: first\n", "seed must be int"),
}


@pytest.mark.parametrize("case", list(RECIPE_CASES))
def test_bad_recipe(case, tmp_path, capsys):
    body, expected = RECIPE_CASES[case]
    # A small budget first, so that only the case's own mistake can stop the run (a later `search:` wins).
    run_and_check(capsys, tmp_path, ["train", recipe(tmp_path, TINY_SEARCH + body)], expected)


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the CPU-only refusal")
def test_quantization_without_cuda(tmp_path, capsys):
    path = recipe(tmp_path, "model: {name_or_path: smollm2-135m-instruct, quantization: 4bit}\n" + TINY_SEARCH)
    run_and_check(capsys, tmp_path, ["train", path], "needs a CUDA GPU")


def test_packaged_model_without_its_part_packages(tmp_path, capsys, monkeypatch):
    from metaspo_hf.models import loading

    monkeypatch.setattr(loading, "_locate_part", lambda part: None)  # as if `make install-models` never ran
    path = recipe(tmp_path, "model: {name_or_path: qwen2.5-coder-0.5b-instruct}\n" + TINY_SEARCH)
    line = run_and_check(capsys, tmp_path, ["train", path], "lacks 6 of its 6 parts")
    assert line.endswith("(hint: make install-models)")


def test_missing_recipe_file(tmp_path, capsys):
    run_and_check(capsys, tmp_path, ["train", str(tmp_path / "nope.yaml")], "recipe not found")


def test_inherit_of_a_missing_file(tmp_path, capsys):
    run_and_check(capsys, tmp_path, ["train", recipe(tmp_path, "inherit: _nope.yaml\n")], "inherit: file not found")


def test_malformed_override(tmp_path, capsys):
    run_and_check(capsys, tmp_path, ["train", recipe(tmp_path, TINY_SEARCH), "--set", "search.iterations"],
                  "expected section.key=value")


def reference_recipe(tmp_path, root, extra: str = ""):
    """A recipe on the reference-layout folder ``root``; ``extra`` lines are merged over it."""
    body = f"tasks: {{suite: {root / 'tasks.yaml'}, data_dir: {root}}}\n" + TINY_SEARCH
    if extra:
        (tmp_path / "_parent.yaml").write_text(body)
        return recipe(tmp_path, "inherit: _parent.yaml\n" + extra)
    return recipe(tmp_path, body)


DATA_CASES = {
    "missing data file": (None, "toy/t"),
    "empty data file": ("", "not valid JSON"),
    "malformed json": ('{"train": [{"question": "q", "answer": "a"}', "not valid JSON"),
    "rows without a question": ('{"train": [{"q": "x", "answer": "a"}], "test": []}', "expected keys 'question' and 'answer'"),
    "not train/test lists": ('[1, 2, 3]', "expected an object with 'train' and 'test'"),
    "empty answer": ('{"train": [{"question": "q", "answer": ""}], "test": [{"question": "q", "answer": "a"}]}', "the answer is empty"),
}


@pytest.mark.parametrize("case", list(DATA_CASES))
def test_bad_reference_data(case, tmp_path, capsys):
    content, expected = DATA_CASES[case]
    root = reference_data(tmp_path, content)
    run_and_check(capsys, tmp_path, ["train", reference_recipe(tmp_path, root)], expected)


VALIDATE_CASES = {
    "a record without an answer": ('{"train": [{"question": "q"}], "test": [{"question": "q", "answer": "a"}]}',
                                   "", "toy/t.json: train[0]: expected keys 'question' and 'answer', found question"),
    "a truncated JSON file": ('{"train": [{"question": "q", "answer": "a"}', "", "toy/t.json: not valid JSON"),
    "an empty explicit task list": (None, "tasks: {meta_test: []}\n", "tasks.meta_test is an empty list"),
    "fewer training examples than train_size": (
        json.dumps({"train": [{"question": f"q{i}", "answer": "a"} for i in range(2)], "test": [{"question": "q", "answer": "a"}]}),
        "search: {train_size: 3}\n", "task toy/t: train_size 3 is larger than the 2 examples of its training split"),
}


@pytest.mark.parametrize("case", list(VALIDATE_CASES))
def test_validate_reads_every_task(case, tmp_path, capsys):
    """Mistakes in the data fail validate (not only a run), in one line."""
    content, extra, expected = VALIDATE_CASES[case]
    good = '{"train": [{"question": "q1", "answer": "a"}, {"question": "q2", "answer": "b"}], "test": [{"question": "q", "answer": "a"}]}'
    root = reference_data(tmp_path, content or good)
    run_and_check(capsys, tmp_path, ["validate", reference_recipe(tmp_path, root, extra)], expected)


def test_task_list_with_unknown_key(tmp_path, capsys):
    root = reference_data(tmp_path, '{"train": [], "test": []}', "meta_train_task: [toy/t]\nmeta_test_tasks: [toy/t]\n")
    run_and_check(capsys, tmp_path, ["train", reference_recipe(tmp_path, root)], "meta_train_task")


def test_local_file_with_a_missing_column(tmp_path, capsys):
    suite = local_suite(tmp_path, [{"text": "hi", "label": "yes"}] * 8, 'question: "{sentence}"\nanswer: label')
    run_and_check(capsys, tmp_path, ["train", recipe(tmp_path, f"tasks: {{suite: {suite}}}\n" + TINY_SEARCH)],
                  "no field 'sentence'")


def test_local_answers_not_among_the_options(tmp_path, capsys):
    rows = [{"q": "pick", "a": "x", "b": "y", "gold": "z"}] * 8
    suite = local_suite(tmp_path, rows, 'question: "{q}"\nanswer: gold\noptions: [a, b]')
    run_and_check(capsys, tmp_path, ["train", recipe(tmp_path, f"tasks: {{suite: {suite}}}\n" + TINY_SEARCH)],
                  "names none of the options")


def test_user_prompt_without_question_slot(tmp_path, capsys):
    rows = [{"q": f"q{i}", "gold": "yes"} for i in range(8)]
    suite = local_suite(tmp_path, rows, 'question: "{q}"\nanswer: gold\nprompt: "Answer the question."')
    run_and_check(capsys, tmp_path, ["train", recipe(tmp_path, f"tasks: {{suite: {suite}}}\n" + TINY_SEARCH)],
                  "has no {question} slot")


def test_missing_system_prompt_file(tmp_path, capsys):
    run_and_check(capsys, tmp_path, ["evaluate", recipe(tmp_path, TINY_SEARCH), "--system-prompt",
                                     str(tmp_path / "none.txt")], "--system-prompt")


def test_empty_system_prompt_file(tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    run_and_check(capsys, tmp_path, ["evaluate", recipe(tmp_path, TINY_SEARCH), "--system-prompt", str(empty)],
                  "the file is empty")


def test_resume_of_a_missing_run_folder(tmp_path, capsys):
    run_and_check(capsys, tmp_path, ["train", recipe(tmp_path, TINY_SEARCH), "--resume", str(tmp_path / "gone")],
                  "does not exist")


def test_resume_of_a_run_made_by_another_recipe(tmp_path, capsys):
    from metaspo_hf.recipe import load_recipe
    from metaspo_hf.runs import RunDir

    other = load_recipe(recipe(tmp_path, "seed: 7\n" + TINY_SEARCH, "other.yaml"))
    existing = RunDir.create(tmp_path / "existing", other.name, other.to_dict(), other.fingerprint()).path
    before = sorted(p.name for p in existing.iterdir())
    run_and_check(capsys, tmp_path, ["train", recipe(tmp_path, TINY_SEARCH), "--resume", str(existing)],
                  "not by this recipe")
    assert sorted(p.name for p in existing.iterdir()) == before  # the other run is left untouched


def test_compare_of_seeds_made_with_other_settings(tmp_path, capsys):
    from metaspo_hf.recipe import load_recipe
    from metaspo_hf.runs import RunDir

    folders = []
    for seed, suite in ((1, "bigbench-ethics"), (2, "bigbench-knowledge")):
        made = load_recipe(recipe(tmp_path, TINY_SEARCH), [f"seed={seed}", f"tasks.suite={suite}"])
        folders.append(str(RunDir.create(tmp_path / f"seed{seed}", made.name, made.to_dict(), made.fingerprint()).path))
    line = run_and_check(capsys, tmp_path, ["compare", *folders, "--out", str(tmp_path / "comparison")],
                         "the runs differ in tasks.suite: 'bigbench-ethics' in")
    assert "'bigbench-knowledge' in" in line and not (tmp_path / "comparison").exists()


def test_report_of_a_folder_that_is_not_a_run(tmp_path, capsys):
    (tmp_path / "plain").mkdir()
    run_and_check(capsys, tmp_path, ["report", str(tmp_path / "plain")], "is not a run folder")


def test_unknown_task_in_tasks_show(tmp_path, capsys):
    run_and_check(capsys, tmp_path, ["tasks", "show", "logical_deducton"], "did you mean")
