"""Extending a prepared cache with the per-image fields methods declare (:mod:`gren.core.fields`).

``extend_cache(cache_dir, ["superpixels", ...])`` computes each missing field from the cache's own images
and lung masks, chunk by chunk, writes it (fixed: ``<name>.npy`` ``(N, ...)``; ragged:
``<name>.values.npy`` with ``<name>.offsets.npy`` ``(N + 1,)``, rows of image ``i`` at
``values[offsets[i]:offsets[i + 1]]``), each file atomically, and records it in ``meta.json`` under
``"fields"`` last -- an interrupted extension leaves the cache as it was. The rest of the cache is never
rewritten. ``ensure_fields`` is what training calls: it extends a writable cache with what the method
needs, or says exactly which ``gren prepare`` command to run.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from gren.core.atomic import atomic_path
from gren.core.errors import DataError
from gren.core.fields import FIELDS, CacheField
from gren.core.progress import progress as progress_bar
from gren.data import cache_format as fmt

log = logging.getLogger(__name__)

CHUNK = 256


def _discover() -> None:
    import gren.methods  # noqa: F401  (method modules register the fields they need)


def missing_fields(meta: dict, names: Iterable[str]) -> list[str]:
    """The registered non-built-in fields among ``names`` that a cache with ``meta`` does not hold."""
    _discover()
    held = set(meta.get("fields", {}))
    return [n for n in dict.fromkeys(names) if n in FIELDS and not FIELDS[n].builtin and n not in held]


def fields_needed_by(methods: Iterable[str]) -> list[str]:
    """The non-built-in cache fields that the given methods' ``needs`` name."""
    from gren.methods import method_class

    _discover()
    names: list[str] = []
    for method in methods:
        names += [n for n in sorted(method_class(method).needs) if n in FIELDS and not FIELDS[n].builtin]
    return list(dict.fromkeys(names))


def _compute(field: CacheField, images: np.ndarray, masks: np.ndarray, size: int, progress: bool):
    values, counts = [], []
    for start in progress_bar(range(0, len(images), CHUNK), desc=f"prepare: field {field.name}", unit="chunk",
                              disable=not progress, logger=log):
        stop = min(start + CHUNK, len(images))
        rows = field.compute(np.asarray(images[start:stop]), np.asarray(masks[start:stop]))
        if len(rows) != stop - start:
            raise DataError(f"cache field {field.name}: compute returned {len(rows)} rows for {stop - start} images")
        for row in rows:
            row = np.asarray(row, dtype=field.dtype)
            expected = field.trailing_shape(size)
            if (row.shape[1:] if field.ragged else row.shape) != expected:
                raise DataError(f"cache field {field.name}: a row of shape {row.shape}, expected "
                                f"{'(n, ' + str(expected)[1:] if field.ragged else expected}")
            values.append(row)
            counts.append(len(row) if field.ragged else 1)
    return values, counts


def extend_cache(cache_dir: str | os.PathLike, names: Iterable[str], progress: bool = True) -> list[str]:
    """Add the missing registered fields ``names`` to the complete cache at ``cache_dir``; returns those added.

    Raises:
        DataError: not a complete cache, an unknown field, or a compute function that breaks its declaration.
    """
    from gren.data.cache import PreparedCache
    from gren.data.prepare import _exclusive

    cache_dir = Path(cache_dir)
    _discover()
    unknown = [n for n in names if n not in FIELDS]
    if unknown:
        raise DataError(f"unknown cache field(s) {', '.join(unknown)}; registered: {', '.join(sorted(FIELDS))}")
    with _exclusive(cache_dir):
        cache = PreparedCache(cache_dir)  # re-read under the lock: another process may have added them
        todo = missing_fields(cache.meta, names)
        for name in todo:
            field = FIELDS[name]
            log.info("%s: computing cache field %s for %d images", cache_dir, name, len(cache))
            values, counts = _compute(field, cache.images, cache.lung_masks, cache.size, progress)
            shape = field.trailing_shape(cache.size)
            if field.ragged:
                stacked = np.concatenate(values) if values else np.zeros((0, *shape), field.dtype)
                offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
                for suffix, array in (("values", stacked), ("offsets", offsets)):
                    with atomic_path(cache_dir / f"{name}.{suffix}.npy") as tmp, open(tmp, "wb") as handle:
                        np.save(handle, array)
            else:
                stacked = np.stack(values) if values else np.zeros((0, *shape), field.dtype)
                with atomic_path(cache_dir / f"{name}.npy") as tmp, open(tmp, "wb") as handle:
                    np.save(handle, stacked)
            meta = fmt.read_meta(cache_dir) or {}
            meta.setdefault("fields", {})[name] = {"dtype": str(field.dtype), "shape": list(shape),
                                                   "ragged": field.ragged}
            fmt.write_json_atomic(cache_dir / fmt.META_FILE, meta)
    return todo


def ensure_fields(cache, names: Iterable[str], progress: bool = True):
    """The cache with every registered field of ``names`` present: extended when it lacks some and is
    writable; otherwise a :class:`DataError` with the ``gren prepare`` command that adds them."""
    from gren.data.cache import PreparedCache

    todo = missing_fields(cache.meta, names)
    if not todo:
        return cache
    if not os.access(cache.path, os.W_OK):
        raise DataError(f"{cache.path} lacks the cache field(s) {', '.join(todo)} and is not writable here; run "
                        f"`gren prepare --data {cache.meta.get('data_dir', 'DATA')} --out {cache.path} "
                        f"--fields {','.join(todo)}` where it is")
    extend_cache(cache.path, todo, progress=progress)
    return PreparedCache(cache.path)
