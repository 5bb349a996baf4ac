"""Baseline vs GREN on the real NIH ChestX-ray14 sample in ../shared/data/nih (CPU configuration).

    python benchmarks/exp_nih_sample.py [--data PATH] [--out runs/nih-sample] [--folds 0,1,2,3,4]
        [--methods baseline,gren] [--lungs classical|unet:PATH] [--size 128]

Protocol for the sample: the annotated images (box images present on disk) split 80/20 by patient in
5 folds; the weakly-labelled pool is every other image (the labelled images without boxes and the
"No Finding" images), all of it used (participation ``1.0_0.8``; an unannotated image whose patient is
tested in a fold is left out of that fold). CPU configuration: ResNet-18 at output stride 16 on
``--size`` px (8 x 8 cells at 128), random init, AdamW lr 1e-3 divided by 10 for the last epoch,
``--epochs`` epochs of at most ``--steps`` batches of 8, a share ``--annotated-fraction`` of each batch
from the annotated images. Two settings are recorded: the short one (the defaults: 8 epochs, a quarter
annotated, about 10 min per fold and method on one core) and the one-hour one
(``--epochs 32 --annotated-fraction 0.5 --name nih_sample_long --out runs/nih-sample-long --no-selected``:
37 min per method on one core, so one fold of baseline and GREN in about 40 minutes on 2 cores when the
two methods run side by side with ``OMP_NUM_THREADS=1`` and ``--methods baseline`` / ``--methods gren``;
one more call without ``--methods`` then writes the table). GPU configuration (the paper's): ``--gpu``
uses the default config
(ResNet-50, 512 px, SGD, 9 epochs, batch 4) and ImageNet weights when available.

When exp_gren_selection.py adopted a GREN variant (chosen on synthetic seed 7), it is trained on the same
folds too (``OUT/crossval-selected``) and added to the table as one more row.

Writes benchmarks/results/nih_sample.json and .md (accuracy per class at each T, mean, AUC).
Settings are fixed here before any test fold is looked at; nothing is tuned on the test folds.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from pathlib import Path
from statistics import fmean

from crossval_results import add_selected_variant, adopted_variant, training_minutes, write_crossval_results
from gren.core.paths import shared_data_dir
from gren.data.prepare import prepare_cache
from gren.eval.crossval import pair_dir, parse_methods, run_crossval
from gren.eval.evaluate import EVAL_JSON

log = logging.getLogger("exp_nih_sample")


def cpu_overrides(size: int, epochs: int, steps: int, annotated_fraction: float = 0.25) -> list[str]:
    return [
        "model.backbone=resnet18", "model.output_stride=16", "model.weights=none", f"data.size={size}",
        "data.workers=0", f"data.annotated_fraction={annotated_fraction}", f"train.epochs={epochs}", "train.batch_size=8",
        f"train.max_steps_per_epoch={steps}", "optim.name=adamw", "optim.lr=0.001",
        f"optim.step_epochs={max(1, epochs - 1)}", "seed=0",
    ]


def headline(results: dict) -> str:
    """Per method: mean accuracy at T = 0.1 (all classes, Cardiomegaly) and mean AUC, averaged over folds."""
    parts = []
    for method, folds in results.items():
        if folds:
            acc = fmean(r["accuracy"]["mean"]["0.1"] for r in folds)
            cardio = [r["accuracy"]["Cardiomegaly"]["0.1"] for r in folds if r["accuracy"]["Cardiomegaly"]["0.1"] is not None]
            auc = fmean(r["auc"]["mean"] for r in folds)
            parts.append(f"{method}: accuracy at T = 0.1 {acc:.3f} (Cardiomegaly "
                         f"{fmean(cardio) if cardio else float('nan'):.2f}), AUC {auc:.3f}")
    return "; ".join(parts) or "-"


def rerun_arguments(args: argparse.Namespace, results: dict) -> str:
    """The command-line arguments that reproduce this configuration on the folds that have results."""
    folds = sorted({r["fold"] for runs in results.values() for r in runs}) or [0]
    words = [f"--folds {','.join(map(str, folds))}"]
    if args.gpu:
        return " ".join(words + ["--gpu"])
    if args.epochs != 8:
        words.append(f"--epochs {args.epochs}")
    if args.annotated_fraction != 0.25:
        words.append(f"--annotated-fraction {args.annotated_fraction:g}")
    if args.name != "nih_sample":
        words += [f"--name {args.name}", f"--out {args.out}"]
    if args.no_selected:
        words.append("--no-selected")
    return " ".join(words)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(shared_data_dir() / "nih"))
    parser.add_argument("--out", default="runs/nih-sample")
    parser.add_argument("--folds", default="0", help="folds to run now, e.g. 0 or 0,1,2,3,4")
    parser.add_argument("--methods", default="baseline,gren")
    parser.add_argument("--lungs", default="classical", help="classical | unet:PATH (see gren lungs train)")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--steps", type=int, default=120, help="batches per epoch at most")
    parser.add_argument("--annotated-fraction", type=float, default=0.25,
                        help="share of each batch drawn from the annotated (box) images")
    parser.add_argument("--name", default="nih_sample", help="results/NAME.json and .md")
    parser.add_argument("--gpu", action="store_true", help="the paper's configuration instead of the CPU one")
    parser.add_argument("--only-selected", action="store_true", help="train only the adopted GREN variant")
    parser.add_argument("--no-selected", action="store_true",
                        help="leave out the GREN variant adopted by exp_gren_selection.py (CPU configuration only)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    out = Path(args.out)
    size = 512 if args.gpu else args.size
    cache = out / f"cache{size}"
    start = time.perf_counter()
    prepare_cache(args.data, cache, size=size, lungs=args.lungs, workers=os.cpu_count())
    overrides = ["model.weights=imagenet"] if args.gpu else cpu_overrides(size, args.epochs, args.steps, args.annotated_fraction)
    folds = [int(f) for f in args.folds.split(",") if f.strip()]
    if args.only_selected:  # e.g. in a second process while the first trains --methods
        summary = {"trained": [], "results": {}}
    else:
        summary = run_crossval(cache, args.methods, out / "crossval", protocol="1.0_0.8", folds=5,
                               config_file=None if args.gpu else "cpu-small", overrides=overrides,
                               only_folds=folds, batch_size=32, progress=False)
    table_dir = out / "crossval"
    if not args.no_selected and not args.gpu:
        summary, combined_dir = add_selected_variant(
            summary, cache, out, protocol="1.0_0.8", folds=5, config_file="cpu-small", overrides=overrides,
            only_folds=folds, title="Cross-validation: protocol 1.0_0.8, 5 folds")
        table_dir = combined_dir or table_dir
    seconds = time.perf_counter() - start
    run_dirs = {m: [pair_dir(out / "crossval", m, f) for f in range(5)] for m in parse_methods(args.methods)}
    selected = adopted_variant()
    if selected is not None and not args.no_selected and not args.gpu:
        run_dirs[f"{selected[0]} (selected)"] = [pair_dir(out / "crossval-selected", selected[1], f) for f in range(5)]
    # only evaluated folds: a fold still training would pull the figure down
    minutes = {label: [m for d in dirs if (d / EVAL_JSON).is_file() and (m := training_minutes(d)) is not None]
               for label, dirs in run_dirs.items()}
    minutes_text = "; ".join(f"{label} {' / '.join(f'{m:.1f}' for m in v)} min" for label, v in minutes.items() if v) or "-"
    intro = [
        f"{args.data}: annotated images split 80/20 by patient in 5 folds, all other images as the",
        f"weakly-labelled pool (protocol 1.0_0.8); lungs {args.lungs}; "
        + ("the paper's GPU configuration." if args.gpu else
           f"CPU configuration: ResNet-18, {size} px, {args.epochs} epochs of at most {args.steps} batches of 8, "
           f"{args.annotated_fraction:g} of each batch annotated, AdamW."),
        f"Training time of each evaluated fold (sum of the epochs' wall-clock time in metrics.jsonl; longer when "
        f"the machine was shared): {minutes_text}.",
        f"Means over the folds run: {headline(summary['results'])}. Reading: docs/gren_study.md.",
        f"Rerun: `python benchmarks/exp_nih_sample.py {rerun_arguments(args, summary['results'])}`.",
    ]
    title = "Real NIH sample: baseline vs GREN" + ("" if args.name == "nih_sample" else f" ({args.name})")
    path = write_crossval_results(args.name, title, intro, table_dir, summary,
                                  {**vars(args), "overrides": overrides, "protocol": "1.0_0.8"}, seconds)
    log.info("wrote %s", path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
