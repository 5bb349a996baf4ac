"""The registry of per-image fields: what a prepared cache can hold and how a batch carries it.

A :class:`CacheField` names one per-image quantity, its dtype and either a fixed trailing shape (stacked
into ``(B, ...)`` by ``collate``) or ``ragged`` (a variable number of rows per image, kept as a list of
``B`` tensors by ``collate``). The built-in fields are computed by ``gren prepare``'s own pipeline
(images, lung masks, lung hashes, labels, boxes). Any other field carries a ``compute`` function
``(images uint8 (B, S, S), lung_masks uint8 (B, S, S)) -> list of B arrays`` and is computed once, on
demand: ``gren prepare --fields NAME`` (or ``--methods M``, for what method ``M`` needs), or training a
method whose ``needs`` name it, extends an existing cache with it instead of rebuilding the cache.

Fields are registered where their computation lives (``register_field``), e.g. a method module that
needs superpixels registers them; the registry itself imports no other gren package.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

ComputeFn = Callable[[np.ndarray, np.ndarray], Sequence[np.ndarray]]


@dataclass(frozen=True)
class CacheField:
    """One per-image field.

    Attributes:
        name: the batch key and the cache file stem (``<name>.npy``; ragged: ``<name>.values.npy`` +
            ``<name>.offsets.npy``).
        dtype: NumPy dtype of the stored values.
        shape: fixed trailing shape per image (``"S"`` for the cache side), or, when ``ragged``, the
            trailing shape of each of the image's rows.
        ragged: a variable number of rows per image.
        compute: ``(images (B, S, S) uint8, lung_masks (B, S, S) uint8) -> B arrays``; ``None`` for the
            built-in fields that prepare's pipeline writes itself.
        description: one line for ``gren prepare --help`` and the docs.
    """

    name: str
    dtype: np.dtype
    shape: tuple[int | str, ...] = ()
    ragged: bool = False
    compute: ComputeFn | None = None
    description: str = ""

    @property
    def builtin(self) -> bool:
        return self.compute is None

    def trailing_shape(self, size: int) -> tuple[int, ...]:
        """The per-image (fixed) or per-row (ragged) shape for cache side ``size``."""
        return tuple(size if dim == "S" else int(dim) for dim in self.shape)


FIELDS: dict[str, CacheField] = {}


def register_field(field: CacheField) -> CacheField:
    """Add ``field`` to :data:`FIELDS` (the same definition twice is fine; a different one is an error)."""
    known = FIELDS.get(field.name)
    if known is not None and known != field:
        raise ValueError(f"cache field {field.name!r} registered twice with different definitions")
    FIELDS[field.name] = field
    return field


def is_ragged(name: str) -> bool:
    """True for a registered ragged field (``collate`` keeps it as a list)."""
    field = FIELDS.get(name)
    return bool(field and field.ragged)


for _builtin in (
    CacheField("image", np.dtype(np.float32), (1, "S", "S"), description="the film, normalised (from images.npy)"),
    CacheField("labels", np.dtype(np.float32), (14,), description="image-level labels in LABELS order"),
    CacheField("boxes", np.dtype(np.float32), (4,), ragged=True, description="x1, y1, x2, y2 in S pixels"),
    CacheField("box_labels", np.dtype(np.int64), (), ragged=True, description="LABELS index of each box"),
    CacheField("lung_masks", np.dtype(np.uint8), ("S", "S"), description="0 background, 1 right, 2 left lung"),
    CacheField("lung_hashes", np.dtype(np.bool_), (2, 64), description="64-bit pHash of each lung"),
    CacheField("lung_fallback", np.dtype(np.bool_), (), description="the lung masks are the anatomical prior"),
):
    register_field(_builtin)
