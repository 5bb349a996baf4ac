"""Findings: how each of the 14 labels changes the film.

Two hooks per label, both optional:

* a *modifier* ``(anatomy, side, rng) -> None`` edits the geometry before anything is drawn
  (Cardiomegaly enlarges the heart, Atelectasis lifts a hemidiaphragm, Emphysema hyperinflates);
* a *renderer* ``(ctx, side, hard) -> list[LesionPatch]`` returns density patches: an opacity map
  ``alpha`` (float32 (S, S) in [0, 1]) times a ``density`` (attenuation units, negative for lucent
  findings such as Pneumothorax). The first patch of a box class carries the lesion's box.

Box classes are placed and sized from the real BBox_List_2017 statistics (:mod:`.stats`): a box
centre is drawn in normalised lung coordinates and mapped into this film's lung, a (w, h) from the
class's log-normal size model; the renderer then draws a shape that fills that box, clipped to the
lung field. The box written to the CSV is the bounding box of the drawn lesion's footprint
(``alpha`` above a third of its peak), in 1024-space pixels.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from gren.data.synth.anatomy import (
    SIDE_MASK_VALUE,
    SIDE_SIGN,
    Anatomy,
    AnatomyLayers,
    heart_outline,
    lung_centre,
    lung_outline,
    lung_point,
)
from gren.data.synth.raster import (
    Canvas,
    ellipse_points,
    footprint_box,
    pixel_grid,
    radial_wobble,
    smooth_noise,
)
from gren.data.synth.stats import (
    BOX_STATS,
    CARDIOMEGALY_CX,
    PLACEMENT_CALIBRATION,
    sample_box_centre_uv,
    sample_box_size,
)

FOOTPRINT_LEVEL = 1.0 / 3.0  # alpha above this share of its peak counts as the lesion
HARD_DENSITY = 0.4  # a "hard" lesion is drawn this much fainter ...
HARD_SIZE = 0.6  # ... and this much smaller


@dataclass
class LesionPatch:
    """A density change: ``density * alpha`` is added to the film's attenuation.

    ``box``: (x1, y1, x2, y2) in 1024-space pixels for a box-class lesion, else None;
    ``clears_vessels``: the patch hides lung markings (a pneumothorax has none).
    """

    alpha: np.ndarray | None
    density: float
    box: tuple[float, float, float, float] | None = None
    clears_vessels: bool = False


@dataclass
class LesionContext:
    """What a renderer may use: the canvas, the (modified) anatomy, its layers and the case's rng."""

    canvas: Canvas
    anatomy: Anatomy
    layers: AnatomyLayers
    rng: np.random.Generator
    _noise: dict = field(default_factory=dict)
    _sides: dict = field(default_factory=dict)

    def noise(self, cell_px: float) -> np.ndarray:
        """Smooth noise (S, S) with features ~``cell_px`` canonical pixels, drawn once per film and scale."""
        if cell_px not in self._noise:
            self._noise[cell_px] = smooth_noise(self.rng, self.canvas.size, cell_px)
        return self._noise[cell_px]

    def lung_soft(self, side: str) -> np.ndarray:
        """One side's visible lung field (its mask value), blurred like the air layer: (S, S) in [0, 1].

        Lesions are multiplied by it, so their edges fall off exactly where the lung's air does.
        """
        if side not in self._sides:
            image = Image.fromarray(self.layers.lung_mask).point(
                lambda v, keep=SIDE_MASK_VALUE[side]: 255 if v == keep else 0)
            self._sides[side] = self.canvas.soften(image, 7.0)
        return self._sides[side]

    def shape(self, points, blur_px: float, fill: int = 255) -> np.ndarray:
        """A filled canonical polygon, blurred: float32 (S, S) in [0, 1]."""
        image, draw = self.canvas.new_layer()
        self.canvas.polygon(draw, points, fill)
        return self.canvas.soften(image, blur_px, smooth=blur_px * self.canvas.scale > 3.0)

    def box_of(self, alpha: np.ndarray) -> tuple[float, float, float, float] | None:
        peak = float(alpha.max()) if alpha.size else 0.0
        if peak <= 0.05:
            return None
        return footprint_box(alpha, FOOTPRINT_LEVEL * peak)


