"""Sources on local fixture files: the reference layout, every hub schema of the paper suites, a user's
own local files; and the seeded train/test sampling rules."""

import json
from pathlib import Path

import pytest

from metaspo_hf.errors import MetaspoError
from metaspo_hf.tasks import Example, load_suite, load_task
from metaspo_hf.tasks.build import TaskData, sample_examples

FIXTURES = Path(__file__).parent.parent / "fixtures"
HUB = str(FIXTURES / "hub")
REFERENCE = FIXTURES / "reference"


# ---- the reference layout --------------------------------------------------------------------

def test_reference_task_list_runs_like_a_suite():
    suite = load_suite(str(REFERENCE / "task_list.yaml"), train_size=3, test_size=10)
    kinds = {task.name: (task.domain, task.answer_kind) for task in suite.meta_train + suite.meta_test}
    assert [task.name for task in suite.meta_train] == ["logic_grid_puzzle", "amazon/beauty", "ethos"]
    assert kinds == {"logic_grid_puzzle": ("bigbench", "choice"), "amazon/beauty": ("amazon", "rating"),
                     "ethos": ("safety", "label"), "object_counting": ("bigbench", "number"),
                     "squad": ("grounding", "open")}
    puzzle = suite.meta_train[0]
    assert puzzle.train[0].options == ("1", "2", "3")
    assert all(len(answers) == 1 and answers[0] in "ABC" for answers in (ex.answers for ex in puzzle.train))
    assert suite.meta_test[1].test[0].answers == ("the river",)
    assert suite.meta_train[2].labels == ("no", "yes")
    # Test sizes are capped at what the split holds.
    assert [len(task.test) for task in suite.meta_train] == [4, 1, 2]


def test_reference_names_resolve_with_data_dir(tmp_path):
    task = load_task("bigbench/object_counting", data_dir=str(REFERENCE), train_size=2)
    assert task.source.startswith("reference:") and task.answer_kind == "number"
    # A registry name found in data_dir reads the file, not the registry's source.
    task = load_task("logic_grid_puzzle", data_dir=str(REFERENCE), train_size=2, test_size=2)
    assert task.source.endswith("logic_grid_puzzle.json") and len(task.test) == 2
    # A registry task whose file in the original layout has another name.
    task = load_task("anthropic_harmless", data_dir=str(REFERENCE), train_size=2)
    assert task.source.endswith("safety/antropic_harmless.json") and task.answer_kind == "label"
    with pytest.raises(MetaspoError, match="unknown task 'object_countin'") as error:
        load_task("object_countin", data_dir=str(REFERENCE))
    assert "object_counting" in error.value.hint


def test_reference_task_list_mapping_form_and_explicit_data_dir(tmp_path):
    (tmp_path / "list.yaml").write_text(f"data_dir: {REFERENCE}\nmeta_train_tasks:\n  amazon: [beauty]\n"
                                        "meta_test_tasks: [squad]\n")
    suite = load_suite(str(tmp_path / "list.yaml"), train_size=2, test_size=1, domains=["grounding"])
    assert suite.meta_train == [] and [task.name for task in suite.meta_test] == ["squad"]


def test_reference_errors_name_the_file(tmp_path):
    (tmp_path / "bench").mkdir()
    (tmp_path / "bench" / "broken.json").write_text(json.dumps({"train": [{"question": "q"}], "test": []}))
    with pytest.raises(MetaspoError, match=r"broken.json: train\[0\]: expected keys 'question' and 'answer'"):
        load_task("broken", data_dir=str(tmp_path))
    (tmp_path / "bench" / "broken.json").write_text("{not json")
    with pytest.raises(MetaspoError, match="not valid JSON"):
        load_task("bench/broken", data_dir=str(tmp_path))


# ---- hub schemas, read from local copies ------------------------------------------------------

def test_paper_medical_on_local_medmcqa():
    suite = load_suite("paper-medical", data_dir=HUB, train_size=2, test_size=5)
    assert [task.name for task in suite.meta_test] == ["dental", "anatomy", "surgery", "pediatrics"]
    for task in suite.meta_train + suite.meta_test:
        # Only the task's subject, and never the unlabelled row.
        assert len(task.train) == 2 and len(task.test) == 2
        example = task.test[0]
        assert task.answer_kind == "choice" and len(example.options) == 4
        subject = {"ob_gyn": "Gynaecology"}.get(task.name, task.name.capitalize())
        assert subject in example.question and "(D)" in example.question
    first = suite.meta_test[0].train + suite.meta_test[0].test
    rows = [json.loads(line) for line in (FIXTURES / "hub/medmcqa/train.jsonl").read_text().splitlines()]
    dental = {row["question"]: "ABCD"[row["cop"]] for row in rows if row["subject_name"] == "Dental"}
    for example in first:
        stem = example.question.split("\n\nOptions:")[0]
        if stem in dental:
            assert example.answers == (dental[stem],)


def test_paper_reviews_on_local_amazon_files():
    suite = load_suite("paper-reviews", data_dir=HUB, train_size=2, test_size=10)
    for task in suite.meta_train + suite.meta_test:
        assert task.answer_kind == "rating" and task.meta["pool_sizes"] == {"all": 5}
        assert len(task.train) == 2 and len(task.test) == 3
        assert {example.answers[0] for example in task.train + task.test} == {"1", "2", "3", "4", "5"}
        assert task.train[0].question.startswith("Title: ")


