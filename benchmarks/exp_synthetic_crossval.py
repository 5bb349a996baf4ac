"""The GREN ablation on the synthetic default: B, B+Intra, B+Inter, GREN, B+Cosine over 5 folds.

    python benchmarks/exp_synthetic_crossval.py [--out DIR] [--n 1600] [--epochs 5] [--methods ...]

Synthesises a dataset (``gren data synth``), prepares it at the demo's CPU size, then runs
``gren crossval`` (protocol 0.5_0.8, 5 folds by patient) with the demo's training settings for every
method, and writes ``benchmarks/results/synthetic_crossval.json`` and ``.md`` (the Table I layout,
mean ± std over folds). Resumable: rerun with the same ``--out`` to continue. No setting here was
chosen by looking at test folds: the training settings are the demo's, fixed before this ran.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import time
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import torch

from gren.data.prepare import prepare_cache
from gren.data.synth import synthesize
from gren.eval.crossval import TABLE_MD, run_crossval
from gren.eval.demo import DemoSettings

RESULTS = Path(__file__).resolve().parent / "results"
ABLATION = ("baseline", "gren-intra", "gren-inter", "gren", "gren-cosine")
log = logging.getLogger("exp_synthetic_crossval")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/synthetic-crossval", help="work folder (resumable)")
    parser.add_argument("--n", type=int, default=1600, help="synthetic images")
    parser.add_argument("--epochs", type=int, default=None, help="override the demo's epochs")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--only-folds", default="", help="e.g. 0,1 (the table uses the folds that exist)")
    parser.add_argument("--methods", default=",".join(ABLATION))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    settings = replace(DemoSettings(), n=args.n, seed=args.seed)
    if args.epochs:
        settings = replace(settings, epochs=args.epochs)
    out = Path(args.out)
    data, cache = out / "data", out / "cache"
    start = time.perf_counter()
    if not (data / "synth.json").is_file():
        synthesize(data, n=settings.n, size=settings.synth_size, seed=settings.seed, workers=2)
    prepare_cache(data, cache, size=settings.size, lungs="masks", workers=2)
    only = [int(f) for f in args.only_folds.split(",") if f.strip()] or None
    summary = run_crossval(cache, args.methods, out / "crossval", protocol=settings.protocol, folds=args.folds,
                           config_file="cpu-small", overrides=settings.overrides(), only_folds=only,
                           batch_size=32, progress=False)
    seconds = time.perf_counter() - start
    table = (out / "crossval" / TABLE_MD).read_text()
    RESULTS.mkdir(parents=True, exist_ok=True)
    payload = {
        "name": "synthetic_crossval",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()} {os.cpu_count()} CPU cores, torch {torch.__version__}",
        "settings": {**vars(args), "demo": settings.__dict__},
        "seconds_this_call": round(seconds, 1),
        "results": summary["results"],
    }
    (RESULTS / "synthetic_crossval.json").write_text(json.dumps(payload, indent=1, default=str) + "\n")
    md = [
        "## Synthetic default: the GREN ablation over 5 folds",
        "",
        f"{settings.n} synthetic images (`gren data synth --seed {settings.seed}`), cached at {settings.size} px with",
        "the generator's lung masks, protocol 0.5_0.8 by patient, the demo's CPU training setting (ResNet-18,",
        f"output stride 16, random init, {settings.epochs} epochs of at most {settings.max_steps_per_epoch} batches of",
        f"{settings.batch_size}). Rerun: `python benchmarks/exp_synthetic_crossval.py`.",
        "",
        table.replace("# ", "### ", 1),
    ]
    (RESULTS / "synthetic_crossval.md").write_text("\n".join(md) + "\n")
    log.info("wrote %s", RESULTS / "synthetic_crossval.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
