"""Gross-failure flags for left/right lung masks, shared by every segmenter.

A segmentation can pass a segmenter's own sanity checks (two lungs of plausible area) and still be
grossly wrong: a lung spilling outside the body (into the air beside an arm), up into the neck, down
into the abdomen, or far from where lungs sit. :func:`check_mask` measures, on a 128 x 128 copy:

* the body outline from the film's intensities (:func:`body_mask`: percentile stretch, the largest
  component brighter than half Otsu's level, holes filled; the whole frame when that is unclear);
* per lung (1 = patient's right = image left, 2 = patient's left = image right), :func:`mask_features`:
  ``area`` (fraction of the film), ``outside`` (fraction of the lung outside the body), ``top``,
  ``bottom``, ``cy``, ``cx`` (rows / centroid as fractions of the body's bounding box, 0 = its top /
  left edge), ``width`` (fraction of the body's width), ``aspect`` (the lung's height / width),
  ``solidity`` (its area / its convex hull's area: a tongue leaking into the arm or abdomen lowers it);
* per film: ``ratio`` (area 1 / area 2), ``dtop`` and ``dbot`` (difference of the two lungs' top rows,
  bottom rows, fractions of the body's height: one lung running up into the neck or down into the
  abdomen while the other does not).

A feature outside its range in :data:`RANGES` flags the film (reason text starting with
:data:`FLAG_PREFIX`); the segmenters then give it the anatomical prior and ``fallback=True``. Each
range is the [min, max] of the feature over the true masks of the 90 real films in
``../shared/data/lungs`` (:func:`measure_ranges`, reproduced by ``benchmarks/bench_lungs.py --parts
flags``), widened on each side by :data:`MARGIN` (50 %) of its width (bounds that cannot be exceeded
-- a fraction below 0 -- left open). The ranges are deliberately wide: only gross failures fall out.

Not a rule: "a lung reaching the film's top edge". On NIH films (neck in the frame) that is a lung
in the neck, but the real films include tight crops whose true lungs touch the top edge, and on them
the classical masks are cut flat by the edge with Dice 0.8-0.9; a rule on the flat cut (the fraction of
the lung's columns in the film's top 2 % rows) flagged 14 such good classical masks of the 90 and gave
them the much worse prior (measured, docs/lungs.md). A lung spilling into the neck on *both* sides is
therefore caught only when it breaks another range.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image
from scipy import ndimage as ndi
from scipy.spatial import ConvexHull, QhullError

from gren.lungs.binary import largest_component, otsu_threshold

FLAG_PREFIX = "flag: "
WORK_SIZE = 128
MARGIN = 0.5
LUNG_FEATURES = ("area", "outside", "top", "bottom", "cy", "cx", "width", "aspect", "solidity")
FILM_FEATURES = ("ratio", "dtop", "dbot")

# [min, max] over the 90 real films' true masks (measure_ranges(), 128 px), before the margin.
MEASURED: dict[str, tuple[float, float]] = {
    "area_1": (0.096, 0.286), "area_2": (0.108, 0.326),
    "outside_1": (0.000, 0.365), "outside_2": (0.000, 0.266),
    "top_1": (0.008, 0.281), "top_2": (0.008, 0.266),
    "bottom_1": (0.516, 1.000), "bottom_2": (0.555, 1.000),
    "cy_1": (0.265, 0.609), "cy_2": (0.287, 0.621),
    "cx_1": (0.136, 0.378), "cx_2": (0.557, 0.829),
    "width_1": (0.273, 0.516), "width_2": (0.266, 0.484),
    "aspect_1": (1.125, 2.750), "aspect_2": (1.274, 2.705),
    "solidity_1": (0.812, 0.970), "solidity_2": (0.834, 0.970),
    "ratio": (0.614, 1.195), "dtop": (0.000, 0.062), "dbot": (0.000, 0.203),
}
# Bounds that no mask can pass (fractions of a lung below 0, lungs above the body's top ...): open.
_OPEN_LOW = {"outside_1", "outside_2", "dtop", "dbot"}
_OPEN_HIGH = {"bottom_1", "bottom_2"}


def widened(measured: dict[str, tuple[float, float]], margin: float = MARGIN) -> dict[str, tuple[float, float]]:
    """Ranges widened by ``margin`` x their width on each side (open bounds -> -inf / +inf)."""
    out = {}
    for name, (lo, hi) in measured.items():
        pad = margin * (hi - lo)
        out[name] = (-math.inf if name in _OPEN_LOW else lo - pad, math.inf if name in _OPEN_HIGH else hi + pad)
    return out


RANGES: dict[str, tuple[float, float]] = widened(MEASURED)


def body_mask(image: np.ndarray, size: int = WORK_SIZE) -> np.ndarray:
    """The body outline of a uint8 (H, W) film as a bool (size, size) mask (the whole frame when the
    estimate is unclear: under a quarter of the frame, or a bounding box under half of it)."""
    small = np.asarray(Image.fromarray(np.asarray(image, np.uint8)).resize((size, size), Image.BILINEAR), np.float32)
    lo, hi = np.percentile(small, [1, 99])
    work = ndi.gaussian_filter(np.clip((small - lo) / max(hi - lo, 1.0), 0, 1), 1.0)
    body = ndi.binary_opening(work > 0.5 * otsu_threshold(work.ravel()), iterations=1)
    whole = np.ones((size, size), bool)
    if body.sum() < 0.25 * size * size:
        return whole
    body = largest_component(body)
    ys, xs = np.nonzero(body)
    if ys.max() - ys.min() + 1 < 0.5 * size or xs.max() - xs.min() + 1 < 0.5 * size:
        return whole
    return body


def mask_features(mask: np.ndarray, body: np.ndarray) -> dict[str, float]:
    """Features (module docstring) of a uint8 (H, W) 0/1/2 mask against a bool (s, s) body mask.

    Keys ``<feature>_<label>`` for each of :data:`LUNG_FEATURES` and labels 1, 2, plus
    :data:`FILM_FEATURES`. A missing lung has area 0 and NaN for its other features (and the film
    features that need it).
    """
    size = body.shape[0]
    small = np.asarray(Image.fromarray(np.asarray(mask, np.uint8)).resize((size, size), Image.NEAREST))
    ys, xs = np.nonzero(body)
    by0, by1, bx0, bx1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    bh, bw = by1 - by0, bx1 - bx0
    out: dict[str, float] = {}
    rows_of: dict[int, np.ndarray] = {}
    for label in (1, 2):
        lung = small == label
        n = int(lung.sum())
        out[f"area_{label}"] = n / lung.size
        if n == 0:
            for key in LUNG_FEATURES[1:]:
                out[f"{key}_{label}"] = math.nan
            continue
        rows, columns = np.nonzero(lung)
        rows_of[label] = rows
        height, width = rows.max() + 1 - rows.min(), columns.max() + 1 - columns.min()
        out[f"outside_{label}"] = float((lung & ~body).sum()) / n
        out[f"top_{label}"] = (rows.min() - by0) / bh
        out[f"bottom_{label}"] = (rows.max() + 1 - by0) / bh
        out[f"cy_{label}"] = (rows.mean() + 0.5 - by0) / bh
        out[f"cx_{label}"] = (columns.mean() + 0.5 - bx0) / bw
        out[f"width_{label}"] = width / bw
        out[f"aspect_{label}"] = height / width
        out[f"solidity_{label}"] = _solidity(rows, columns)
    both = len(rows_of) == 2
    out["ratio"] = out["area_1"] / out["area_2"] if out["area_2"] > 0 else math.inf
    out["dtop"] = abs(int(rows_of[1].min()) - int(rows_of[2].min())) / bh if both else math.nan
    out["dbot"] = abs(int(rows_of[1].max()) - int(rows_of[2].max())) / bh if both else math.nan
    return out


def _solidity(rows: np.ndarray, columns: np.ndarray) -> float:
    """Pixel count / area of the convex hull of the pixels' squares (1.0 for a filled rectangle)."""
    corners = np.concatenate([np.stack([rows + dy, columns + dx], axis=1) for dy in (0, 1) for dx in (0, 1)])
    try:
        hull = ConvexHull(corners.astype(np.float64))
    except QhullError:  # collinear: a one-pixel-wide lung
        return 1.0
    return float(len(rows) / hull.volume)


