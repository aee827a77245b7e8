"""The human side of a run folder: report.md, CSV tables, PNG plots and the deployable prompt.

Everything here is rebuilt from ``result.json`` alone (plus ``nodes.json`` when present), so
``metaspo report RUN_DIR`` works on any finished run, old ones included. ``compare_runs`` puts
several seeds of one recipe side by side.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from .errors import MetaspoError
from .evaluation.labels import ordered_labels
from .files import atomic_file, read_json, write_json_atomic, write_text_atomic
from .models.base import make_chat
from .reference_files import reference_result
from .runs import RunDir
from .stats import describe, paired_difference, spread

COST_KEYS = (
    "base_generations",
    "generated_tokens",
    "prefill_tokens",
    "optimizer_calls",
    "cache_hits",
    "seconds",
)
META_TRAIN_KEYS = ("iteration", "incumbent_score", "best_candidate_score", "adopted")
# Per-iteration call counts the search adds to its history entries; shown when present.
STEP_CALL_COUNTS = ("optimizer_calls", "base_generations")
# The baseline the report's first sentence compares the run's prompt with.
DEFAULT_LABEL = "default"
# The baselines whose gap to MetaSPO `compare_runs` weighs against seed-to-seed noise.
MARGIN_BASELINES = ("default", "cot")
# Placeholder user turn in the exported chat snippet.
USER_PLACEHOLDER = "<your user prompt>"
# Enough resolution for print and for a README; the files stay around 50-100 kB.
PLOT_DPI = 120

# The test-time adaptation plot: the narrowest y range its panels share, and each label's marker and dash.
ADAPTATION_MIN_SPAN = 0.2
ADAPTATION_MARKERS = ("o", "s", "^", "D", "v")
ADAPTATION_DASHES = ("-", "--", ":", "-.")

PLOTS = {
    "scores": "unseen_generalization.png",
    "adaptation": "test_time_adaptation.png",
    "meta_train": "meta_train.png",
}


# ---- result.json schema ---------------------------------------------------------------------------


def _is_number(value: Any) -> bool:
    # JSON numbers: integers count, booleans (a subclass of int in Python) do not.
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# What a value must be, by the phrase the error message uses.
STRING, INTEGER, NUMBER, NUMBER_OR_NULL = "a string", "an integer", "a number", "a number or null"
BOOLEAN, OBJECT, LIST = "true or false", "a JSON object", "a list"
_KINDS = {
    STRING: lambda v: isinstance(v, str),
    INTEGER: lambda v: isinstance(v, int) and not isinstance(v, bool),
    NUMBER: _is_number,
    NUMBER_OR_NULL: lambda v: v is None or _is_number(v),
    BOOLEAN: lambda v: isinstance(v, bool),
    OBJECT: lambda v: isinstance(v, dict),
    LIST: lambda v: isinstance(v, list),
}


def validate_result(obj: Any, source: str = "result.json") -> dict:
    """``obj`` if it has the shape of a run's result.json; otherwise a MetaspoError naming the key.

    Extra keys are allowed (the pipeline may add per-prompt scores or per-iteration call counts).
    """
    check = _Checker(source)
    check.value(obj, "the top level", OBJECT)
    for key in ("recipe", "model", "method", "optimized_system_prompt"):
        check.field(obj, key, STRING)
    check.field(obj, "seed", INTEGER)
    check.field(obj, "wall_seconds", NUMBER)
    for label in check.field(obj, "system_prompts", OBJECT):
        check.field(obj["system_prompts"], label, STRING, "system_prompts.")
    for task in check.field(obj, "scores", OBJECT):
        for label in check.field(obj["scores"], task, OBJECT, "scores."):
            check.field(obj["scores"][task], label, OBJECT, f"scores.{task}.")
            for key, kind in (("mean", NUMBER), ("sd", NUMBER), ("n", INTEGER)):
                check.field(obj["scores"][task][label], key, kind, f"scores.{task}.{label}.")
    for label in check.field(obj, "overall", OBJECT):
        check.field(obj["overall"], label, NUMBER, "overall.")
    for task in check.field(obj, "adaptation", OBJECT):
        for label in check.field(obj["adaptation"], task, OBJECT, "adaptation."):
            for i, score in enumerate(
                check.field(obj["adaptation"][task], label, LIST, f"adaptation.{task}.")
            ):
                check.value(score, f"adaptation.{task}.{label}.{i}", NUMBER)
    for method in check.field(obj, "meta_train", OBJECT):
        for i, step in enumerate(check.field(obj["meta_train"], method, LIST, "meta_train.")):
            where = f"meta_train.{method}.{i}"
            check.value(step, where, OBJECT)
            # best_candidate_score is null where an iteration wrote no candidate (0 is the starting point).
            for key, kind in zip(META_TRAIN_KEYS, (INTEGER, NUMBER, NUMBER_OR_NULL, BOOLEAN), strict=True):
                check.field(step, key, kind, f"{where}.")
    check.field(obj, "costs", OBJECT)
    for key in COST_KEYS:
        check.field(obj["costs"], key, NUMBER, "costs.")
    return obj


class _Checker:
    """Type checks that name the file and the dotted key of the first problem."""

    def __init__(self, source: str):
        self.source = source

    def field(self, container: dict, key: str, kind: str, prefix: str = "") -> Any:
        if key not in container:
            raise MetaspoError(
                f"{self.source}: missing key {prefix + key!r}",
                hint="result.json is written whole at the end of a run; was this one edited by hand?",
            )
        return self.value(container[key], prefix + key, kind)

    def value(self, value: Any, name: str, kind: str) -> Any:
        if not _KINDS[kind](value):
            raise MetaspoError(f"{self.source}: {name!r} should be {kind}, not {json.dumps(value)[:60]}")
        return value


# ---- the report -----------------------------------------------------------------------------------


def write_report(run_dir: str | Path) -> Path:
    """Rebuild report.md, the CSVs, the plots and the prompt exports of ``run_dir``; the report's path."""
    folder = Path(run_dir)
    if not folder.is_dir():
        raise MetaspoError(f"run folder {folder} does not exist", hint="check the path")
    result_path = folder / "result.json"
    if not result_path.exists():
        raise MetaspoError(
            f"{result_path} does not exist",
            hint="the run has not finished yet; resume it to write its result",
        )
    result = validate_result(read_json(result_path), source=str(result_path))
    nodes = _method_nodes(folder / "nodes.json", result["method"])
    labels = ordered_labels(_all_labels(result))
    # Methods share the label colors (the `metaspo` curve matches the `metaspo` bars).
    colors = _label_colors(ordered_labels([*labels, *result["meta_train"]]))

    comparisons = result.get("comparisons", {})

    def paired(label: str, task: str | None) -> list:
        """The run's prompt minus ``label`` on the same items, with its interval (blank where none)."""
        c = comparisons.get(label)
        c = c and (c["overall"] if task is None else c["tasks"].get(task))
        return [c["mean"], c["low"], c["high"], c["verdict"]] if c else ["", "", "", ""]

    _write_csv(
        folder / "scores.csv",
        ["task", "label", "mean", "sd", "n", "paired_difference", "ci_low", "ci_high", "verdict"],
        [
            [task, label, s["mean"], s["sd"], s["n"], *paired(label, task)]
            for task, by_label in result["scores"].items()
            for label, s in _in_order(by_label, labels)
        ]
        + [["overall", label, mean, "", "", *paired(label, None)]
           for label, mean in _in_order(result["overall"], labels)],
    )
    _write_csv(
        folder / "adaptation.csv",
        ["task", "label", "iteration", "score"],
        [
            [task, label, i, score]
            for task, by_label in result["adaptation"].items()
            for label, curve in _in_order(by_label, labels)
            for i, score in enumerate(curve)
        ],
    )
    _write_csv(
        folder / "meta_train.csv",
        ["method", *META_TRAIN_KEYS, *STEP_CALL_COUNTS],
        [
            [method, *(s[key] for key in META_TRAIN_KEYS), *(s.get(key, "") for key in STEP_CALL_COUNTS)]
            for method, history in result["meta_train"].items()
            for s in history
        ],
    )

    plotted = {
        "scores": _plot_scores(result, labels, colors, folder / PLOTS["scores"]),
        "adaptation": _plot_adaptation(result, labels, colors, folder / PLOTS["adaptation"]),
        "meta_train": _plot_meta_train(result, colors, folder / PLOTS["meta_train"]),
    }
    for section, drawn in plotted.items():
        if not drawn:  # a stale plot from an earlier report would contradict the data
            (folder / PLOTS[section]).unlink(missing_ok=True)

    _write_exports(folder, result, nodes)
    report = folder / "report.md"
    write_text_atomic(report, _report_markdown(result, labels, plotted))
    return report


