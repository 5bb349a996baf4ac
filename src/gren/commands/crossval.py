"""``gren crossval``: train and evaluate several methods over K folds; the paper's Table I layout."""

from __future__ import annotations

import argparse

GROUP = None
NAME = "crossval"
HELP = "train + evaluate methods over K folds (resumable) -> OUT/table.md, OUT/table.csv"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", metavar="DIR|CACHE", help="dataset folder (NIH layout) or prepared cache")
    parser.add_argument("--methods", default="baseline,gren", help="comma-separated method names (baseline,gren)")
    parser.add_argument("--protocol", default="0.5_0.8", metavar="X_Y",
                        help="participation: train on X of the unannotated and Y of the annotated images (0.5_0.8)")
    parser.add_argument("--folds", type=int, default=5, metavar="K", help="number of folds (5)")
    parser.add_argument("--only-folds", metavar="LIST", help="run only these folds, e.g. 0,1 (the table uses all "
                        "evaluated folds)")
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder: DIR/<method>/fold_<k>/, tables")
    parser.add_argument("--config", metavar="YAML", help="training config file or bundled name (e.g. cpu-small)")
    parser.add_argument("--batch-size", type=int, default=16, metavar="N", help="evaluation batch size (16)")
    parser.add_argument("--table-only", action="store_true", help="only rebuild the tables from existing runs")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="training config overrides (optim.lr=0.01)")


def run(args: argparse.Namespace) -> int:
    from gren.core.errors import GrenError
    from gren.eval.crossval import TABLE_CSV, TABLE_MD, run_crossval, write_tables

    if args.table_only:
        write_tables(args.out)
    else:
        if not args.data:
            raise GrenError("--data DIR|CACHE is required (or --table-only to rebuild the tables)")
        only = None
        if args.only_folds:
            try:
                only = [int(x) for x in args.only_folds.split(",") if x.strip()]
            except ValueError:
                raise GrenError(f"--only-folds {args.only_folds!r}: expected integers like 0,1") from None
        summary = run_crossval(args.data, args.methods, args.out, protocol=args.protocol, folds=args.folds,
                               config_file=args.config, overrides=args.overrides, only_folds=only,
                               batch_size=args.batch_size)
        print(f"trained and evaluated {len(summary['trained'])} runs, {len(summary['skipped'])} already done")
    with open(f"{args.out}/{TABLE_MD}") as handle:
        print(handle.read())
    print(f"written: {args.out}/{TABLE_MD}, {args.out}/{TABLE_CSV}")
    return 0
