"""``gren predict``: per-image heat maps, region boxes (JSON) and overlays (PNG) from a trained model."""

from __future__ import annotations

import argparse

GROUP = None
NAME = "predict"
HELP = ("localize findings in image files (PNG, JPEG, DICOM) -> OUT/<stem>.json, OUT/<stem>.png (heat-map overlay), "
        "OUT/regions.csv and OUT/regions.coco.json")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files: PNG, JPEG (any size, 8/16-bit), "
                        "DICOM (needs the optional pydicom: pip install 'gren[dicom]')")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--run", metavar="RUN", help="trained run directory (uses its last checkpoint)")
    source.add_argument("--checkpoint", metavar="CKPT", help="a checkpoint file")
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="output folder: <stem>.json and <stem>.png per image, plus regions.csv and regions.coco.json "
                             "(every region of this call's images, boxes in image pixels)")
    parser.add_argument("--threshold", type=float, default=None,
                        help="map value above which a cell is part of a predicted region and outlined on the overlay "
                             "(default: the method's own threshold: 0.5 for the grid-MIL methods, 180/255 of the "
                             "normalised map for cam)")
    parser.add_argument("--class-threshold", type=float, default=0.5,
                        help="image probability from which a class is reported (0.5)")
    parser.add_argument("--top-k", type=int, default=3, help="at most this many classes per image (3)")
    parser.add_argument("--data", metavar="DIR|CACHE", help="dataset whose boxes are drawn as ground truth (green); default with --run: the run's dataset; "
                             "images it does not know get \"ground_truth\": []")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")


def run(args: argparse.Namespace) -> int:
    from gren.eval.predict import predict_files

    summary = predict_files(args.images, args.run or args.checkpoint, args.out, cell_threshold=args.threshold,
                            class_threshold=args.class_threshold, top_k=args.top_k, data=args.data,
                            device=args.device)
    print(f"{len(summary['written'])} images predicted into {args.out}"
          + (f"; {len(summary['failed'])} failed:" if summary["failed"] else ""))
    for message in summary["failed"].values():
        print(f"  {message}")  # each message names its file
    return 1 if summary["failed"] else 0
