"""``gren lungs preview``: a contact sheet of segmented lungs over their images."""

from __future__ import annotations

import argparse
import logging
import tempfile
from pathlib import Path

from gren.core.errors import DataError, GrenError
from gren.lungs.segment import SPEC_HELP

GROUP = "lungs"
NAME = "preview"
HELP = "contact sheet of lung masks over images (ground-truth outlines when DIR has masks/)"

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, metavar="DIR", help="folder with images/ (masks/ optional) or images")
    parser.add_argument("--lungs", default="classical", metavar="SPEC", help=f"segmenter: {SPEC_HELP}")
    parser.add_argument("--out", default="lungs_preview.png", metavar="PNG",
                        help="sheet to write (.png, .jpg or .jpeg; its folder is created)")
    parser.add_argument("--n", type=int, default=16, help="number of images, spread over the folder (default 16)")
    parser.add_argument("--tile", type=int, default=256, help="tile side in pixels")
    parser.add_argument("--columns", type=int, default=4)
    parser.add_argument("--raw", action="store_true",
                        help="draw the masks as segmented, before the gross-failure flags (flagged films are "
                        "captioned FLAG but keep their mask instead of the prior)")


OUT_SUFFIXES = (".png", ".jpg", ".jpeg")


def check_output_path(value: str) -> Path:
    """Validate ``--out`` before any work: an image suffix, not a folder, a folder that exists (or can
    be created) and is writable. Creates the missing parent folders. Raises :class:`GrenError`."""
    out = Path(value).expanduser()
    if out.is_dir():
        raise GrenError(f"--out {out}: is a folder; expected an image file name such as {out / 'lungs_preview.png'}")
    if out.suffix.lower() not in OUT_SUFFIXES:
        raise GrenError(f"--out {out}: expected a file name ending in {', '.join(OUT_SUFFIXES)} "
                        f"(e.g. {out.with_suffix('.png') if out.name else 'lungs_preview.png'})")
    parent = out.parent if str(out.parent) else Path(".")
    if parent.exists() and not parent.is_dir():
        raise GrenError(f"--out {out}: {parent} exists and is not a folder")
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise GrenError(f"--out {out}: cannot create the folder {parent} ({err.strerror or err})") from err
    try:  # the real test of writability (os.access says yes to root, and on read-only mounts)
        with tempfile.NamedTemporaryFile(dir=parent, prefix=".gren-write-test-"):
            pass
    except OSError as err:
        raise GrenError(f"--out {out}: cannot write into {parent} ({err.strerror or err})") from err
    return out


def run(args: argparse.Namespace) -> int:
    out = check_output_path(args.out)  # before the segmenter and the images: fail fast
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
    skipped = 0
    flagged = 0
    for sample in samples:
        try:
            image = read_gray(sample.image_path)
            truth = read_mask(sample.mask_path, image.shape) if sample.mask_path else None
        except DataError as err:  # ImageReadError included: one bad film costs its tile, not the sheet
            log.warning("skipped %s: %s", sample.stem, err)
            skipped += 1
            continue
        masks, fallback, reasons = segment_with_reasons(segmenter, image[None])
        if args.raw and not fallback[0]:
            reasons = [check_mask(image, masks[0])]
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
    if skipped:
        log.warning("%d of %d images skipped as unreadable", skipped, len(samples))
    if not tiles:
        raise DataError(f"{args.data}: none of the {len(samples)} images picked could be read")
    try:
        contact_sheet(tiles, args.columns).save(out)
    except OSError as err:
        raise GrenError(f"{out}: cannot write the contact sheet ({err.strerror or err})") from err
    log.info("wrote %s: %d images, %d fell back to the prior, %d of them flagged as gross failures "
             "(red: right lung = image left, blue: left lung)", out, len(tiles), fallbacks, flagged)
    print(out)
    return 0
