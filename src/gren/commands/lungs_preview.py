"""``gren lungs preview``: a contact sheet of segmented lungs over their images."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from gren.lungs.segment import SPEC_HELP

GROUP = "lungs"
NAME = "preview"
HELP = "contact sheet of lung masks over images (ground-truth outlines when DIR has masks/)"

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, metavar="DIR", help="folder with images/ (masks/ optional) or images")
    parser.add_argument("--lungs", default="classical", metavar="SPEC", help=f"segmenter: {SPEC_HELP}")
    parser.add_argument("--out", default="lungs_preview.png", metavar="PNG", help="sheet to write")
    parser.add_argument("--n", type=int, default=16, help="number of images, spread over the folder (default 16)")
    parser.add_argument("--tile", type=int, default=256, help="tile side in pixels")
    parser.add_argument("--columns", type=int, default=4)
    parser.add_argument("--raw", action="store_true",
                        help="draw the masks as segmented, before the gross-failure flags (flagged films are "
                        "captioned FLAG but keep their mask instead of the prior)")


def run(args: argparse.Namespace) -> int:
    from gren.lungs.dice import lung_dice
    from gren.lungs.folder import find_samples, read_gray, read_mask
    from gren.lungs.quality import FLAG_PREFIX, check_mask
    from gren.lungs.segment import load_segmenter, segment_with_reasons
    from gren.lungs.tools import contact_sheet, overlay_tile, pick_evenly

    segmenter = load_segmenter(args.lungs)
    if args.raw and hasattr(segmenter, "check"):
        segmenter.check = False
    samples = pick_evenly(find_samples(args.data), max(1, args.n))
    tiles = []
    fallbacks = 0
    flagged = 0
    for sample in samples:
        image = read_gray(sample.image_path)
        masks, fallback, reasons = segment_with_reasons(segmenter, image[None])
        if args.raw and not fallback[0]:
            reasons = [check_mask(image, masks[0])]
        truth = read_mask(sample.mask_path, image.shape) if sample.mask_path else None
        caption = sample.stem[:18]
        if truth is not None:
            caption += f" {lung_dice(masks[0], truth).mean():.2f}"
        if reasons[0].startswith(FLAG_PREFIX):
            caption += " FLAG" if args.raw else " FLAG prior"
            flagged += 1
            log.info("%s: flagged, %s", sample.stem, reasons[0][len(FLAG_PREFIX):])
        elif fallback[0]:
            caption += " prior"
        fallbacks += bool(fallback[0])
        tiles.append(overlay_tile(image, masks[0], truth, args.tile, caption))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    contact_sheet(tiles, args.columns).save(out)
    log.info("wrote %s: %d images, %d fell back to the prior, %d of them flagged as gross failures "
             "(red: right lung = image left, blue: left lung)", out, len(tiles), fallbacks, flagged)
    print(out)
    return 0
