"""Helpers shared by ``gren lungs train|evaluate|preview``: splits, batched evaluation, contact sheets."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage as ndi
from tqdm import tqdm

from gren.core.errors import GrenError
from gren.lungs.dice import lung_dice, summarize_dice
from gren.lungs.folder import LungSample, read_gray, read_mask
from gren.lungs.quality import FLAG_PREFIX, check_mask
from gren.lungs.segment import segment_with_reasons

log = logging.getLogger(__name__)

# Overlay colours (RGB): prediction fills and ground-truth outlines per label.
FILL_COLOURS = {1: (230, 60, 60), 2: (60, 110, 235)}
OUTLINE_COLOURS = {1: (60, 230, 90), 2: (250, 220, 40)}


def fold_split(ids: list[str], folds: int, fold: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """(train ids, test ids) of fold ``fold`` of ``folds``: a seeded permutation cut into near-equal parts.

    Every id is tested in exactly one fold; train and test never share an id.
    """
    if folds < 2:
        raise GrenError(f"--folds {folds}: need at least 2 folds")
    if not 0 <= fold < folds:
        raise GrenError(f"--fold {fold}: expected 0..{folds - 1}")
    if len(ids) < folds:
        raise GrenError(f"{len(ids)} images cannot be cut into {folds} folds")
    order = np.random.default_rng(seed).permutation(len(ids))
    test_positions = set(np.array_split(order, folds)[fold].tolist())
    train = [i for k, i in enumerate(ids) if k not in test_positions]
    test = [i for k, i in enumerate(ids) if k in test_positions]
    return train, test


def parse_holdout(value: str) -> set[str]:
    """``--holdout``: a comma-separated list of stems, or a text file with one stem per line (# comments)."""
    path = Path(value)
    if path.is_file():
        stems = []
        for line in path.read_text().splitlines():
            line = line.split("#", 1)[0].strip()
            if line:
                stems.append(Path(line).stem)
        return set(stems)
    return {Path(part.strip()).stem for part in value.split(",") if part.strip()}


def iter_batches(samples: list[LungSample], batch_size: int) -> Iterator[tuple[list[LungSample], np.ndarray]]:
    """Decoded images in batches of equal shape: (samples, uint8 (B, H, W))."""
    batch: list[LungSample] = []
    arrays: list[np.ndarray] = []
    for sample in samples:
        image = read_gray(sample.image_path)
        if arrays and (image.shape != arrays[0].shape or len(arrays) == batch_size):
            yield batch, np.stack(arrays)
            batch, arrays = [], []
        batch.append(sample)
        arrays.append(image)
    if arrays:
        yield batch, np.stack(arrays)


def evaluate_samples(segmenter, samples: list[LungSample], batch_size: int = 16, progress: bool = True) -> dict:
    """Dice of ``segmenter`` against each sample's mask.

    Returns a dict: ``n_images``, ``right_lung``, ``left_lung``, ``mean`` (Dice means), ``fallback``
    (count of images that got the prior), ``flagged`` (of those, the ones a gross-failure flag of
    :mod:`gren.lungs.quality` sent there), ``true_masks_flagged`` (the flags' false alarms: how many of
    the folder's own masks they would flag), ``images`` (list of per-image dicts: ``stem``,
    ``right_lung``, ``left_lung``, ``mean``, ``fallback``, ``flagged``, ``reason``).
    """
    rows = []
    true_flagged = 0
    with tqdm(total=len(samples), desc="lungs evaluate", unit="img", disable=not progress or None) as bar:
        for batch, images in iter_batches(samples, batch_size):
            masks, fallback, reasons = segment_with_reasons(segmenter, images)
            truths = np.stack([read_mask(s.mask_path, images.shape[1:]) for s in batch])
            true_flagged += sum(bool(check_mask(image, truth)) for image, truth in zip(images, truths))
            scores = lung_dice(masks, truths)
            for sample, score, fell_back, reason in zip(batch, scores, fallback, reasons):
                rows.append({"stem": sample.stem, "right_lung": round(float(score[0]), 4),
                             "left_lung": round(float(score[1]), 4), "mean": round(float(score.mean()), 4),
                             "fallback": bool(fell_back), "flagged": reason.startswith(FLAG_PREFIX),
                             "reason": reason})
            bar.update(len(batch))
    scores = np.array([[r["right_lung"], r["left_lung"]] for r in rows]).reshape(-1, 2)
    summary = {k: round(v, 4) for k, v in summarize_dice(scores).items()}
    return {"n_images": len(rows), **summary, "fallback": int(sum(r["fallback"] for r in rows)),
            "flagged": int(sum(r["flagged"] for r in rows)), "true_masks_flagged": int(true_flagged),
            "images": rows}


def overlay_tile(image: np.ndarray, predicted: np.ndarray | None, truth: np.ndarray | None, tile: int,
                 caption: str = "") -> Image.Image:
    """One RGB tile (tile x tile): the image, predicted lungs as translucent fills, ground truth outlines."""
    gray = np.asarray(Image.fromarray(image).resize((tile, tile), Image.BILINEAR), np.float32)
    rgb = np.repeat(gray[..., None], 3, axis=2)
    if predicted is not None:
        small = np.asarray(Image.fromarray(predicted).resize((tile, tile), Image.NEAREST))
        for label, colour in FILL_COLOURS.items():
            region = small == label
            rgb[region] = 0.6 * rgb[region] + 0.4 * np.array(colour, np.float32)
    if truth is not None:
        small = np.asarray(Image.fromarray(truth).resize((tile, tile), Image.NEAREST))
        for label, colour in OUTLINE_COLOURS.items():
            region = small == label
            edge = region & ~ndi.binary_erosion(region, iterations=1)
            rgb[edge] = colour
    out = Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8))
    if caption:
        draw = ImageDraw.Draw(out)
        draw.rectangle((0, 0, min(tile, 7 * len(caption) + 6), 13), fill=(0, 0, 0))
        draw.text((3, 1), caption, fill=(255, 255, 255))
    return out


def contact_sheet(tiles: list[Image.Image], columns: int = 4) -> Image.Image:
    """Tiles (equal size) in a grid, row by row."""
    if not tiles:
        raise GrenError("nothing to draw")
    width, height = tiles[0].size
    rows = (len(tiles) + columns - 1) // columns
    sheet = Image.new("RGB", (columns * width, rows * height))
    for k, tile_image in enumerate(tiles):
        sheet.paste(tile_image, ((k % columns) * width, (k // columns) * height))
    return sheet


def pick_evenly(samples: list, n: int) -> list:
    """``n`` samples spread evenly over the sorted list (all when there are fewer)."""
    if n >= len(samples):
        return list(samples)
    positions = np.linspace(0, len(samples) - 1, n).round().astype(int)
    return [samples[p] for p in positions]
