"""Torch datasets over a :class:`~gren.data.nih.DatasetIndex`, the intensity normalisation and ``collate``.

Intensity normalisation, one for the whole package: an 8-bit image ``x`` (0..255) becomes
``(x / 255 - 0.5) / 0.25`` in float32, i.e. 0 -> -2, 127.5 -> 0, 255 -> +2 (see
:func:`normalize_uint8`). :func:`check_batch_scale` warns (once per kind of problem) when a batch fed
to a model does not look like that.

Items are dicts (docs/architecture.md, "Dataset items"): ``image`` float32 (1, S, S), ``labels``
float32 (14,), ``boxes`` float32 (n, 4) x1, y1, x2, y2 in pixels of the returned S x S image,
``box_labels`` int64 (n,) LABELS indices, ``lung_masks`` uint8 (S, S) 0/1/2, ``lung_fallback`` bool,
``image_id`` str, ``index`` int.
"""

from __future__ import annotations

import logging
import threading

import numpy as np
import torch
from torch.utils.data import Dataset

from gren.core.errors import ImageReadError
from gren.core.fields import is_ragged
from gren.core.imageio import read_gray_resized, read_mask
from gren.data.nih import DatasetIndex

log = logging.getLogger(__name__)

NORM_MEAN = 0.5
"""Mean subtracted from ``x / 255``."""
NORM_STD = 0.25
"""Divisor after subtracting :data:`NORM_MEAN`; normalised values span [-2, 2]."""


def normalize_uint8(images) -> torch.Tensor:
    """8-bit intensities (0..255) to the model's scale: ``(x / 255 - 0.5) / 0.25``, float32.

    ``images``: uint8 tensor or array of any shape, e.g. (S, S), (B, 1, S, S). Returns a float32
    tensor of the same shape with values in [-2, 2]. Any dtype is accepted, but non-uint8 input is
    taken to be on the 0..255 scale too.
    """
    tensor = torch.as_tensor(images)
    return (tensor.to(torch.float32) / 255.0 - NORM_MEAN) / NORM_STD


