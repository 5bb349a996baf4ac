"""``gren data synth``: generate a synthetic chest X-ray dataset in the NIH layout."""

from __future__ import annotations

import argparse
import json
import logging
import sys

GROUP = "data"
NAME = "synth"
HELP = "generate a synthetic NIH-layout chest X-ray dataset (images, lung masks, labels, boxes)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="output folder (new, empty, or a previous synth output)")
    parser.add_argument("--n", type=int, required=True, help="number of images")
    parser.add_argument("--size", type=int, default=256, help="image side in pixels (default 256)")
    parser.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives identical files")
    parser.add_argument("--workers", type=int, default=1, help="processes (the output does not depend on it)")
    parser.add_argument("--preview", action="store_true", help="also write OUT/preview.png, a 4 x 4 contact sheet")
    parser.add_argument("--force", action="store_true",
                        help="overwrite the generator's files in a non-empty folder that is not a synth output")
    parser.add_argument("--json", action="store_true", help="print the summary (OUT/synth.json) to stdout")


def run(args: argparse.Namespace) -> int:
    from gren.data.synth import synthesize

    progress = logging.getLogger().getEffectiveLevel() <= logging.INFO
    summary = synthesize(args.out, args.n, size=args.size, seed=args.seed, workers=args.workers,
                         preview=args.preview, force=args.force, progress=progress)
    if args.json:
        json.dump(summary, sys.stdout, indent=2)
        sys.stdout.write("\n")
    return 0
