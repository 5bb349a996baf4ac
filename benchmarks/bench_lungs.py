"""Lung segmentation benchmark on the real films in ../shared/data/lungs (90 images + 0/1/2 masks).

* classical: Dice (each lung, mean) on all films and segmentation speed (images/s, one process,
  images already decoded, 512 px);
* unet: K-fold cross-validation (default 5: train on 72, test on 18, each film tested once, never
  trained and tested on the same film), Dice per fold and over all films.
* flags: the gross-failure flags of :mod:`gren.lungs.quality`: the feature ranges measured on the true
  masks, their false alarms on the true masks (in-sample and leave-one-out: ranges from the other 89
  films), the flag rate and Dice with / without flags of the classical segmenter on the 90 films, and
  the flag rate of the classical and the shipped U-Net on NIH films (``--nih``: the 16 films
  ``gren lungs preview`` shows and ``--nih-n`` films spread evenly over the folder). Writes
  benchmarks/results/lung_flags.json and .md.

Writes benchmarks/results/lungs.json and lungs.md (a part not run keeps its previous figures).

    nice -n 10 python benchmarks/bench_lungs.py                # both parts
    nice -n 10 python benchmarks/bench_lungs.py --parts classical
    nice -n 10 python benchmarks/bench_lungs.py --parts flags
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import time
from pathlib import Path

import numpy as np
import torch

from gren.core.paths import shared_data_dir
from gren.lungs import quality
from gren.lungs.classical import ClassicalSegmenter, outline_from_masks
from gren.lungs.dice import lung_dice, summarize_dice
from gren.lungs.folder import find_samples, load_pairs, read_gray
from gren.lungs.segment import load_segmenter, segment_with_reasons
from gren.lungs.tools import fold_split, pick_evenly
from gren.lungs.unet import UNetSegmenter, train_unet
from machine_info import cpu_model, vector_flags

log = logging.getLogger("bench_lungs")
RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> str:
    """CPU model with its vector instruction-set flags (/proc/cpuinfo), cores, torch version and threads."""
    return f"{cpu_model()} [{' '.join(vector_flags())}], {os.cpu_count()} CPUs, torch {torch.__version__}, " \
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


# ---- gross-failure flags ----------------------------------------------------------------------------
def _flagged_raw(segmenter, images: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """Masks before the flags (``check`` off) and the flag each would get ('' for none; fallbacks of the
    segmenter's own checks are reported as 'own check')."""
    segmenter.check = False
    masks, fallback, _ = segment_with_reasons(segmenter, images)
    segmenter.check = True
    return masks, ["own check" if f else quality.check_mask(i, m) for i, m, f in zip(images, masks, fallback)]


def bench_flags(stems, images, masks, nih_dir: Path | None, nih_n: int) -> dict:
    measured = quality.measure_ranges(images, masks)
    features = [quality.film_features(i, m) for i, m in zip(images, masks)]
    in_sample = [s for s, f in zip(stems, features) if quality.problems(f)]
    loo = []
    for k, stem in enumerate(stems):
        rest = features[:k] + features[k + 1:]
        ranges = quality.widened({name: (min(r[name] for r in rest if np.isfinite(r[name])),
                                          max(r[name] for r in rest if np.isfinite(r[name])))
                                  for name in quality.MEASURED})
        found = quality.problems(features[k], ranges)
        if found:
            loo.append({"stem": stem, "reasons": found})
    batch, truth = np.stack(images), np.stack(masks)
    classical = ClassicalSegmenter()
    raw, reasons = _flagged_raw(classical, batch)
    checked, fallback = classical.segment(batch)
    dice_raw, dice_checked = lung_dice(raw, truth).mean(axis=1), lung_dice(checked, truth).mean(axis=1)
    flagged = [{"stem": s, "dice_before": round(float(d), 4), "dice_prior": round(float(c), 4), "reason": r}
               for s, d, c, r in zip(stems, dice_raw, dice_checked, reasons) if r.startswith(quality.FLAG_PREFIX)]
    result = {"margin": quality.MARGIN, "measured": {k: [round(a, 4), round(b, 4)] for k, (a, b) in measured.items()},
              "true_flagged_in_sample": in_sample, "true_flagged_leave_one_out": loo,
              "classical": {"n_images": len(stems), "flagged": len(flagged),
                            "dice_without_flags": round(float(dice_raw.mean()), 4),
                            "dice_with_flags": round(float(dice_checked.mean()), 4), "films": flagged}}
    log.info("flags: true masks flagged %d in-sample, %d leave-one-out; classical %d flagged, Dice %.4f -> %.4f",
             len(in_sample), len(loo), len(flagged), dice_raw.mean(), dice_checked.mean())
    if nih_dir is not None and nih_dir.is_dir():
        samples = find_samples(nih_dir)
        sets = {"preview16": pick_evenly(samples, 16), f"even{nih_n}": pick_evenly(samples, nih_n)}
        result["nih"] = {}
        for name, chosen in sets.items():
            films = np.stack([read_gray(s.image_path) for s in chosen])
            row = {"n_images": len(chosen)}
            for spec in ("classical", "unet"):
                _, found = _flagged_raw(load_segmenter(spec), films)
                row[spec] = {"flagged": sum(r.startswith(quality.FLAG_PREFIX) for r in found),
                             "own_check": sum(r == "own check" for r in found),
                             "films": {s.stem: r for s, r in zip(chosen, found) if r} if name == "preview16" else {}}
            result["nih"][name] = row
            log.info("flags on NIH %s: classical %d, unet %d flagged of %d", name, row["classical"]["flagged"],
                     row["unet"]["flagged"], len(chosen))
    return result


def write_flags_markdown(result: dict, path: Path) -> None:
    f = result["flags"]
    c = f["classical"]
    lines = ["# Gross-failure flags of lung masks (`gren.lungs.quality`)", "",
             f"Machine: {result.get('machine')}.  Date: {result.get('date')}.", "",
             f"Ranges: [min, max] over the {result['n_images']} real films' true masks, widened by "
             f"{f['margin']:.0%} of their width on each side (bounds no mask can pass left open).", "",
             "| feature | min | max |", "| --- | ---: | ---: |"]
    lines += [f"| {k} | {a:.3f} | {b:.3f} |" for k, (a, b) in f["measured"].items()]
    lines += ["", "| masks | films | flagged | notes |", "| --- | ---: | ---: | --- |",
              f"| true masks, ranges from all films | {result['n_images']} | {len(f['true_flagged_in_sample'])} "
              "| in-sample (0 by construction) |",
              f"| true masks, ranges from the other films | {result['n_images']} | "
              f"{len(f['true_flagged_leave_one_out'])} | leave-one-out: the false-alarm rate on good masks |",
              f"| classical | {c['n_images']} | {c['flagged']} | mean Dice {c['dice_without_flags']:.4f} without "
              f"flags, {c['dice_with_flags']:.4f} with (flagged films get the prior) |"]
    for name, row in f.get("nih", {}).items():
        lines.append(f"| NIH {name}, classical | {row['n_images']} | {row['classical']['flagged']} | "
                     f"+ {row['classical']['own_check']} by its own checks |")
        lines.append(f"| NIH {name}, shipped U-Net | {row['n_images']} | {row['unet']['flagged']} | "
                     f"+ {row['unet']['own_check']} by its own checks |")
    if f["true_flagged_leave_one_out"]:
        lines += ["", "Leave-one-out false alarms: " + "; ".join(
            f"{r['stem']} ({', '.join(r['reasons'])})" for r in f["true_flagged_leave_one_out"])]
    if c["films"]:
        lines += ["", "Classical films flagged (Dice of the flagged mask -> of the prior): " + "; ".join(
            f"{r['stem']} {r['dice_before']:.3f} -> {r['dice_prior']:.3f} ({r['reason'][len(quality.FLAG_PREFIX):]})"
            for r in c["films"])]
    preview = f.get("nih", {}).get("preview16")
    if preview:
        for spec in ("classical", "unet"):
            lines += ["", f"NIH preview films flagged, {spec}: " + ("; ".join(
                f"{stem} ({reason[len(quality.FLAG_PREFIX):] if reason.startswith(quality.FLAG_PREFIX) else reason})"
                for stem, reason in preview[spec]["films"].items()) or "none")]
    path.write_text("\n".join(lines) + "\n")


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
    parser.add_argument("--nih", default=str(shared_data_dir() / "nih"), help="NIH folder for the flags part")
    parser.add_argument("--nih-n", type=int, default=160, help="NIH films spread over the folder (flags part)")
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
    if "flags" in parts:
        flags = {"n_images": len(stems), "machine": machine(), "date": result["date"],
                 "flags": bench_flags(stems, images, masks, Path(args.nih), args.nih_n)}
        (out / "lung_flags.json").write_text(json.dumps(flags, indent=1) + "\n")
        write_flags_markdown(flags, out / "lung_flags.md")
        log.info("wrote %s", out / "lung_flags.md")
        if parts == {"flags"}:
            return 0
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