def _report_markdown(result: dict, labels: list[str], plotted: dict[str, bool]) -> str:
    prompt = result["optimized_system_prompt"]
    lines = [
        f"# MetaSPO run: {result['recipe']}",
        "",
        *_verdict_lines(result),
        f"Model `{result['model']}`, method `{result['method']}`, seed {result['seed']}; "
        f"total wall time {_duration(result['wall_seconds'])}.",
        "",
        "## Optimized system prompt",
        "",
        *_fenced(prompt or "(empty: no system turn)"),
        "",
        "Ready to deploy: [system_prompt.txt](system_prompt.txt) (plain text), [Modelfile](Modelfile) "
        "(Ollama `SYSTEM` snippet), [chat_template_snippet.json](chat_template_snippet.json) (messages for "
        "`tokenizer.apply_chat_template(messages, add_generation_prompt=True)`), and "
        "[metaspo_result.json](metaspo_result.json) (the reference code's result shape).",
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
            *_bold_best(
                {
                    label: (s["mean"], _mean_sd(s["mean"], s["sd"], f"n={s['n']}"))
                    for label, s in by_label.items()
                },
                columns,
            ),
        ]
        for task, by_label in result["scores"].items()
    ]
    overall = {label: (value, f"{value:.3f}") for label, value in result["overall"].items()}
    rows.append(["**overall**", *_bold_best(overall, columns)])
    return [
        "Test score on each unseen task: mean ± sd over the user prompts (n = number of user prompts). "
        "The best system prompt of each row is in bold.",
        "",
        *_markdown_table(["task", *columns], rows),
        "",
        f"![Unseen generalization]({PLOTS['scores']})",
        "",
        "Data: [scores.csv](scores.csv) (with the paired differences), [items.csv](items.csv) (every "
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
        sentence = (f"the validation guard turned down `{main}`'s searched prompt ({_interval(guard['difference']['overall'])} "
                    "against the initial prompt on held-out training questions), so the run returns the default system prompt.")
    elif same:
        sentence = f"`{main}` returned the default system prompt itself, so there is nothing to tell apart."
    else:
        sentence = describe(comparisons[DEFAULT_LABEL], main, DEFAULT_LABEL)
    return [f"**Result on the unseen tasks:** {sentence}", ""]


def _paired_section(result: dict, labels: list[str]) -> list[str]:
    main, comparisons = result.get("main_label", result["method"]), result.get("comparisons", {})
    compared = [(label, c) for label, c in _in_order(comparisons, labels) if c]
    if not compared:
        return []
    tasks = list(result["scores"])
    rows = [
        [label, *(_interval(c["tasks"].get(task)) for task in tasks), _interval(c["overall"]), c["overall"]["verdict"]]
        for label, c in compared
    ]
    return [
        f"### `{main}` against each other system prompt, paired",
        "",
        f"Mean of `{main}`'s score minus the other's on the same (user prompt, question) items, with a 95% "
        "bootstrap interval over questions (seeded). An interval that contains 0 is no difference.",
        "",
        *_markdown_table(["compared with", *tasks, "overall", "verdict"], rows),
    ]


def _interval(c: dict | None) -> str:
    return "–" if not c else f"{c['mean']:+.3f} [{c['low']:+.3f}, {c['high']:+.3f}]"


def _adaptation_section(result: dict, labels: list[str], plotted: bool) -> list[str]:
    if not plotted:
        return ["This run has no test-time adaptation curves, so there is no table or plot."]
    width = max(len(curve) for by_label in result["adaptation"].values() for curve in by_label.values())
    rows = [
        [task, label, *(f"{v:.3f}" for v in curve), *([""] * (width - len(curve)))]
        for task, by_label in result["adaptation"].items()
        for label, curve in _in_order(by_label, labels)
    ]
    return [
        "Test score on each unseen task after each test-time adaptation iteration (user-prompt search "
        "with the system prompt fixed; iteration 0 is the task's initial user prompt).",
        "",
        *_markdown_table(["task", "system prompt", *(f"iter {i}" for i in range(width))], rows),
        "",
        f"![Test-time adaptation]({PLOTS['adaptation']})",
        "",
        "Data: [adaptation.csv](adaptation.csv).",
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
        *_markdown_table(header, rows),
        "",
        *_guard_lines(result),
        f"![Meta-training]({PLOTS['meta_train']})",
        "",
        "Data: [meta_train.csv](meta_train.csv).",
    ]


def _guard_lines(result: dict) -> list[str]:
    guards = result.get("guard", {})
    if not guards:
        return []
    rows = [[method, _interval(g["difference"]["overall"]), str(g["difference"]["overall"]["items"]),
             f"> {g['margin']:+.3f}", "kept" if g["kept"] else "turned down (initial prompt returned)"]
            for method, g in guards.items()]
    return [
        "Validation guard: each searched system prompt against the initial one on training questions the "
        "search never saw (paired; 95% bootstrap interval). It is kept only if the mean gain passes the margin.",
        "",
        *_markdown_table(["method", "searched minus initial", "items", "needs", "decision"], rows),
        "",
    ]


def _costs_section(result: dict) -> list[str]:
    costs, wall = result["costs"], result["wall_seconds"]
    rows = [[key.replace("_", " "), _count(costs[key])] for key in COST_KEYS if key != "seconds"]
    rows.append(["generation seconds", f"{costs['seconds']:.1f}"])
    rows.append(["total wall time", f"{_duration(wall)} ({wall:.1f} s)"])
    return _markdown_table(["counter", "value"], rows)


def _prompts_section(result: dict, labels: list[str]) -> list[str]:
    if not result["system_prompts"]:
        return []
    lines = ["## System prompts compared", ""]
    for label, text in _in_order(result["system_prompts"], labels):
        body = _fenced(text or "(empty: no system turn)")
        lines += [f"<details><summary>{label}</summary>", "", *body, "", "</details>", ""]
    return lines


def _method_nodes(path: Path, method: str) -> Any:
    """The search nodes of the run's method: nodes.json maps each searched method to its nodes."""
    if not path.exists():
        return []
    nodes = read_json(path)
    return nodes.get(method, []) if isinstance(nodes, dict) else nodes


def _write_exports(folder: Path, result: dict, nodes: Any) -> None:
    prompt = result["optimized_system_prompt"]
    write_text_atomic(folder / "system_prompt.txt", prompt + "\n")
    write_text_atomic(
        folder / "Modelfile",
        f"# Ollama Modelfile snippet: the system prompt optimized for {result['model']}.\n"
        "# Add it below your FROM line.\n"
        f'SYSTEM """{prompt}"""\n',
    )
    write_json_atomic(
        folder / "chat_template_snippet.json", {"messages": make_chat(prompt, USER_PLACEHOLDER)}
    )
    write_json_atomic(folder / "metaspo_result.json", reference_result(prompt, nodes))


# ---- plots ----------------------------------------------------------------------------------------


def _plot_scores(result: dict, labels: list[str], colors: dict, path: Path) -> bool:
    scores, overall = result["scores"], result["overall"]
    if not scores:
        return False
    shown = [label for label in labels if label in overall or any(label in t for t in scores.values())]
    groups = [*scores, "overall"]
    width = 0.8 / len(shown)
    fig = Figure(figsize=(max(6.0, 1.1 * len(groups) * max(1.0, len(shown) / 4)), 4.5))
    ax = fig.subplots()
    for i, label in enumerate(shown):
        offset = (i - (len(shown) - 1) / 2) * width
        present = [(g, scores[task][label]) for g, task in enumerate(scores) if label in scores[task]]
        ax.bar(
            [g + offset for g, _ in present],
            [s["mean"] for _, s in present],
            width,
            yerr=_clipped_error([s["mean"] for _, s in present], [s["sd"] for _, s in present]),
            capsize=2,
            label=label,
            color=colors[label],
        )
        if label in overall:  # no error bar: the overall score is a mean over tasks, not over user prompts
            ax.bar(len(scores) + offset, overall[label], width, color=colors[label])
    # Task names are long (reasoning_about_colored_objects): slanted labels keep them from overlapping.
    crowded = len(groups) > 4 or max(len(g) for g in groups) > 12
    ax.set_xticks(range(len(groups)), groups, rotation=20 if crowded else 0, ha="right" if crowded else "center")
    ax.set_ylabel("test score (mean ± sd over user prompts)")
    ax.set_title("Unseen generalization")
    ax.legend(fontsize="small", ncols=min(len(shown), 4))
    _save_png(fig, path)
    return True


def _span(low: float, high: float, minimum: float) -> tuple[float, float]:
    """[low, high] widened around its middle to at least ``minimum``, kept inside [0, 1] where it fits,
    with a small margin outside it so that a line at 0 or 1 is not hidden by the axis."""
    pad = max(minimum - (high - low), 0.0) / 2
    low, high = max(0.0, low - pad), min(1.0, high + pad)
    if high - low < minimum:  # clipped at one end: take the rest at the other
        low, high = (0.0, minimum) if low == 0.0 else (1.0 - minimum, 1.0)
    margin = 0.03 * minimum
    return low - margin, high + margin


def _clipped_error(means: list[float], sds: list[float]) -> list[list[float]]:
    """Error bars of ± sd cut at the score's range [0, 1] (a bar below 0 reads as a negative score)."""
    return [[min(sd, m) for m, sd in zip(means, sds, strict=True)],
            [min(sd, 1.0 - m) for m, sd in zip(means, sds, strict=True)]]


def _plot_adaptation(result: dict, labels: list[str], colors: dict, path: Path) -> bool:
    tasks = {task: by_label for task, by_label in result["adaptation"].items() if any(by_label.values())}
    if not tasks:
        return False
    columns = min(3, len(tasks))
    rows = math.ceil(len(tasks) / columns)
    fig = Figure(figsize=(4.2 * columns, 3.4 * rows))
    axes = fig.subplots(rows, columns, squeeze=False).ravel()
    # One y range for every panel, at least ADAPTATION_MIN_SPAN wide, so that a flat line reads as flat.
    values = [v for by_label in tasks.values() for curve in by_label.values() for v in curve]
    low, high = _span(min(values), max(values), ADAPTATION_MIN_SPAN)
    for ax, (task, by_label) in zip(axes, tasks.items(), strict=False):
        for rank, (label, curve) in enumerate(_in_order(by_label, labels)):
            # Equal curves stay visible: each label has its own marker and dash, drawn smaller on top.
            ax.plot(range(len(curve)), curve, label=label, color=colors[label],
                    marker=ADAPTATION_MARKERS[rank % len(ADAPTATION_MARKERS)], markersize=8 - 2 * (rank % 3),
                    linestyle=ADAPTATION_DASHES[rank % len(ADAPTATION_DASHES)])
        ax.set_ylim(low, high)
        ax.set_title(task)
        ax.set_xlabel("iteration")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("test score")
        ax.legend(fontsize="small")
    for ax in axes[len(tasks) :]:
        ax.set_visible(False)
    fig.suptitle("Test-time adaptation")
    fig.tight_layout()
    _save_png(fig, path)
    return True


def _plot_meta_train(result: dict, colors: dict, path: Path) -> bool:
    history = {method: steps for method, steps in result["meta_train"].items() if steps}
    if not history:
        return False
    fig = Figure(figsize=(6.0, 4.0))
    ax = fig.subplots()
    for method, steps in history.items():
        ax.plot(
            [s["iteration"] for s in steps],
            [s["incumbent_score"] for s in steps],
            marker="o",
            color=colors[method],
            label=f"{method}: incumbent",
        )
        candidates = [s for s in steps if s["best_candidate_score"] is not None]
        ax.plot(
            [s["iteration"] for s in candidates],
            [s["best_candidate_score"] for s in candidates],
            linestyle="--",
            alpha=0.6,
            color=colors[method],
            label=f"{method}: best candidate",
        )
    ax.set_xlabel("iteration")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("mean training score")
    ax.set_title("Meta-training")
    ax.legend(fontsize="small")
    _save_png(fig, path)
    return True


def _save_png(fig: Figure, path: Path) -> None:
    with atomic_file(path, binary=True) as fh:
        fig.savefig(fh, format="png", dpi=PLOT_DPI, bbox_inches="tight")


def _label_colors(labels: list[str]) -> dict[str, Any]:
    """One fixed color per label, so a label looks the same in every plot of a report."""
    from matplotlib import colormaps

    palette = colormaps["tab10"].colors
    return {label: palette[i % len(palette)] for i, label in enumerate(labels)}


# ---- comparing seeds ------------------------------------------------------------------------------


def summarize_seeds(results: list[dict]) -> dict:
    """Mean and sample sd across runs (seeds) of each label's overall and per-task scores, and
    MetaSPO's margin over each baseline in ``MARGIN_BASELINES``."""
    labels = ordered_labels(label for r in results for label in r["overall"])
    tasks = list(dict.fromkeys(task for r in results for task in r["scores"]))
    summary = {
        "recipe": results[0]["recipe"],
        "main_label": results[0].get("main_label", results[0]["method"]),
        "seeds": [r["seed"] for r in results],
        "overall": {
            label: spread([r["overall"][label] for r in results if label in r["overall"]])
            for label in labels
        },
        "tasks": {
            task: {
                label: spread(
                    [r["scores"][task][label]["mean"] for r in results if label in r["scores"].get(task, {})]
                )
                for label in labels
                if any(label in r["scores"].get(task, {}) for r in results)
            }
            for task in tasks
        },
        "margins": {},
    }
    main = summary["main_label"]
    for baseline in MARGIN_BASELINES:
        paired = [
            r["overall"][main] - r["overall"][baseline]
            for r in results
            if main in r["overall"] and baseline in r["overall"]
        ]
        if paired:
            margin = spread(paired)
            summary["margins"][baseline] = {
                **margin,
                "metaspo_seed_sd": summary["overall"][main]["sd"],
                "beyond_seed_noise": margin["mean"] > summary["overall"][main]["sd"],
            }
    return summary


def pooled_comparisons(items: list[dict], main: str, labels: Iterable[str]) -> dict:
    """``main`` against each other label on the items of every seed pooled (stats.paired_difference)."""
    return {label: c for label in labels if label != main and (c := paired_difference(items, main, label))}


def compare_runs(run_dirs: Iterable[str | Path], out_dir: str | Path) -> Path:
    """Write comparison.md, comparison.csv and comparison.png for several seeds of one recipe."""
    folders = [Path(d) for d in run_dirs]
    if len(folders) < 2:
        raise MetaspoError(f"comparing seeds needs at least two run folders, got {len(folders)}")
    results = []
    for folder in folders:
        path = folder / "result.json"
        if not path.exists():
            raise MetaspoError(
                f"{path} does not exist", hint="finish (resume) that run first, or leave it out"
            )
        results.append(validate_result(read_json(path), source=str(path)))
    recipes = sorted({r["recipe"] for r in results})
    if len(recipes) > 1:
        raise MetaspoError(
            f"the runs were made by different recipes ({', '.join(recipes)})",
            hint="compare seeds of one recipe at a time",
        )
    seeds = [r["seed"] for r in results]
    repeated = sorted({s for s in seeds if seeds.count(s) > 1})
    if repeated:
        raise MetaspoError(
            f"seed {repeated[0]} appears in more than one run folder",
            hint="each run should use a different seed; leave out the repeats",
        )

    summary = summarize_seeds(results)
    items = [row for folder in folders for row in RunDir(folder).read_items()]
    summary["paired"] = pooled_comparisons(items, summary["main_label"], summary["overall"])
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _write_csv(
        out / "comparison.csv",
        ["task", "label", "mean", "sd", "n_seeds"],
        [["overall", label, s["mean"], s["sd"], s["n"]] for label, s in summary["overall"].items()]
        + [
            [task, label, s["mean"], s["sd"], s["n"]]
            for task, by_label in summary["tasks"].items()
            for label, s in by_label.items()
        ],
    )
    _plot_comparison(summary, out / "comparison.png")

    report = out / "comparison.md"
    write_text_atomic(report, _comparison_markdown(summary, folders, out))
    return report


def _comparison_markdown(summary: dict, folders: list[Path], out: Path) -> str:
    labels = list(summary["overall"])

    def cells(by_label: dict) -> list[str]:
        return _bold_best(
            {
                label: (s["mean"], _mean_sd(s["mean"], s["sd"], f"{s['n']} seeds"))
                for label, s in by_label.items()
            },
            labels,
        )

    lines = [
        f"# Seed comparison: {summary['recipe']}",
        "",
        f"{len(folders)} runs, seeds {', '.join(map(str, summary['seeds']))}: "
        + ", ".join(f"[{f}]({_relative_link(f / 'report.md', out)})" for f in folders)
        + ".",
        "",
        "Scores are mean ± sample sd across seeds of each run's score (a run's task score is itself a mean "
        "over user prompts). The best system prompt of each row is in bold.",
        "",
        *_markdown_table(
            ["task", *labels],
            [["**overall**", *cells(summary["overall"])]]
            + [[task, *cells(by_label)] for task, by_label in summary["tasks"].items()],
        ),
        "",
        "![Seed comparison](comparison.png)",
        "",
        "Data: [comparison.csv](comparison.csv).",
        "",
        *_pooled_section(summary),
        "## MetaSPO's margin against seed-to-seed noise",
        "",
    ]
    if summary["margins"]:
        lines += [
            "Margin = MetaSPO's overall score minus the baseline's, paired by seed. It counts as beyond seed "
            "noise when the mean margin exceeds the sd of MetaSPO's overall score across seeds.",
            "",
            *_markdown_table(
                ["baseline", "margin (mean ± sd)", "MetaSPO seed sd", "beyond seed noise"],
                [
                    [
                        baseline,
                        _mean_sd(m["mean"], m["sd"], f"{m['n']} seeds"),
                        f"{m['metaspo_seed_sd']:.3f}",
                        "yes" if m["beyond_seed_noise"] else "no",
                    ]
                    for baseline, m in summary["margins"].items()
                ],
            ),
        ]
    else:
        lines.append(
            "The runs do not score both MetaSPO and a default or CoT baseline, so there is no margin."
        )
    return "\n".join(lines) + "\n"


def _pooled_section(summary: dict) -> list[str]:
    main, paired = summary["main_label"], summary["paired"]
    if not paired:
        return ["The run folders hold no items.csv, so there are no paired differences.", ""]
    tasks = list(summary["tasks"])
    lines = ["## Paired differences on the pooled items of every seed", ""]
    if DEFAULT_LABEL in paired:
        lines += [f"**{describe(paired[DEFAULT_LABEL], main, DEFAULT_LABEL)}**", ""]
    return lines + [
        f"`{main}`'s score minus each other system prompt's on the same (seed, task, user prompt, question) "
        "items, pooled over the seeds, with a 95% bootstrap interval over questions (seeded). An interval "
        "that contains 0 is no difference.",
        "",
        *_markdown_table(
            ["compared with", *tasks, "overall", "verdict"],
            [[label, *(_interval(c["tasks"].get(task)) for task in tasks), _interval(c["overall"]),
              c["overall"]["verdict"]] for label, c in paired.items()],
        ),
        "",
    ]


def _plot_comparison(summary: dict, path: Path) -> None:
    labels = list(summary["overall"])
    colors = _label_colors(labels)
    fig = Figure(figsize=(max(5.0, 0.9 * len(labels)), 4.0))
    ax = fig.subplots()
    ax.bar(
        range(len(labels)),
        [summary["overall"][label]["mean"] for label in labels],
        yerr=[summary["overall"][label]["sd"] for label in labels],
        capsize=3,
        color=[colors[label] for label in labels],
    )
    ax.set_xticks(range(len(labels)), labels, rotation=20, ha="right")
    ax.set_ylabel("overall test score (mean ± sd over seeds)")
    ax.set_title(f"{summary['recipe']}: {len(summary['seeds'])} seeds")
    _save_png(fig, path)


# ---- formatting helpers ---------------------------------------------------------------------------


def _all_labels(result: dict) -> Iterable[str]:
    yield from result["system_prompts"]
    yield from result["overall"]
    for by_label in (*result["scores"].values(), *result["adaptation"].values()):
        yield from by_label


def _in_order(by_label: dict, labels: list[str]) -> list[tuple[str, Any]]:
    return [(label, by_label[label]) for label in labels if label in by_label]


def _bold_best(cells: dict[str, tuple[float, str]], columns: list[str]) -> list[str]:
    """Each column's text for one table row (a dash where the label is missing), the highest in bold."""
    values = [cells[label][0] for label in columns if label in cells and not math.isnan(cells[label][0])]
    best = max(values, default=None)
    texts = []
    for label in columns:
        if label not in cells:
            texts.append("–")
        else:
            value, text = cells[label]
            texts.append(f"**{text}**" if value == best else text)
    return texts


def _mean_sd(mean: float, sd: float, count: str) -> str:
    return f"{mean:.3f} ± {sd:.3f} ({count})"


def _markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    def line(cells: list[str]) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    return [line(header), "|" + "---|" * len(header), *(line(row) for row in rows)]


def _fenced(text: str) -> list[str]:
    # A fence longer than any backtick run inside the text, so a prompt with ``` cannot break it.
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return [f"{fence}text", text, fence]


def _relative_link(target: Path, start: Path) -> str:
    # Relative, so the links keep working when the folders are copied or published together.
    return Path(os.path.relpath(target.resolve(), start.resolve())).as_posix()


def _write_csv(path: Path, header: list[str], rows: list[list[Any]]) -> None:
    with atomic_file(path) as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)


def _duration(seconds: float) -> str:
    whole = int(round(seconds))
    return f"{whole // 3600}:{whole % 3600 // 60:02d}:{whole % 60:02d}"


def _count(value: float) -> str:
    return f"{value:,}" if isinstance(value, int) else f"{value:,.1f}"
