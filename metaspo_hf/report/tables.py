"""The report's CSV tables: scores.csv, adaptation.csv and meta_train.csv, rebuilt from result.json."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from ..files import atomic_file
from ..results import META_TRAIN_KEYS, STEP_CALL_COUNTS
from ..runs import RunDir
from .formatting import in_order


def write_csv(path: Path, header: list[str], rows: list[list[Any]]) -> None:
    with atomic_file(path) as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)


def write_tables(run: RunDir, result: dict, labels: list[str]) -> None:
    """scores.csv (with the paired differences), adaptation.csv and meta_train.csv of ``run``."""
    comparisons = result.get("comparisons", {})

    def paired(label: str, task: str | None) -> list:
        """The run's prompt minus ``label`` on the same items, with its interval (blank where none)."""
        c = comparisons.get(label)
        c = c and (c["overall"] if task is None else c["tasks"].get(task))
        return [c["mean"], c["low"], c["high"], c["verdict"]] if c else ["", "", "", ""]

    write_csv(
        run.file(RunDir.SCORES_CSV),
        ["task", "label", "mean", "sd", "n", "paired_difference", "ci_low", "ci_high", "verdict"],
        [
            [task, label, s["mean"], s["sd"], s["n"], *paired(label, task)]
            for task, by_label in result["scores"].items()
            for label, s in in_order(by_label, labels)
        ]
        + [["overall", label, mean, "", "", *paired(label, None)]
           for label, mean in in_order(result["overall"], labels)],
    )
    write_csv(
        run.file(RunDir.ADAPTATION_CSV),
        ["task", "label", "iteration", "score"],
        [
            [task, label, i, score]
            for task, by_label in result["adaptation"].items()
            for label, curve in in_order(by_label, labels)
            for i, score in enumerate(curve)
        ],
    )
    write_csv(
        run.file(RunDir.META_TRAIN_CSV),
        ["method", *META_TRAIN_KEYS, *STEP_CALL_COUNTS],
        [
            [method, *(s[key] for key in META_TRAIN_KEYS), *(s.get(key, "") for key in STEP_CALL_COUNTS)]
            for method, history in result["meta_train"].items()
            for s in history
        ],
    )
