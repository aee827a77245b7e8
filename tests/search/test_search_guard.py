"""The validation guard: a searched system prompt must beat the initial one on held-out training questions."""

from __future__ import annotations

import pytest
from fakes import base_lm, make_task, optimizer_lm, question_index

from metaspo_hf.errors import MetaspoError
from metaspo_hf.search import SearchConfig, run_search

INITIAL = "You are a helpful assistant."


def guarded_run(candidate: str, held_out_right: bool | set, guard: bool = True, margin: float = 0.0, rule="mean"):
    """Every system candidate is ``candidate``: it answers the 4 search questions of each task right
    (the initial prompt only the even ones), and the 4 held-out ones (4..7) right iff ``held_out_right``
    (or those whose index is in it)."""

    def correct(system, user):
        i = question_index(user)
        if system == INITIAL:
            return i % 2 == 0
        return i < 4 or (i in held_out_right if isinstance(held_out_right, set) else held_out_right)

    budget = SearchConfig(iterations=1, system_candidates=2, user_candidates=1, top_k=1, train_size=4,
                          racing=False, guard=guard, validation_size=4 if guard else 0, guard_margin=margin,
                          guard_rule=rule)
    events = []
    tasks = [make_task(f"t{i}", n_train=8) for i in range(2)]
    result = run_search("metaspo", tasks, base_lm(correct), optimizer_lm(lambda h: candidate), budget, seed=1,
                        on_event=events.append)
    return result, events


def test_a_prompt_that_also_wins_on_held_out_questions_is_kept():
    result, events = guarded_run("Check every step.", held_out_right=True)
    assert result.system_prompt == "Check every step." and result.rejected_system_prompt is None
    overall = result.guard["difference"]["overall"]
    # Held out: questions 4..7; the initial prompt gets 4 and 6 right, the candidate all four.
    assert result.guard["kept"] and overall["mean"] == pytest.approx(0.5)
    # Tasks x user prompts x questions; user candidates only tie here, so each task kept its initial one.
    assert overall["items"] == 2 * 1 * 4 and result.user_prompts["t0"] == [make_task("t0").initial_prompt]
    assert events[-1]["step"] == "guard" and events[-1]["kept"] is True


def test_a_prompt_adopted_on_the_search_questions_but_worse_held_out_is_turned_down():
    result, events = guarded_run("Answer from memory.", held_out_right=False)
    assert result.history[-1]["adopted"]  # the search itself adopted it
    assert result.system_prompt == INITIAL and result.rejected_system_prompt == "Answer from memory."
    assert not result.guard["kept"] and result.guard["difference"]["overall"]["mean"] == pytest.approx(-0.5)
    assert events[-1]["kept"] is False


def test_the_margin_must_be_passed():
    result, _ = guarded_run("Check every step.", held_out_right=True, margin=0.6)
    assert result.system_prompt == INITIAL and not result.guard["kept"]


def test_the_low_rule_turns_down_a_held_out_gain_whose_interval_reaches_zero_and_keeps_a_clear_one():
    # One held-out question more of four (question 5), in each task: a mean gain, inside the noise.
    small = {rule: guarded_run("Check every step.", held_out_right={4, 5, 6}, rule=rule)[0] for rule in ("mean", "low")}
    overall = small["mean"].guard["difference"]["overall"]
    assert overall["mean"] == pytest.approx(0.25) and overall["low"] <= 0
    assert small["mean"].guard["kept"] and small["mean"].system_prompt == "Check every step."
    assert not small["low"].guard["kept"] and small["low"].system_prompt == INITIAL
    assert (small["mean"].guard["rule"], small["low"].guard["rule"]) == ("mean", "low")
    clear, _ = guarded_run("Check every step.", held_out_right=True, rule="low")
    assert clear.guard["difference"]["overall"]["low"] > 0 and clear.system_prompt == "Check every step."


def test_the_broad_rule_turns_down_a_held_out_gain_that_one_task_carries_and_keeps_a_gain_every_task_shares():
    def run(gaining_tasks: set[str], rule: str):
        def correct(system, user):
            i, task = question_index(user), user.split("[")[-1].split("-")[0]
            if system == INITIAL:
                return i % 2 == 0
            return i < 4 or task in gaining_tasks or i % 2 == 0  # held out (4..11): right where the task gains

        budget = SearchConfig(iterations=1, system_candidates=2, user_candidates=1, top_k=1, train_size=4,
                              racing=False, guard=True, validation_size=8, guard_rule=rule)
        tasks = [make_task(f"t{i}", n_train=12) for i in range(3)]
        events = []
        result = run_search("metaspo", tasks, base_lm(correct), optimizer_lm(lambda h: "Check every step."), budget,
                            seed=1, on_event=events.append)
        return result, events[-1]

    one_task = {rule: run({"t0"}, rule) for rule in ("low", "broad")}
    # Pooled, t0's +0.5 clears 0 (the low rule keeps it); without t0 nothing is left of the gain.
    assert one_task["low"][0].guard["kept"] and one_task["low"][0].guard["difference"]["overall"]["low"] > 0
    broad, event = one_task["broad"]
    assert not broad.guard["kept"] and broad.system_prompt == INITIAL
    assert set(broad.guard["task_left_out"]) == {"t0", "t1", "t2"} and broad.guard["task_left_out"]["t0"]["low"] <= 0
    assert (event["weakest_left_out"], event["kept"]) == ("t0", False)
    every_task, _ = run({"t0", "t1", "t2"}, "broad")
    assert every_task.guard["kept"] and every_task.system_prompt == "Check every step."
    assert all(stats["low"] > 0 for stats in every_task.guard["task_left_out"].values())


def test_without_the_guard_the_search_result_stands_and_nothing_is_held_out():
    result, events = guarded_run("Answer from memory.", held_out_right=False, guard=False)
    assert result.system_prompt == "Answer from memory." and result.guard is None
    assert all(e["step"] != "guard" for e in events)


def test_the_guard_never_scores_the_held_out_questions_during_the_search():
    seen = []

    def correct(system, user):
        seen.append((system, question_index(user)))
        return True

    budget = SearchConfig(iterations=1, system_candidates=1, user_candidates=1, top_k=1, train_size=4,
                          racing=False, guard=True, validation_size=4)
    run_search("metaspo", [make_task("t", n_train=8)], base_lm(correct), optimizer_lm(), budget, seed=1)
    # Every candidate ties the initial prompt at 1.0, so nothing is adopted and the guard has nothing to do.
    assert max(i for _, i in seen) == 3


def test_too_few_training_questions_for_the_guard_is_an_error_before_any_work():
    budget = SearchConfig(train_size=4, guard=True, validation_size=8)
    lm = base_lm(lambda s, u: True)
    with pytest.raises(MetaspoError, match="task 't' has 4 training questions left .*validation_size asks for 8"):
        run_search("metaspo", [make_task("t", n_train=8)], lm, optimizer_lm(), budget, seed=1)
    assert lm.engine.calls == []


@pytest.mark.parametrize("fields, message", [
    ({"guard": True}, "search.guard is on but search.validation_size is 0"),
    ({"guard": "yes"}, "search.guard must be true or false"),
    ({"guard_margin": 1.5}, "search.guard_margin must be a number in"),
    ({"guard_rule": "lowest"}, "search.guard_rule must be one of mean, low, broad"),
    ({"validation_size": -1}, "search.validation_size must be >= 0"),
])
def test_bad_guard_settings_are_refused(fields, message):
    with pytest.raises(MetaspoError, match=message):
        SearchConfig(**fields)
