"""``gren evaluate``: localization accuracy, IoBB and AUC of a trained run on its test split or on other data."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

GROUP = None
NAME = "evaluate"
HELP = ("evaluate a trained run on its test split -> RUN/eval.json, RUN/eval.md; or on data it never saw "
        "(--data OTHER) -> RUN/eval-OTHER.json, .md")


def positive_int(text: str) -> int:
    """argparse type: a whole number >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {value}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", required=True, metavar="RUN", help="run directory written by `gren train --out RUN`")
    parser.add_argument("--data", metavar="DIR|CACHE",
                        help="dataset folder or prepared cache (default: the one the run was trained on); other "
                        "data than the run's is scored on all its annotated images into RUN/eval-<name>.json")
    parser.add_argument("--subset", choices=("auto", "test", "all"), default="auto",
                        help="auto (default): the run's test split on its own data, every annotated image on other "
                        "data; test: the run's test split read from --data (e.g. the dataset moved); all: every "
                        "annotated image of --data (refused on the run's own data)")
    parser.add_argument("--out", metavar="FILE.json",
                        help="where to write the results (the markdown beside it as .md); default RUN/eval.json "
                        "for the test split, RUN/eval-<name of --data>.json for other data")
    parser.add_argument("--checkpoint", metavar="NAME",
                        help="checkpoint in RUN/checkpoints (e.g. epoch_003) or a path (default: last)")
    parser.add_argument("--batch-size", type=positive_int, default=16, metavar="N", help="images per batch (16)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default: the run's device setting)")
    parser.add_argument("--auc-images", choices=("test", "heldout"), default="test",
                        help="images for AUC: the annotated test images (default) or every image of the fold "
                        "not used for training")
    parser.add_argument("--rules", metavar="R[,R]",
                        help="box rules: cells (the union of positive cells, always) and wang (a box around each "
                        "connected component, Wang et al. 2017); default: cells plus the method's own")
    parser.add_argument("--predict-upsample", type=int, default=None, metavar="N",
                        help="upsample the backbone map xN before the head for this evaluation only (8: the "
                             "published CIA/CCG/GREN protocol); a factor other than the run's writes "
                             "eval-upsampleN.json beside eval.json")
    parser.add_argument("--json", action="store_true", help="print eval.json on stdout instead of the table")


def run(args: argparse.Namespace) -> int:
    from gren.eval.evaluate import EVAL_JSON, eval_markdown, evaluate_run

    result = evaluate_run(args.run, data=args.data, checkpoint=args.checkpoint, batch_size=args.batch_size,
                          device=args.device, auc_images=args.auc_images, rules=args.rules, progress=not args.json,
                          subset=args.subset, out=args.out, predict_upsample=args.predict_upsample)
    if args.json:
        json.dump(result, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print(eval_markdown(result, title=str(result.get("method") or args.run)))
        output = result.get("output", f"{args.run}/{EVAL_JSON}")
        print(f"written: {output}, {Path(output).with_suffix('.md')}")
    return 0
