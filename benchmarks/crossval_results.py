"""Shared by the experiment scripts: write a ``gren crossval`` outcome to benchmarks/results/<name>.json|md."""

from __future__ import annotations

import json
import os
import platform
from datetime import datetime, timezone
from pathlib import Path

import torch

from gren.eval.crossval import TABLE_MD

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> str:
    """One line: architecture, CPU cores, torch version and the GPU (if any)."""
    gpu = f"CUDA {torch.cuda.get_device_name()}" if torch.cuda.is_available() else "no GPU"
    return f"{platform.machine()} {os.cpu_count()} CPU cores, torch {torch.__version__}, {gpu}"


def write_crossval_results(name: str, title: str, intro: list[str], crossval_dir: Path, summary: dict,
                           settings: dict, seconds: float) -> Path:
    """``results/<name>.json`` (settings, per-fold eval results) and ``results/<name>.md`` (``title``, the
    ``intro`` lines, then ``crossval_dir``'s table.md with its headings nested under the title)."""
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
    md = [f"## {title}", "", *intro, "",
          *(("##" + line) if line.startswith("#") else line for line in table.splitlines())]
    path = RESULTS / f"{name}.md"
    path.write_text("\n".join(md) + "\n")
    return path
