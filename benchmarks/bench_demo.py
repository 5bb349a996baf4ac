"""`gren demo` end to end: wall time of each step and the baseline-vs-GREN result of the default setting.

    python benchmarks/bench_demo.py [--out DIR] [--quick] [--n N]

Runs the demo from scratch in a fresh folder (a temporary one unless --out is given; an existing
--out is refused so that nothing is skipped) and writes benchmarks/results/demo.json and demo.md.
The target is the whole default demo in under 10 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import tempfile
import time
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import torch

from gren.core.labels import BOX_CLASSES
from gren.eval.demo import DemoSettings, run_demo

RESULTS = Path(__file__).resolve().parent / "results"
log = logging.getLogger("bench_demo")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="demo folder (must not exist); default: a temporary folder, removed after")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--n", type=int)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    settings = DemoSettings.quick(args.n) if args.quick else DemoSettings()
    if args.n and not args.quick:
        settings = replace(settings, n=args.n)
    if args.out and Path(args.out).exists():
        parser.error(f"--out {args.out} exists; the benchmark times a run from scratch")
    folder = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="gren-demo-bench-"))
    try:
        start = time.perf_counter()
        summary = run_demo(folder, settings, progress=False)
        total = time.perf_counter() - start
        table = Path(summary["table_md"]).read_text()
    finally:
        if not args.out:
            shutil.rmtree(folder, ignore_errors=True)

    results = summary["results"]
    payload = {
        "name": "demo",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None},
        "settings": summary["settings"],
        "seconds_total": round(total, 1),
        "seconds": summary["seconds"],
        "mean_accuracy": {m: r["accuracy"]["mean"] for m, r in results.items()},
        "mean_iobb": {m: r["iobb"]["mean"] for m, r in results.items()},
        "mean_auc": {m: r["auc"]["mean"] for m, r in results.items()},
        "n_test_boxes": {m: sum(r["n_boxes"].values()) for m, r in results.items()},
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "demo.json").write_text(json.dumps(payload, indent=2) + "\n")
    s = payload["settings"]
    lines = [
        f"`gren demo{' --quick' if args.quick else ''}` from scratch: {s['n']} synthetic images rendered at "
        f"{s['synth_size']} px, cached at {s['size']} px, ResNet-18 (output stride 16, random init), "
        f"{s['epochs']} epochs of at most {s['max_steps_per_epoch']} batches of {s['batch_size']}, baseline and GREN "
        f"on fold 0 of protocol {s['protocol']}; {payload['machine']['cpus']} CPUs, "
        f"1-min load average {payload['machine']['load_average_1min']} at the end (shared machine).",
        "",
        "| step | seconds |",
        "| --- | --- |",
        *[f"| {k} | {v:.0f} |" for k, v in payload["seconds"].items()],
        f"| **total** | **{total:.0f}** |",
        "",
        f"Test boxes: {next(iter(payload['n_test_boxes'].values()), 0)} "
        f"({', '.join(c for c in BOX_CLASSES)}); mean localization accuracy over the classes with test boxes:",
        "",
        "| method | T=0.1 | T=0.3 | T=0.5 | T=0.7 | mean AUC |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for method, acc in payload["mean_accuracy"].items():
        cells = " | ".join("-" if acc[t] is None else f"{acc[t]:.2f}" for t in ("0.1", "0.3", "0.5", "0.7"))
        auc = payload["mean_auc"][method]
        lines.append(f"| {method} | {cells} | {'-' if auc is None else f'{auc:.3f}'} |")
    lines += ["", "<details><summary>full ablation table</summary>", "", table, "</details>", ""]
    (RESULTS / "demo.md").write_text("\n".join(lines))
    log.info("demo took %.0f s; wrote %s", total, RESULTS / "demo.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