def test_paper_safety_on_local_files():
    suite = load_suite("paper-safety", data_dir=HUB, train_size=2, test_size=10)
    tasks = {task.name: task for task in suite.meta_train + suite.meta_test}
    for name in ("liar", "hatecheck", "tweet_eval", "sarcasm", "ethos"):
        assert tasks[name].answer_kind == "label" and tasks[name].labels == ("yes", "no")
        assert {example.answers[0] for example in tasks[name].train + tasks[name].test} <= {"yes", "no"}
    # LIAR keeps only clear verdicts: 6 of the 8 test rows (half-true and barely-true are left out).
    assert tasks["liar"].meta["pool_sizes"] == {"train": 6, "test": 6}
    assert tasks["hatecheck"].meta["pool_sizes"] == {"all": 6}
    harmless = tasks["anthropic_harmless"]
    for example in harmless.train + harmless.test:
        gold = example.options["AB".index(example.answers[0])]
        assert "can't help" in gold and len(example.options) == 2


def test_paper_grounding_on_local_files():
    suite = load_suite("paper-grounding", data_dir=HUB, train_size=2, test_size=10)
    tasks = {task.name: task for task in suite.meta_train + suite.meta_test}
    assert all(task.answer_kind == "open" for task in tasks.values())
    squad = tasks["squad"].test[0]
    assert squad.question.startswith("Context: The tower") and len(squad.answers) == 2
    hotpot = tasks["hotpot_qa"].test[0].question
    assert "is yearly. It is held in Town" in hotpot and "\nTown" in hotpot
    assert len(tasks["trivia_qa"].test[0].answers) == 2
    assert tasks["drop"].test[0].answers[0].isdigit()
    assert tasks["natural_questions"].test[0].answers[0].startswith("Author")
    assert len(tasks["web_qa"].test) == 4


def test_paper_suite_on_local_copies_keeps_domains():
    suite = load_suite("paper", data_dir=HUB, train_size=2, test_size=2, domains=["safety", "grounding"])
    assert [task.name for task in suite.meta_train] == ["liar", "hatecheck", "tweet_eval", "sarcasm"]
    assert [task.name for task in suite.meta_test] == ["ethos", "anthropic_harmless", "natural_questions", "web_qa"]
    assert list(dict.fromkeys(t.domain for t in suite.meta_train + suite.meta_test)) == ["safety", "grounding"]


def test_hub_task_without_a_local_copy_points_to_one(tmp_path, monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(MetaspoError, match="cannot load dataset 'openlifescienceai/medmcqa'") as error:
        load_task("dental", data_dir=str(tmp_path))
    assert "<data_dir>/medmcqa/train.jsonl" in error.value.hint


def test_users_own_suite_of_local_files():
    suite = load_suite(str(FIXTURES / "local" / "suite.yaml"), train_size=2, test_size=5)
    quiz, moods = suite.meta_train
    facts, = suite.meta_test
    assert (quiz.answer_kind, quiz.meta["pool_sizes"]) == ("number", {"train": 5, "test": 2})
    assert moods.answer_kind == "label" and moods.labels == ("happy", "sad")
    assert moods.initial_prompt.startswith("Name the mood") and len(moods.test) == 4
    assert facts.answer_kind == "open" and facts.meta["metric"] == "exact" and len(facts.test[0].answers) == 2


@pytest.mark.parametrize("spec, message", [
    ("{data_files: x.csv, anwser: a}", "unknown key 'anwser'"),
    ("{data_files: x.csv, answer_kind: labels}", "unknown answer_kind 'labels'"),
    ("{data_files: x.csv, answer_kind: label}", "needs a list of labels"),
    ("{data_files: x.csv, labels: [yes, no]}", "write yes/no/true/false in quotes"),
    ("{data_files: x.csv, prompt: no slot}", "has no {question} slot"),
    ("{config: x}", "needs 'dataset'"),
    ("{data_files: x.csv, metric: F1}", "unknown metric 'F1'"),
    ("{dataset: a/b, load_kwargs: {trust_remote_code: true}}", "load_kwargs: 'trust_remote_code' is not allowed"),
])
def test_bad_dataset_specs_name_the_key(tmp_path, spec, message):
    (tmp_path / "suite.yaml").write_text(f"domains:\n  d:\n    meta_train:\n      - t: {spec}\n")
    with pytest.raises(MetaspoError, match=message) as error:
        load_suite(str(tmp_path / "suite.yaml"))
    assert "suite.yaml" in error.value.message and "domains.d.meta_train.t" in error.value.message


# ---- sizes and seeds ------------------------------------------------------------------------------

def pool(count):
    return [Example(f"q{index}", (str(index),)) for index in range(count)]


def test_single_pool_is_split_by_seed_without_overlap():
    data = TaskData(train=pool(30), test=None, answer_kind="number", source="s")
    train, test = sample_examples("t", data, seed=1, train_size=10, test_size=100)
    assert len(train) == 10 and len(test) == 20
    assert not {ex.question for ex in train} & {ex.question for ex in test}
    assert (train, test) == sample_examples("t", data, seed=1, train_size=10, test_size=100)
    assert train != sample_examples("t", data, seed=2, train_size=10, test_size=100)[0]


def test_presplit_sources_sample_each_split():
    data = TaskData(train=pool(20), test=pool(8), answer_kind="number", source="s")
    train, test = sample_examples("t", data, seed=0, train_size=5, test_size=3)
    assert len(train) == 5 and len(test) == 3 and set(test) <= set(data.test)


def test_train_size_too_large_is_an_error_naming_task_and_sizes():
    data = TaskData(train=pool(30), test=None, answer_kind="number", source="s")
    with pytest.raises(MetaspoError, match="task small: train_size 50 is larger than the 30 examples"):
        sample_examples("small", data, seed=0, train_size=50, test_size=10)
    with pytest.raises(MetaspoError, match="no test questions left"):
        sample_examples("small", data, seed=0, train_size=30, test_size=10)
    with pytest.raises(MetaspoError, match="test_size must be >= 0"):
        sample_examples("small", data, seed=0, train_size=3, test_size=-1)
