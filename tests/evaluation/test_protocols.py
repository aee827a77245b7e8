"""The evaluation protocols on scripted models: shapes, means and sds, batching, saved user prompts."""

from __future__ import annotations

import json
from statistics import stdev

import pytest
from fakes import base_lm, batch_sizes, make_task, optimizer_lm, question_index, turns

from metaspo_hf import search
from metaspo_hf.errors import MetaspoError
from metaspo_hf.evaluation import EvaluationConfig, labels, protocols
from metaspo_hf.models.base import LM, GenerationSettings
from metaspo_hf.models.fake import FakeEngine
from metaspo_hf.search import SearchConfig
from metaspo_hf.tasks.task import QUESTION_SLOT


def test_baseline_system_prompts():
    prompts = labels.BASELINE_SYSTEM_PROMPTS
    assert list(prompts) == ["none", "default", "cot", "service"]
    assert (prompts["none"], prompts["default"], prompts["cot"]) == (
        "",
        "You are a helpful assistant.",
        "Let's think step by step.",
    )
    assert prompts["service"].count("\n\n") >= 3 and len(prompts["service"]) > 1000


def test_write_user_prompts_writes_n_per_task_from_demos_in_one_batch():
    tasks = [make_task("a", n_train=6), make_task("b", n_train=6)]
    optimizer = optimizer_lm()
    events = []
    written = search.write_user_prompts(tasks, optimizer, n=4, seed=0, demos=3, on_event=events.append)
    assert batch_sizes(optimizer) == [8]
    assert {name: len(prompts) for name, prompts in written.items()} == {"a": 4, "b": 4}
    assert all(p.count(QUESTION_SLOT) == 1 for prompts in written.values() for p in prompts)
    requests = [turns(chat)[1] for chat in optimizer.engine.calls[0][0]]
    assert all(r.count("Input:") == 3 for r in requests)
    assert all("[a-train-" in r for r in requests[:4]) and all("[b-train-" in r for r in requests[4:])
    assert events[0]["prompts_per_task"] == {"a": 4, "b": 4} and events[0]["optimizer_calls"] == 8
    again = search.write_user_prompts(tasks, optimizer_lm(), n=4, seed=0, demos=3)
    assert again == written


def test_write_user_prompts_drops_failures_and_duplicates_and_fills_in_with_the_initial_prompt():
    def respond(chat, settings, k):
        request = turns(chat)[1]
        if "[a-train-" in request:
            return "<prompt>Same prompt for a: {question}</prompt>"
        return "I'm sorry, but I cannot help with that."

    optimizer = LM(FakeEngine(respond), GenerationSettings(temperature=1.0), "optimizer")
    tasks = [make_task("a"), make_task("b")]
    events = []
    written = search.write_user_prompts(
        tasks, optimizer, n=3, seed=0, demos=2, search=SearchConfig(max_parse_retries=1), on_event=events.append
    )
    assert written == {"a": ["Same prompt for a: {question}", tasks[0].initial_prompt], "b": [tasks[1].initial_prompt]}
    assert batch_sizes(optimizer) == [6, 3]  # b's three refusals are re-asked once, together
    (event,) = events
    assert event["initial_prompt_added"] == ["a", "b"] and event["parse_failures"] == 3
    assert event["refused_because"] == {"it was a refusal": 3}


def test_user_prompts_round_trip_and_bad_files_are_named(tmp_path):
    path = tmp_path / "user_prompts.json"
    prompts = {"a": ["Q: {question}", "Think, then answer: {question}"]}
    protocols.save_user_prompts(path, prompts)
    assert protocols.load_user_prompts(path) == prompts
    for content, message in [
        ("[1, 2]", "expected an object"),
        ('{"a": []}', "non-empty list"),
        ('{"a": ["no slot"]}', "has no {question} slot"),
        ("{", "cannot read"),
    ]:
        path.write_text(content)
        with pytest.raises(MetaspoError, match=message) as error:
            protocols.load_user_prompts(path)
        assert str(path) in error.value.message


