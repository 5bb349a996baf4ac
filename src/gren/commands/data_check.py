"""``gren data check``: what a data folder in the NIH layout holds, and every problem found in it."""

from __future__ import annotations

import argparse
import json
import logging

from gren.core.errors import DataError
from gren.core.labels import BOX_CLASSES, LABELS, NO_FINDING
from gren.data.nih import MIN_FILM_SIDE, load_index

GROUP = "data"
NAME = "check"
HELP = "count images, labels and boxes of an NIH-layout folder and list every problem found"

log = logging.getLogger(__name__)

_LISTED_PROBLEMS = 50  # problems printed in the human-readable report (all are in --json)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data", required=True, metavar="DIR", help="folder with Data_Entry_2017*.csv and images"
    )
    parser.add_argument("--json", action="store_true", help="print the summary as JSON instead of a table")
    parser.add_argument("--strict", action="store_true", help="fail (exit 1) when any problem is found")
    parser.add_argument(
        "--verify",
        action="store_true",
        help="decode every image (slow) to find truncated or corrupt files; they are reported and left out",
    )


def format_report(summary: dict, max_problems: int = _LISTED_PROBLEMS) -> str:
    """The human-readable report of a :meth:`DatasetIndex.summary` dict."""
    images, boxes, box_images = summary["images"], summary["boxes"], summary["box_images"]
    lines = [
        f"data folder:   {summary['data_dir']}",
        f"label list:    {summary['data_entry_csv']}",
        f"box list:      {summary['bbox_csv'] or '(none)'}",
        "",
        f"images listed:  {images['listed']:,}",
        f"images found:   {images['found']:,}",
        f"images missing: {images['missing']:,}",
    ]
    for key, text in (
        ("unreadable", "unreadable (left out)"),
        ("unlisted_files", "files not in the label list"),
        ("duplicate_files", "stems found in several files"),
        ("skipped_entries", "skipped (dangling/looping links, non-UTF-8 names, FIFOs)"),
        ("tiny", f"smaller than {MIN_FILM_SIDE} px (kept)"),
        ("with_mask", "with a lung mask"),
    ):
        if images.get(key):
            lines.append(f"  {text}: {images[key]:,}")
    lines += [
        f"patients:       {summary['patients']:,}",
        "views:          " + (", ".join(f"{k} {v:,}" for k, v in summary["views"].items()) or "-"),
        "",
        f"box images:     {box_images['found']:,} found of {box_images['listed']:,} listed "
        f"({box_images['missing']:,} missing)",
        f"boxes:          {boxes['usable']:,} usable of {boxes['rows']:,} rows "
        f"({boxes['missing_image']:,} on missing images, {boxes['invalid']:,} invalid), {boxes['classes']} classes",
        "",
        f"{'label':<20}{'images':>8}{'listed':>9}{'boxes':>7}{'no image':>10}",
    ]
    per_class = boxes["per_class"]
    for label in (*LABELS, NO_FINDING):
        box = per_class.get(label)
        box_text = f"{box['usable']:>7}{box['missing_image']:>10}" if box and label in BOX_CLASSES else ""
        listed = summary["labels_listed"].get(label, 0)
        lines.append(f"{label:<20}{summary['labels'].get(label, 0):>8,}{listed:>9,}{box_text}")
    problems = summary["problems"]
    lines += ["", f"problems: {len(problems)}"]
    for problem in problems[:max_problems]:
        where = problem["file"] + (f":{problem['line']}" if problem["line"] is not None else "")
        lines.append(f"  {problem['severity']}: {where}: {problem['message']}")
    if len(problems) > max_problems:
        lines.append(f"  ... and {len(problems) - max_problems} more (all of them with --json)")
    lines.append("")
    lines.append("usable: yes" if summary["usable"] else "usable: NO (no listed image was found)")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    index = load_index(args.data, strict=args.strict, on_bad_image="skip", verify=args.verify)
    summary = index.summary()
    if args.strict and summary["images"]["unreadable"]:
        raise DataError(f"{args.data}: {summary['images']['unreadable']} unreadable image(s) (strict mode)")
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(format_report(summary))
    if not summary["usable"]:
        log.error(
            "%s: none of the %d listed images was found under the folder",
            args.data,
            summary["images"]["listed"],
        )
        return 1
    return 0