Renderer = Callable[[LesionContext, str, bool], list[LesionPatch]]
Modifier = Callable[[Anatomy, str, np.random.Generator], None]
RENDERERS: dict[str, Renderer] = {}
MODIFIERS: dict[str, Modifier] = {}


def renderer(label: str):
    def register(fn: Renderer) -> Renderer:
        RENDERERS[label] = fn
        return fn

    return register


def modifier(label: str):
    def register(fn: Modifier) -> Modifier:
        MODIFIERS[label] = fn
        return fn

    return register


# --- helpers --------------------------------------------------------------------------------------


def ellipse_axes_for_box(width: float, height: float, angle: float) -> tuple[float, float, float]:
    """Semi-axes (a, b) and angle of an ellipse whose axis-aligned bounding box is ``width x height``.

    Solves (W/2)^2 = a^2 c^2 + b^2 s^2, (H/2)^2 = a^2 s^2 + b^2 c^2; the angle is reduced until the
    solution is real (a thin tilted ellipse cannot fill a square box).
    """
    for scale in (1.0, 0.7, 0.45, 0.2, 0.0):
        theta = angle * scale
        c2, s2 = np.cos(theta) ** 2, np.sin(theta) ** 2
        det = c2 * c2 - s2 * s2
        a2 = (c2 * width**2 / 4 - s2 * height**2 / 4) / det
        b2 = (c2 * height**2 / 4 - s2 * width**2 / 4) / det
        if a2 > 1.0 and b2 > 1.0:
            return float(np.sqrt(a2)), float(np.sqrt(b2)), float(theta)
    return width / 2, height / 2, 0.0


def _target(ctx: LesionContext, label: str, side: str, hard: bool):
    """A box-class lesion's centre (canonical x, y) and size (w, h) from the real statistics."""
    stats = BOX_STATS[label]
    geom = ctx.anatomy.lungs[side]
    du, dv, width_factor, height_factor = PLACEMENT_CALIBRATION.get(label, (0.0, 0.0, 1.0, 1.0))
    width, height = sample_box_size(ctx.rng, stats, HARD_SIZE if hard else 1.0)
    width = min(width * width_factor, 0.95 * (geom.lateral - geom.medial))
    height = min(height * height_factor, 0.7 * (geom.base - geom.apex))
    u, v = sample_box_centre_uv(ctx.rng, stats)
    u, v = float(np.clip(u + du, 0.08, 0.92)), float(np.clip(v + dv, 0.06, 0.94))
    return lung_point(ctx.anatomy, side, u, v), width, height


def _place(ctx: LesionContext, label: str, side: str, hard: bool, draw, tries: int = 6) -> np.ndarray:
    """Draw a lesion at a sampled target, re-sampling until most of it lies in the visible lung.

    ``draw(centre, width, height) -> alpha`` makes the unclipped shape; the result is clipped to the
    side's visible lung field. After ``tries`` the best attempt is kept.
    """
    best, best_share = None, -1.0
    for _ in range(tries):
        centre, width, height = _target(ctx, label, side, hard)
        raw = draw(centre, width, height)
        clipped = _in_lung(ctx, raw, side)
        share = float(clipped.sum()) / max(float(raw.sum()), 1e-6)
        if share > best_share:
            best, best_share = clipped, share
        if share >= 0.5:
            break
    return best


def _density(ctx: LesionContext, low: float, high: float, hard: bool) -> float:
    return float(ctx.rng.uniform(low, high)) * (HARD_DENSITY if hard else 1.0)


def _blob(ctx: LesionContext, centre, width, height, wobble: float, blur_frac: float, tilt_deg: float = 15.0):
    """A soft irregular elliptic blob filling roughly a ``width x height`` box around ``centre``."""
    angle = np.deg2rad(ctx.rng.uniform(-tilt_deg, tilt_deg))
    a, b, angle = ellipse_axes_for_box(width, height, angle)
    points = ellipse_points(centre[0], centre[1], a, b, angle, 40, radial_wobble(ctx.rng, 40, wobble))
    return ctx.shape(points, blur_frac * min(width, height))