def film_features(image: np.ndarray, mask: np.ndarray) -> dict[str, float]:
    """:func:`mask_features` of a uint8 (H, W) ``mask`` against the body of the uint8 (H', W') ``image``."""
    return mask_features(mask, body_mask(image))


def problems(features: dict[str, float], ranges: dict[str, tuple[float, float]] | None = None) -> list[str]:
    """The features outside their range, as ``"name value outside [lo, hi]"`` texts (empty: plausible)."""
    ranges = RANGES if ranges is None else ranges
    out = []
    for label in (1, 2):
        if features[f"area_{label}"] == 0:
            out.append(f"lung {label} missing")
    for name, (lo, hi) in ranges.items():
        value = features.get(name, math.nan)
        if math.isnan(value):
            continue
        if not lo <= value <= hi:
            out.append(f"{name} {value:.3f} outside [{lo:.3f}, {hi:.3f}]")
    if not math.isnan(features.get("cx_1", math.nan)) and not math.isnan(features.get("cx_2", math.nan)) \
            and features["cx_1"] >= features["cx_2"]:
        out.append("lung 1 not on the image left of lung 2")
    return out


def check_mask(image: np.ndarray, mask: np.ndarray, ranges: dict[str, tuple[float, float]] | None = None) -> str:
    """'' when the uint8 (H, W) 0/1/2 ``mask`` of the uint8 film ``image`` looks like two lungs, else
    :data:`FLAG_PREFIX` + the reasons (``; ``-separated)."""
    found = problems(film_features(image, mask), ranges)
    return FLAG_PREFIX + "; ".join(found) if found else ""


def check_masks(images: np.ndarray, masks: np.ndarray) -> list[str]:
    """:func:`check_mask` of each film: uint8 (B, H, W) images and masks -> B reason texts."""
    return [check_mask(image, mask) for image, mask in zip(images, masks)]


def measure_ranges(images: list[np.ndarray], masks: list[np.ndarray]) -> dict[str, tuple[float, float]]:
    """[min, max] of every feature over (image, true mask) pairs (NaNs ignored): how :data:`MEASURED`
    was made from the 90 real films."""
    rows = [film_features(image, mask) for image, mask in zip(images, masks)]
    names = [f"{f}_{label}" for f in LUNG_FEATURES for label in (1, 2)] + list(FILM_FEATURES)
    out = {}
    for name in sorted(names, key=lambda n: list(MEASURED).index(n) if n in MEASURED else 99):
        values = np.array([r[name] for r in rows], np.float64)
        values = values[np.isfinite(values)]
        out[name] = (float(values.min()), float(values.max()))
    return out
