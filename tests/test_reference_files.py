"""Files shared with the reference MetaSPO code: system prompt files in its formats and ours."""

import json
from pathlib import Path

import pytest
from fixtures.fake_bigbench import write_fake_bigbench
from fixtures.fake_model import system_prompts_seen, use_fake_model

from metaspo_hf import pipeline
from metaspo_hf.cli import main
from metaspo_hf.errors import MetaspoError
from metaspo_hf.reference_files import read_system_prompt

REFERENCE_CODE = Path(__file__).parent / "fixtures" / "reference_code"


@pytest.fixture
def offline_bigbench(tmp_path, monkeypatch):
    monkeypatch.setenv("METASPO_BIGBENCH_ARCHIVE", str(write_fake_bigbench(tmp_path / "archive")))
    monkeypatch.setenv("METASPO_CACHE", str(tmp_path / "cache"))


def fake_recipe(tmp_path, extra: str = "") -> str:
    path = tmp_path / "fake.yaml"
    path.write_text("model: {name_or_path: smollm2-135m-instruct}\n"
                    "search: {iterations: 1, system_candidates: 1, user_candidates: 1, top_k: 1, train_size: 2, test_size: 2}\n"
                    "evaluation: {user_prompts_per_task: 2, compare: [none]}\n" + extra)
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
                           system_prompt_file=str(REFERENCE_CODE / "prompts" / "default.json"),
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
