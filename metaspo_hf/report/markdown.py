"""report.md, section by section, from result.json."""

from __future__ import annotations

from ..evaluation.labels import turned_down_label
from ..results import COST_KEYS, STEP_CALL_COUNTS
from ..runs import RunDir
from ..stats import describe
from .formatting import bold_best, fenced, guard_rule_words, in_order, interval, markdown_table, mean_sd

# The baseline the report's first sentence compares the run's prompt with.
DEFAULT_LABEL = "default"


def report_markdown(result: dict, labels: list[str], plotted: dict[str, bool]) -> str:
    prompt = result["optimized_system_prompt"]
    lines = [
        f"# MetaSPO run: {result['recipe']}",
        "",
        *_verdict_lines(result),
        f"Model `{result['model']}`, method `{result['method']}`, seed {result['seed']}; "
        f"total wall time {_wall_time(result)}.",
        "",
        "## Optimized system prompt",
        "",
        *fenced(prompt or "(empty: no system turn)"),
        "",
        f"Ready to deploy: {_link(RunDir.SYSTEM_PROMPT)} (plain text), {_link(RunDir.MODELFILE)} "
        f"(Ollama `SYSTEM` snippet), {_link(RunDir.CHAT_SNIPPET)} (messages for "
        "`tokenizer.apply_chat_template(messages, add_generation_prompt=True)`), and "
        f"{_link(RunDir.REFERENCE_RESULT)} (the reference code's result shape).",
        "",
        "## Unseen generalization",
        "",
        *_scores_section(result, labels),
        "",
        "## Test-time adaptation",
        "",
        *_adaptation_section(result, labels, plotted["adaptation"]),
        "",
        "## Meta-training",
        "",
        *_meta_train_section(result, plotted["meta_train"]),
        "",
        "## Costs",
        "",
        *_costs_section(result),
        "",
        *_prompts_section(result, labels),
    ]
    return "\n".join(lines).rstrip("\n") + "\n"


def _scores_section(result: dict, labels: list[str]) -> list[str]:
    if not result["scores"]:
        return ["This run has no unseen-generalization scores, so there is no table or plot."]
    columns = [label for label in labels if any(label in t for t in result["scores"].values())]
    rows = [
        [
            task,
            *bold_best(
                {
                    label: (s["mean"], mean_sd(s["mean"], s["sd"], f"n={s['n']}"))
                    for label, s in by_label.items()
                },
                columns,
            ),
        ]
        for task, by_label in result["scores"].items()
    ]
    overall = {label: (value, f"{value:.3f}") for label, value in result["overall"].items()}
    rows.append(["**overall**", *bold_best(overall, columns)])
    return [
        "Test score on each unseen task: mean ± sd over the user prompts (n = number of user prompts). "
        "The best system prompt of each row is in bold.",
        "",
        *markdown_table(["task", *columns], rows),
        "",
        f"![Unseen generalization]({RunDir.SCORES_PLOT})",
        "",
        f"Data: {_link(RunDir.SCORES_CSV)} (with the paired differences), {_link(RunDir.ITEMS)} (every "
        "question's score under every system prompt).",
        "",
        *_paired_section(result, labels),
    ]


def _verdict_lines(result: dict) -> list[str]:
    """The report's first words: is the run's prompt better than the default, on paired items?"""
    main, comparisons = result.get("main_label", result["method"]), result.get("comparisons", {})
    if DEFAULT_LABEL not in comparisons or not comparisons[DEFAULT_LABEL]:
        return []
    same = result["system_prompts"].get(main) == result["system_prompts"].get(DEFAULT_LABEL)
    guard = result.get("guard", {}).get(main)
    if same and guard and not guard["kept"]:
        sentence = (f"the validation guard turned down `{main}`'s searched prompt ({interval(guard['difference']['overall'])} "
                    "against the initial prompt on held-out training questions), so the run returns the default system prompt."
                    + _turned_down_words(comparisons.get(turned_down_label(main))))
    elif same:
        sentence = f"`{main}` returned the default system prompt itself, so there is nothing to tell apart."
    else:
        sentence = describe(comparisons[DEFAULT_LABEL], main, DEFAULT_LABEL)
    return [f"**Result on the unseen tasks:** {sentence}", ""]


# The run's prompt minus the one its guard turned down, on unseen items -> what that says of the guard's call.
_TURNED_DOWN_VERDICTS = {
    "better": "worse than the prompt returned: turning it down was right",
    "worse": "better than the prompt returned: turning it down lost a gain",
    "no difference": "not distinguishable from the prompt returned",
}


def _turned_down_words(comparison: dict | None) -> str:
    """A sentence on how the turned-down prompt did on the unseen tasks, when the run scored it."""
    if not comparison:
        return ""
    overall = comparison["overall"]
    return (f" Scored on the unseen tasks all the same, the turned-down prompt was "
            f"{_TURNED_DOWN_VERDICTS[overall['verdict']]} (returned minus turned down {interval(overall)}).")


