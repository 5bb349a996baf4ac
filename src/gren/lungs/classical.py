"""Training-free left/right lung segmentation: a lung-shape template fitted to the image's dark fields.

Method (all in a square working frame of ``work_size`` pixels, default 256):

1. Contrast: percentile stretch (1st-99th) to [0, 1], light Gaussian smoothing.
2. Body frame: the bounding box of the body (largest non-air component, holes filled); the lungs are
   searched for inside it, so films with wide air margins or small patients are handled like tight crops.
3. Template fit: each lung has a fixed anatomical outline (:data:`LUNG_OUTLINE`, the 0.5 level set of
   the mean of 90 real per-lung masks, in body-frame fractions). Every candidate anisotropic scale of
   that outline is cross-correlated (FFT) with the image's darkness (Otsu threshold minus intensity,
   clipped) using a matched filter: +1/area inside the outline, -1/area in a ring around it. The
   best (scale, shift) per lung maximises the contrast "mean darkness inside - mean darkness around".
   The search is restricted to the lung's own side of the midline.
4. Refinement: a pixel's score is ``logit(blurred fitted template) + refine_weight * (t - intensity)``
   with ``t`` at ``refine_level`` (0.8) of the way from the mean intensity inside the fitted lung to the
   mean around it; the lungs are the positive pixels, each label keeps its largest component, holes are
   filled, and each lung is dilated by ``grow`` (0.8 %) of the frame. Annotated lung masks include
   margins brighter than the lung's core (costophrenic angles, behind the heart and the diaphragm dome);
   the 0.8 level and the small dilation (chosen by cross-validation over the 90 real films, see
   benchmarks/bench_lungs.py) keep them.
5. Sanity checks (fit contrast, area fractions, left/right balance, vertical extent), then the
   gross-failure flags of :mod:`gren.lungs.quality` (a lung outside the body, in the neck or abdomen, far
   from its usual size / position). A film that fails gets the anatomical prior (the outline at its mean
   scale in the body frame) and ``fallback=True``.

The template fit is what makes it robust on AP supine ICU films: lines, tubes, opacified (white)
lower lobes and outside air change the darkness map locally but not the best-matching lung outline.

Labels: 1 = patient's right lung = IMAGE LEFT, 2 = patient's left lung = IMAGE RIGHT, 0 background.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from PIL import Image
from scipy import ndimage as ndi

from gren.lungs.binary import largest_component, otsu_threshold
from gren.lungs.quality import check_mask

log = logging.getLogger(__name__)

# Per-lung outline: rows (y, x_left, x_right) as fractions of the frame (0 = top/left, 1 = bottom/right).
# The 0.5 level set of the mean of the 90 real masks in ../shared/data/lungs (512 px, sampled every
# 1/32 of the height): a compact parametric shape, not the masks themselves.
LUNG_OUTLINE: dict[int, tuple[tuple[float, float, float], ...]] = {  # = outline_from_masks(the 90 masks)
    1: (
        (0.1406, 0.297, 0.426), (0.1719, 0.250, 0.441), (0.2031, 0.215, 0.441), (0.2344, 0.199, 0.441),
        (0.2656, 0.184, 0.441), (0.2969, 0.164, 0.438), (0.3281, 0.156, 0.438), (0.3594, 0.145, 0.434),
        (0.3906, 0.133, 0.434), (0.4219, 0.125, 0.430), (0.4531, 0.121, 0.430), (0.4844, 0.113, 0.426),
        (0.5156, 0.109, 0.422), (0.5469, 0.105, 0.418), (0.5781, 0.102, 0.414), (0.6094, 0.102, 0.410),
        (0.6406, 0.105, 0.406), (0.6719, 0.105, 0.395), (0.7031, 0.145, 0.258),
    ),
    2: (
        (0.1406, 0.605, 0.734), (0.1719, 0.574, 0.762), (0.2031, 0.566, 0.793), (0.2344, 0.562, 0.812),
        (0.2656, 0.559, 0.828), (0.2969, 0.559, 0.836), (0.3281, 0.559, 0.844), (0.3594, 0.559, 0.855),
        (0.3906, 0.559, 0.859), (0.4219, 0.559, 0.867), (0.4531, 0.559, 0.871), (0.4844, 0.562, 0.879),
        (0.5156, 0.562, 0.883), (0.5469, 0.562, 0.887), (0.5781, 0.566, 0.891), (0.6094, 0.570, 0.898),
        (0.6406, 0.574, 0.902), (0.6719, 0.574, 0.898), (0.7031, 0.582, 0.895), (0.7344, 0.598, 0.895),
    ),
}
_ROW_HALF_STEP = 1.0 / 64.0  # half the spacing of the outline rows
# The 0.5 level set of a mean mask is smaller than a typical lung: the prior uses this scale.
PRIOR_SCALE = 1.15


Outline = dict[int, tuple[tuple[float, float, float], ...]]


def outline_from_masks(masks: list[np.ndarray] | np.ndarray, level: float = 0.5) -> Outline:
    """The per-lung outline table from label masks (each uint8 (H, W) with 0/1/2, any size).

    Masks are resized to 256 x 256 (nearest) and averaged per label; each 8th row (at its centre)
    gives the first and last column where the mean reaches ``level``. This is how
    :data:`LUNG_OUTLINE` was made from the 90 real masks; the benchmark uses it to rebuild the
    outline from the training folds only.
    """
    total = {1: np.zeros((256, 256)), 2: np.zeros((256, 256))}
    for mask in masks:
        small = resize_labels(np.asarray(mask, np.uint8), 256, 256)
        for label in (1, 2):
            total[label] += small == label
    outline: Outline = {}
    for label in (1, 2):
        mean = total[label] / max(len(masks), 1)
        rows = []
        for row in range(4, 256, 8):
            columns = np.nonzero(mean[row] >= level)[0]
            if len(columns):
                rows.append((round(row / 256, 4), round(float(columns[0]) / 256, 3),
                             round(float(columns[-1] + 1) / 256, 3)))
        if len(rows) < 2:
            raise ValueError(f"lung {label}: the masks' mean never reaches {level} on two rows")
        outline[label] = tuple(rows)
    return outline


def render_outline(label: int, size: int, scale_x: float = 1.0, scale_y: float = 1.0,
                   shift_x: float = 0.0, shift_y: float = 0.0, outline: Outline | None = None) -> np.ndarray:
    """The lung outline of ``label`` (1 or 2) as a bool mask (size, size) in frame pixels.

    Scales are about the outline's bounding-box centre; shifts are fractions of the frame.
    """
    rows = np.asarray((outline or LUNG_OUTLINE)[label], dtype=np.float64)
    ys, x_lo, x_hi = rows[:, 0], rows[:, 1], rows[:, 2]
    y_top, y_bottom = ys[0] - _ROW_HALF_STEP, ys[-1] + _ROW_HALF_STEP
    cy, cx = (y_top + y_bottom) / 2, (x_lo.min() + x_hi.max()) / 2
    centres = (np.arange(size) + 0.5) / size
    y_in_outline = (centres - shift_y - cy) / scale_y + cy
    inside_rows = (y_in_outline >= y_top) & (y_in_outline <= y_bottom)
    left = (np.interp(y_in_outline, ys, x_lo) - cx) * scale_x + cx + shift_x
    right = (np.interp(y_in_outline, ys, x_hi) - cx) * scale_x + cx + shift_x
    return inside_rows[:, None] & (centres[None, :] >= left[:, None]) & (centres[None, :] < right[:, None])


def resize_float(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize of a float32 (H, W) array."""
    return np.asarray(Image.fromarray(image.astype(np.float32), mode="F").resize((width, height), Image.BILINEAR))


