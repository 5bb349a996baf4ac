"""``gren evaluate``: localization accuracy, IoBB and AUC of a trained run on its test split."""

from __future__ import annotations

import argparse
import json
import sys

GROUP = None
NAME = "evaluate"
HELP = "evaluate a trained run on its test split -> RUN/eval.json and RUN/eval.md"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", required=True, metavar="RUN", help="run directory written by `gren train --out RUN`")
    parser.add_argument("--data", metavar="DIR|CACHE",
                        help="dataset folder or prepared cache (default: the one the run was trained on)")
    parser.add_argument("--checkpoint", metavar="NAME",
                        help="checkpoint in RUN/checkpoints (e.g. epoch_003) or a path (default: last)")
    parser.add_argument("--batch-size", type=int, default=16, metavar="N", help="images per batch (16)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default: the run's device setting)")
    parser.add_argument("--auc-images", choices=("test", "heldout"), default="test",
                        help="images for AUC: the annotated test images (default) or every image of the fold "
                        "not used for training")
    parser.add_argument("--rules", metavar="R[,R]",
                        help="box rules: cells (the union of positive cells, always) and wang (a box around each "
                        "connected component, Wang et al. 2017); default: cells plus the method's own")
    parser.add_argument("--json", action="store_true", help="print eval.json on stdout instead of the table")


def run(args: argparse.Namespace) -> int:
    from gren.eval.evaluate import EVAL_JSON, eval_markdown, evaluate_run

    result = evaluate_run(args.run, data=args.data, checkpoint=args.checkpoint, batch_size=args.batch_size,
                          device=args.device, auc_images=args.auc_images, rules=args.rules, progress=not args.json)
    if args.json:
        json.dump(result, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print(eval_markdown(result, title=str(result.get("method") or args.run)))
        print(f"written: {args.run}/{EVAL_JSON}, {args.run}/eval.md")
    return 0
