"""``gren lungs evaluate``: Dice of a lung segmenter against a folder's masks."""

from __future__ import annotations

import argparse
import json

from gren.lungs.segment import SPEC_HELP

GROUP = "lungs"
NAME = "evaluate"
HELP = ("Dice of each lung and their mean over every image in DIR that has a mask, with the fallbacks "
        "and gross-failure flags")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, metavar="DIR", help="folder with images/ and masks/ (0/1/2)")
    parser.add_argument("--lungs", default="classical", metavar="SPEC", help=f"segmenter: {SPEC_HELP}")
    parser.add_argument("--json", action="store_true", help="print JSON with a row per image")
    parser.add_argument("--batch-size", type=int, default=16)


def run(args: argparse.Namespace) -> int:
    from gren.lungs.folder import find_samples
    from gren.lungs.segment import load_segmenter
    from gren.lungs.tools import evaluate_samples

    segmenter = load_segmenter(args.lungs)
    samples = find_samples(args.data, require_masks=True)
    result = evaluate_samples(segmenter, samples, args.batch_size, progress=not args.quiet)
    result = {"data": str(args.data), "lungs": args.lungs, **result}
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    print("| lungs | images | right lung (1) | left lung (2) | mean | fallbacks | of which flagged "
          "| true masks flagged |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    print(f"| {args.lungs} | {result['n_images']} | {result['right_lung']:.4f} | {result['left_lung']:.4f} "
          f"| {result['mean']:.4f} | {result['fallback']} | {result['flagged']} | {result['true_masks_flagged']} |")
    worst = sorted(result["images"], key=lambda r: r["mean"])[:5]
    if worst:
        print("\nlowest Dice: " + ", ".join(f"{r['stem']} {r['mean']:.3f}" for r in worst))
    flagged = [r for r in result["images"] if r["flagged"]]
    if flagged:
        print("flagged (gross failure, prior used): " + "; ".join(f"{r['stem']} ({r['reason'][6:]})" for r in flagged[:10]))
    return 0
