"""``gren data split``: participation-protocol folds (``fold_<k>.csv`` + ``split.json``) for training."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from gren.core.errors import GrenError
from gren.data.source import split_records
from gren.data.splits import SPLIT_BY, make_folds, parse_protocol, split_summary, write_split

GROUP = "data"
NAME = "split"
HELP = "write K folds of a participation protocol X_Y (train on X unannotated, Y annotated; test on the rest)"

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, metavar="DIR|CACHE",
                        help="folder in the NIH layout, or a prepared cache (the same images training uses)")
    parser.add_argument(
        "--protocol",
        default="0.5_0.8",
        metavar="X_Y",
        help="participation protocol, e.g. 0.5_0.8 (default), 1.0_0.4",
    )
    parser.add_argument("--folds", type=int, default=5, metavar="K", help="number of folds (default 5)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split (default 0)")
    parser.add_argument("--out", required=True, metavar="DIR", help="where fold_<k>.csv and split.json go")
    parser.add_argument(
        "--split-by", choices=SPLIT_BY, default="patient", help="keep patients (default) or images apart"
    )
    parser.add_argument("--strict", action="store_true", help="fail on any problem in the data")


def run(args: argparse.Namespace) -> int:
    protocol = parse_protocol(args.protocol)  # validate before the (slower) index load
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise GrenError(f"--out {out}: exists and is not a folder; expected the folder for fold_<k>.csv")
    # The images training will use: unreadable and undecodable ones left out, as prepare leaves them out.
    records, data_dir = split_records(args.data, strict=args.strict)
    folds = make_folds(records, protocol, folds=args.folds, seed=args.seed, split_by=args.split_by)
    summary = split_summary(folds, protocol, args.seed, args.split_by, data_dir=str(data_dir))
    paths = write_split(folds, args.out, summary)
    for stats in summary["per_fold"]:
        log.info(
            "fold %d: train %d annotated + %d unannotated, test %d, dropped (test patient) %d",
            stats["fold"],
            stats["train_annotated"],
            stats["train_unannotated"],
            stats["test"],
            stats["dropped_test_patient"],
        )
    log.info("wrote %d fold file(s) and split.json to %s", len(paths), args.out)
    return 0
