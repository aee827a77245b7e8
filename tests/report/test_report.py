"""report.md, CSVs, plots and exports rebuilt from a synthetic result.json; seed comparison."""

from __future__ import annotations

import csv
import json
import statistics

import pytest
from matplotlib.image import imread
from synthetic import LABELS, TASKS, synthetic_result

from metaspo_hf.errors import MetaspoError
from metaspo_hf.files import write_json_atomic
from metaspo_hf.report import compare_runs, write_report
from metaspo_hf.report.formatting import interval
from metaspo_hf.runs import RunDir
from metaspo_hf.stats import describe, paired_difference


def write_run(folder, result):
    folder.mkdir(parents=True, exist_ok=True)
    write_json_atomic(folder / "result.json", result)
    return folder


def read_csv(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_report_holds_every_task_label_and_number(tmp_path):
    result = synthetic_result()
    report = write_report(write_run(tmp_path, result))
    text = report.read_text()

    assert result["optimized_system_prompt"] in text
    for task, by_label in result["scores"].items():
        row = next(line for line in text.splitlines() if line.startswith(f"| {task} |"))
        cells = [c.strip().strip("*") for c in row.strip("|").split("|")][1:]
        assert cells == [f"{s['mean']:.3f} ± {s['sd']:.3f} (n={s['n']})" for s in by_label.values()]
        best = max(by_label.values(), key=lambda s: s["mean"])
        assert f"**{best['mean']:.3f} ± {best['sd']:.3f} (n=10)**" in row
        assert row.count("**") == 2, "only the best cell of a row is bold"
    header = next(line for line in text.splitlines() if line.startswith("| task |"))
    assert [c.strip() for c in header.strip("|").split("|")][1:] == list(LABELS)
    overall_row = next(line for line in text.splitlines() if line.startswith("| **overall** |"))
    for value in result["overall"].values():
        assert f"{value:.3f}" in overall_row
    assert "| metaspo | 0 | 0.300 | – | no | 0 | 150 |" in text  # iteration 0 has no candidate
    assert "1,200" in text and "45,678" in text and "1:02:05" in text  # costs and the wall time
    for name in ("unseen_generalization.png", "test_time_adaptation.png", "meta_train.png", "scores.csv"):
        assert f"({name})" in text


def test_plots_open_and_csvs_match_the_data(tmp_path):
    result = synthetic_result(seed=1)
    write_report(write_run(tmp_path, result))
    for name in ("unseen_generalization.png", "test_time_adaptation.png", "meta_train.png"):
        image = imread(tmp_path / name)
        assert image.shape[0] > 100 and image.shape[1] > 100

    rows = read_csv(tmp_path / "scores.csv")
    assert len(rows) == (len(TASKS) + 1) * len(LABELS)  # each task, then the overall row of each label
    for row in rows[: len(TASKS) * len(LABELS)]:
        expected = result["scores"][row["task"]][row["label"]]
        assert float(row["mean"]) == expected["mean"] and float(row["sd"]) == expected["sd"]
    assert {row["label"]: float(row["mean"]) for row in rows if row["task"] == "overall"} == result["overall"]
    adaptation = read_csv(tmp_path / "adaptation.csv")
    assert [float(r["score"]) for r in adaptation if r["task"] == TASKS[0] and r["label"] == "metaspo"] == (
        result["adaptation"][TASKS[0]]["metaspo"]
    )
    meta_train = read_csv(tmp_path / "meta_train.csv")
    assert len(meta_train) == 8
    assert meta_train[0]["best_candidate_score"] == "" and meta_train[1]["base_generations"] == "300"


def test_exports_hold_the_optimized_prompt(tmp_path):
    result = synthetic_result()
    prompt = result["optimized_system_prompt"]
    nodes = [{"id": 0, "task": "t", "system_prompt": "You are a helpful assistant.", "user_prompt": "Q: {question}",
              "parent_id": None, "depth": 0, "train_score": 0.4, "kept_in": [0, 1]},
             {"id": 1, "task": "t", "system_prompt": prompt, "user_prompt": "Q: {question}", "parent_id": 0,
              "depth": 1, "train_score": 0.5, "kept_in": [1]}]
    write_json_atomic(tmp_path / "nodes.json", {"metaspo": nodes, "outer_only": [{"id": 9}]})
    write_report(write_run(tmp_path, result))
    assert (tmp_path / "system_prompt.txt").read_text() == prompt + "\n"
    assert f'SYSTEM """{prompt}"""' in (tmp_path / "Modelfile").read_text()
    messages = json.loads((tmp_path / "chat_template_snippet.json").read_text())["messages"]
    assert messages[0] == {"role": "system", "content": prompt} and messages[1]["role"] == "user"
    # The reference's nesting: per update, per task, the kept nodes best first, in its keys.
    exported = json.loads((tmp_path / "metaspo_result.json").read_text())
    assert exported["optimized_system_prompt"] == prompt
    assert [[[node["id"] for node in task] for task in update] for update in exported["nodes"]] == [[[0]], [[1, 0]]]
    assert exported["nodes"][1][0][0] == {"id": 1, "task": "t", "system_prompt": prompt, "instruction": "Q: {question}",
                                          "parent_id": 0, "depth": 1, "eval_metric": 0.5, "test_metric": -1}


def test_empty_sections_skip_their_plots_and_say_so(tmp_path):
    write_report(write_run(tmp_path, synthetic_result()))
    assert (tmp_path / "meta_train.png").exists()
    result = synthetic_result()
    result.update(adaptation={}, meta_train={"metaspo": []})
    text = write_report(write_run(tmp_path, result)).read_text()
    assert not (tmp_path / "test_time_adaptation.png").exists(), "a stale plot is removed"
    assert not (tmp_path / "meta_train.png").exists()
    assert "no test-time adaptation" in text and "no meta-training history" in text
    assert (tmp_path / "unseen_generalization.png").exists()
    assert read_csv(tmp_path / "adaptation.csv") == []


def test_prompt_with_backticks_stays_inside_its_fence(tmp_path):
    result = synthetic_result()
    result["optimized_system_prompt"] = "Answer in ```code``` blocks."
    text = write_report(write_run(tmp_path, result)).read_text()
    assert "````text\nAnswer in ```code``` blocks.\n````" in text


def test_report_on_an_unfinished_run_is_a_clear_error(tmp_path):
    with pytest.raises(MetaspoError, match="result.json does not exist"):
        write_report(tmp_path)


def test_compare_runs_computes_mean_and_sd_across_seeds(tmp_path):
    results = [synthetic_result(seed) for seed in (1, 2, 3)]
    folders = [write_run(tmp_path / f"seed{r['seed']}", r) for r in results]
    report = compare_runs(folders, tmp_path / "comparison")

    rows = {(r["task"], r["label"]): r for r in read_csv(tmp_path / "comparison" / "comparison.csv")}
    for label in LABELS:
        values = [r["overall"][label] for r in results]
        row = rows[("overall", label)]
        assert float(row["mean"]) == pytest.approx(statistics.mean(values))
        assert float(row["sd"]) == pytest.approx(statistics.stdev(values))
        assert row["n_seeds"] == "3"
        task_values = [r["scores"][TASKS[2]][label]["mean"] for r in results]
        assert float(rows[(TASKS[2], label)]["sd"]) == pytest.approx(statistics.stdev(task_values))

    text = report.read_text()
    margins = [r["overall"]["metaspo"] - r["overall"]["cot"] for r in results]
    cot_row = next(line for line in text.splitlines() if line.startswith("| cot |"))
    assert f"{statistics.mean(margins):.3f} ± {statistics.stdev(margins):.3f} (3 seeds)" in cot_row
    seed_sd = statistics.stdev(r["overall"]["metaspo"] for r in results)
    assert cot_row.rstrip(" |").endswith("yes" if statistics.mean(margins) > seed_sd else "no")
    assert imread(tmp_path / "comparison" / "comparison.png").shape[0] > 100


def test_compare_runs_refuses_mixed_recipes_and_repeated_seeds(tmp_path):
    a = write_run(tmp_path / "a", synthetic_result(1, recipe="smoke"))
    b = write_run(tmp_path / "b", synthetic_result(2, recipe="qwen"))
    c = write_run(tmp_path / "c", synthetic_result(1, recipe="smoke"))
    with pytest.raises(MetaspoError, match="different recipes"):
        compare_runs([a, b], tmp_path / "out")
    with pytest.raises(MetaspoError, match="seed 1"):
        compare_runs([a, c], tmp_path / "out")


def test_compare_runs_refuses_to_pool_seeds_of_other_unseen_tasks(tmp_path):
    a = write_run(tmp_path / "a", synthetic_result(1))
    other_tasks = synthetic_result(2)
    other_tasks["scores"]["strategyqa"] = other_tasks["scores"].pop(TASKS[0])
    b = write_run(tmp_path / "b", other_tasks)
    with pytest.raises(MetaspoError, match="different unseen tasks: .*strategyqa"):
        compare_runs([a, b], tmp_path / "out")
    assert not (tmp_path / "out").exists(), "nothing is written for a refused comparison"


def paired_result(shift: float) -> dict:
    """A result whose `metaspo` prompt scores ``shift`` above `default` on 60 paired questions."""
    items = [{"seed": 0, "task": task, "user_prompt": 0, "question": f"q{i}", "label": label,
              "score": float((i % 10) < 5 + (shift * 10 if label == "metaspo" else 0))}
             for task in TASKS for i in range(20) for label in ("metaspo", "default")]
    result = synthetic_result()
    result["comparisons"] = {"default": paired_difference(items, "metaspo", "default")}
    return result


@pytest.mark.parametrize("shift, sentence", [
    (0.3, "`metaspo` is better than `default`: paired difference +0.300 (95% CI +0.1"),
    (0.0, "`metaspo` is not distinguishable from `default`: paired difference +0.000 (95% CI +0.000 to +0.000"),
    (-0.3, "`metaspo` is worse than `default`: paired difference -0.300"),
])
def test_the_report_opens_with_the_paired_verdict_against_the_default(tmp_path, shift, sentence):
    result = paired_result(shift)
    text = write_report(write_run(tmp_path, result)).read_text()
    first = text.splitlines()[2]
    assert first.startswith("**Result on the unseen tasks:** " + sentence), first
    row = next(line for line in text.splitlines() if line.startswith("| default | "))
    assert row.endswith(f"| {result['comparisons']['default']['overall']['verdict']} |")
    overall = next(r for r in read_csv(tmp_path / "scores.csv") if r["task"] == "overall" and r["label"] == "default")
    assert float(overall["paired_difference"]) == pytest.approx(shift)
    assert float(overall["ci_low"]) <= shift <= float(overall["ci_high"])


def test_a_run_that_returned_the_default_prompt_says_so(tmp_path):
    result = paired_result(0.0)
    result["system_prompts"]["metaspo"] = result["system_prompts"]["default"]
    text = write_report(write_run(tmp_path, result)).read_text()
    assert "returned the default system prompt itself" in text.splitlines()[2]


def test_a_resumed_run_states_the_time_of_every_process(tmp_path):
    result = {**synthetic_result(), "wall_seconds": 416.0, "earlier_processes_seconds": [4380.0]}
    text = write_report(write_run(tmp_path, result)).read_text()
    assert "total wall time 1:19:56 over 2 processes (resumed: this one 0:06:56; before it 1:13:00," in text


def test_compare_runs_pools_the_items_of_every_seed(tmp_path):
    folders, rows = [], []
    for seed in (1, 2):
        folder = write_run(tmp_path / f"seed{seed}", synthetic_result(seed))
        seed_rows = [{"seed": seed, "task": task, "user_prompt": 0, "question": f"{task}-{i}", "label": label,
                      "score": float(i % 4 == 0 or label == "metaspo")}
                     for task in TASKS for i in range(12) for label in ("metaspo", "default", "cot")]
        RunDir(folder).write_items(seed_rows)
        folders.append(folder)
        rows += seed_rows
    text = compare_runs(folders, tmp_path / "comparison").read_text()
    pooled = paired_difference(rows, "metaspo", "default")
    assert pooled["overall"]["items"] == 2 * len(TASKS) * 12 and pooled["overall"]["verdict"] == "better"
    assert f"**{describe(pooled, 'metaspo', 'default')}**" in text
    row = next(line for line in text.splitlines() if line.startswith("| default | +"))
    o = pooled["overall"]
    assert f"| {o['mean']:+.3f} [{o['low']:+.3f}, {o['high']:+.3f}] | better |" in row


def turned_down_guard(rule: str | None = "low") -> dict:
    """A guard entry that turned down a searched prompt ahead by +0.125 on 8 held-out items, inside the noise."""
    held_out = [{"seed": 0, "task": "t", "user_prompt": 0, "question": str(i), "label": label,
                 "score": float(label == "searched" and i == 0)} for i in range(8) for label in ("searched", "initial")]
    return {"kept": False, "margin": 0.0, "rule": rule, "difference": paired_difference(held_out, "searched", "initial")}


def returned_against_turned_down(turned_down_wins: bool) -> dict:
    """``metaspo`` (the returned prompt) minus ``metaspo_turned_down`` on 60 unseen items: -0.3 or +0.3."""
    items = [{"seed": 0, "task": task, "user_prompt": 0, "question": f"q{i}", "label": label,
              "score": float((i % 10) < (8 if (label == "metaspo_turned_down") == turned_down_wins else 5))}
             for task in TASKS for i in range(20) for label in ("metaspo", "metaspo_turned_down")]
    return paired_difference(items, "metaspo", "metaspo_turned_down")


@pytest.mark.parametrize("rule, needs", [("low", "interval low end > +0.000"), (None, "mean > +0.000")])
def test_a_guard_that_turned_the_prompt_down_opens_the_report_and_its_table_says_what_it_needed(tmp_path, rule, needs):
    result = paired_result(0.0)
    result["system_prompts"]["metaspo"] = result["system_prompts"]["default"]
    guard = turned_down_guard(rule)
    if rule is None:  # result.json written before search.guard_rule has no "rule": the mean was the rule then
        del guard["rule"]
    result["guard"] = {"metaspo": guard}
    lines = write_report(write_run(tmp_path, result)).read_text().splitlines()
    assert "the validation guard turned down `metaspo`'s searched prompt (+0.125" in lines[2]
    row = next(line for line in lines if line.startswith("| metaspo | +0.125"))
    assert f"| 8 | {needs} | turned down (initial prompt returned) |" in row


@pytest.mark.parametrize("turned_down_wins, words", [
    (False, "the turned-down prompt was worse than the prompt returned: turning it down was right (returned minus "
            "turned down +0.300"),
    (True, "the turned-down prompt was better than the prompt returned: turning it down lost a gain (returned minus "
           "turned down -0.300"),
])
def test_a_turned_down_prompt_scored_on_the_unseen_tasks_says_whether_the_guard_was_right(tmp_path, turned_down_wins,
                                                                                           words):
    result = paired_result(0.0)
    result["system_prompts"]["metaspo"] = result["system_prompts"]["default"]
    result["guard"] = {"metaspo": turned_down_guard()}
    result["comparisons"]["metaspo_turned_down"] = returned_against_turned_down(turned_down_wins)
    first = write_report(write_run(tmp_path, result)).read_text().splitlines()[2]
    assert "so the run returns the default system prompt. Scored on the unseen tasks all the same, " + words in first


def test_compare_runs_lists_each_seeds_guard_call_beside_what_the_unseen_tasks_said_of_it(tmp_path):
    kept = paired_result(0.3)
    kept["guard"] = {"metaspo": {**turned_down_guard("mean"), "kept": True}}
    turned_down = paired_result(0.0)
    turned_down["seed"] = 1
    turned_down["guard"] = {"metaspo": turned_down_guard("low")}
    turned_down["comparisons"]["metaspo_turned_down"] = returned_against_turned_down(False)
    nothing_adopted = paired_result(0.0)
    nothing_adopted["seed"] = 2
    for step in nothing_adopted["meta_train"]["metaspo"]:
        step["adopted"] = False
    folders = [write_run(tmp_path / f"seed{r['seed']}", r) for r in (kept, turned_down, nothing_adopted)]
    text = compare_runs(folders, tmp_path / "comparison").read_text()
    held_out = interval(turned_down_guard()["difference"]["overall"])
    rows = [line for line in text.splitlines() if line.startswith(("| 0 |", "| 1 |", "| 2 |"))]
    assert rows == [
        f"| 0 | {held_out} | mean > +0.000 | kept | {interval(kept['comparisons']['default']['overall'])} | not scored |",
        f"| 1 | {held_out} | interval low end > +0.000 | turned down | "
        f"{interval(turned_down['comparisons']['default']['overall'])} | "
        f"{interval(turned_down['comparisons']['metaspo_turned_down']['overall'])} |",
        f"| 2 | – | – | no call: nothing adopted | {interval(nothing_adopted['comparisons']['default']['overall'])} | – |",
    ]
    assert interval(turned_down["comparisons"]["metaspo_turned_down"]["overall"]).startswith("+0.300")