def _in_lung(ctx: LesionContext, alpha: np.ndarray, side: str) -> np.ndarray:
    return alpha * ctx.lung_soft(side)


def _opacity(ctx: LesionContext, alpha: np.ndarray, density: float) -> list[LesionPatch]:
    return [LesionPatch(alpha, density, ctx.box_of(alpha))]


# --- the eight box classes -----------------------------------------------------------------------


@renderer("Nodule")
def _nodule(ctx: LesionContext, side: str, hard: bool) -> list[LesionPatch]:
    def draw(centre, width, height):
        size = float(np.clip((width + height) / 2, 24.0, 130.0))
        points = ellipse_points(centre[0], centre[1], size / 2, size / 2 * ctx.rng.uniform(0.85, 1.0),
                                ctx.rng.uniform(0, np.pi), 28, radial_wobble(ctx.rng, 28, 0.06))
        return ctx.shape(points, 0.12 * size)

    alpha = _place(ctx, "Nodule", side, hard, draw)
    return _opacity(ctx, alpha, _density(ctx, 0.26, 0.4, hard))


@renderer("Mass")
def _mass(ctx: LesionContext, side: str, hard: bool) -> list[LesionPatch]:
    def draw(centre, width, height):
        return _blob(ctx, centre, max(width, 60.0), max(height, 60.0), 0.22, 0.08, 30.0)

    alpha = _place(ctx, "Mass", side, hard, draw) * (0.85 + 0.15 * np.clip(ctx.noise(30.0), -1, 1))
    return _opacity(ctx, alpha, _density(ctx, 0.3, 0.45, hard))


def _patchy(ctx: LesionContext, label: str, side: str, hard: bool, confluence: float, density: tuple):
    """Cloudy airspace opacity: a soft envelope times thresholded smooth noise (``confluence`` 0..1)."""
    def draw(centre, width, height):
        return _blob(ctx, centre, width, height, 0.3, 0.18, 25.0)

    texture = ctx.noise(70.0) + 0.6 * ctx.noise(28.0)
    patches = np.clip(0.35 + confluence + 0.45 * texture, 0.0, 1.0)
    alpha = _place(ctx, label, side, hard, draw) * patches
    return _opacity(ctx, alpha, _density(ctx, *density, hard))


@renderer("Infiltration")
def _infiltration(ctx: LesionContext, side: str, hard: bool) -> list[LesionPatch]:
    return _patchy(ctx, "Infiltration", side, hard, confluence=0.0, density=(0.2, 0.3))


@renderer("Pneumonia")
def _pneumonia(ctx: LesionContext, side: str, hard: bool) -> list[LesionPatch]:
    return _patchy(ctx, "Pneumonia", side, hard, confluence=0.45, density=(0.3, 0.42))


@modifier("Atelectasis")
def _atelectasis_volume_loss(anatomy: Anatomy, side: str, rng: np.random.Generator) -> None:
    lift = rng.uniform(15.0, 45.0)
    anatomy.lungs[side].base -= lift
    anatomy.lungs[side].dome -= lift * 1.2
    anatomy.heart["cx"] += SIDE_SIGN[side] * rng.uniform(0.0, 12.0)


@renderer("Atelectasis")
def _atelectasis(ctx: LesionContext, side: str, hard: bool) -> list[LesionPatch]:
    """Plate-like band or wedge opacity, tilted down laterally."""
    wedge = ctx.rng.random() < 0.5

    def draw(centre, width, height):
        angle = SIDE_SIGN[side] * np.deg2rad(ctx.rng.uniform(5.0, 30.0))
        a, b, angle = ellipse_axes_for_box(width, height, angle)
        if wedge:  # the medial end (towards the hilum) tapers
            t = np.linspace(0, 2 * np.pi, 40, endpoint=False)
            medial_end = 0.5 - 0.5 * SIDE_SIGN[side] * np.cos(t)
            points = ellipse_points(centre[0], centre[1], a, b, angle, 40)
            points[:, 1] = centre[1] + (points[:, 1] - centre[1]) * (1.0 - 0.55 * medial_end)
        else:
            points = ellipse_points(centre[0], centre[1], a, b, angle, 40, radial_wobble(ctx.rng, 40, 0.08))
        return ctx.shape(points, 0.1 * min(width, height))

    alpha = _place(ctx, "Atelectasis", side, hard, draw)
    return _opacity(ctx, alpha, _density(ctx, 0.28, 0.4, hard))


