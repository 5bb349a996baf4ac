"""SLIC superpixels of each film and a 64-bit pHash of each superpixel: CCG's patches (CCG section 3.4).

Two per-image cache fields (:mod:`gren.core.fields`), computed once by ``gren prepare --methods ccg`` /
``--fields superpixels,superpixel_hashes`` or on first training of a method that names them in ``needs``
(an existing cache is extended, never rebuilt):

* ``superpixels``: uint8 ``(S, S)``, the superpixel label of every pixel, ``0 .. n - 1`` contiguous, with
  ``n <= MAX_SUPERPIXELS``; labels follow SLIC's seeding order (a raster over the film), so label ``l``
  of one film and label ``l`` of another lie in roughly the same place.
* ``superpixel_hashes``: bool, ragged ``(n, 64)``: row ``l`` is the pHash (imagehash bit order,
  :func:`gren.hashing.phash`) of superpixel ``l``'s crop.

Readings (the paper says only "SLIC [1] ... to generate the patches" and "the hash code [19] of the patch"):

* SLIC from scikit-image with about ``SLIC_SEGMENTS = 10`` segments (the lineage code's <= 10 patches),
  ``compactness = SLIC_COMPACTNESS = 0.3`` on the film scaled to [0, 1] (grayscale: ``channel_axis=None``);
  at 10 segments the default compactness 10 gives an intensity-blind grid, 0.3 follows the anatomy and
  gives 6-9 segments on real NIH films. SLIC runs on the film resized to at most ``SLIC_SIDE = 128``
  pixels (bilinear) and its labels are brought back to ``S x S`` by nearest neighbour: segments of
  ~1/10 of the film lose nothing by it, and it costs ~6 ms a film instead of ~85 ms at 512 px.
  More than ``MAX_SUPERPIXELS`` segments (rare) are capped: the labels beyond are merged into the last.
* The crop of superpixel ``l`` is the bounding box of its pixels in the ``S x S`` film, the pixels outside
  the superpixel replaced by the superpixel's own mean intensity (rounded), as the lung crops of
  :mod:`gren.lungs.regions` do (``fill="mean"``), so only the superpixel's pixels shape its hash.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from gren.core.errors import GrenError
from gren.core.fields import CacheField, register_field

SLIC_SEGMENTS = 10
SLIC_COMPACTNESS = 0.3
SLIC_SIDE = 128
MAX_SUPERPIXELS = 16
HASH_BITS = 64


def _slic():
    try:
        from skimage.segmentation import slic
    except ImportError as err:  # pragma: no cover - a declared dependency
        raise GrenError("superpixels need scikit-image (pip install scikit-image)") from err
    return slic


def superpixel_labels(image: np.ndarray) -> np.ndarray:
    """SLIC labels of one film: ``image`` uint8 ``(H, W)`` -> uint8 ``(H, W)`` in ``0 .. n - 1``, ``n <= 16``."""
    image = np.asarray(image)
    if image.ndim != 2 or image.dtype != np.uint8:
        raise ValueError(f"superpixel_labels takes a uint8 (H, W) film, got {image.dtype} {image.shape}")
    height, width = image.shape
    scale = min(1.0, SLIC_SIDE / max(height, width))
    small_hw = (max(1, round(height * scale)), max(1, round(width * scale)))
    small = image if small_hw == (height, width) else \
        np.asarray(Image.fromarray(image).resize(small_hw[::-1], Image.Resampling.BILINEAR))
    labels = _slic()(small.astype(np.float64) / 255.0, n_segments=SLIC_SEGMENTS, compactness=SLIC_COMPACTNESS,
                     channel_axis=None, start_label=0, enforce_connectivity=True)
    _, labels = np.unique(labels, return_inverse=True)  # contiguous 0 .. n-1, in SLIC's order
    labels = np.minimum(labels.reshape(small_hw), MAX_SUPERPIXELS - 1).astype(np.uint8)
    if small_hw != (height, width):
        labels = np.asarray(Image.fromarray(labels).resize((width, height), Image.Resampling.NEAREST))
        _, labels = np.unique(labels, return_inverse=True)  # a sliver lost by the resize: stay contiguous
        labels = labels.reshape(height, width).astype(np.uint8)
    return np.ascontiguousarray(labels)


def superpixel_crops(image: np.ndarray, labels: np.ndarray) -> list[np.ndarray]:
    """The crop of each superpixel: uint8 ``(h_l, w_l)`` arrays, ``l = 0 .. labels.max()``.

    Each is the bounding box of the superpixel with the pixels outside it set to its rounded mean.
    """
    crops = []
    for label in range(int(labels.max()) + 1):
        inside = labels == label
        rows, cols = np.flatnonzero(inside.any(axis=1)), np.flatnonzero(inside.any(axis=0))
        box = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
        crop, keep = image[box], inside[box]
        value = np.uint8(np.clip(np.rint(crop[keep].mean()), 0, 255))
        crops.append(np.ascontiguousarray(np.where(keep, crop, value)))
    return crops


def superpixel_hashes(image: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """bool ``(n, 64)``: the pHash of each superpixel crop (:func:`superpixel_crops`), row ``l`` for label ``l``."""
    from gren.hashing import phash

    crops = [torch.from_numpy(crop) for crop in superpixel_crops(image, labels)]
    return phash(crops).numpy().astype(bool)


def compute_superpixels(images: np.ndarray, lung_masks: np.ndarray) -> list[np.ndarray]:
    """Cache field ``superpixels``: ``images`` uint8 ``(B, S, S)`` -> ``B`` label maps uint8 ``(S, S)``."""
    return [superpixel_labels(image) for image in images]


def compute_superpixel_hashes(images: np.ndarray, lung_masks: np.ndarray) -> list[np.ndarray]:
    """Cache field ``superpixel_hashes``: ``images`` uint8 ``(B, S, S)`` -> ``B`` bool arrays ``(n_i, 64)``.

    All crops of the chunk go through one batched :func:`gren.hashing.phash` call.
    """
    from gren.hashing import phash

    crops, counts = [], []
    for image in images:
        own = superpixel_crops(image, superpixel_labels(image))
        crops += [torch.from_numpy(crop) for crop in own]
        counts.append(len(own))
    bits = phash(crops).numpy().astype(bool) if crops else np.zeros((0, HASH_BITS), bool)
    return np.split(bits, np.cumsum(counts)[:-1])


SUPERPIXELS = register_field(CacheField(
    "superpixels", np.dtype(np.uint8), ("S", "S"), compute=compute_superpixels,
    description="SLIC superpixel label of each pixel (about 10 a film; CCG)"))
SUPERPIXEL_HASHES = register_field(CacheField(
    "superpixel_hashes", np.dtype(np.bool_), (HASH_BITS,), ragged=True, compute=compute_superpixel_hashes,
    description="64-bit pHash of each SLIC superpixel's crop (CCG)"))


@torch.no_grad()
def superpixel_cell_weights(labels: torch.Tensor, grid_hw: tuple[int, int], count: int = MAX_SUPERPIXELS
                            ) -> torch.Tensor:
    """Fraction of each cell of an ``h x w`` grid that each superpixel covers.

    Args:
        labels: ``(B, H, W)`` integer superpixel labels in ``0 .. count - 1``.
        grid_hw: ``(h, w)``; pixel ``(y, x)`` belongs to cell ``(y h // H, x w // W)``.
        count: the number of label slots ``M``.

    Returns:
        float32 ``(B, M, h, w)``; over ``M`` each cell sums to 1.
    """
    batch, height, width = labels.shape
    grid_h, grid_w = grid_hw
    device = labels.device
    rows = torch.arange(height, device=device) * grid_h // height
    cols = torch.arange(width, device=device) * grid_w // width
    cell = (rows[:, None] * grid_w + cols[None, :]).reshape(-1)  # (H W,)
    cells = grid_h * grid_w
    index = labels.reshape(batch, -1).long().clamp(0, count - 1) * cells + cell[None, :]
    index = index + torch.arange(batch, device=device)[:, None] * (count * cells)
    counts = torch.bincount(index.reshape(-1), minlength=batch * count * cells).float()
    counts = counts.view(batch, count, grid_h, grid_w)
    return counts / counts.sum(dim=1, keepdim=True).clamp_min(1.0)


def padded_hashes(rows: Sequence[torch.Tensor], count: int = MAX_SUPERPIXELS) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch's ragged hashes as ``(B, M, 64)`` bool (zeros beyond each film's ``n_i``) and ``valid (B, M)``."""
    batch = len(rows)
    device = rows[0].device if batch else torch.device("cpu")
    out = torch.zeros(batch, count, HASH_BITS, dtype=torch.bool, device=device)
    valid = torch.zeros(batch, count, dtype=torch.bool, device=device)
    for i, row in enumerate(rows):
        n = min(len(row), count)
        out[i, :n] = torch.as_tensor(row[:n], device=device).bool()
        valid[i, :n] = True
    return out, valid