def _paired_section(result: dict, labels: list[str]) -> list[str]:
    main, comparisons = result.get("main_label", result["method"]), result.get("comparisons", {})
    compared = [(label, c) for label, c in in_order(comparisons, labels) if c]
    if not compared:
        return []
    tasks = list(result["scores"])
    rows = [
        [label, *(interval(c["tasks"].get(task)) for task in tasks), interval(c["overall"]), c["overall"]["verdict"]]
        for label, c in compared
    ]
    return [
        f"### `{main}` against each other system prompt, paired",
        "",
        f"Mean of `{main}`'s score minus the other's on the same (user prompt, question) items, with a 95% "
        "bootstrap interval over questions (seeded). An interval that contains 0 is no difference.",
        "",
        *markdown_table(["compared with", *tasks, "overall", "verdict"], rows),
    ]


def _adaptation_section(result: dict, labels: list[str], plotted: bool) -> list[str]:
    if not plotted:
        return ["This run has no test-time adaptation curves, so there is no table or plot."]
    width = max(len(curve) for by_label in result["adaptation"].values() for curve in by_label.values())
    rows = [
        [task, label, *(f"{v:.3f}" for v in curve), *([""] * (width - len(curve)))]
        for task, by_label in result["adaptation"].items()
        for label, curve in in_order(by_label, labels)
    ]
    return [
        "Test score on each unseen task after each test-time adaptation iteration (user-prompt search "
        "with the system prompt fixed; iteration 0 is the task's initial user prompt).",
        "",
        *markdown_table(["task", "system prompt", *(f"iter {i}" for i in range(width))], rows),
        "",
        f"![Test-time adaptation]({RunDir.ADAPTATION_PLOT})",
        "",
        f"Data: {_link(RunDir.ADAPTATION_CSV)}.",
    ]


def _meta_train_section(result: dict, plotted: bool) -> list[str]:
    if not plotted:
        return [
            "This run has no meta-training history (it evaluated given system prompts), so there is no plot."
        ]
    rows = [
        [
            method,
            str(s["iteration"]),
            f"{s['incumbent_score']:.3f}",
            "–" if s["best_candidate_score"] is None else f"{s['best_candidate_score']:.3f}",
            "yes" if s["adopted"] else "no",
            *(str(s.get(key, "")) for key in STEP_CALL_COUNTS),
        ]
        for method, history in result["meta_train"].items()
        for s in history
    ]
    header = [
        "method",
        "iteration",
        "incumbent",
        "best candidate",
        "adopted",
        "optimizer calls",
        "base generations",
    ]
    return [
        "Mean training score over all source tasks and kept user prompts, per iteration (0 is the starting "
        "point): the incumbent system prompt after the iteration, the best candidate written in it, and the "
        "calls the iteration made.",
        "",
        *markdown_table(header, rows),
        "",
        *_guard_lines(result),
        f"![Meta-training]({RunDir.META_TRAIN_PLOT})",
        "",
        f"Data: {_link(RunDir.META_TRAIN_CSV)}.",
    ]


def _guard_lines(result: dict) -> list[str]:
    guards = result.get("guard", {})
    if not guards:
        return []
    rows = [[method, interval(g["difference"]["overall"]), str(g["difference"]["overall"]["items"]),
             guard_rule_words(g),
             "kept" if g["kept"] else "turned down (initial prompt returned)"]
            for method, g in guards.items()]
    return [
        "Validation guard: each searched system prompt against the initial one on training questions the "
        "search never saw (paired; 95% bootstrap interval). It is kept only if the gain (its mean, or the low end "
        "of its interval, as the recipe asks) passes the margin.",
        "",
        *markdown_table(["method", "searched minus initial", "items", "needs", "decision"], rows),
        "",
    ]


def _costs_section(result: dict) -> list[str]:
    costs = result["costs"]
    rows = [[key.replace("_", " "), _count(costs[key])] for key in COST_KEYS if key != "seconds"]
    rows.append(["generation seconds", f"{costs['seconds']:.1f}"])
    rows.append(["total wall time", _wall_time(result)])
    return markdown_table(["counter", "value"], rows)


def _prompts_section(result: dict, labels: list[str]) -> list[str]:
    if not result["system_prompts"]:
        return []
    lines = ["## System prompts compared", ""]
    for label, text in in_order(result["system_prompts"], labels):
        body = fenced(text or "(empty: no system turn)")
        lines += [f"<details><summary>{label}</summary>", "", *body, "", "</details>", ""]
    return lines


def _wall_time(result: dict) -> str:
    wall, earlier = result["wall_seconds"], result.get("earlier_processes_seconds", [])
    if not earlier:
        return f"{_duration(wall)} ({wall:.1f} s)"
    return (f"{_duration(wall + sum(earlier))} over {len(earlier) + 1} processes (resumed: this one "
            f"{_duration(wall)}; before it {', '.join(_duration(s) for s in earlier)}, from events.jsonl, "
            "where a pause counts)")


def _duration(seconds: float) -> str:
    whole = int(round(seconds))
    return f"{whole // 3600}:{whole % 3600 // 60:02d}:{whole % 60:02d}"


def _count(value: float) -> str:
    return f"{value:,}" if isinstance(value, int) else f"{value:,.1f}"


def _link(name: str) -> str:
    """A Markdown link to the file ``name`` beside report.md."""
    return f"[{name}]({name})"
