"""One interface to the lung segmenters: ``load_segmenter("classical" | "unet" | "unet:PATH")``.

``unet`` is the lung U-Net shipped in the package (:data:`SHIPPED_WEIGHTS`, trained by
``benchmarks/train_shipped_lungs.py`` on 90 real films with masks + synthetic films; see docs/lungs.md);
``unet:PATH`` a checkpoint written by ``gren lungs train``; ``classical`` the training-free template fit.

A segmenter has ``name`` and ``segment(images uint8 (B, H, W)) -> (masks uint8 (B, H, W), fallback
bool (B,))``: masks in {0, 1, 2} with 1 = patient's right lung = IMAGE LEFT, 2 = patient's left lung =
IMAGE RIGHT, 0 background, at the input's own size (any H, W: resized internally to the segmenter's
working size and back with nearest / bilinear logits); ``fallback[i]`` is True when image i got the
anatomical prior instead of a segmentation.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
from pathlib import Path
from typing import Protocol

import numpy as np

from gren.core.errors import GrenError

SPEC_HELP = ("classical (no weights), unet (the U-Net shipped with gren) or unet:PATH (a checkpoint "
             "written by `gren lungs train`)")
SHIPPED_WEIGHTS = Path(__file__).resolve().parent / "weights" / "lungs-unet.pt"
"""The shipped lung U-Net checkpoint (package data)."""


def shipped_weights() -> Path:
    """Path of the shipped lung U-Net checkpoint.

    Raises:
        GrenError: the file is not there (an install without the package data).
    """
    if not SHIPPED_WEIGHTS.is_file():
        raise GrenError(f"{SHIPPED_WEIGHTS}: the shipped lung U-Net is missing from this gren install; "
                        "reinstall gren, or use --lungs classical or unet:PATH")
    return SHIPPED_WEIGHTS


@functools.lru_cache(maxsize=4)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_sha256(path: str | Path) -> str:
    """SHA-256 (hex) of a file's bytes (cached on path, size and modification time)."""
    stat = Path(path).stat()
    return _sha256(str(path), stat.st_size, stat.st_mtime_ns)


def shipped_sha256() -> str:
    """SHA-256 (hex) of the shipped checkpoint: what a prepared cache records for ``--lungs auto``."""
    return file_sha256(shipped_weights())


class Segmenter(Protocol):
    name: str

    def segment(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """uint8 (B, H, W) -> (uint8 (B, H, W) in {0, 1, 2}, bool (B,)); ours also take
        ``return_reasons=True`` and then add a list of B texts (see :func:`segment_with_reasons`)."""
        ...


def segment_with_reasons(segmenter: Segmenter, images: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """``segmenter.segment`` plus why each image fell back: uint8 (B, H, W) -> (masks uint8 (B, H, W),
    fallback bool (B,), B texts: '' when it did not, a gross-failure flag of :mod:`gren.lungs.quality`
    starting with ``FLAG_PREFIX``, or the segmenter's own check). A segmenter without reasons gives
    ``"fallback"`` for its fallbacks."""
    if "return_reasons" in inspect.signature(segmenter.segment).parameters:
        return segmenter.segment(images, return_reasons=True)
    masks, fallback = segmenter.segment(images)
    return masks, fallback, ["fallback" if f else "" for f in np.asarray(fallback).reshape(-1)]


_CACHE: dict[str, Segmenter] = {}


def load_segmenter(spec: str) -> Segmenter:
    """The segmenter named by ``spec``: ``classical``, ``unet`` (shipped) or ``unet:PATH``.

    Raises:
        GrenError: an unknown spec, or a U-Net checkpoint that is missing or not ours.
    """
    spec = (spec or "").strip()
    if spec == "classical":
        from gren.lungs.classical import ClassicalSegmenter

        return ClassicalSegmenter()
    if spec == "unet":
        from gren.lungs.unet import UNetSegmenter

        return UNetSegmenter.from_checkpoint(shipped_weights())
    if spec.startswith("unet:"):
        path = spec[len("unet:"):]
        if not path:
            raise GrenError(f"--lungs {spec!r}: give the checkpoint path, e.g. unet:lungs.pt")
        from gren.lungs.unet import UNetSegmenter

        return UNetSegmenter.from_checkpoint(Path(path).expanduser())
    raise GrenError(f"--lungs {spec!r}: expected {SPEC_HELP}")


def segment_lungs(images: np.ndarray, spec: str = "classical") -> tuple[np.ndarray, np.ndarray]:
    """Convenience: segment uint8 (B, H, W) (or one (H, W)) images with the segmenter ``spec``
    (kept loaded between calls) -> (masks uint8 (B, H, W), fallback bool (B,))."""
    if spec not in _CACHE:
        _CACHE[spec] = load_segmenter(spec)
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise GrenError(f"segment_lungs expects uint8 images, got {images.dtype}")
    return _CACHE[spec].segment(images if images.ndim == 3 else images[None])
