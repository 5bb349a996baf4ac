"""The on-disk format of a prepared cache (written by :mod:`gren.data.prepare`, read by :mod:`gren.data.cache`).

A cache is one directory::

    meta.json          parameters, counts, failures; "complete": true is written LAST (tmp + os.replace)
    images.npy         uint8 (N, S, S)       the images resized to S x S pixels
    lung_masks.npy     uint8 (N, S, S)       0 background, 1 patient's right lung (image left), 2 left lung
    lung_hashes.npy    bool  (N, 2, 64)      pHash bits of the right ([:, 0]) and left ([:, 1]) lung
    lung_fallback.npy  bool  (N,)            the lung mask came from the anatomical prior
    labels.npy         uint8 (N, 14)         image-level labels in LABELS order
    boxes.npy          float32 (M, 4)        x1, y1, x2, y2 in pixels of the S x S image
    box_labels.npy     int64 (M,)            LABELS index of each box
    box_offsets.npy    int64 (N + 1,)        boxes of row i are boxes[box_offsets[i]:box_offsets[i + 1]]
    records.csv        the index's records table (plus lung_fallback, mask_source), one row per image
    work/              only while prepare runs: preallocated row arrays and per-chunk markers
    .prepare.lock      flock'ed while prepare runs (one preparer per folder)

Every ``.npy`` is a plain NumPy file, opened with ``np.load(path, mmap_mode="r")``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from gren.core.atomic import atomic_path
from gren.core.atomic import write_json_atomic as core_write_json_atomic
from gren.core.errors import DataError

FORMAT = "gren-prepared-cache"
FORMAT_VERSION = 1

META_FILE = "meta.json"
RECORDS_FILE = "records.csv"
WORK_DIR = "work"
CHUNKS_DIR = "chunks"
WORK_IDS_FILE = "image_ids.json"
LOCK_FILE = ".prepare.lock"

ROW_ARRAYS: dict[str, tuple[np.dtype, tuple[str, ...]]] = {
    "images": (np.dtype(np.uint8), ("S", "S")),
    "lung_masks": (np.dtype(np.uint8), ("S", "S")),
    "lung_hashes": (np.dtype(np.bool_), ("2", "64")),
    "lung_fallback": (np.dtype(np.bool_), ()),
}
"""Per-image arrays that the prepare workers fill: name -> (dtype, trailing shape; "S" = the size)."""

TABLE_ARRAYS = ("labels", "boxes", "box_labels", "box_offsets")
"""Arrays written once from the index when prepare finishes."""

CACHE_FILES = (META_FILE, RECORDS_FILE, *(f"{name}.npy" for name in (*ROW_ARRAYS, *TABLE_ARRAYS)))


def row_shape(name: str, size: int) -> tuple[int, ...]:
    """Trailing shape of row array ``name`` for cache side ``size`` (pixels)."""
    return tuple(size if dim == "S" else int(dim) for dim in ROW_ARRAYS[name][1])


def write_json_atomic(path: Path, payload: dict[str, Any]) -> None:
    """Write ``payload`` as JSON to ``path`` through a temporary file and ``os.replace`` (never half-written)."""
    core_write_json_atomic(path, payload, indent=1, sort_keys=True)


def read_meta(cache_dir: Path) -> dict[str, Any] | None:
    """The cache's ``meta.json`` as a dict, or ``None`` when the folder has none (or another format's)."""
    path = Path(cache_dir) / META_FILE
    if not path.is_file():
        return None
    try:
        with open(path, encoding="utf-8") as handle:
            meta = json.load(handle)
    except (OSError, json.JSONDecodeError) as err:
        raise DataError(f"{path}: unreadable cache metadata ({err}); rerun `gren prepare` with --force") from err
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        return None
    return meta


def write_records(records: pd.DataFrame, path: Path) -> dict[str, str]:
    """Write the records table as CSV (tmp + replace); returns the column dtypes to restore it with."""
    with atomic_path(path) as tmp:
        records.to_csv(tmp, index=False)
    return {column: _dtype_kind(records[column]) for column in records.columns}


def _dtype_kind(column: pd.Series) -> str:
    if pd.api.types.is_bool_dtype(column):
        return "bool"
    if pd.api.types.is_integer_dtype(column):
        return "int"
    if pd.api.types.is_float_dtype(column):
        return "float"
    return "str"


def read_records(path: Path, dtypes: dict[str, str]) -> pd.DataFrame:
    """Read a records CSV written by :func:`write_records`, restoring its column dtypes."""
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    for column, kind in dtypes.items():
        if column not in frame.columns:
            raise DataError(f"{path}: column {column!r} missing; the cache is damaged, rerun `gren prepare --force`")
        if kind == "bool":
            frame[column] = frame[column].map({"True": True, "False": False}).astype(bool)
        elif kind == "int":
            frame[column] = frame[column].astype(np.int64)
        elif kind == "float":
            frame[column] = pd.to_numeric(frame[column]).astype(np.float64)
    return frame