def resize_labels(mask: np.ndarray, height: int, width: int) -> np.ndarray:
    """Nearest-neighbour resize of a uint8 label mask (H, W)."""
    if mask.shape == (height, width):
        return mask
    return np.asarray(Image.fromarray(mask).resize((width, height), Image.NEAREST))


@dataclass
class FitResult:
    """One lung's fitted outline: scales, shifts (frame fractions) and matched-filter contrast."""

    scale_x: float
    scale_y: float
    shift_x: float
    shift_y: float
    contrast: float


class ClassicalSegmenter:
    """Template-fit lung segmentation (see module docstring). No weights.

    Args:
        work_size: side of the square working frame in pixels.
        fit_size: side of the grid the template is fitted on (circular FFT correlation of that size).
        scales: candidate scales of the outline, used for x and y independently.
        max_shift: largest template shift searched, as a fraction of the frame.
        refine_weight: weight of the intensity term against the template's log-odds (0: template only).
        refine_level: where the refinement's intensity threshold sits between the fitted lung's mean
            intensity (0) and its surrounding ring's (1); above 0.5 keeps the brighter lung margins
            (costophrenic angles, the region behind the heart) that annotated masks include.
        grow: each lung is finally dilated by this fraction of the frame's longer side (pixels).
        prior_blur: sigma of the template blur, as a fraction of the frame.
        min_contrast: a fit whose contrast (darkness units, [0, 0.5]) is below this is a failure.
        outside_penalty: darkness given to air outside the body (negative: "not lung").
        use_midline: split the sides at the spine column (else at the body frame's centre).
        outline: the lung outline table (default :data:`LUNG_OUTLINE`; see :func:`outline_from_masks`).
        check: apply the gross-failure flags of :func:`gren.lungs.quality.check_mask` (False: only the
            segmenter's own sanity checks).
    """

    name = "classical"

    def __init__(self, work_size: int = 256, fit_size: int = 128,
                 scales: tuple[float, ...] = (0.95, 1.05, 1.15, 1.25, 1.35), max_shift: float = 1 / 6,
                 refine_weight: float = 8.0, prior_blur: float = 0.03, min_contrast: float = 0.04,
                 outside_penalty: float = 0.1, use_midline: bool = True, outline: Outline | None = None,
                 refine_level: float = 0.8, grow: float = 0.008, check: bool = True):
        self.check = check
        self.work_size = work_size
        self.fit_size = fit_size
        self.scales = tuple(scales)
        self.max_shift = max_shift
        self.refine_weight = refine_weight
        self.prior_blur = prior_blur
        self.min_contrast = min_contrast
        self.outside_penalty = outside_penalty
        self.use_midline = use_midline
        self.outline = outline
        self.refine_level = refine_level
        self.grow = grow
        self._filters = {label: self._matched_filters(label) for label in (1, 2)}

    def _matched_filters(self, label: int) -> list[tuple[float, float, np.ndarray]]:
        """FFTs (conjugated, n x n, circular) of +1/area inside, -1/area ring, per scale pair."""
        n = self.fit_size
        ring_width = max(2, n // 16)
        filters = []
        for scale_x in self.scales:
            for scale_y in self.scales:
                inside = render_outline(label, n, scale_x, scale_y, outline=self.outline)
                ring = ndi.binary_dilation(inside, iterations=ring_width) & ~inside
                kernel = inside / max(inside.sum(), 1) - ring / max(ring.sum(), 1)
                # Correlation via FFT: score[s] = sum_p kernel(p) z(p + s), circular over n (shifts
                # wrap, harmless for shifts <= n/6 since the outline sits well inside the frame).
                filters.append((scale_x, scale_y, np.conj(np.fft.rfft2(kernel, s=(n, n)))))
        return filters

    # ---- one image ----------------------------------------------------------------------------
    def _body(self, smooth: np.ndarray) -> tuple[tuple[int, int, int, int], np.ndarray]:
        """The body in the working frame: its box (y0, y1, x0, x1) and bool mask (size, size).

        The body is the largest component brighter than half Otsu's level, holes (the lungs) filled;
        when that is unclear (under a quarter of the frame, or a box under half of it) the whole frame.
        """
        size = smooth.shape[0]
        whole = (0, size, 0, size), np.ones_like(smooth, dtype=bool)
        air_level = 0.5 * otsu_threshold(smooth.ravel())
        body = ndi.binary_opening(smooth > air_level, iterations=2)
        if body.sum() < 0.25 * size * size:
            return whole
        body = largest_component(body)
        ys, xs = np.nonzero(body)
        y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
        if (y1 - y0) < 0.5 * size or (x1 - x0) < 0.5 * size:
            return whole
        return (int(y0), int(y1), int(x0), int(x1)), body

    @staticmethod
    def _midline(small: np.ndarray) -> int:
        """Column of the spine/mediastinum on the fit grid: the brightest column (mean over the rows
        of the chest, 15 %-70 % of the height) within the central 30 % of the frame."""
        n = small.shape[1]
        profile = ndi.uniform_filter1d(small[int(0.15 * n): int(0.7 * n)].mean(axis=0), max(3, n // 16))
        lo, hi = int(0.35 * n), int(0.65 * n)
        return lo + int(np.argmax(profile[lo:hi]))

    def _fit(self, darkness: np.ndarray, label: int, midline: int | None = None) -> FitResult:
        """Best outline of ``label`` on the darkness map (fit_size, fit_size); ``midline`` the column
        splitting the two sides (default the centre)."""
        n = darkness.shape[0]
        half = n // 2 if midline is None else midline
        side = np.zeros_like(darkness)
        # Search each lung on its own side (with a 10 % overlap band around the midline).
        if label == 1:
            side[:, : half + n // 10] = 1
        else:
            side[:, half - n // 10:] = 1
        spectrum = np.fft.rfft2(darkness * side, s=(n, n))
        limit = int(round(self.max_shift * n))
        keep = np.zeros((n, n), bool)
        idx = np.r_[0: limit + 1, n - limit: n]
        keep[np.ix_(idx, idx)] = True
        best = FitResult(1.0, 1.0, 0.0, 0.0, -np.inf)
        for scale_x, scale_y, filt in self._filters[label]:
            score = np.fft.irfft2(filt * spectrum, s=(n, n))
            score[~keep] = -np.inf
            flat = int(np.argmax(score))
            if score.flat[flat] > best.contrast:
                dy, dx = np.unravel_index(flat, score.shape)
                dy = dy - n if dy > n // 2 else dy
                dx = dx - n if dx > n // 2 else dx
                best = FitResult(scale_x, scale_y, dx / n, dy / n, float(score.flat[flat]))
        return best

    def segment_one(self, image: np.ndarray) -> tuple[np.ndarray, bool, dict]:
        """Segment one uint8 (H, W) image -> (mask uint8 (H, W) in {0,1,2}, fallback, diagnostics)."""
        height, width = image.shape
        size = self.work_size
        work = resize_float(image.astype(np.float32), size, size)
        lo, hi = np.percentile(work, [1, 99])
        work = np.clip((work - lo) / max(hi - lo, 1.0), 0.0, 1.0)
        smooth = ndi.gaussian_filter(work, 1.5)
        (y0, y1, x0, x1), body = self._body(smooth)
        frame = smooth[y0:y1, x0:x1]
        outside = ~body[y0:y1, x0:x1]
        fh, fw = frame.shape
        n = self.fit_size
        small = resize_float(frame, n, n)
        small_outside = resize_float(outside.astype(np.float32), n, n) > 0.5
        threshold = otsu_threshold(small[~small_outside] if (~small_outside).any() else small.ravel())
        darkness = np.clip(threshold - small, -0.25, 0.25)
        # Air outside the body is darker than any lung: score it as "not lung".
        darkness[small_outside] = -self.outside_penalty
        midline = self._midline(small) if self.use_midline else None
        fits = {label: self._fit(darkness, label, midline) for label in (1, 2)}
        info = {"contrast": {label: fits[label].contrast for label in (1, 2)}, "body_box": (y0, y1, x0, x1)}

        scores = []
        for label in (1, 2):
            fit = fits[label]
            template = _render_rect(label, fh, fw, fit, self.outline)
            if self.refine_weight > 0:
                blurred = ndi.gaussian_filter(template.astype(np.float32), self.prior_blur * max(fh, fw), truncate=2.5)
                prob = np.clip(blurred, 1e-3, 1 - 1e-3)
                ring = (blurred > 0.01) & ~template  # about two blur sigmas around the outline
                inside_mean = frame[template].mean() if template.any() else 0.0
                ring_mean = frame[ring].mean() if ring.any() else 1.0
                level = inside_mean + self.refine_level * (ring_mean - inside_mean)
                score = np.log(prob / (1 - prob)) + self.refine_weight * (level - frame)
                score[outside] = -np.inf
                scores.append(score)
            else:
                scores.append(np.where(template, 1.0, -1.0))
        stacked = np.stack(scores)
        winner = np.argmax(stacked, axis=0) + 1
        positive = stacked.max(axis=0) > 0
        frame_mask = np.zeros((fh, fw), np.uint8)
        for label in (1, 2):
            lung = (winner == label) & positive
            if lung.any():
                frame_mask[largest_component(lung) & (frame_mask == 0)] = label
        frame_mask = self._grown(frame_mask, body[y0:y1, x0:x1])
        work_mask = np.zeros((size, size), np.uint8)
        work_mask[y0:y1, x0:x1] = frame_mask


        problem = self._check(work_mask, fits) or (check_mask(image, work_mask) if self.check else "")
        info["problem"] = problem
        if problem:
            work_mask = np.zeros((size, size), np.uint8)
            work_mask[y0:y1, x0:x1] = prior_mask(fh, fw)
        return resize_labels(work_mask, height, width), bool(problem), info

    def _grown(self, frame_mask: np.ndarray, body: np.ndarray) -> np.ndarray:
        """Each lung dilated by ``grow`` x the frame's longer side (pixels), inside the body, never
        over the other lung."""
        radius = int(round(self.grow * max(frame_mask.shape)))
        if radius <= 0:
            return frame_mask
        grown = frame_mask.copy()
        disk = _disk(radius)
        for label in (1, 2):
            lung = frame_mask == label
            if lung.any():
                grown[ndi.binary_dilation(lung, structure=disk) & (grown == 0) & body] = label
        return grown

    def _check(self, mask: np.ndarray, fits: dict[int, FitResult]) -> str:
        """'' when the segmentation looks like two lungs, else the reason it does not."""
        total = mask.size
        for label in (1, 2):
            if not np.isfinite(fits[label].contrast) or fits[label].contrast < self.min_contrast:
                return f"lung {label}: template contrast {fits[label].contrast:.3f} < {self.min_contrast}"
        areas = {label: float((mask == label).sum()) / total for label in (1, 2)}
        for label, area in areas.items():
            if not 0.03 <= area <= 0.45:
                return f"lung {label}: area fraction {area:.3f} outside [0.03, 0.45]"
        ratio = areas[1] / max(areas[2], 1e-9)
        if not 1 / 3 <= ratio <= 3:
            return f"left/right area ratio {ratio:.2f} outside [1/3, 3]"
        for label in (1, 2):
            rows = np.nonzero((mask == label).any(axis=1))[0]
            if (rows[-1] - rows[0] + 1) < 0.25 * mask.shape[0]:
                return f"lung {label}: vertical extent below a quarter of the frame"
        columns_1 = np.nonzero((mask == 1).any(axis=0))[0]
        columns_2 = np.nonzero((mask == 2).any(axis=0))[0]
        if columns_1.mean() >= columns_2.mean():
            return "lung 1 is not on the image left of lung 2"
        return ""

    # ---- batches ------------------------------------------------------------------------------
    def segment(self, images: np.ndarray, return_reasons: bool = False):
        """images uint8 (B, H, W) -> (masks uint8 (B, H, W) in {0,1,2}, fallback bool (B,)), plus with
        ``return_reasons`` a list of B texts: '' or why image i fell back (a gross-failure flag of
        :mod:`gren.lungs.quality` starts with ``quality.FLAG_PREFIX``)."""
        images = np.asarray(images)
        if images.ndim == 2:
            images = images[None]
        masks = np.zeros(images.shape, np.uint8)
        fallback = np.zeros(len(images), bool)
        reasons = [""] * len(images)
        for i, image in enumerate(images):
            masks[i], fallback[i], info = self.segment_one(image)
            reasons[i] = info["problem"]
            if fallback[i]:
                log.debug("classical lung segmentation fell back to the prior: %s", info["problem"])
        return (masks, fallback, reasons) if return_reasons else (masks, fallback)


def _render_rect(label: int, height: int, width: int, fit: FitResult, outline: Outline | None = None) -> np.ndarray:
    """The fitted outline rendered on a (height, width) frame (the fit is in frame fractions)."""
    side = max(height, width)
    square = render_outline(label, side, fit.scale_x, fit.scale_y, fit.shift_x, fit.shift_y, outline)
    if (height, width) == (side, side):
        return square
    return resize_labels(square.astype(np.uint8), height, width).astype(bool)


def _disk(radius: int) -> np.ndarray:
    """A bool disk of the given radius in pixels, (2r+1, 2r+1)."""
    y, x = np.mgrid[-radius: radius + 1, -radius: radius + 1]
    return x * x + y * y <= radius * radius


def prior_mask(height: int, width: int) -> np.ndarray:
    """The anatomical prior on a whole (height, width) frame: uint8 in {0, 1, 2}."""
    prior = np.zeros((256, 256), np.uint8)
    for label in (1, 2):
        prior[render_outline(label, 256, PRIOR_SCALE, PRIOR_SCALE) & (prior == 0)] = label
    return resize_labels(prior, height, width)
