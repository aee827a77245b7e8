"""Files shared with the reference MetaSPO code: system prompt files in its formats and ours."""

import json
import os
from pathlib import Path

import pytest
from fixtures.fake_bigbench import write_fake_bigbench
from fixtures.fake_model import base_chats, system_prompts_seen, use_fake_model, writes_prompts

from metaspo_hf import pipeline
from metaspo_hf.cli import main
from metaspo_hf.errors import MetaspoError
from metaspo_hf.recipe import load_recipe
from metaspo_hf.reference_files import read_fixed_user_prompts, read_system_prompt

REFERENCE_CODE = Path(__file__).parent.parent / "fixtures" / "reference_code"


@pytest.fixture
def offline_bigbench(tmp_path, monkeypatch):
    monkeypatch.setenv("METASPO_BIGBENCH_ARCHIVE", str(write_fake_bigbench(tmp_path / "archive")))
    monkeypatch.setenv("METASPO_CACHE", str(tmp_path / "cache"))


def fake_recipe(tmp_path, evaluation: str = "") -> str:
    """A tiny recipe for the fake model; ``evaluation`` adds indented lines to its evaluation section."""
    path = tmp_path / "fake.yaml"
    path.write_text("model: {name_or_path: smollm2-135m-instruct}\n"
                    "search: {iterations: 1, system_candidates: 1, user_candidates: 1, top_k: 1, train_size: 2, test_size: 2}\n"
                    "evaluation:\n  user_prompts_per_task: 2\n  compare: [none]\n" + evaluation)
    return str(path)


@pytest.mark.parametrize("name, content", [
    ("reference prompt file", {"prompt": "Think first."}),
    ("reference result file", {"optimized_system_prompt": "Think first.", "nodes": [[[]]]}),
    ("our result.json", {"recipe": "smoke", "optimized_system_prompt": "Think first.", "scores": {}}),
])
def test_json_system_prompt_files_give_their_prompt(tmp_path, name, content):
    path = tmp_path / "prompt.json"
    path.write_text(json.dumps(content))
    assert read_system_prompt(str(path)) == "Think first."


def test_plain_text_is_the_prompt_even_when_it_has_braces(tmp_path):
    path = tmp_path / "prompt.txt"
    path.write_text("  Answer {briefly}.\n")
    assert read_system_prompt(str(path)) == "Answer {briefly}."


@pytest.mark.parametrize("suffix, text, expected", [
    (".json", '{"system": "Think first."}', "found keys 'system'"),
    (".txt", '{"system": "Think first."}', "found keys 'system'"),
    (".json", '["Think first."]', "found a list"),
    (".json", '"Think first."', "found a string"),
    (".json", '{"prompt": "Think', "not valid JSON"),
    (".json", '{"prompt": ["Think first."]}', "'prompt' must be a non-empty string"),
])
def test_json_without_a_prompt_key_is_an_error_naming_the_keys(tmp_path, suffix, text, expected):
    path = tmp_path / f"prompt{suffix}"
    path.write_text(text)
    with pytest.raises(MetaspoError) as error:
        read_system_prompt(str(path))
    assert expected in error.value.one_line() and str(path) in error.value.one_line()
    if "found" in expected:
        assert "'prompt' or 'optimized_system_prompt'" in error.value.one_line()


def test_evaluate_scores_the_prompt_of_a_reference_prompt_file(tmp_path, offline_bigbench, monkeypatch):
    engine = use_fake_model(monkeypatch)
    run_dir = pipeline.run(fake_recipe(tmp_path), [], phases=("evaluate",), output_dir=str(tmp_path / "run"),
                           system_prompt_files=[str(REFERENCE_CODE / "prompts" / "default.json")],
                           task_names=["object_counting"])
    result = json.loads((run_dir / "result.json").read_text())
    # `none` is the only baseline compared, so the helpful-assistant turn can only come from the file.
    assert result["system_prompts"] == {"none": "", "default": "You are a helpful assistant."}
    assert result["optimized_system_prompt"] == "You are a helpful assistant."
    assert system_prompts_seen(engine) == {"", "You are a helpful assistant."}
    assert sorted(result["scores"]["object_counting"]) == ["default", "none"]


