"""The report's PNG plots and the colour each label keeps in all of them."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from ..files import atomic_file
from ..runs import RunDir
from .formatting import in_order

# Enough resolution for print and for a README; the files stay around 50-100 kB.
PLOT_DPI = 120

# The test-time adaptation plot: the narrowest y range its panels share, and each label's marker and dash.
ADAPTATION_MIN_SPAN = 0.2
ADAPTATION_MARKERS = ("o", "s", "^", "D", "v")
ADAPTATION_DASHES = ("-", "--", ":", "-.")


def plot_scores(result: dict, labels: list[str], colors: dict, path: Path) -> bool:
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
    save_png(fig, path)
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


def plot_adaptation(result: dict, labels: list[str], colors: dict, path: Path) -> bool:
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
        for rank, (label, curve) in enumerate(in_order(by_label, labels)):
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
    save_png(fig, path)
    return True


def plot_meta_train(result: dict, colors: dict, path: Path) -> bool:
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
    save_png(fig, path)
    return True


def save_png(fig: Figure, path: Path) -> None:
    with atomic_file(path, binary=True) as fh:
        fig.savefig(fh, format="png", dpi=PLOT_DPI, bbox_inches="tight")


def label_colors(labels: list[str]) -> dict[str, Any]:
    """One fixed color per label, so a label looks the same in every plot of a report."""

    palette = colormaps["tab10"].colors
    return {label: palette[i % len(palette)] for i, label in enumerate(labels)}


def write_plots(run: RunDir, result: dict, labels: list[str], colors: dict) -> dict[str, bool]:
    """The report's three plots, by section; a section without data has none (``False``)."""
    files = {"scores": RunDir.SCORES_PLOT, "adaptation": RunDir.ADAPTATION_PLOT, "meta_train": RunDir.META_TRAIN_PLOT}
    plotted = {
        "scores": plot_scores(result, labels, colors, run.file(files["scores"])),
        "adaptation": plot_adaptation(result, labels, colors, run.file(files["adaptation"])),
        "meta_train": plot_meta_train(result, colors, run.file(files["meta_train"])),
    }
    for section, drawn in plotted.items():
        if not drawn:  # a stale plot from an earlier report would contradict the data
            run.file(files[section]).unlink(missing_ok=True)
    return plotted