def denormalize_to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`normalize_uint8` (rounded, clipped): float (...) -> uint8 (...), for display."""
    values = (images.to(torch.float32) * NORM_STD + NORM_MEAN) * 255.0
    return values.round().clamp(0, 255).to(torch.uint8)


_warned: set[str] = set()
_warn_lock = threading.Lock()


def check_batch_scale(images: torch.Tensor) -> str | None:
    """Check that a batch is on the :func:`normalize_uint8` scale; warn once per kind of problem.

    ``images``: (B, C, H, W) (any shape works). Returns ``None`` when it looks right, else a short
    reason (also logged as a warning the first time it occurs in the process):

    * ``"uint8"``: raw 8-bit values, not normalised;
    * ``"0-255"``: float values beyond 3 (raw intensities cast to float);
    * ``"0-1"``: all values in [0, 1] with some above 0 -- looks like ``x / 255`` without the shift;
    * ``"constant"``: every value the same (blank images, or normalised twice to a constant);
    * ``"non-finite"``: NaN or infinity present.
    """
    tensor = torch.as_tensor(images)
    reason = None
    if tensor.numel() == 0:
        return None
    if tensor.dtype == torch.uint8:
        reason = "uint8"
    else:
        values = tensor.detach().to(torch.float32)
        if not bool(torch.isfinite(values).all()):
            reason = "non-finite"
        else:
            low, high = float(values.min()), float(values.max())
            if high > 3.0 or low < -3.0:
                reason = "0-255"
            elif low == high:
                reason = "constant"
            elif low >= 0.0 and high <= 1.0:
                reason = "0-1"
    if reason is not None:
        with _warn_lock:
            first = reason not in _warned
            _warned.add(reason)
        if first:
            log.warning(
                "input batch looks wrongly scaled (%s); expected gren.data.normalize_uint8 output, "
                "(x / 255 - 0.5) / 0.25 in [-2, 2] (this warning is shown once)",
                reason,
            )
    return reason


class RawDataset(Dataset):
    """Decode-and-resize dataset over a :class:`DatasetIndex` (one file read per item).

    ``size``: ``S``, the side of the returned square image in pixels (the aspect ratio is not kept;
    boxes scale by ``S / width`` and ``S / height``). ``image_ids``: restrict to these ids, in this
    order (default: all records). ``on_bad_image``: ``"error"`` raises
    :class:`gren.core.errors.ImageReadError` naming the file; ``"skip"`` logs a warning once per file,
    counts it in :attr:`bad_images` (per worker process) and returns the next readable item in
    index order instead, so batch shapes stay fixed (``index`` then names the item returned).
    Lung masks come from ``records.mask_path`` (resized NEAREST); without one the item has zeros and
    ``lung_fallback`` True.
    """

    def __init__(
        self, index: DatasetIndex, size: int, *, image_ids=None, on_bad_image: str = "error"
    ) -> None:
        if on_bad_image not in ("error", "skip"):
            raise ValueError(f"on_bad_image must be 'error' or 'skip', not {on_bad_image!r}")
        if int(size) <= 0:
            raise ValueError(f"size must be a positive number of pixels, not {size!r}")
        self.index = index if image_ids is None else index.subset(image_ids)
        self.size = int(size)
        self.on_bad_image = on_bad_image
        self.bad_images: set[str] = set()
        records = self.index.records
        self._paths = records["path"].tolist()
        self._mask_paths = records["mask_path"].tolist()
        self._ids = records["image_id"].tolist()
        self._sizes = records[["width", "height"]].to_numpy(dtype=np.float64)
        self._labels = torch.from_numpy(self.index.label_matrix().astype(np.float32))

    def __len__(self) -> int:
        return len(self._ids)

    def __getitem__(self, i: int) -> dict:
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"item {i} out of range for a dataset of {len(self)}")
        if self.on_bad_image == "error":
            return self._item(i)
        for step in range(len(self)):
            j = (i + step) % len(self)
            if self._paths[j] in self.bad_images:
                continue
            try:
                return self._item(j)
            except ImageReadError as err:
                self.bad_images.add(self._paths[j])
                log.warning(
                    "skipping unreadable image (%d so far in this process): %s", len(self.bad_images), err
                )
        raise ImageReadError(f"{self.index.data_dir}: none of the {len(self)} images is readable")

    def _item(self, i: int) -> dict:
        size = self.size
        gray = read_gray_resized(self._paths[i], size)
        boxes, box_labels = self.index.boxes_for(self._ids[i])
        width, height = self._sizes[i]
        scale = np.array([size / width, size / height, size / width, size / height], dtype=np.float32)
        mask_path = self._mask_paths[i]
        if mask_path:
            lung_masks = torch.from_numpy(read_mask(mask_path, size))
        else:
            lung_masks = torch.zeros((size, size), dtype=torch.uint8)
        return {
            "image": normalize_uint8(torch.from_numpy(gray)).unsqueeze(0),
            "labels": self._labels[i].clone(),
            "boxes": torch.from_numpy(boxes * scale),
            "box_labels": torch.from_numpy(box_labels.copy()),
            "lung_masks": lung_masks,
            "lung_fallback": not mask_path,
            "image_id": self._ids[i],
            "index": i,
        }


def collate(items: list[dict]) -> dict:
    """Batch a list of item dicts, the one collate of the package: fields registered as ragged
    (:mod:`gren.core.fields`: ``boxes`` (n_i, 4), ``box_labels`` (n_i,), a method's per-superpixel rows...)
    stay lists of B tensors; other tensors are stacked (``image`` -> (B, 1, S, S), ``labels`` -> (B, 14),
    ``lung_masks`` -> (B, S, S), ...); strings (``image_id``) become lists; bools and ints become bool /
    int64 tensors (B,)."""
    if not items:
        raise ValueError("collate needs at least one item")
    batch: dict = {}
    for key in items[0]:
        values = [item[key] for item in items]
        if is_ragged(key):
            batch[key] = values
        elif isinstance(values[0], torch.Tensor):
            batch[key] = torch.stack(values)
        elif isinstance(values[0], bool | np.bool_):
            batch[key] = torch.tensor([bool(v) for v in values], dtype=torch.bool)
        elif isinstance(values[0], int | np.integer):
            batch[key] = torch.tensor([int(v) for v in values], dtype=torch.int64)
        elif isinstance(values[0], float):
            batch[key] = torch.tensor(values, dtype=torch.float32)
        else:
            batch[key] = values
    return batch
