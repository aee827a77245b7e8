"""Several seeds of one recipe side by side: comparison.md, comparison.csv and comparison.png."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from matplotlib.figure import Figure

from ..errors import MetaspoError
from ..evaluation.labels import ordered_labels, turned_down_label
from ..files import write_text_atomic
from ..results import read_result
from ..runs import RunDir
from ..stats import describe, paired_difference, spread
from .formatting import bold_best, guard_rule_words, interval, markdown_table, mean_sd, relative_link
from .markdown import DEFAULT_LABEL
from .plots import label_colors, save_png
from .tables import write_csv

# The baselines whose gap to MetaSPO `compare_runs` weighs against seed-to-seed noise.
MARGIN_BASELINES = ("default", "cot")
# The files `compare_runs` writes into its output folder.
COMPARISON_MD, COMPARISON_CSV, COMPARISON_PLOT = "comparison.md", "comparison.csv", "comparison.png"


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
    results = [read_result(folder, hint="finish (resume) that run first, or leave it out") for folder in folders]
    recipes = sorted({r["recipe"] for r in results})
    if len(recipes) > 1:
        raise MetaspoError(
            f"the runs were made by different recipes ({', '.join(recipes)})",
            hint="compare seeds of one recipe at a time",
        )
    _check_same_tasks(folders, results)
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
    write_csv(
        out / COMPARISON_CSV,
        ["task", "label", "mean", "sd", "n_seeds"],
        [["overall", label, s["mean"], s["sd"], s["n"]] for label, s in summary["overall"].items()]
        + [
            [task, label, s["mean"], s["sd"], s["n"]]
            for task, by_label in summary["tasks"].items()
            for label, s in by_label.items()
        ],
    )
    _plot_comparison(summary, out / COMPARISON_PLOT)

    report = out / COMPARISON_MD
    write_text_atomic(report, _comparison_markdown(summary, results, folders, out))
    return report


def _check_same_tasks(folders: list[Path], results: list[dict]) -> None:
    """Pooling is only sound for seeds that scored the same unseen tasks (the recipe settings are checked
    by the caller, ``pipeline.compare``)."""
    tasks = [sorted(result["scores"]) for result in results]
    for folder, names in zip(folders[1:], tasks[1:], strict=True):
        if names != tasks[0]:
            raise MetaspoError(
                f"the runs scored different unseen tasks: {', '.join(tasks[0])} in {folders[0]}, "
                f"{', '.join(names)} in {folder}",
                hint="compare seeds of one task suite at a time",
            )


def _comparison_markdown(summary: dict, results: list[dict], folders: list[Path], out: Path) -> str:
    labels = list(summary["overall"])

    def cells(by_label: dict) -> list[str]:
        return bold_best(
            {
                label: (s["mean"], mean_sd(s["mean"], s["sd"], f"{s['n']} seeds"))
                for label, s in by_label.items()
            },
            labels,
        )

    lines = [
        f"# Seed comparison: {summary['recipe']}",
        "",
        f"{len(folders)} runs, seeds {', '.join(map(str, summary['seeds']))}: "
        + ", ".join(f"[{f}]({relative_link(RunDir(f).report_file, out)})" for f in folders)
        + ".",
        "",
        "Scores are mean ± sample sd across seeds of each run's score (a run's task score is itself a mean "
        "over user prompts). The best system prompt of each row is in bold.",
        "",
        *markdown_table(
            ["task", *labels],
            [["**overall**", *cells(summary["overall"])]]
            + [[task, *cells(by_label)] for task, by_label in summary["tasks"].items()],
        ),
        "",
        f"![Seed comparison]({COMPARISON_PLOT})",
        "",
        f"Data: [{COMPARISON_CSV}]({COMPARISON_CSV}).",
        "",
        *_pooled_section(summary),
        *_guard_section(results, summary["main_label"]),
        "## MetaSPO's margin against seed-to-seed noise",
        "",
    ]
    if summary["margins"]:
        lines += [
            "Margin = MetaSPO's overall score minus the baseline's, paired by seed. It counts as beyond seed "
            "noise when the mean margin exceeds the sd of MetaSPO's overall score across seeds.",
            "",
            *markdown_table(
                ["baseline", "margin (mean ± sd)", "MetaSPO seed sd", "beyond seed noise"],
                [
                    [
                        baseline,
                        mean_sd(m["mean"], m["sd"], f"{m['n']} seeds"),
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
        *markdown_table(
            ["compared with", *tasks, "overall", "verdict"],
            [[label, *(interval(c["tasks"].get(task)) for task in tasks), interval(c["overall"]),
              c["overall"]["verdict"]] for label, c in paired.items()],
        ),
        "",
    ]


def _guard_section(results: list[dict], main: str) -> list[str]:
    """Each seed's validation guard call, next to what the unseen tasks said of it (when the run scored it)."""
    if not any(r.get("guard", {}).get(main) for r in results):
        return []
    rows = []
    for r in results:
        guard = r.get("guard", {}).get(main)
        unseen = r.get("comparisons", {})
        against_default = interval(unseen[DEFAULT_LABEL]["overall"]) if unseen.get(DEFAULT_LABEL) else "not scored"
        if not guard:
            # Only a search that adopted something has a searched prompt for the guard to check.
            if not any(step["adopted"] for step in r.get("meta_train", {}).get(main, [])):
                rows.append([str(r["seed"]), "–", "–", "no call: nothing adopted", against_default, "–"])
            continue
        turned_down = unseen.get(turned_down_label(main))
        rows.append([str(r["seed"]), interval(guard["difference"]["overall"]), guard_rule_words(guard),
                     "kept" if guard["kept"] else "turned down", against_default,
                     interval(turned_down["overall"]) if turned_down else "not scored"])
    return [
        "## The validation guard in each seed",
        "",
        f"Held out: `{main}`'s searched prompt minus the initial one on training questions the search never saw. "
        f"Unseen: the prompt the run returned minus the default, and minus the prompt the guard turned down "
        f"(scored only with `evaluation.score_turned_down`); a positive difference against the turned-down "
        "prompt means turning it down was right.",
        "",
        *markdown_table(["seed", "held out", "needs", "decision", "unseen: returned minus default",
                         "unseen: returned minus turned down"], rows),
        "",
    ]


def _plot_comparison(summary: dict, path: Path) -> None:
    labels = list(summary["overall"])
    colors = label_colors(labels)
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
    save_png(fig, path)
