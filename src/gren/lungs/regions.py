"""Lung regions for hashing: how each lung is cut out of an image before its pHash is taken.

A lung region is the bounding box of that lung's label in the mask (label 1 = patient's right lung =
IMAGE LEFT, label 2 = patient's left lung = IMAGE RIGHT), cut from the image at the image's own
resolution (pixels of the image the mask belongs to; both arrays (H, W)).

* ``fill="mean"`` (default): pixels of the box outside the lung's mask are set to the mean of the
  lung's own pixels, so only the parenchyma shapes the hash. ``fill="keep"``: the crop keeps all image
  content inside the box (ribs, heart border, mediastinum where the box reaches them).
* ``mirror_left=True`` (default): the patient's left lung is flipped horizontally, so both crops have
  the lateral chest wall on the left and the mediastinum on the right before their hashes are compared
  (the thorax is roughly mirror-symmetric). GREN's intra-image edge compares the two lungs' hashes,
  so without mirroring the Hamming distance mostly measures the (always present) left/right asymmetry
  of the crops' layout rather than a difference in the lungs.

The defaults were chosen by the hash-signal study (``benchmarks/hash_signal.py``, results and reading
in ``docs/hashing.md``): on 2,220 real NIH images mirroring brings the two lungs' hashes from chance
level (mean Hamming distance ~30-32 of 64) to ~22-24, and mirrored + mean fill is the only variant
whose intra-image distance separates images with findings from "No Finding" above chance (AUC 0.54,
95% CI 0.515-0.559). The signal is weak; see the docs.

A lung whose mask is empty or tiny (fewer than :data:`MIN_LUNG_FRACTION` of the image; a segmentation
failure) gets the anatomical prior box :data:`PRIOR_BOXES` instead, and its fallback flag is set.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch

from gren.hashing import HASH_BITS, phash

log = logging.getLogger(__name__)

RIGHT_LUNG = 1
"""Mask label of the patient's right lung (image left)."""
LEFT_LUNG = 2
"""Mask label of the patient's left lung (image right)."""

PRIOR_BOXES: dict[int, tuple[float, float, float, float]] = {
    RIGHT_LUNG: (0.10, 0.14, 0.45, 0.72),
    LEFT_LUNG: (0.55, 0.14, 0.90, 0.72),
}
"""Anatomical prior per label: (x0, y0, x1, y1) as fractions of the image width / height. The extent of
the mean lung outline of the 90 real masks (``gren.lungs.classical.LUNG_OUTLINE``), rounded outward."""

MIN_LUNG_FRACTION = 0.002
"""A lung label covering less than this share of the image is treated as missing (prior box used)."""

FILL_MODES = ("keep", "mean")


def prior_box(label: int, height: int, width: int) -> tuple[int, int, int, int]:
    """The prior box of lung ``label`` in an image of ``height`` x ``width`` pixels: (x0, y0, x1, y1),
    integer pixels, end-exclusive, at least 1 x 1."""
    fx0, fy0, fx1, fy1 = PRIOR_BOXES[label]
    x0, y0 = int(fx0 * width), int(fy0 * height)
    x1 = max(x0 + 1, int(round(fx1 * width)))
    y1 = max(y0 + 1, int(round(fy1 * height)))
    return x0, y0, min(x1, width), min(y1, height)