def test_unseen_generalization_scores_every_pair_and_summarizes_over_user_prompts():
    # "strong" system prompt: user prompt "P1" gets all 4 test questions right, "P2" the first 2;
    # no system prompt: P1 gets the first question right, P2 none.
    def correct(system, user):
        i = question_index(user)
        if system == "strong":
            return "P1" in user or i < 2
        return "P1" in user and i == 0

    tasks = [make_task("a"), make_task("b")]
    user_prompts = {"a": ["P1 {question}", "P2 {question}"], "b": ["P2 {question}"]}
    base = base_lm(correct)
    events = []
    scores = protocols.unseen_generalization(
        tasks, {"none": "", "strong": "strong"}, user_prompts, base, on_event=events.append
    )
    assert batch_sizes(base) == [
        2 * 2 * 4,
        2 * 1 * 4,
    ]  # one batch per task: labels x user prompts x questions
    assert scores["a"]["strong"] == {
        "mean": 0.75,
        "sd": pytest.approx(stdev([1.0, 0.5])),
        "n": 2,
        "scores": [1.0, 0.5],
        "items": [[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 0.0, 0.0]],
    }
    assert scores["a"]["none"] == {
        "mean": 0.125,
        "sd": pytest.approx(stdev([0.25, 0.0])),
        "n": 2,
        "scores": [0.25, 0.0],
        "items": [[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]],
    }
    assert scores["b"]["strong"] == {"mean": 0.5, "sd": 0.0, "n": 1, "scores": [0.5], "items": [[1, 1, 0, 0]]}
    assert protocols.overall_scores(scores) == {"none": pytest.approx(0.0625), "strong": pytest.approx(0.625)}
    assert [e["task"] for e in events] == ["a", "b"]
    assert json.loads(json.dumps(scores)) == scores

    rows = protocols.item_rows(tasks, scores, seed=7)
    assert len(rows) == 2 * (2 * 4 + 1 * 4)  # labels x (user prompts x questions) per task
    assert rows[0] == {"seed": 7, "task": "a", "user_prompt": 0, "question": protocols.question_id(tasks[0].test[0]),
                       "label": "none", "score": 1.0}
    strong_b = [r for r in rows if r["task"] == "b" and r["label"] == "strong"]
    assert [r["score"] for r in strong_b] == [1, 1, 0, 0]
    assert len({r["question"] for r in strong_b}) == 4  # one id per distinct question


def test_unseen_generalization_needs_user_prompts_and_test_questions():
    base = base_lm(lambda s, u: True)
    with pytest.raises(MetaspoError, match="no user prompts for unseen task 'a'"):
        protocols.unseen_generalization([make_task("a")], {"none": ""}, {}, base)
    with pytest.raises(MetaspoError, match="no test examples"):
        protocols.unseen_generalization([make_task("a", n_test=0)], {"none": ""}, {"a": ["{question}"]}, base)


def test_test_time_adaptation_reports_test_scores_per_iteration_for_each_system_prompt():
    # Rewritten user prompts get every question right under the "good" system prompt; under "none"
    # they get half right; the initial prompt gets only the first question right.
    def correct(system, user):
        i = question_index(user)
        if "Think it through" not in user:
            return i == 0
        return system == "good" or i % 2 == 0

    tasks = [make_task("a", n_train=4, n_test=4), make_task("b", n_train=4, n_test=4)]
    base, optimizer = base_lm(correct), optimizer_lm()
    budget = EvaluationConfig(adapt_iterations=2, beam=2, adapt_candidates=2)
    events = []
    curves = protocols.test_time_adaptation(
        tasks,
        {"none": "", "good": "good"},
        base,
        optimizer,
        budget,
        seed=0,
        on_event=events.append,
        search=SearchConfig(train_size=4),
    )
    assert curves == {
        "a": {"none": [0.25, 0.5, 0.5], "good": [0.25, 1.0, 1.0]},
        "b": {"none": [0.25, 0.5, 0.5], "good": [0.25, 1.0, 1.0]},
    }
    # 4 beams (2 labels x 2 tasks) advance together: beam sizes 1 then 2, 2 candidates per beam prompt.
    tracks = 4
    assert batch_sizes(optimizer) == [tracks * 1 * 2] * 2 + [tracks * 2 * 2] * 2
    # Train scoring per iteration, then one test batch. Iteration 2 finds no better prompt (ties keep the
    # older one), so its best prompts equal iteration 1's and are generated once.
    assert batch_sizes(base) == [tracks * 4, tracks * 2 * 4, tracks * 4 * 4, tracks * 2 * 4]
    assert events[-1]["event"] == "test_time_adaptation" and events[-1]["scores"] == curves


def test_test_time_adaptation_searches_once_for_labels_with_the_same_system_prompt():
    def correct(system, user):
        return "Think it through" in user and question_index(user) % 2 == 0

    tasks = [make_task("a", n_train=4, n_test=4), make_task("b", n_train=4, n_test=4)]
    base, optimizer = base_lm(correct), optimizer_lm()
    budget = EvaluationConfig(adapt_iterations=1, beam=1, adapt_candidates=2)
    curves = protocols.test_time_adaptation(
        tasks, {"default": "same", "metaspo": "same", "other": ""}, base, optimizer, budget, seed=0,
        search=SearchConfig(train_size=4))
    for task in ("a", "b"):
        assert curves[task]["default"] == curves[task]["metaspo"]
        assert set(curves[task]) == {"default", "metaspo", "other"}
    # 2 distinct system prompts x 2 tasks are searched, not 3 x 2.
    assert batch_sizes(optimizer) == [2 * 2 * 1 * 2] * 2
