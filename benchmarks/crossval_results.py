"""Shared by the experiment scripts: write a ``gren crossval`` outcome to benchmarks/results/<name>.json|md."""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
from datetime import datetime, timezone
from pathlib import Path

import torch
from scipy.stats import t as student_t

from gren.eval.crossval import TABLE_MD, run_crossval
from gren.eval.report import read_metrics
from gren.eval.table import markdown_table

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> str:
    """One line: architecture, CPU cores, torch version and the GPU (if any)."""
    gpu = f"CUDA {torch.cuda.get_device_name()}" if torch.cuda.is_available() else "no GPU"
    return f"{platform.machine()} {os.cpu_count()} CPU cores, torch {torch.__version__}, {gpu}"


SELECTION_T = ("0.1", "0.3", "0.5")


def selection_score(result: dict) -> float:
    """One run's score: mean localization accuracy over the 8 box classes, averaged over T = 0.1, 0.3, 0.5."""
    mean = result["accuracy"]["mean"]
    return sum(mean[t] for t in SELECTION_T) / len(SELECTION_T)


def training_minutes(run_dir: Path) -> float | None:
    """Minutes of training (sum of the epochs' ``time_s`` in ``run_dir/metrics.jsonl``), or None."""
    epochs = read_metrics(run_dir)
    return sum(line["time_s"] for line in epochs) / 60.0 if epochs else None


def paired_difference(scores: dict[int, float], base: dict[int, float]) -> tuple[float, float, float, int]:
    """Mean of the per-fold differences ``scores[f] - base[f]`` over the folds both have, with its 95 %
    Student-t interval (n - 1 degrees of freedom): (mean, low, high, n). The interval is (nan, nan) below 2 folds."""
    shared = sorted(f for f in scores if f in base)
    diffs = [scores[f] - base[f] for f in shared]
    if not diffs:
        return math.nan, math.nan, math.nan, 0
    mean = statistics.fmean(diffs)
    if len(diffs) < 2:
        return mean, math.nan, math.nan, len(diffs)
    half = float(student_t.ppf(0.975, len(diffs) - 1)) * statistics.stdev(diffs) / math.sqrt(len(diffs))
    return mean, mean - half, mean + half, len(diffs)


def folds_above(scores: dict[int, float], base: dict[int, float]) -> str:
    """"k of n": on how many of the folds both have ``scores`` is above ``base`` (paired)."""
    shared = [f for f in scores if f in base]
    return f"{sum(scores[f] > base[f] for f in shared)} of {len(shared)}"


def format_paired(mean: float, low: float, high: float) -> str:
    """``+0.012 [-0.004, +0.028]``; the mean alone when there is no interval (one shared fold)."""
    return f"{mean:+.3f}" if math.isnan(low) else f"{mean:+.3f} [{low:+.3f}, {high:+.3f}]"


def score_table(results: dict) -> list[str]:
    """Markdown lines: per method, the :func:`selection_score` of each fold, their mean, and (when a
    ``baseline`` row exists) on how many shared folds the method scored above the baseline and the
    :func:`paired_difference` to it with its 95 % interval."""
    scores = {method: {r["fold"]: selection_score(r) for r in folds} for method, folds in results.items() if folds}
    base = scores.get("baseline")
    lines = ["Score per fold (mean localization accuracy over T = 0.1, 0.3, 0.5; the selection score of",
             "exp_gren_selection.py); \"above\": folds on which the method scored above the baseline (paired);",
             "\"paired difference\": mean over folds of (method - baseline) with its 95 % t-interval. A difference",
             "counts as resolved only when that interval excludes 0.", "",
             "| method | per fold | mean | above | paired difference [95 % CI] |", "| --- | --- | --- | --- | --- |"]
    for method, by_fold in scores.items():
        values = [by_fold[f] for f in sorted(by_fold)]
        above = paired = "-"
        if base is not None and method != "baseline":
            above = folds_above(by_fold, base)
            paired = format_paired(*paired_difference(by_fold, base)[:3])
        lines.append(f"| {method} | {' / '.join(f'{x:.3f}' for x in values)} | {sum(values) / len(values):.3f} "
                     f"| {above} | {paired} |")
    return lines


def write_crossval_results(name: str, title: str, intro: list[str], crossval_dir: Path, summary: dict,
                           settings: dict, seconds: float) -> Path:
    """``results/<name>.json`` (settings, per-fold eval results) and ``results/<name>.md`` (``title``, the
    ``intro`` lines, the per-fold score table, then ``crossval_dir``'s table.md with its headings nested
    under the title)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    payload = {
        "name": name,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "settings": settings,
        "seconds_this_call": round(seconds, 1),
        "trained_this_call": summary["trained"],
        "results": summary["results"],
    }
    (RESULTS / f"{name}.json").write_text(json.dumps(payload, indent=1, default=str) + "\n")
    table = (Path(crossval_dir) / TABLE_MD).read_text()
    md = [f"## {title}", "", *intro, "", *score_table(summary["results"]), "",
          *(("##" + line) if line.startswith("#") else line for line in table.splitlines())]
    path = RESULTS / f"{name}.md"
    path.write_text("\n".join(md) + "\n")
    return path


def adopted_variant() -> tuple[str, str, list[str]] | None:
    """(variant name, method, overrides) adopted by exp_gren_selection.py (chosen on synthetic seed 7), or None."""
    path = RESULTS / "gren_selection.json"
    if not path.is_file():
        return None
    selection = json.loads(path.read_text())
    if not selection.get("adopted"):
        return None
    row = next(r for r in selection["rows"] if r["variant"] == selection["best"])
    return selection["best"], row["method"], list(row["overrides"])


def add_selected_variant(summary: dict, data: Path, out: Path, *, protocol: str, folds: int,
                         config_file: str | None, overrides: list[str], only_folds, title: str,
                         variant: tuple[str, str, list[str]] | None = None, label: str | None = None,
                         subdir: str = "crossval-selected") -> tuple[dict, Path]:
    """Train a GREN variant on the same folds into ``out/<subdir>`` and return the summary with its
    results added as one more row, and the folder holding the combined table.md
    (``out/crossval-with-selected``).

    ``variant`` is (name, method, overrides); default the one adopted by exp_gren_selection.py, labelled
    "(selected on seed 7)". Without a variant, returns ``summary`` unchanged and ``None``.
    """
    selected = variant or adopted_variant()
    if selected is None:
        return summary, None
    name, method, extra = selected
    label = label or f"{name} (selected on seed 7)"
    extra_summary = run_crossval(data, [method], out / subdir, protocol=protocol, folds=folds,
                                 config_file=config_file, overrides=[*overrides, *extra], only_folds=only_folds,
                                 batch_size=32, progress=False)
    combined = {"trained": summary["trained"] + [(label, f) for _, f in extra_summary["trained"]],
                "results": {**summary["results"], label: extra_summary["results"][method]}}
    table_dir = out / "crossval-with-selected"
    table_dir.mkdir(parents=True, exist_ok=True)
    (table_dir / TABLE_MD).write_text(markdown_table(combined["results"], title=title))
    return combined, table_dir