def lung_boxes(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Bounding boxes of both lungs in a label mask.

    ``mask``: uint8 (H, W) with 0 / 1 / 2. Returns (int64 (2, 4) boxes (x0, y0, x1, y1) in mask pixels,
    end-exclusive, row 0 = right lung (label 1), row 1 = left lung (label 2); bool (2,) fallback: the
    label was missing or tiny and the prior box was used).
    """
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"expected a lung mask (H, W), got shape {mask.shape}")
    height, width = mask.shape
    min_pixels = max(4, int(MIN_LUNG_FRACTION * height * width))
    boxes = np.zeros((2, 4), dtype=np.int64)
    fallback = np.zeros(2, dtype=bool)
    for row, label in enumerate((RIGHT_LUNG, LEFT_LUNG)):
        inside = mask == label
        if int(inside.sum()) < min_pixels:
            boxes[row] = prior_box(label, height, width)
            fallback[row] = True
            continue
        y_idx = np.flatnonzero(inside.any(axis=1))
        x_idx = np.flatnonzero(inside.any(axis=0))
        boxes[row] = (x_idx[0], y_idx[0], x_idx[-1] + 1, y_idx[-1] + 1)
    return boxes, fallback


def _cut(image: np.ndarray, mask: np.ndarray, label: int, box, use_mask: bool, fill: str) -> np.ndarray:
    x0, y0, x1, y1 = (int(v) for v in box)
    crop = image[y0:y1, x0:x1]
    if fill == "mean" and use_mask:
        inside = mask[y0:y1, x0:x1] == label
        value = np.uint8(np.clip(np.rint(crop[inside].mean()), 0, 255))
        crop = np.where(inside, crop, value)
    return np.ascontiguousarray(crop)


def lung_crops_with_fallback(
    image: np.ndarray, mask: np.ndarray, mirror_left: bool = True, fill: str = "mean"
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`lung_crops` plus the bool (2,) fallback flags (right, left) of :func:`lung_boxes`."""
    image = np.asarray(image)
    mask = np.asarray(mask)
    if image.dtype != np.uint8 or image.ndim != 2:
        raise ValueError(f"expected a uint8 (H, W) image, got {image.dtype} {image.shape}")
    if mask.shape != image.shape:
        raise ValueError(f"mask shape {mask.shape} does not match image shape {image.shape}")
    if fill not in FILL_MODES:
        raise ValueError(f"fill must be one of {FILL_MODES}, got {fill!r}")
    boxes, fallback = lung_boxes(mask)
    right = _cut(image, mask, RIGHT_LUNG, boxes[0], not fallback[0], fill)
    left = _cut(image, mask, LEFT_LUNG, boxes[1], not fallback[1], fill)
    if mirror_left:
        left = np.ascontiguousarray(left[:, ::-1])
    return right, left, fallback


def lung_crops(
    image: np.ndarray, mask: np.ndarray, mirror_left: bool = True, fill: str = "mean"
) -> tuple[np.ndarray, np.ndarray]:
    """Cut the two lung regions of one image for hashing.

    ``image``: uint8 (H, W); ``mask``: uint8 (H, W) labels 0 / 1 / 2 at the same size.
    Returns (right_crop, left_crop), uint8 arrays (h_r, w_r) and (h_l, w_l) in image pixels: the right
    lung is the box of label 1 (image left), the left lung the box of label 2 (image right), flipped
    horizontally when ``mirror_left``. A missing lung gets its prior box (see :func:`lung_boxes`).
    """
    right, left, _ = lung_crops_with_fallback(image, mask, mirror_left=mirror_left, fill=fill)
    return right, left


def lung_hashes(
    images: np.ndarray | torch.Tensor | Sequence[np.ndarray],
    masks: np.ndarray | torch.Tensor | Sequence[np.ndarray],
    mirror_left: bool = True,
    fill: str = "mean",
    return_fallback: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """pHash of both lungs of each image: bool (B, 2, 64), ``[:, 0]`` right lung (mask 1), ``[:, 1]`` left.

    ``images``: uint8 (B, H, W) (or a sequence of (H_i, W_i) arrays); ``masks``: the matching uint8 label
    masks. All 2B crops (of many sizes) are hashed in one batched :func:`gren.hashing.phash` call, which
    groups equal resample lengths into shared GEMMs. With ``return_fallback`` also returns bool (B, 2):
    the lung got the prior box because its mask was empty. Hashes are on the CPU.
    """
    if isinstance(images, torch.Tensor):
        images = images.cpu().numpy()
    if isinstance(masks, torch.Tensor):
        masks = masks.cpu().numpy()
    if len(images) != len(masks):
        raise ValueError(f"got {len(images)} images but {len(masks)} masks")
    crops: list[np.ndarray] = []
    fallback = np.zeros((len(images), 2), dtype=bool)
    for index, (image, mask) in enumerate(zip(images, masks)):
        right, left, fallback[index] = lung_crops_with_fallback(
            image, mask, mirror_left=mirror_left, fill=fill
        )
        crops.extend((right, left))
    if fallback.any():
        log.info(
            "lung_hashes: %d of %d lungs used the prior box (empty mask)", int(fallback.sum()), fallback.size
        )
    if crops:
        hashes = phash(crops).view(len(images), 2, HASH_BITS)
    else:
        hashes = torch.zeros((0, 2, HASH_BITS), dtype=torch.bool)
    if return_fallback:
        return hashes, torch.from_numpy(fallback)
    return hashes