@renderer("Effusion")
def _effusion(ctx: LesionContext, side: str, hard: bool) -> list[LesionPatch]:
    """Basal fluid with a meniscus climbing the lateral chest wall; blunts the costophrenic angle."""
    anatomy, rng = ctx.anatomy, ctx.rng
    geom = anatomy.lungs[side]
    _, _, height = _target(ctx, "Effusion", side, hard)
    # The box of a basal effusion ends at the costophrenic angle; the fluid is drawn 1.25x the sampled
    # height so that the drawn boxes' heights match the real ones (their centres then sit ~70 px lower).
    height = float(np.clip(1.25 * height, 70.0, 0.65 * (geom.base - geom.apex)))
    lateral_top = geom.base - height
    medial_level = lateral_top + height * rng.uniform(0.15, 0.4)  # the meniscus climbs laterally
    d = np.linspace(0.0, geom.lateral + 90.0, 16)
    u = np.clip((d - geom.medial) / (geom.lateral - geom.medial), 0, 1)
    y = medial_level - (medial_level - lateral_top) * u**2.2
    sign = SIDE_SIGN[side]
    curve = np.stack([anatomy.midline + sign * d, y], axis=1)
    points = np.concatenate([curve, [(anatomy.midline + sign * (geom.lateral + 90.0), 1100.0),
                                     (anatomy.midline, 1100.0)]])
    points = _tilt_like_lung(anatomy, side, points)
    fluid = ctx.shape(points, 14.0)
    cols, rows = pixel_grid(ctx.canvas.size)
    deeper = np.clip((rows - lateral_top) / max(height, 1.0), 0.0, 1.0)
    alpha = _in_lung(ctx, fluid * (0.7 + 0.3 * deeper), side)
    return _opacity(ctx, alpha, _density(ctx, 0.4, 0.55, hard))


def _tilt_like_lung(anatomy: Anatomy, side: str, points: np.ndarray) -> np.ndarray:
    geom = anatomy.lungs[side]
    centre = lung_centre(anatomy, side)
    theta = np.deg2rad(geom.tilt_deg)
    c, s = np.cos(theta), np.sin(theta)
    return (points - centre) @ np.array([[c, -s], [s, c]]).T + centre


@renderer("Pneumothorax")
def _pneumothorax(ctx: LesionContext, side: str, hard: bool) -> list[LesionPatch]:
    """Air between the chest wall and the collapsed lung: dark, no markings, a thin pleural line."""
    anatomy = ctx.anatomy
    geom = anatomy.lungs[side]
    centre, width, height = _target(ctx, "Pneumothorax", side, hard)
    span = geom.lateral - geom.medial
    collapse = float(np.clip(1.0 - 0.3 * width / span, 0.6, 0.92))
    anchor = lung_point(anatomy, side, 0.0, 0.45)  # the collapsed lung hangs from the hilum
    outline = lung_outline(anatomy, side)
    collapsed = anchor + (outline - anchor) * collapse
    # Air over the apex and down the lateral wall to the bottom of the sampled box (an erect film:
    # pleural air rises), fading out below it.
    top = geom.apex - 50.0
    cut = float(np.clip(centre[1] + 0.25 * height, geom.apex + 100.0, geom.base - 60.0))
    image, draw = ctx.canvas.new_layer()
    ctx.canvas.polygon(draw, outline, 255)
    ctx.canvas.polygon(draw, collapsed, 0)
    sign = SIDE_SIGN[side]
    below = [(anatomy.midline, cut), (anatomy.midline + sign * 700, cut), (anatomy.midline + sign * 700, 1100),
             (anatomy.midline, 1100)]
    above = [(anatomy.midline, top), (anatomy.midline + sign * 700, top), (anatomy.midline + sign * 700, -100),
             (anatomy.midline, -100)]
    air = ctx.canvas.soften(image, 6.0)
    # Fade in and out over ~40 px at the top and bottom of the band (image rows of the posed film).
    (_, top_row), (_, cut_row) = ctx.canvas.to_image([(anatomy.midline, top), (anatomy.midline, cut)])
    _, rows = pixel_grid(ctx.canvas.size)
    fade = np.clip((rows - top_row) / 40.0, 0.0, 1.0) * np.clip((cut_row - rows) / 40.0 + 0.5, 0.0, 1.0)
    air = _in_lung(ctx, air * fade, side)
    line_image, draw = ctx.canvas.new_layer()
    ctx.canvas.line(draw, np.vstack([collapsed, collapsed[:1]]), 255, 5.0)
    ctx.canvas.polygon(draw, below, 0)
    ctx.canvas.polygon(draw, above, 0)
    pleural_line = ctx.canvas.soften(line_image, 2.5) * ctx.lung_soft(side)
    density = -_density(ctx, 0.2, 0.3, hard)
    return [LesionPatch(air, density, ctx.box_of(air), clears_vessels=True),
            LesionPatch(pleural_line, 0.35 * (HARD_DENSITY if hard else 1.0))]


