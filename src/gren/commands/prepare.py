"""``gren prepare``: decode, resize, segment and hash a dataset once into a memory-mapped cache."""

from __future__ import annotations

import argparse
import json
import os
import sys

GROUP = None
NAME = "prepare"
HELP = "decode + resize every image once, with lung masks and lung hashes, into a cache for training"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, metavar="DIR", help="dataset folder in the NIH layout")
    parser.add_argument("--out", required=True, metavar="CACHE", help="cache folder to write (created)")
    parser.add_argument("--size", type=int, default=256, metavar="S", help="side of the cached images in pixels (256)")
    parser.add_argument(
        "--lungs",
        default="auto",
        metavar="SPEC",
        help="lung masks: auto (the dataset's masks/ where present, else the shipped U-Net), masks, classical, "
        "unet (the shipped U-Net), unet:PATH (default auto)",
    )
    parser.add_argument("--workers", type=int, default=None, metavar="N",
                        help=f"worker processes (default: CPU count, {os.cpu_count()} here; 1 = no pool)")
    parser.add_argument("--chunk-size", type=int, default=64, metavar="N",
                        help="images per chunk, the unit of parallel work and of resumption (64)")
    parser.add_argument("--force", action="store_true",
                        help="replace a cache prepared with other parameters in --out")
    parser.add_argument("--methods", metavar="M[,M]",
                        help="also compute the per-image fields these methods need (e.g. CCG's superpixels); an "
                             "existing cache is extended, not rebuilt")
    parser.add_argument("--fields", metavar="F[,F]", help="also compute these registered cache fields")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON on stdout")


def run(args: argparse.Namespace) -> int:
    from gren.data.fields import extend_cache, fields_needed_by
    from gren.data.prepare import prepare_cache

    wanted = [f.strip() for f in (args.fields or "").split(",") if f.strip()]
    if args.methods:
        wanted += fields_needed_by([m.strip() for m in args.methods.split(",") if m.strip()])
    summary = prepare_cache(args.data, args.out, size=args.size, lungs=args.lungs, workers=args.workers,
                            chunk_size=args.chunk_size, force=args.force, progress=not args.json)
    summary["fields_added"] = extend_cache(summary["cache"], wanted, progress=not args.json) if wanted else []
    if args.json:
        json.dump(summary, sys.stdout, indent=1)
        sys.stdout.write("\n")
        return 0
    sources = ", ".join(f"{k or 'none'}: {v}" for k, v in sorted(summary["mask_sources"].items()))
    lines = [
        f"cache            {summary['cache']}",
        f"images           {summary['n_images']} ({summary['size']} x {summary['size']} px)",
        f"lung masks       {sources} (fallback to the prior: {summary['n_fallback']})",
        f"boxes            {summary['n_boxes']}",
        f"missing images   {summary['n_missing']}",
        f"unreadable       {summary['n_failed']}",
        f"chunks           {summary['chunks_processed']} processed, {summary['chunks_skipped']} already done",
        f"speed            {summary['images_per_s']} images/s" if summary["images_decoded"] else "speed            -",
        f"size on disk     {summary['bytes'] / 1e6:.1f} MB ({summary['bytes_per_image'] / 1e3:.1f} kB/image)",
    ]
    if wanted:
        lines.append(f"extra fields     {', '.join(wanted)} ({', '.join(summary['fields_added']) or 'none'} added now)")
    for failure in summary["failures"][:10]:
        lines.append(f"  skipped {failure['image_id']}: {failure['error']}")
    if summary["n_failed"] > 10:
        lines.append(f"  ... and {summary['n_failed'] - 10} more (see --json)")
    print("\n".join(lines))
    return 0