def test_evaluate_with_a_json_file_without_a_known_key_exits_2_with_one_line(tmp_path, offline_bigbench,
                                                                           monkeypatch, capsys):
    engine = use_fake_model(monkeypatch)
    prompt = tmp_path / "settings.json"
    prompt.write_text('{"temperature": 0.7}')
    code = main(["evaluate", fake_recipe(tmp_path), "--system-prompt", str(prompt),
                 "--output-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert f"--system-prompt {prompt}: a JSON system prompt file needs the key 'prompt' or " \
           "'optimized_system_prompt', found keys 'temperature'" in err
    assert not engine.calls and not (tmp_path / "run").exists()


FIXED = REFERENCE_CODE / "prompts" / "unseen_generalization_user_prompts"


def test_the_protocol_scores_exactly_the_fixed_user_prompts(tmp_path, offline_bigbench, monkeypatch):
    engine = use_fake_model(monkeypatch)
    # The recipe names the folder relative to itself; the run starts from another working directory.
    (tmp_path / "recipes").mkdir()
    recipe = fake_recipe(tmp_path / "recipes", f"  user_prompts_dir: {os.path.relpath(FIXED, tmp_path / 'recipes')}\n")
    monkeypatch.chdir(tmp_path)
    tasks = ["object_counting", "epistemic_reasoning"]  # the second is "epistemic" in the reference's files
    run_dir = pipeline.run(recipe, ["evaluation.compare=[none, default]"], phases=("evaluate",),
                           output_dir=str(tmp_path / "run"), task_names=tasks)
    expected = {task: json.loads((FIXED / f"up_for_unseen_gen_{name}.json").read_text())[:2]
                for task, name in zip(tasks, ["object_counting", "epistemic"], strict=True)}
    assert json.loads((run_dir / "user_prompts.json").read_text()) == expected
    # Every base chat is one of those prompts on one test question, each under every compared system prompt.
    suite = pipeline.load_tasks(load_recipe(recipe), test_task_names=tasks)
    rendered = {task.render(prompt, example) for task in suite.meta_test for prompt in expected[task.name]
                for example in task.test}
    seen = [chat[-1]["content"] for chat in base_chats(engine)]
    assert set(seen) == rendered and len(seen) == 2 * len(rendered)
    assert len(base_chats(engine)) == sum(len(c) for c, _ in engine.calls)  # the optimizer wrote nothing
    result = json.loads((run_dir / "result.json").read_text())
    assert all(cell["n"] == 2 for by_label in result["scores"].values() for cell in by_label.values())


def test_fixed_user_prompts_name_the_missing_file_or_the_bad_prompt(tmp_path, offline_bigbench):
    suite = pipeline.load_tasks(load_recipe(fake_recipe(tmp_path)), test_task_names=["reasoning_about_colored_objects"])
    with pytest.raises(MetaspoError, match="no user prompts for unseen task 'reasoning_about_colored_objects' "
                       r"\(looked for up_for_unseen_gen_reasoning_about_colored_objects.json and "
                       r"up_for_unseen_gen_reasoning_colored_objects.json\)"):
        read_fixed_user_prompts(str(FIXED), suite.meta_test, 10)
    (tmp_path / "up_for_unseen_gen_reasoning_colored_objects.json").write_text('["Count.", "{question}"]')
    with pytest.raises(MetaspoError, match=r"user prompt \[0\] has no \{question\} slot: 'Count.'"):
        read_fixed_user_prompts(str(tmp_path), suite.meta_test, 10)
    with pytest.raises(MetaspoError, match="user_prompts_dir .*/none: no such folder"):
        read_fixed_user_prompts(str(tmp_path / "none"), suite.meta_test, 10)


REFERENCE_NODE_KEYS = ["id", "task", "system_prompt", "instruction", "parent_id", "depth", "eval_metric", "test_metric"]


def test_metaspo_result_nests_the_kept_nodes_per_update_and_task_as_the_reference_does(
        tmp_path, offline_bigbench, monkeypatch):
    use_fake_model(monkeypatch, writes_prompts)
    run_dir = pipeline.run(fake_recipe(tmp_path), ["search.top_k=2", "search.iterations=2"], phases=("train",),
                           output_dir=str(tmp_path / "run"))
    exported = json.loads((run_dir / "metaspo_result.json").read_text())
    ours = {node["id"]: node for node in json.loads((run_dir / "nodes.json").read_text())["metaspo"]}
    result = json.loads((run_dir / "result.json").read_text())
    assert list(exported) == ["optimized_system_prompt", "nodes"]
    assert exported["optimized_system_prompt"] == result["optimized_system_prompt"]
    tasks = ["logic_grid_puzzle", "tracking_shuffled_objects", "logical_deduction", "temporal_sequences"]
    updates = exported["nodes"]
    assert len(updates) == 1 + 2 * 2  # the start, then an inner and an outer step per iteration
    for update, per_task in enumerate(updates):
        assert [[node["task"] for node in nodes][:1] for nodes in per_task] == [[task] for task in tasks]
        for nodes in per_task:
            assert 1 <= len(nodes) <= (1 if update == 0 else 2)
            assert [n["eval_metric"] for n in nodes] == sorted((n["eval_metric"] for n in nodes), reverse=True)
            for node in nodes:
                assert list(node) == REFERENCE_NODE_KEYS and node["test_metric"] == -1
                mine = ours[node["id"]]
                assert (node["instruction"], node["eval_metric"], node["system_prompt"]) == (
                    mine["user_prompt"], mine["train_score"], mine["system_prompt"])
                assert update in mine["kept_in"]
    # Each inner step adds the rewrites kept in the beams; the last update holds the prompts kept at the end.
    assert any(node["depth"] > 0 for nodes in updates[1] for node in nodes)
    assert {node["system_prompt"] for nodes in updates[-1] for node in nodes} == {result["optimized_system_prompt"]}
    assert {node["system_prompt"] for nodes in updates[0] for node in nodes} == {"You are a helpful assistant."}
