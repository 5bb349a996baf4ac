"""``gren train``: train a localization method on one fold of a protocol."""

from __future__ import annotations

import argparse

GROUP = None
NAME = "train"
HELP = "train a method (baseline, gren, ...) on one fold; writes a run directory"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, help="prepared cache (gren prepare) or raw NIH-layout folder")
    parser.add_argument("--method", required=True, help="registered method name (baseline, gren, gren-intra, "
                        "gren-inter, gren-cosine, ...)")
    parser.add_argument("--protocol", default=None, help="participation X_Y, e.g. 0.5_0.8 (default: data.protocol)")
    parser.add_argument("--fold", type=int, default=None, help="fold index 0..folds-1 (default: data.fold)")
    parser.add_argument("--out", required=True, help="run directory to write")
    parser.add_argument("--config", default=None, help="YAML file or bundled config name (cpu-small) over the defaults")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="config overrides, e.g. optim.lr=0.01 data.size=128 train.epochs=2")


def run(args: argparse.Namespace) -> int:
    from gren.train.engine import train

    train(args.data, args.method, args.out, protocol=args.protocol, fold=args.fold, config_file=args.config,
          overrides=args.overrides, resume=args.resume)
    return 0
