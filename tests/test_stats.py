"""Paired differences with seeded bootstrap intervals (stats.py)."""

import random

import pytest

from metaspo_hf.stats import describe, paired_difference, spread, verdict


def items(task_scores: dict[str, list[tuple[float, float]]], seed: int = 0, prompts: int = 1) -> list[dict]:
    """Rows for labels "a" and "b": task -> per question (score under a, score under b)."""
    rows = []
    for task, pairs in task_scores.items():
        for q, (a, b) in enumerate(pairs):
            for u in range(prompts):
                rows += [{"seed": seed, "task": task, "user_prompt": u, "question": f"{task}-{q}", "label": "a",
                          "score": a},
                         {"seed": seed, "task": task, "user_prompt": u, "question": f"{task}-{q}", "label": "b",
                          "score": b}]
    return rows


def test_identical_prompts_differ_by_nothing():
    rng = random.Random(0)
    same = [(s, s) for s in (float(rng.random() < 0.5) for _ in range(40))]
    result = paired_difference(items({"t": same}), "a", "b")
    assert result["overall"] == {"mean": 0.0, "low": 0.0, "high": 0.0, "items": 40, "questions": 40,
                                 "verdict": "no difference"}


def test_a_clear_gain_is_better_and_its_mirror_is_worse():
    pairs = [(1.0, 0.0)] * 15 + [(1.0, 1.0)] * 25  # a wins 15 of 40 questions and never loses
    gain = paired_difference(items({"t": pairs}), "a", "b")["overall"]
    assert gain["mean"] == pytest.approx(15 / 40) and 0 < gain["low"] < gain["mean"] < gain["high"] <= 1
    assert gain["verdict"] == "better"
    loss = paired_difference(items({"t": pairs}), "b", "a")["overall"]
    assert loss["verdict"] == "worse" and loss["mean"] == pytest.approx(-15 / 40)


def test_a_one_question_edge_is_inside_the_noise():
    pairs = [(1.0, 0.0)] * 3 + [(0.0, 1.0)] * 2 + [(1.0, 1.0)] * 35
    result = paired_difference(items({"t": pairs}), "a", "b")["overall"]
    assert result["mean"] == pytest.approx(1 / 40) and result["verdict"] == "no difference"
    assert result["low"] < 0 < result["high"]


def test_overall_is_the_mean_of_task_differences_and_tasks_are_reported():
    result = paired_difference(items({"x": [(1.0, 0.0)] * 10, "y": [(0.0, 0.0)] * 30}), "a", "b")
    assert result["tasks"]["x"]["mean"] == 1.0 and result["tasks"]["y"]["mean"] == 0.0
    assert result["overall"]["mean"] == 0.5  # tasks weigh equally, as in the overall score
    assert result["overall"]["items"] == 40


def test_questions_are_resampled_whole_across_user_prompts_and_seeds():
    """Repeating every question under more user prompts or seeds adds no independent evidence: the
    interval is the same as with one copy of each question."""
    rng = random.Random(1)
    pairs = [(float(rng.random() < 0.6), float(rng.random() < 0.5)) for _ in range(30)]
    one = paired_difference(items({"t": pairs}), "a", "b", seed=3)["overall"]
    repeated = paired_difference(items({"t": pairs}, prompts=3) + items({"t": pairs}, seed=1, prompts=3),
                                 "a", "b", seed=3)["overall"]
    assert (repeated["low"], repeated["high"]) == pytest.approx((one["low"], one["high"]))
    assert repeated["items"] == 6 * one["items"] and repeated["questions"] == one["questions"]


def test_the_interval_is_seeded_and_ignores_row_order():
    rng = random.Random(2)
    rows = items({"t": [(float(rng.random() < 0.6), float(rng.random() < 0.5)) for _ in range(30)]})
    first = paired_difference(rows, "a", "b", seed=5)
    assert paired_difference(list(reversed(rows)), "a", "b", seed=5) == first


def test_unpaired_rows_are_left_out_and_nothing_shared_gives_nothing():
    rows = items({"t": [(1.0, 0.0)] * 4})
    rows.append({"seed": 0, "task": "t", "user_prompt": 9, "question": "lonely", "label": "a", "score": 0.0})
    assert paired_difference(rows, "a", "b")["overall"]["items"] == 4
    assert paired_difference(rows, "a", "c") == {}


def test_verdict_spread_and_sentence():
    assert [verdict(0.01, 0.2), verdict(-0.2, -0.01), verdict(-0.01, 0.2)] == ["better", "worse", "no difference"]
    assert spread([1.0, 3.0]) == {"mean": 2.0, "sd": pytest.approx(2 ** 0.5), "n": 2}
    assert spread([0.5])["sd"] == 0.0
    gain = paired_difference(items({"t": [(1.0, 0.0)] * 15 + [(1.0, 1.0)] * 25}), "a", "b")
    assert describe(gain, "a", "b").startswith("`a` is better than `b`: paired difference +0.375 (95% CI +0.")
