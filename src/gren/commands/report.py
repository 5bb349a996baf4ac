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


def run(args: argparse.Namespace) -> int:
    from gren.eval.report import make_report

    for path in make_report(args.runs, args.out, data=args.data, n_images=args.images, device=args.device):
        print(path)
    return 0
