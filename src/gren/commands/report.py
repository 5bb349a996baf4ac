"""``gren report``: training curves, lung-hash similarity and side-by-side localization figures."""

from __future__ import annotations

import argparse

GROUP = None
NAME = "report"
HELP = "figures for trained runs: training curves, lung-hash similarity, localization side by side"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--runs", nargs="+", required=True, metavar="RUN", help="run directories (gren train --out)")
    parser.add_argument("--out", required=True, metavar="DIR", help="folder for the PNG figures")
    parser.add_argument("--data", metavar="DIR|CACHE", help="dataset of the runs (default: from the first run's config)")
    parser.add_argument("--images", type=int, default=8, metavar="N", help="test images in the figures (8)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")


REPORT_FILES = ("training_curves.png", "hash_similarity.png", "localization.png")


def _matplotlib_png(path) -> bool:
    """A PNG figure saved by matplotlib (what gren report wrote before output manifests existed)."""
    from PIL import Image

    with Image.open(path) as image:
        return image.format == "PNG" and str(image.info.get("Software", "")).lower().startswith("matplotlib")


def run(args: argparse.Namespace) -> int:
    from gren.core.outputs import OutputFolder
    from gren.eval.report import make_report

    # before any work: refuse to replace figures (or anything) that gren report did not write, or links
    OutputFolder(args.out, "gren report").prepare(REPORT_FILES, recognise=_matplotlib_png)
    for path in make_report(args.runs, args.out, data=args.data, n_images=args.images, device=args.device):
        print(path)
    return 0
