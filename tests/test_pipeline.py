"""The whole pipeline: recipe -> models -> tasks -> search -> protocols -> run folder -> report."""

import json
import subprocess
import sys

import matplotlib.image
import pytest
from fixtures.fake_bigbench import write_fake_bigbench

from metaspo_hf import pipeline
from metaspo_hf.runs import RunDir

LABELS = ["none", "default", "cot", "service", "outer_only", "sprig", "metaspo"]


@pytest.fixture
def offline_bigbench(tmp_path, monkeypatch):
    monkeypatch.setenv("METASPO_BIGBENCH_ARCHIVE", str(write_fake_bigbench(tmp_path / "archive", count=60)))
    monkeypatch.setenv("METASPO_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def tiny_recipe(tmp_path, model_dir):
    path = tmp_path / "tiny.yaml"
    path.write_text(f"""
model: {{name_or_path: "{model_dir}", batch_size: 8}}
tasks:
  suite: bigbench-reasoning
search: {{iterations: 1, system_candidates: 2, user_candidates: 1, top_k: 1, train_size: 3, test_size: 3}}
evaluation: {{user_prompts_per_task: 2, adapt_iterations: 1, beam: 1, adapt_candidates: 1}}
generation:
  base: {{max_new_tokens: 6, stop: ["</answer>"]}}
  optimizer: {{max_new_tokens: 12}}
""")
    return path


def test_reproduce_writes_a_complete_run_folder(tmp_path, offline_bigbench, tiny_model_dir):
    run_dir = pipeline.run(str(tiny_recipe(tmp_path, tiny_model_dir)), [], phases=pipeline.PHASES,
                           output_dir=str(tmp_path / "run"))
    result = json.loads((run_dir / "result.json").read_text())
    unseen = ["object_counting", "reasoning_about_colored_objects", "epistemic_reasoning"]
    assert sorted(result["scores"]) == sorted(unseen)
    # The user prompts of the unseen-generalization protocol are saved for reuse; a random model's
    # unusable rewrites fall back to the task's initial prompt, so there may be fewer than asked.
    prompts = json.loads((run_dir / "user_prompts.json").read_text())
    for task in unseen:
        assert sorted(result["scores"][task]) == sorted(LABELS)
        assert 1 <= len(prompts[task]) <= 2
        assert all(cell["n"] == len(prompts[task]) for cell in result["scores"][task].values())
        assert sorted(result["adaptation"][task]) == ["default", "metaspo"]
        assert all(len(curve) == 2 for curve in result["adaptation"][task].values())
    assert result["optimized_system_prompt"] == result["system_prompts"]["metaspo"]
    assert set(result["meta_train"]) == {"metaspo", "outer_only", "sprig"}
    costs = result["costs"]
    assert costs["base_generations"] > 0 and costs["optimizer_calls"] > 0 and costs["generated_tokens"] > 0
    report = (run_dir / "report.md").read_text()
    for label in LABELS:
        assert label in report
    for plot in ("unseen_generalization.png", "test_time_adaptation.png", "meta_train.png"):
        assert matplotlib.image.imread(run_dir / plot).size > 0
    assert (run_dir / "system_prompt.txt").read_text().strip() == result["optimized_system_prompt"].strip()


def test_rerun_of_a_finished_run_generates_nothing_new(tmp_path, offline_bigbench, tiny_model_dir):
    from metaspo_hf.models.cache import count_responses

    recipe = str(tiny_recipe(tmp_path, tiny_model_dir))
    first = pipeline.run(recipe, [], phases=("train",), output_dir=str(tmp_path / "run"))
    before = json.loads((first / "result.json").read_text())
    responses = count_responses(first / "responses.sqlite")
    again = pipeline.run(recipe, [], phases=("train",), output_dir=str(tmp_path / "run"))
    after = json.loads((again / "result.json").read_text())
    assert again == first
    assert count_responses(first / "responses.sqlite") == responses
    for key in ("optimized_system_prompt", "system_prompts", "meta_train"):
        assert after[key] == before[key]
    for key in ("base_generations", "optimizer_calls", "generated_tokens", "prefill_tokens"):
        assert after["costs"][key] == before["costs"][key]


def test_evaluate_system_prompt_files_label_them_by_stem_and_pair_every_item(tmp_path, offline_bigbench,
                                                                              tiny_model_dir):
    files = {"concise": "Answer in one word.", "careful": "Read the question twice."}
    for stem, text in files.items():
        (tmp_path / f"{stem}.txt").write_text(text)
    run_dir = pipeline.run(str(tiny_recipe(tmp_path, tiny_model_dir)), ["evaluation.compare=[default]"],
                           phases=("evaluate",), output_dir=str(tmp_path / "run"),
                           system_prompt_files=[str(tmp_path / f"{stem}.txt") for stem in files],
                           task_names=["bigbench:navigate"])
    result = json.loads((run_dir / "result.json").read_text())
    assert list(result["scores"]) == ["bigbench:navigate"]
    assert sorted(result["scores"]["bigbench:navigate"]) == ["careful", "concise", "default"]
    assert result["optimized_system_prompt"] == "Answer in one word." and result["main_label"] == "concise"
    # items.csv holds one row per label x user prompt x question, and the comparison pairs them.
    items = RunDir(run_dir).read_items()
    scores = result["scores"]["bigbench:navigate"]
    per_label = len(items) // 3
    assert per_label == sum(len(q) for q in scores["concise"]["items"]) > 0
    assert sorted(result["comparisons"]) == ["careful", "default"]
    overall = result["comparisons"]["default"]["overall"]
    assert overall["items"] == per_label
    assert overall["mean"] == pytest.approx(scores["concise"]["mean"] - scores["default"]["mean"])
    assert overall["low"] <= overall["mean"] <= overall["high"]


@pytest.mark.smollm
def test_smoke_recipe_end_to_end_on_smollm2(tmp_path, offline_bigbench):
    out = tmp_path / "smoke"
    result = subprocess.run([sys.executable, "-m", "metaspo_hf.cli", "reproduce", "recipes/smoke.yaml",
                             "--output-dir", str(out), "--set", "tasks.meta_train=[bigbench:navigate]",
                             "--set", "generation.optimizer.max_new_tokens=32"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == str(out)
    data = json.loads((out / "result.json").read_text())
    assert set(data["scores"]["object_counting"]) == {"none", "default", "cot", "outer_only", "sprig", "metaspo"}
    assert data["optimized_system_prompt"]
    assert "object_counting" in (out / "report.md").read_text()


@pytest.mark.parametrize("score_turned_down", [False, True])
def test_a_prompt_the_guard_turned_down_is_scored_on_unseen_tasks_only_when_the_recipe_asks(tmp_path,
                                                                                           score_turned_down):
    from metaspo_hf.recipe import load_recipe
    from metaspo_hf.search import SearchResult

    path = tmp_path / "r.yaml"
    path.write_text("evaluation: {compare: [default, cot]}\nsearch: {guard: true, validation_size: 2}\n")
    recipe = load_recipe(str(path), [f"evaluation.score_turned_down={str(score_turned_down).lower()}"])
    initial = recipe.search.initial_system_prompt

    def search(method, returned, rejected):
        return SearchResult(method, returned, {}, [], [], {}, {"kept": rejected is None}, rejected)

    searches = {"metaspo": search("metaspo", initial, "Answer from memory."),
                "outer_only": search("outer_only", "Check every step.", None)}
    prompts = pipeline.unseen_system_prompts(recipe, searches, {})
    expected = {"default": "You are a helpful assistant.", "cot": "Let's think step by step.", "metaspo": initial,
                "outer_only": "Check every step."}
    if score_turned_down:
        expected["metaspo_turned_down"] = "Answer from memory."
    assert prompts == expected
