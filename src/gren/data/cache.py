"""The prepared cache: :func:`prepare_cache` writes it, :class:`PreparedCache` reads it, :class:`CacheDataset` serves it.

``gren prepare`` (:mod:`gren.data.prepare`) decodes, resizes, segments and hashes every image once;
training and evaluation then read ``S x S`` uint8 images, lung masks and lung hashes from memory-mapped
``.npy`` files (format: :mod:`gren.data.cache_format`). A raw folder is prepared on first use by
:func:`gren.data.source.open_prepared`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from gren.core.errors import DataError
from gren.core.labels import LABELS
from gren.data import cache_format as fmt
from gren.data.dataset import normalize_uint8
from gren.data.prepare import prepare_cache

__all__ = ["CacheDataset", "LungSafeAugment", "PreparedCache", "prepare_cache"]

log = logging.getLogger(__name__)


class PreparedCache:
    """A complete prepared cache, opened read-only; arrays are memory-mapped on first access.

    Attributes: ``path``, ``meta`` (``meta.json``), ``size`` (S, pixels), ``lungs`` (the spec it was
    prepared with), ``records`` (DataFrame: the index's columns plus ``lung_fallback`` and
    ``mask_source``), ``image_ids`` (list[str]). Arrays (rows aligned with ``records``):

    * ``images``: uint8 (N, S, S); ``lung_masks``: uint8 (N, S, S), 0 background, 1 patient's right lung
      (image left), 2 patient's left lung (image right);
    * ``lung_hashes``: bool (N, 2, 64), ``[:, 0]`` right lung (mask 1), ``[:, 1]`` left lung (mask 2);
    * ``lung_fallback``: bool (N,); ``labels``: uint8 (N, 14) in ``LABELS`` order.

    ``boxes(i)`` gives row ``i``'s boxes. The object pickles without its arrays (DataLoader workers
    re-open the memory maps lazily).
    """

    def __init__(self, path: str | os.PathLike, meta: dict[str, Any] | None = None):
        self.path = Path(path).expanduser()
        meta = fmt.read_meta(self.path) if meta is None else meta  # callers that already read it pass it
        if meta is None:
            raise DataError(f"{self.path}: not a prepared cache (no gren {fmt.META_FILE}); "
                            f"run `gren prepare --data DATA_DIR --out {self.path}` first")
        if not meta.get("complete"):
            params = meta.get("params", {})
            raise DataError(
                f"{self.path}: incomplete cache (`gren prepare` was interrupted before it finished); rerun "
                f"`gren prepare --data {meta.get('data_dir', 'DATA_DIR')} --out {self.path} "
                f"--size {params.get('size', 'S')} --lungs {params.get('lungs', 'auto')}` to resume it")
        version = meta.get("params", {}).get("version")
        if version != fmt.FORMAT_VERSION:
            raise DataError(f"{self.path}: cache format version {version}, this gren reads {fmt.FORMAT_VERSION}; "
                            "rerun `gren prepare --force`")
        self.meta = meta
        self.size = int(meta["params"]["size"])
        self.lungs = str(meta["params"]["lungs"])
        self.records = fmt.read_records(self.path / fmt.RECORDS_FILE, meta["records_dtypes"])
        if len(self.records) != int(meta["n_images"]):
            raise DataError(f"{self.path / fmt.RECORDS_FILE}: {len(self.records)} rows, meta.json says "
                            f"{meta['n_images']}; the cache is damaged, rerun `gren prepare --force`")
        self.image_ids: list[str] = self.records["image_id"].astype(str).tolist()
        self._row_of: dict[str, int] | None = None
        self._arrays: dict[str, np.ndarray] = {}

    @staticmethod
    def is_cache(path: str | os.PathLike) -> bool:
        """True when ``path`` is a gren cache folder (complete or interrupted), False for anything else."""
        path = Path(path).expanduser()
        return path.is_dir() and fmt.read_meta(path) is not None

    @staticmethod
    def is_complete(path: str | os.PathLike) -> bool:
        """True when ``path`` is a complete gren cache."""
        path = Path(path).expanduser()
        meta = fmt.read_meta(path) if path.is_dir() else None
        return bool(meta and meta.get("complete"))

    def __len__(self) -> int:
        return len(self.image_ids)

    def __repr__(self) -> str:
        return f"PreparedCache({str(self.path)!r}, n={len(self)}, size={self.size}, lungs={self.lungs!r})"

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_arrays"] = {}
        return state

    def _array(self, name: str) -> np.ndarray:
        array = self._arrays.get(name)
        if array is None:
            path = self.path / f"{name}.npy"
            try:
                array = np.load(path, mmap_mode="r")
            except (OSError, ValueError) as err:
                raise DataError(f"{path}: cannot open cache array ({err}); rerun `gren prepare --force`") from err
            expected_rows = len(self) + 1 if name == "box_offsets" else len(self)
            if name in fmt.ROW_ARRAYS or name in ("labels", "box_offsets"):
                if array.shape[0] != expected_rows:
                    raise DataError(f"{path}: {array.shape[0]} rows, expected {expected_rows}; "
                                    "the cache is damaged, rerun `gren prepare --force`")
            self._arrays[name] = array
        return array

    @property
    def images(self) -> np.ndarray:
        """uint8 (N, S, S), memory-mapped."""
        return self._array("images")

    @property
    def lung_masks(self) -> np.ndarray:
        """uint8 (N, S, S) with 0/1/2, memory-mapped."""
        return self._array("lung_masks")

    @property
    def lung_hashes(self) -> np.ndarray:
        """bool (N, 2, 64): right lung, left lung."""
        return self._array("lung_hashes")

    @property
    def lung_fallback(self) -> np.ndarray:
        """bool (N,): the lung mask came from the anatomical prior, not a segmentation."""
        return self._array("lung_fallback")

    @property
    def labels(self) -> np.ndarray:
        """uint8 (N, 14) in ``LABELS`` order."""
        return self._array("labels")

    def boxes(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Row ``i``'s boxes: (float32 (n, 4) x1, y1, x2, y2 in pixels of the S x S image, int64 (n,) LABELS index)."""
        offsets = self._array("box_offsets")
        start, stop = int(offsets[i]), int(offsets[i + 1])
        return (np.array(self._array("boxes")[start:stop], dtype=np.float32),
                np.array(self._array("box_labels")[start:stop], dtype=np.int64))

    def _lookup(self) -> dict[str, int]:
        if self._row_of is None:
            self._row_of = {image_id: i for i, image_id in enumerate(self.image_ids)}
        return self._row_of

    def row_of(self, image_id: str) -> int:
        """The row of ``image_id``; raises :class:`DataError` when the cache does not hold it."""
        try:
            return self._lookup()[str(image_id)]
        except KeyError as err:
            raise DataError(f"{self.path}: image {image_id!r} is not in this cache") from err

    def rows_of(self, image_ids: Sequence[str]) -> np.ndarray:
        """int64 rows of ``image_ids``; raises :class:`DataError` naming the first few that are absent."""
        lookup = self._lookup()
        absent = [i for i in image_ids if str(i) not in lookup]
        if absent:
            raise DataError(f"{self.path}: {len(absent)} requested images are not in this cache "
                            f"(e.g. {', '.join(map(str, absent[:5]))})")
        return np.array([lookup[str(i)] for i in image_ids], dtype=np.int64)

    @property
    def extra_fields(self) -> list[str]:
        """Names of the method-declared fields this cache holds (:mod:`gren.data.fields`)."""
        return sorted(self.meta.get("fields", {}))

    def field(self, name: str, i: int) -> np.ndarray:
        """Row ``i`` of extra field ``name``: its fixed-shape array, or (ragged) its ``(n_i, ...)`` rows."""
        spec = self.meta.get("fields", {}).get(name)
        if spec is None:
            raise DataError(f"{self.path}: no cache field {name!r} (held: {', '.join(self.extra_fields) or 'none'}); "
                            f"add it with `gren prepare --out {self.path} --fields {name}`")
        if spec.get("ragged"):
            offsets = self._array(f"{name}.offsets")
            return np.array(self._array(f"{name}.values")[int(offsets[i]):int(offsets[i + 1])])
        return np.array(self._array(name)[i])

    @property
    def summary(self) -> dict[str, Any]:
        """What ``gren prepare`` reported when it completed this cache."""
        return dict(self.meta.get("summary", {}))

    def label_frame(self) -> pd.DataFrame:
        """``labels`` as a DataFrame (N rows, one column per LABELS name), indexed by image id."""
        return pd.DataFrame(np.asarray(self.labels), columns=list(LABELS), index=self.image_ids)