@modifier("Cardiomegaly")
def _enlarge_heart(anatomy: Anatomy, side: str, rng: np.random.Generator) -> None:
    stats = BOX_STATS["Cardiomegaly"]
    width, height = sample_box_size(rng, stats)
    a, b, angle = ellipse_axes_for_box(width, height, anatomy.heart["angle"])
    anatomy.heart.update(a=a, b=b, angle=angle)
    anatomy.heart["cx"] = anatomy.midline + rng.normal(CARDIOMEGALY_CX[0] - 512.0, 0.5 * CARDIOMEGALY_CX[1])
    anatomy.heart["cy"] = float(np.clip(rng.normal(*stats.cy), 480.0, 690.0))


@renderer("Cardiomegaly")
def _cardiomegaly(ctx: LesionContext, side: str, hard: bool) -> list[LesionPatch]:
    """The enlarged heart is drawn with the anatomy; the box is its silhouette's bounding box."""
    points = ctx.canvas.to_image(heart_outline(ctx.anatomy))
    x1, y1 = np.clip(points.min(axis=0), 0.0, 1024.0)
    x2, y2 = np.clip(points.max(axis=0), 0.0, 1024.0)
    return [LesionPatch(None, 0.0, (float(x1), float(y1), float(x2), float(y2)))]


# --- the six label-only classes ------------------------------------------------------------------


@renderer("Consolidation")
def _consolidation(ctx: LesionContext, side: str, hard: bool) -> list[LesionPatch]:
    """Dense, homogeneous lobar opacity with one straight (fissural) border."""
    rng = ctx.rng
    geom = ctx.anatomy.lungs[side]
    u, v = rng.uniform(0.3, 0.7), rng.uniform(0.3, 0.75)
    centre = lung_point(ctx.anatomy, side, u, v)
    width = rng.uniform(0.35, 0.6) * (geom.lateral - geom.medial)
    height = rng.uniform(0.2, 0.35) * (geom.base - geom.apex)
    a, b, angle = ellipse_axes_for_box(width, height, 0.0)
    points = ellipse_points(centre[0], centre[1], a, b, angle, 40, radial_wobble(rng, 40, 0.15))
    fissure = centre[1] - b * rng.uniform(0.2, 0.6)
    points[:, 1] = np.maximum(points[:, 1], fissure)
    alpha = ctx.shape(points, 12.0) * (0.92 + 0.08 * np.clip(ctx.noise(28.0), -1, 1))
    return [LesionPatch(_in_lung(ctx, alpha, side), _density(ctx, 0.4, 0.52, hard))]


