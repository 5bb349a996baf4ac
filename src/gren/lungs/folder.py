"""Lung-mask folders: ``DIR/images/<stem>.<ext>`` with optional ``DIR/masks/<stem>.png`` (0/1/2).

A folder without ``images/`` is searched for images itself (e.g. an NIH ``images`` folder, or the
NIH layout's ``images_001/images`` ...), so ``gren lungs preview`` works on any folder of films.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gren.core.errors import DataError
from gren.core.imageio import IMAGE_EXTENSIONS, read_gray
from gren.core.imageio import read_mask as read_mask_file

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset(IMAGE_EXTENSIONS)  # the one list of image suffixes (gren.core.imageio)


@dataclass(frozen=True)
class LungSample:
    """One film: its stem, image path and mask path (None when the folder has no mask for it)."""

    stem: str
    image_path: Path
    mask_path: Path | None


def find_samples(data_dir: str | Path, *, require_masks: bool = False) -> list[LungSample]:
    """All films under ``data_dir``, sorted by stem, each with its mask when ``masks/<stem>.png`` exists.

    Raises:
        DataError: the folder does not exist, holds no image, or (``require_masks``) no image has a mask.
    """
    root = Path(data_dir)
    if not root.is_dir():
        raise DataError(f"{root}: not a folder")
    mask_dir = root / "masks"
    search_root = root / "images" if (root / "images").is_dir() else root
    images: dict[str, Path] = {}
    for path in sorted(search_root.rglob("*")):
        if path.suffix.lower() not in IMAGE_SUFFIXES or not path.is_file():
            continue
        if mask_dir in path.parents:
            continue
        if path.stem in images:
            log.warning("%s: duplicate image stem %r, keeping %s", path, path.stem, images[path.stem])
            continue
        images[path.stem] = path
    if not images:
        raise DataError(f"{root}: no images found (expected {root}/images/<stem>.png|jpg or images in {root})")
    samples = []
    for stem, path in sorted(images.items()):
        mask_path = mask_dir / f"{stem}.png"
        samples.append(LungSample(stem, path, mask_path if mask_path.is_file() else None))
    if require_masks:
        with_masks = [s for s in samples if s.mask_path is not None]
        if not with_masks:
            raise DataError(f"{root}: no masks found (expected {mask_dir}/<stem>.png with 0/1/2 for each image)")
        if len(with_masks) < len(samples):
            log.warning("%s: %d of %d images have no mask in %s; they are skipped",
                        root, len(samples) - len(with_masks), len(samples), mask_dir)
        samples = with_masks
    return samples


def read_mask(path: str | Path, shape: tuple[int, int] | None = None) -> np.ndarray:
    """A lung mask PNG as uint8 (H, W) with values in {0, 1, 2}.

    Raises:
        DataError: unreadable (ImageReadError), other values than 0/1/2, or a size different from ``shape`` (the image's).
    """
    mask = read_mask_file(path)
    values = np.unique(mask)
    if not set(values.tolist()) <= {0, 1, 2}:
        raise DataError(f"{path}: mask values {values.tolist()[:8]}, expected 0 (background), "
                        "1 (patient's right lung = image left), 2 (patient's left lung = image right)")
    if shape is not None and mask.shape != tuple(shape):
        raise DataError(f"{path}: mask is {mask.shape[1]}x{mask.shape[0]}, its image is {shape[1]}x{shape[0]}")
    return mask


def load_pairs(samples: list[LungSample]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Images and masks (uint8 (H, W) each) of samples that have masks."""
    images, masks = [], []
    for sample in samples:
        if sample.mask_path is None:
            continue
        image = read_gray(sample.image_path)
        images.append(image)
        masks.append(read_mask(sample.mask_path, image.shape))
    return images, masks