class LungSafeAugment:
    """Random crop-and-rescale plus brightness/contrast jitter that keeps left and right in place.

    A crop of side ``uniform(min_scale, 1) * S`` at a random position is resized back to ``S x S``
    (image bilinear, lung masks nearest); boxes move and scale with it and are clipped to the image
    (boxes that leave it entirely are dropped). Never flips: the left/right lungs are distinct.
    Hashes are not recomputed (they describe the un-augmented lungs). Uses torch's RNG, which
    DataLoader seeds per worker.
    """

    def __init__(self, min_scale: float = 0.85, brightness: float = 0.1, contrast: float = 0.1):
        if not 0.0 < min_scale <= 1.0:
            raise ValueError(f"min_scale {min_scale}: expected in (0, 1]")
        self.min_scale, self.brightness, self.contrast = min_scale, brightness, contrast

    def __call__(self, image: torch.Tensor, lung_masks: torch.Tensor, boxes: torch.Tensor, box_labels: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``image`` float32 (1, S, S) normalised, ``lung_masks`` uint8 (S, S), ``boxes`` float32 (n, 4) in
        S pixels, ``box_labels`` int64 (n,) -> the same, augmented."""
        size = image.shape[-1]
        side = max(8, int(round(size * float(torch.empty(1).uniform_(self.min_scale, 1.0)))))
        x0 = int(torch.randint(0, size - side + 1, (1,)))
        y0 = int(torch.randint(0, size - side + 1, (1,)))
        crop = image[:, y0:y0 + side, x0:x0 + side].unsqueeze(0)
        image = torch.nn.functional.interpolate(crop, size=(size, size), mode="bilinear", align_corners=False,
                                                antialias=False)[0]
        mask_crop = lung_masks[y0:y0 + side, x0:x0 + side][None, None].float()
        lung_masks = torch.nn.functional.interpolate(mask_crop, size=(size, size), mode="nearest")[0, 0].to(torch.uint8)
        scale = size / side
        if len(boxes):
            shifted = (boxes - torch.tensor([x0, y0, x0, y0], dtype=boxes.dtype)) * scale
            shifted = shifted.clamp(0.0, float(size))
            keep = (shifted[:, 2] > shifted[:, 0]) & (shifted[:, 3] > shifted[:, 1])
            boxes, box_labels = shifted[keep], box_labels[keep]
        gain = 1.0 + float(torch.empty(1).uniform_(-self.contrast, self.contrast))
        shift = float(torch.empty(1).uniform_(-self.brightness, self.brightness)) / 0.25
        image = image * gain + shift
        return image, lung_masks, boxes, box_labels


class CacheDataset(Dataset):
    """Items of a :class:`PreparedCache` as the dicts of docs/architecture.md ("Dataset items").

    ``cache``: a :class:`PreparedCache` or a cache path. ``indices``: ``None`` (all rows), a sequence of
    int rows, or a sequence of image ids (str). ``augment``: ``False`` (default), ``True`` (a default
    :class:`LungSafeAugment`) or a callable with its signature.

    Item: ``image`` float32 (1, S, S) (``normalize_uint8``), ``labels`` float32 (14,), ``boxes`` float32
    (n, 4) in S pixels, ``box_labels`` int64 (n,), ``lung_masks`` uint8 (S, S), ``lung_hashes`` bool
    (2, 64), ``lung_fallback`` bool, ``image_id`` str, ``index`` int (position in this dataset;
    the cache row is ``dataset.rows[index]``).
    """

    def __init__(self, cache: PreparedCache | str | os.PathLike, indices: Sequence[int] | Sequence[str] | None = None,
                 augment: bool | Callable[..., Any] = False):
        self.cache = cache if isinstance(cache, PreparedCache) else PreparedCache(cache)
        self.rows = self._resolve_rows(indices)
        if augment is True:
            self.augment: Callable[..., Any] | None = LungSafeAugment()
        else:
            self.augment = augment or None

    def _resolve_rows(self, indices: Sequence[int] | Sequence[str] | None) -> np.ndarray:
        n = len(self.cache)
        if indices is None:
            return np.arange(n, dtype=np.int64)
        values = list(indices.tolist() if hasattr(indices, "tolist") else indices)
        if values and all(isinstance(v, str) for v in values):
            return self.cache.rows_of(values)
        rows = np.asarray(values, dtype=np.int64).reshape(-1)
        bad = rows[(rows < -n) | (rows >= n)]
        if bad.size:
            raise DataError(f"{self.cache.path}: rows {bad[:5].tolist()} out of range for a cache of {n} images")
        return rows % n if n else rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, Any]:
        row = int(self.rows[index])
        cache = self.cache
        image = normalize_uint8(torch.from_numpy(np.array(cache.images[row]))[None])
        lung_masks = torch.from_numpy(np.array(cache.lung_masks[row]))
        boxes_np, box_labels_np = cache.boxes(row)
        boxes, box_labels = torch.from_numpy(boxes_np), torch.from_numpy(box_labels_np)
        if self.augment is not None:
            image, lung_masks, boxes, box_labels = self.augment(image, lung_masks, boxes, box_labels)
        return {
            "image": image,
            "labels": torch.from_numpy(np.asarray(cache.labels[row], dtype=np.float32)),
            "boxes": boxes,
            "box_labels": box_labels,
            "lung_masks": lung_masks,
            "lung_hashes": torch.from_numpy(np.array(cache.lung_hashes[row], dtype=bool)),
            "lung_fallback": bool(cache.lung_fallback[row]),
            "image_id": cache.image_ids[row],
            "index": int(index),
            **{name: torch.from_numpy(cache.field(name, row)) for name in cache.extra_fields},
        }
