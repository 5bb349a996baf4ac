"""Lung segmentation benchmark on the real films in ../shared/data/lungs (90 images + 0/1/2 masks).

* classical: Dice (each lung, mean) on all films and segmentation speed (images/s, one process,
  images already decoded, 512 px);
* unet: K-fold cross-validation (default 5: train on 72, test on 18, each film tested once, never
  trained and tested on the same film), Dice per fold and over all films.

Writes benchmarks/results/lungs.json and lungs.md (a part not run keeps its previous figures).

    nice -n 10 python benchmarks/bench_lungs.py                # both parts
    nice -n 10 python benchmarks/bench_lungs.py --parts classical
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

from gren.core.paths import shared_data_dir
from gren.lungs.classical import ClassicalSegmenter, outline_from_masks
from gren.lungs.dice import lung_dice, summarize_dice
from gren.lungs.folder import find_samples, load_pairs
from gren.lungs.tools import fold_split
from gren.lungs.unet import UNetSegmenter, train_unet

log = logging.getLogger("bench_lungs")
RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> str:
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, " \
           f"{torch.get_num_threads()} torch threads"


def per_film(stems: list[str], scores: np.ndarray, fallback: np.ndarray) -> list[dict]:
    return [{"stem": s, "right_lung": round(float(d[0]), 4), "left_lung": round(float(d[1]), 4),
             "mean": round(float(d.mean()), 4), "fallback": bool(f)} for s, d, f in zip(stems, scores, fallback)]


def rounded(summary: dict) -> dict:
    return {k: round(v, 4) for k, v in summary.items()}


def bench_classical(stems, images, masks) -> dict:
    segmenter = ClassicalSegmenter()
    batch = np.stack(images)
    segmenter.segment(batch[:2])  # warm-up
    started = time.process_time()  # this process's CPU time: one core's rate, unaffected by other jobs
    predicted, fallback = segmenter.segment(batch)
    seconds = time.process_time() - started
    scores = lung_dice(predicted, np.stack(masks))
    result = {"n_images": len(stems), **rounded(summarize_dice(scores)), "fallback": int(fallback.sum()),
              "images_per_s": round(len(stems) / seconds, 1), "image_size": list(batch.shape[1:]),
              "films": per_film(stems, scores, fallback)}
    log.info("classical: mean Dice %.4f, %.1f images/s", result["mean"], result["images_per_s"])
    return result


def _mean_dice(settings: dict, outline, images: np.ndarray, masks: np.ndarray) -> float:
    predicted, _ = ClassicalSegmenter(outline=outline, **settings).segment(images)
    return float(lung_dice(predicted, masks).mean())


# The refinement settings searched per fold (the shipped defaults are the grid's pick on all 90 films).
REFINE_GRID = [{"refine_level": level, "refine_weight": weight, "grow": grow}
               for level in (0.5, 0.7, 0.8) for weight in (4.0, 8.0) for grow in (0.0, 0.008, 0.016, 0.024)]


def bench_classical_out_of_fold(stems, images, masks, folds: int, seed: int) -> dict:
    """Classical Dice with nothing chosen on the test films: per fold, the lung outline is rebuilt from
    the training folds' masks and the refinement settings (:data:`REFINE_GRID`) are those with the best
    mean Dice on the training films. How much the shipped outline and defaults flatter the figure."""
    all_scores = np.zeros((len(stems), 2))
    picks = []
    for fold in range(folds):
        train_ids, test_ids = fold_split(stems, folds, fold, seed)
        train_idx = [stems.index(s) for s in train_ids]
        test_idx = [stems.index(s) for s in test_ids]
        outline = outline_from_masks([masks[i] for i in train_idx])
        train_images, train_masks = np.stack([images[i] for i in train_idx]), np.stack([masks[i] for i in train_idx])

        best = max(REFINE_GRID, key=lambda settings: _mean_dice(settings, outline, train_images, train_masks))
        picks.append(best)
        predicted, _ = ClassicalSegmenter(outline=outline, **best).segment(np.stack([images[i] for i in test_idx]))
        all_scores[test_idx] = lung_dice(predicted, np.stack([masks[i] for i in test_idx]))
        log.info("classical fold %d: settings %s, test Dice %.4f", fold, best, all_scores[test_idx].mean())
    result = {"folds": folds, **rounded(summarize_dice(all_scores)), "settings_per_fold": picks}
    log.info("classical, outline and settings from the other folds: mean Dice %.4f", result["mean"])
    return result


def bench_unet(stems, images, masks, folds: int, size: int, epochs: int, base_width: int, seed: int) -> dict:
    all_scores = np.zeros((len(stems), 2))
    all_fallback = np.zeros(len(stems), bool)
    fold_rows = []
    started = time.perf_counter()
    for fold in range(folds):
        train_ids, test_ids = fold_split(stems, folds, fold, seed)
        train_idx = [stems.index(s) for s in train_ids]
        test_idx = [stems.index(s) for s in test_ids]
        assert not set(train_idx) & set(test_idx)
        fold_started = time.perf_counter()
        model, config = train_unet([images[i] for i in train_idx], [masks[i] for i in train_idx], size=size,
                                   epochs=epochs, base_width=base_width, seed=seed + fold, progress=False)
        segmenter = UNetSegmenter(model, config)
        predicted, fallback = segmenter.segment(np.stack([images[i] for i in test_idx]))
        scores = lung_dice(predicted, np.stack([masks[i] for i in test_idx]))
        all_scores[test_idx] = scores
        all_fallback[test_idx] = fallback
        row = {"fold": fold, "train": len(train_idx), "test": len(test_idx), **rounded(summarize_dice(scores)),
               "fallback": int(fallback.sum()), "final_loss": round(config["loss_history"][-1], 4),
               "seconds": round(time.perf_counter() - fold_started, 1)}
        fold_rows.append(row)
        log.info("U-Net fold %d: %s", fold, row)
    return {"folds": folds, "size": size, "epochs": epochs, "base_width": base_width, "seed": seed,
            "n_images": len(stems), **rounded(summarize_dice(all_scores)), "fallback": int(all_fallback.sum()),
            "fold_mean_std": round(float(np.std([r["mean"] for r in fold_rows])), 4),
            "seconds": round(time.perf_counter() - started, 1), "per_fold": fold_rows,
            "films": per_film(stems, all_scores, all_fallback)}


def write_markdown(result: dict, path: Path) -> None:
    lines = ["# Lung segmentation benchmark", "",
             f"Data: {result.get('data')} ({result.get('n_images')} real films, 512 x 512).  ",
             f"Machine: {result.get('machine')}.  Date: {result.get('date')}.", ""]
    lines += ["| method | images | right lung (1) | left lung (2) | mean Dice | fallbacks | notes |",
              "| --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    c = result.get("classical")
    if c:
        lines.append(f"| classical | {c['n_images']} | {c['right_lung']:.4f} | {c['left_lung']:.4f} | {c['mean']:.4f} "
                     f"| {c['fallback']} | {c['images_per_s']} images/s at 512 px (CPU time of one process) |")
    o = result.get("classical_out_of_fold")
    if o:
        lines.append(f"| classical, outline and settings from other folds | {result.get('n_images')} "
                     f"| {o['right_lung']:.4f} | {o['left_lung']:.4f} | {o['mean']:.4f} | | per fold: template "
                     f"rebuilt and refinement settings chosen on the training films only |")
    u = result.get("unet")
    if u:
        lines.append(f"| U-Net {u['folds']}-fold CV | {u['n_images']} | {u['right_lung']:.4f} | {u['left_lung']:.4f} "
                     f"| {u['mean']:.4f} | {u['fallback']} | {u['size']} px, {u['epochs']} epochs, width "
                     f"{u['base_width']}, {u['seconds'] / 60:.1f} min in all |")
        lines += ["", "U-Net per fold (test films never seen in training):", "",
                  "| fold | train | test | right lung | left lung | mean | fallbacks | final loss | seconds |",
                  "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for r in u["per_fold"]:
            lines.append(f"| {r['fold']} | {r['train']} | {r['test']} | {r['right_lung']:.4f} | {r['left_lung']:.4f} "
                         f"| {r['mean']:.4f} | {r['fallback']} | {r['final_loss']} | {r['seconds']} |")
        lines.append(f"\nStd of the fold means: {u['fold_mean_std']}.")
    if o and o.get("settings_per_fold"):
        picked = "; ".join(", ".join(f"{k} {v}" for k, v in p.items()) for p in o["settings_per_fold"])
        lines += ["", f"Classical settings chosen per fold: {picked}."]
    if c:
        worst = sorted(c["films"], key=lambda f: f["mean"])[:5]
        lines += ["", "Classical, lowest films: " + ", ".join(f"{f['stem']} {f['mean']:.3f}" for f in worst)]
    path.write_text("\n".join(lines) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(shared_data_dir() / "lungs"))
    parser.add_argument("--parts", default="classical,unet")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--base-width", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    samples = find_samples(args.data, require_masks=True)
    images, masks = load_pairs(samples)
    stems = [s.stem for s in samples]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / "lungs.json"
    result = json.loads(json_path.read_text()) if json_path.is_file() else {}
    result.update({"data": args.data, "n_images": len(stems), "machine": machine(),
                   "date": datetime.datetime.now().isoformat(timespec="seconds")})
    parts = {p.strip() for p in args.parts.split(",")}
    if "classical" in parts:
        result["classical"] = bench_classical(stems, images, masks)
        result["classical_out_of_fold"] = bench_classical_out_of_fold(stems, images, masks, args.folds, args.seed)
    if "unet" in parts:
        result["unet"] = bench_unet(stems, images, masks, args.folds, args.size, args.epochs, args.base_width,
                                    args.seed)
    json_path.write_text(json.dumps(result, indent=1) + "\n")
    write_markdown(result, out / "lungs.md")
    log.info("wrote %s and %s", json_path, out / "lungs.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
