"""Binary-image helpers shared by the classical segmenter, the U-Net's clean-up and the quality flags."""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi


def otsu_threshold(values: np.ndarray, bins: int = 128) -> float:
    """Otsu's threshold of values in [0, 1]."""
    hist, edges = np.histogram(values, bins=bins, range=(0.0, 1.0))
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist).astype(np.float64)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centres)
    mu0 = m0 / np.maximum(w0, 1)
    mu1 = (m0[-1] - m0) / np.maximum(w1, 1)
    return float(centres[np.argmax(w0 * w1 * (mu0 - mu1) ** 2)])


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 8-connected component of a bool mask, holes filled."""
    labelled, count = ndi.label(mask, structure=np.ones((3, 3), bool))
    if count > 1:
        sizes = ndi.sum(mask, labelled, index=np.arange(1, count + 1))
        mask = labelled == (1 + int(np.argmax(sizes)))
    return ndi.binary_fill_holes(mask)