@renderer("Edema")
def _edema(ctx: LesionContext, side: str, hard: bool) -> list[LesionPatch]:
    """Bilateral perihilar ("bat-wing") haze."""
    patches = []
    for lung in ("right", "left"):
        geom = ctx.anatomy.lungs[lung]
        hilum = lung_point(ctx.anatomy, lung, 0.3, 0.5)
        points = ellipse_points(hilum[0], hilum[1], 0.45 * (geom.lateral - geom.medial), 0.28 * (geom.base - geom.apex),
                                0.0, 32, radial_wobble(ctx.rng, 32, 0.15))
        alpha = ctx.shape(points, 60.0) * (0.8 + 0.2 * np.clip(ctx.noise(70.0), -1, 1))
        patches.append(LesionPatch(_in_lung(ctx, alpha, lung), _density(ctx, 0.16, 0.24, hard)))
    return patches


@modifier("Emphysema")
def _hyperinflate(anatomy: Anatomy, side: str, rng: np.random.Generator) -> None:
    for geom in anatomy.lungs.values():
        geom.base += rng.uniform(25.0, 50.0)
        geom.dome = geom.base - rng.uniform(45.0, 75.0)  # flattened diaphragm
    anatomy.lung_air += rng.uniform(0.06, 0.12)
    anatomy.vessel_density *= 0.45
    anatomy.heart["a"] *= 0.92
    anatomy.heart["b"] *= 0.92


@modifier("Fibrosis")
def _fibrotic_volume_loss(anatomy: Anatomy, side: str, rng: np.random.Generator) -> None:
    for geom in anatomy.lungs.values():
        geom.base -= rng.uniform(10.0, 35.0)
        geom.dome -= rng.uniform(10.0, 35.0)


@renderer("Fibrosis")
def _fibrosis(ctx: LesionContext, side: str, hard: bool) -> list[LesionPatch]:
    """Reticular (net-like) lines in the lower lateral zones of both lungs."""
    net = np.clip(1.0 - np.abs(ctx.noise(14.0)) / 0.25, 0.0, 1.0)
    patches = []
    for lung in ("right", "left"):
        geom = ctx.anatomy.lungs[lung]
        zone = lung_point(ctx.anatomy, lung, 0.65, 0.72)
        points = ellipse_points(zone[0], zone[1], 0.4 * (geom.lateral - geom.medial), 0.25 * (geom.base - geom.apex), 0.0, 24)
        alpha = ctx.shape(points, 40.0) * (0.3 + net)
        patches.append(LesionPatch(_in_lung(ctx, alpha, lung), _density(ctx, 0.08, 0.14, hard)))
    return patches


@renderer("Pleural_Thickening")
def _pleural_thickening(ctx: LesionContext, side: str, hard: bool) -> list[LesionPatch]:
    """A smooth band along the lateral chest wall or an apical cap."""
    outline = lung_outline(ctx.anatomy, side)
    n = len(outline)
    if ctx.rng.random() < 0.5:
        segment = outline[int(0.3 * n): int(0.62 * n)]  # apex and upper lateral wall
    else:
        segment = outline[int(0.45 * n): int(0.75 * n)]  # lateral wall
    image, draw = ctx.canvas.new_layer()
    ctx.canvas.line(draw, segment, 255, ctx.rng.uniform(16.0, 30.0))
    alpha = ctx.canvas.soften(image, 6.0) * ctx.layers.body
    return [LesionPatch(alpha, _density(ctx, 0.14, 0.22, hard))]


@renderer("Hernia")
def _hernia(ctx: LesionContext, side: str, hard: bool) -> list[LesionPatch]:
    """Hiatal hernia: a round retrocardiac opacity with an air-fluid level."""
    rng, heart = ctx.rng, ctx.anatomy.heart
    cx = ctx.anatomy.midline + rng.uniform(-20.0, 60.0)
    cy = heart["cy"] + 0.45 * heart["b"] + rng.uniform(-30.0, 10.0)
    radius = rng.uniform(55.0, 95.0)
    sac = ctx.shape(ellipse_points(cx, cy, radius * 1.15, radius, 0.0, 32), 6.0)
    level = cy - radius * rng.uniform(0.1, 0.5)
    gas_points = ellipse_points(cx, cy, radius * 1.05, radius * 0.9, 0.0, 32)
    gas_points[:, 1] = np.minimum(gas_points[:, 1], level)
    gas = ctx.shape(gas_points, 3.0)
    return [LesionPatch(sac, _density(ctx, 0.18, 0.26, hard)), LesionPatch(gas, -0.25)]
