"""One interface to the lung segmenters: ``load_segmenter("classical" | "unet:PATH")``.

A segmenter has ``name`` and ``segment(images uint8 (B, H, W)) -> (masks uint8 (B, H, W), fallback
bool (B,))``: masks in {0, 1, 2} with 1 = patient's right lung = IMAGE LEFT, 2 = patient's left lung =
IMAGE RIGHT, 0 background, at the input's own size (any H, W: resized internally to the segmenter's
working size and back with nearest / bilinear logits); ``fallback[i]`` is True when image i got the
anatomical prior instead of a segmentation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np

from gren.core.errors import GrenError

SPEC_HELP = "classical (no weights) or unet:PATH (a checkpoint written by `gren lungs train`)"


class Segmenter(Protocol):
    name: str

    def segment(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """uint8 (B, H, W) -> (uint8 (B, H, W) in {0, 1, 2}, bool (B,))."""
        ...


_CACHE: dict[str, Segmenter] = {}


def load_segmenter(spec: str) -> Segmenter:
    """The segmenter named by ``spec``: ``classical`` or ``unet:PATH``.

    Raises:
        GrenError: an unknown spec, or a U-Net checkpoint that is missing or not ours.
    """
    spec = (spec or "").strip()
    if spec == "classical":
        from gren.lungs.classical import ClassicalSegmenter

        return ClassicalSegmenter()
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
