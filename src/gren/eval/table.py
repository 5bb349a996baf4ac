"""Comparison tables laid out like the GREN paper's Table I, from per-fold eval.json results.

Rows are methods, columns the 8 box classes and their mean, one block of rows per IoU threshold T;
each cell is ``mean ± std`` over folds (sample std, ``ddof=1``; ``±`` omitted with one fold). A fold in
which a class has no test boxes (``null`` accuracy) is left out of that cell; a cell with no fold is
``-``. The ``Mean`` column is the mean over folds of each fold's class-mean. An AUC block follows:
per method the AUC of each of the 14 labels and their mean.

``table.csv`` has one row per (block, T, method) with, for each column ``c``, ``c`` (the mean over
folds), ``c_std`` and ``c_n`` (number of folds behind the cell).
"""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping, Sequence

import numpy as np

from gren.core.labels import BOX_CLASSES, LABELS
from gren.metrics import IOU_THRESHOLDS, threshold_key

Results = Mapping[str, Sequence[dict]]
"""``{method: [eval.json dict of each fold]}``."""

BLOCK_TITLES = {
    "accuracy": "Localization accuracy (IoU >= T)",
    "iobb": "IoBB accuracy (intersection / box area >= T)",
    "auc": "Classification AUC",
}


def summarize(values: Sequence[float | None]) -> tuple[float | None, float | None, int]:
    """``(mean, std, n)`` over the non-null values (``std`` sample std, ``None`` with fewer than two)."""
    present = np.array([v for v in values if v is not None], dtype=np.float64)
    if present.size == 0:
        return None, None, 0
    std = float(present.std(ddof=1)) if present.size > 1 else None
    return float(present.mean()), std, int(present.size)


def format_cell(mean: float | None, std: float | None, digits: int = 2) -> str:
    if mean is None:
        return "-"
    return f"{mean:.{digits}f}" if std is None else f"{mean:.{digits}f} ± {std:.{digits}f}"


def table_rows(results: Results, thresholds: Sequence[float] = IOU_THRESHOLDS) -> list[dict]:
    """One dict per (block, T, method): ``block``, ``T`` ("" for AUC), ``method``, ``n_folds`` and for
    each column ``c`` the triple ``c``, ``c_std``, ``c_n``."""
    rows = []
    for block in ("accuracy", "iobb"):
        for t in thresholds:
            key = threshold_key(t)
            for method, folds in results.items():
                row = {"block": block, "T": key, "method": method, "n_folds": len(folds)}
                for column in [*BOX_CLASSES, "mean"]:
                    values = [fold.get(block, {}).get(column, {}).get(key) for fold in folds]
                    row[column], row[f"{column}_std"], row[f"{column}_n"] = summarize(values)
                rows.append(row)
    for method, folds in results.items():
        row = {"block": "auc", "T": "", "method": method, "n_folds": len(folds)}
        for column in [*LABELS, "mean"]:
            values = [fold.get("auc", {}).get(column) for fold in folds]
            row[column], row[f"{column}_std"], row[f"{column}_n"] = summarize(values)
        rows.append(row)
    return rows


def _best(rows: list[dict], column: str) -> float | None:
    """The largest value of ``column`` in ``rows``; None when missing everywhere or when all rows tie."""
    values = [r[column] for r in rows if r.get(column) is not None]
    if not values or (len(values) == len(rows) and min(values) == max(values)):
        return None
    return max(values)


def markdown_table(results: Results, title: str = "Cross-validation", thresholds: Sequence[float] = IOU_THRESHOLDS,
                   digits: int = 2) -> str:
    """The markdown tables (accuracy, IoBB, AUC); the best mean of each column within a block is bold
    (nothing is bold in a column where every method ties)."""
    rows = table_rows(results, thresholds)
    n_folds = sorted({len(f) for f in results.values()})
    lines = [f"# {title}", "",
             f"Mean ± std over folds ({', '.join(map(str, n_folds)) or 0} per method); "
             "`-`: no test box of that class in any fold.", ""]
    loc_header = "| T(IoU) | Model | " + " | ".join(BOX_CLASSES) + " | Mean |"
    loc_rule = "| --- " * (len(BOX_CLASSES) + 3) + "|"
    for block in ("accuracy", "iobb"):
        lines += [f"## {BLOCK_TITLES[block]}", "", loc_header, loc_rule]
        for t in thresholds:
            key = threshold_key(t)
            group = [r for r in rows if r["block"] == block and r["T"] == key]
            for row in group:
                cells = []
                for column in [*BOX_CLASSES, "mean"]:
                    text = format_cell(row[column], row[f"{column}_std"], digits)
                    if len(group) > 1 and row[column] is not None and row[column] == _best(group, column):
                        text = f"**{text}**"
                    cells.append(text)
                lines.append(f"| {key} | {row['method']} | " + " | ".join(cells) + " |")
        lines.append("")
    group = [r for r in rows if r["block"] == "auc"]
    lines += [f"## {BLOCK_TITLES['auc']}", "", "| Model | " + " | ".join(LABELS) + " | Mean |",
              "| --- " * (len(LABELS) + 2) + "|"]
    for row in group:
        cells = []
        for column in [*LABELS, "mean"]:
            text = format_cell(row[column], row[f"{column}_std"], digits)
            if len(group) > 1 and row[column] is not None and row[column] == _best(group, column):
                text = f"**{text}**"
            cells.append(text)
        lines.append(f"| {row['method']} | " + " | ".join(cells) + " |")
    lines.append("")
    return "\n".join(lines)


def csv_table(results: Results, thresholds: Sequence[float] = IOU_THRESHOLDS) -> str:
    """``table.csv`` text: one row per (block, T, method), numbers unrounded, empty for null."""
    rows = table_rows(results, thresholds)
    columns = ["block", "T", "method", "n_folds"]
    for column in [*LABELS, "mean"]:
        columns += [column, f"{column}_std", f"{column}_n"]
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=columns, extrasaction="ignore", restval="", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if v is None else v) for k, v in row.items()})
    return out.getvalue()
