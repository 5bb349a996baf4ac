"""``gren lungs evaluate``: Dice of a lung segmenter against a folder's masks."""

from __future__ import annotations

import argparse
import json
import logging

from gren.core.errors import DataError
from gren.lungs.segment import SPEC_HELP

GROUP = "lungs"
NAME = "evaluate"
HELP = ("Dice of each lung and their mean over every image in DIR that has a mask, with the fallbacks "
        "and gross-failure flags")

log = logging.getLogger(__name__)
_LOGGED_SKIPS = 10


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, metavar="DIR", help="folder with images/ and masks/ (0/1/2)")
    parser.add_argument("--lungs", default="classical", metavar="SPEC", help=f"segmenter: {SPEC_HELP}")
    parser.add_argument("--json", action="store_true", help="print JSON with a row per image")
    parser.add_argument("--batch-size", type=int, default=16)


def evaluate_skipping(segmenter, samples: list, batch_size: int, progress: bool = True) -> dict:
    """:func:`gren.lungs.tools.evaluate_samples`, but an unreadable image or mask is skipped (logged,
    counted in ``n_skipped``, listed in ``skipped``: ``stem``, ``error``) instead of ending the run.

    Samples go through ``evaluate_samples`` ``batch_size`` at a time; a batch that fails is redone one
    image at a time, so only the bad image is lost. Raises :class:`DataError` when none is readable.
    """
    from gren.core.progress import progress as progress_bar
    from gren.lungs.dice import summarize_dice
    from gren.lungs.tools import evaluate_samples

    rows: list[dict] = []
    skipped: list[dict] = []
    true_flagged = 0
    step = max(1, int(batch_size))
    with progress_bar(total=len(samples), desc="lungs evaluate", unit="img", disable=not progress,
                      logger=log) as bar:
        for start in range(0, len(samples), step):
            batch = samples[start:start + step]
            try:
                part = evaluate_samples(segmenter, batch, step, progress=False)
                rows += part["images"]
                true_flagged += part["true_masks_flagged"]
            except DataError:  # ImageReadError included: find the bad ones
                for sample in batch:
                    try:
                        part = evaluate_samples(segmenter, [sample], 1, progress=False)
                        rows += part["images"]
                        true_flagged += part["true_masks_flagged"]
                    except DataError as err:
                        if len(skipped) < _LOGGED_SKIPS:
                            log.warning("skipped %s: %s", sample.stem, err)
                        skipped.append({"stem": sample.stem, "error": str(err)})
            bar.update(len(batch))
    if skipped:
        log.warning("%d of %d images skipped as unreadable (listed in --json under 'skipped')", len(skipped),
                    len(samples))
    if not rows:
        raise DataError(f"none of the {len(samples)} images with a mask could be read "
                        f"(e.g. {skipped[0]['error'] if skipped else '?'})")
    scores = [[r["right_lung"], r["left_lung"]] for r in rows]
    summary = {k: round(v, 4) for k, v in summarize_dice(scores).items()}
    return {"n_images": len(rows), **summary, "fallback": int(sum(r["fallback"] for r in rows)),
            "flagged": int(sum(r["flagged"] for r in rows)), "true_masks_flagged": int(true_flagged),
            "n_skipped": len(skipped), "skipped": skipped, "images": rows}


def run(args: argparse.Namespace) -> int:
    from gren.lungs.folder import find_samples
    from gren.lungs.segment import load_segmenter

    segmenter = load_segmenter(args.lungs)
    samples = find_samples(args.data, require_masks=True)
    result = evaluate_skipping(segmenter, samples, args.batch_size, progress=not args.quiet)
    result = {"data": str(args.data), "lungs": args.lungs, **result}
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    print("| lungs | images | right lung (1) | left lung (2) | mean | fallbacks | of which flagged "
          "| true masks flagged |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    print(f"| {args.lungs} | {result['n_images']} | {result['right_lung']:.4f} | {result['left_lung']:.4f} "
          f"| {result['mean']:.4f} | {result['fallback']} | {result['flagged']} | {result['true_masks_flagged']} |")
    if result["n_skipped"]:
        print(f"({result['n_skipped']} unreadable image(s) skipped)")
    worst = sorted(result["images"], key=lambda r: r["mean"])[:5]
    if worst:
        print("\nlowest Dice: " + ", ".join(f"{r['stem']} {r['mean']:.3f}" for r in worst))
    flagged = [r for r in result["images"] if r["flagged"]]
    if flagged:
        print("flagged (gross failure, prior used): " + "; ".join(f"{r['stem']} ({r['reason'][6:]})" for r in flagged[:10]))
    return 0
