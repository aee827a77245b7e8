"""The human side of a run folder: report.md, CSV tables, PNG plots and the deployable prompt.

Everything here is rebuilt from ``result.json`` alone (plus ``nodes.json`` when present), so
``metaspo report RUN_DIR`` works on any finished run, old ones included. ``compare_runs`` puts
several seeds of one recipe side by side.

One module per kind of output: ``markdown`` (report.md), ``tables`` (the CSVs), ``plots`` (the PNGs),
``exports`` (the deployable prompt files) and ``compare`` (several seeds); ``formatting`` holds the
helpers they share.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import MetaspoError
from ..evaluation.labels import ordered_labels
from ..files import write_text_atomic
from ..results import read_result
from ..runs import RunDir
from .compare import compare_runs, summarize_seeds
from .exports import method_nodes, write_exports
from .formatting import all_labels
from .markdown import report_markdown
from .plots import label_colors, write_plots
from .tables import write_tables

__all__ = ["compare_runs", "summarize_seeds", "write_report"]


def write_report(run_dir: str | Path) -> Path:
    """Rebuild report.md, the CSVs, the plots and the prompt exports of ``run_dir``; the report's path."""
    run = RunDir(run_dir)
    if not run.path.is_dir():
        raise MetaspoError(f"run folder {run.path} does not exist", hint="check the path")
    result = read_result(run.path)
    nodes = method_nodes(run.nodes_file, result["method"])
    labels = ordered_labels(all_labels(result))
    # Methods share the label colors (the `metaspo` curve matches the `metaspo` bars).
    colors = label_colors(ordered_labels([*labels, *result["meta_train"]]))

    write_tables(run, result, labels)
    plotted = write_plots(run, result, labels, colors)
    write_exports(run, result, nodes)
    write_text_atomic(run.report_file, report_markdown(result, labels, plotted))
    return run.report_file
