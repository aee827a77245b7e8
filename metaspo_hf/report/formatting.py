"""Shared helpers of the report's tables and text: label order, table cells, numbers, links."""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any


def all_labels(result: dict) -> Iterable[str]:
    yield from result["system_prompts"]
    yield from result["overall"]
    for by_label in (*result["scores"].values(), *result["adaptation"].values()):
        yield from by_label


def in_order(by_label: dict, labels: list[str]) -> list[tuple[str, Any]]:
    return [(label, by_label[label]) for label in labels if label in by_label]


def bold_best(cells: dict[str, tuple[float, str]], columns: list[str]) -> list[str]:
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


def mean_sd(mean: float, sd: float, count: str) -> str:
    return f"{mean:.3f} ± {sd:.3f} ({count})"


# How each search.guard_rule reads in a table; result.json written before the key existed has no "rule".
_GUARD_RULE_WORDS = {"mean": "mean", "low": "interval low end",
                     "broad": "interval low end, also with each task left out"}


def guard_rule_words(guard: dict) -> str:
    """What a validation guard's decision needed, e.g. "interval low end > +0.000"."""
    return f"{_GUARD_RULE_WORDS[guard.get('rule', 'mean')]} > {guard['margin']:+.3f}"


def interval(c: dict | None) -> str:
    return "–" if not c else f"{c['mean']:+.3f} [{c['low']:+.3f}, {c['high']:+.3f}]"


def markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    def line(cells: list[str]) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    return [line(header), "|" + "---|" * len(header), *(line(row) for row in rows)]


def fenced(text: str) -> list[str]:
    # A fence longer than any backtick run inside the text, so a prompt with ``` cannot break it.
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return [f"{fence}text", text, fence]


def relative_link(target: Path, start: Path) -> str:
    # Relative, so the links keep working when the folders are copied or published together.
    return Path(os.path.relpath(target.resolve(), start.resolve())).as_posix()
