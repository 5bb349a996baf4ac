"""Normal chest anatomy: sampled geometry and its soft density layers.

Geometry lives in the canonical 1024 x 1024 frame of a frontal film (x to the image right, y down):
the midline, two lung fields, heart, mediastinum and trachea, spine, ribs, clavicles, body outline.
Sides are the patient's: ``"right"`` is the IMAGE LEFT (mask value 1), ``"left"`` the IMAGE RIGHT
(mask value 2). A lung is described in "distance from the midline" ``d`` and row ``y``; its outline is
built from smooth parametric curves (rounded apex, convex lateral wall, sharp costophrenic angle,
diaphragm dome) and then tilted; the global pose (rotation, zoom, shift) is applied by
:class:`~gren.data.synth.raster.Canvas` when drawing.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np
from PIL import ImageDraw
from scipy import ndimage

from gren.data.synth.raster import Canvas, ellipse_points

SIDES = ("right", "left")
SIDE_SIGN = {"right": -1.0, "left": 1.0}  # patient's right lung is on the image left
SIDE_MASK_VALUE = {"right": 1, "left": 2}


@dataclass
class LungGeometry:
    """One lung field in canonical 1024-space pixels.

    ``medial``/``lateral``: distances of the medial and lateral edges from the midline;
    ``apex``: row of the apex; ``base``: row of the lateral costophrenic angle; ``dome``: row of the
    top of the diaphragm dome; ``tilt_deg``: rotation of the field about its centre;
    ``wiggle``: (amplitude px, frequency, phase) of a smooth outline perturbation.
    """

    medial: float
    lateral: float
    apex: float
    base: float
    dome: float
    tilt_deg: float = 0.0
    wiggle: tuple[float, float, float] = (0.0, 1.0, 0.0)


@dataclass
class Anatomy:
    """Everything that fixes a normal film; lesions and modifiers edit a copy before drawing."""

    midline: float
    lungs: dict[str, LungGeometry]
    heart: dict[str, float]  # cx, cy (rows), a, b (semi-axes px), angle (radians, clockwise)
    chest_wall: float
    carina: float
    aortic_knob: float
    rib_spacing: float
    rib_drop: float
    lung_air: float
    vessel_density: float
    breasts: bool
    view: str = "PA"
    pose: tuple[float, float, float, float] = (0.0, 1.0, 0.0, 0.0)  # angle deg, zoom, shift x, shift y
    contrast: float = 1.0
    brightness: float = 0.0
    noise_sigma: float = 0.012
    blur_px: float = 2.0
    extras: dict = field(default_factory=dict)

    def copy(self) -> Anatomy:
        out = dataclasses.replace(self)
        out.lungs = {side: dataclasses.replace(g) for side, g in self.lungs.items()}
        out.heart = dict(self.heart)
        out.extras = dict(self.extras)
        return out


def sample_patient_anatomy(rng: np.random.Generator, sex: str) -> Anatomy:
    """The patient's own build (shared by all their films): chest size, lung shape, heart."""
    male = sex == "M"
    midline = 512.0 + rng.normal(0.0, 10.0)
    lateral = float(np.clip(rng.normal(392.0 if male else 375.0, 22.0), 320.0, 450.0))
    apex = float(np.clip(rng.normal(128.0, 18.0), 80.0, 180.0))
    base = float(np.clip(rng.normal(815.0, 32.0), 720.0, 900.0))
    dome_height = float(np.clip(rng.normal(150.0, 22.0), 90.0, 210.0))
    lungs = {}
    for side in SIDES:
        extra_high = 22.0 if side == "right" else 0.0  # the liver lifts the right hemidiaphragm
        lungs[side] = LungGeometry(
            medial=float(np.clip(rng.normal(40.0, 7.0), 25.0, 60.0)),
            lateral=lateral + rng.normal(0.0, 8.0),
            apex=apex + rng.normal(0.0, 6.0),
            base=base - extra_high * 0.6 + rng.normal(0.0, 8.0),
            dome=base - dome_height - extra_high + rng.normal(0.0, 10.0),
            wiggle=(rng.uniform(2.0, 9.0), rng.uniform(1.5, 3.5), rng.uniform(0, 2 * np.pi)),
        )
    heart = {
        "cx": midline + rng.normal(45.0, 10.0),
        "cy": float(np.clip(rng.normal(630.0, 22.0), 560.0, 700.0)),
        "a": float(np.clip(rng.normal(185.0, 14.0), 150.0, 225.0)),
        "b": float(np.clip(rng.normal(135.0, 10.0), 105.0, 165.0)),
        "angle": np.deg2rad(rng.normal(24.0, 5.0)),
    }
    return Anatomy(
        midline=midline,
        lungs=lungs,
        heart=heart,
        chest_wall=float(np.clip(rng.normal(70.0 if male else 85.0, 14.0), 40.0, 120.0)),
        carina=float(np.clip(rng.normal(390.0, 20.0), 330.0, 450.0)),
        aortic_knob=float(np.clip(rng.normal(30.0, 10.0), 5.0, 55.0)),
        rib_spacing=float(rng.normal(66.0, 4.0)),
        rib_drop=float(rng.normal(150.0, 18.0)),
        lung_air=float(rng.normal(0.62, 0.04)),
        vessel_density=float(rng.uniform(0.7, 1.2)),
        breasts=(not male) and rng.random() < 0.8,
    )


def sample_film(patient: Anatomy, rng: np.random.Generator, view: str) -> Anatomy:
    """One film of the patient: inspiration, pose, exposure and view-dependent changes (AP)."""
    anatomy = patient.copy()
    anatomy.view = view
    inspiration = float(np.clip(rng.normal(1.0, 0.05), 0.88, 1.12))
    for geom in anatomy.lungs.values():
        height = geom.base - geom.apex
        geom.base = geom.apex + height * inspiration
        geom.dome = geom.apex + (geom.dome - geom.apex) * inspiration
        geom.tilt_deg = rng.normal(0.0, 2.0)
    angle = rng.normal(0.0, 2.5)
    zoom = float(np.clip(rng.normal(1.0, 0.04), 0.9, 1.1))
    shift = rng.normal(0.0, 18.0, size=2)
    if view == "AP":
        # Supine/portable films: magnified heart, higher diaphragm, lower contrast, more noise.
        anatomy.heart["a"] *= 1.08
        anatomy.heart["b"] *= 1.06
        for geom in anatomy.lungs.values():
            geom.base -= 25.0
            geom.dome -= 25.0
        anatomy.contrast = float(rng.uniform(0.62, 0.85))
        anatomy.brightness = float(rng.uniform(0.0, 0.08))
        anatomy.noise_sigma = float(rng.uniform(0.014, 0.028))
        anatomy.blur_px = float(rng.uniform(2.0, 4.0))
        angle += rng.normal(0.0, 2.0)
    else:
        anatomy.contrast = float(rng.uniform(0.85, 1.05))
        anatomy.brightness = float(rng.uniform(-0.04, 0.04))
        anatomy.noise_sigma = float(rng.uniform(0.008, 0.018))
        anatomy.blur_px = float(rng.uniform(1.2, 2.5))
    anatomy.pose = (float(angle), zoom, float(shift[0]), float(shift[1]))
    return anatomy


# --- geometry -----------------------------------------------------------------------------------


def _arc(t: np.ndarray) -> np.ndarray:
    """Quarter-circle ramp 0 -> 1 on t in [0, 1] (vertical tangent at 0: a rounded apex)."""
    t = np.clip(t, 0.0, 1.0)
    return np.sqrt(1.0 - (1.0 - t) ** 2)


def _lung_d_y(geom: LungGeometry, n: int = 28) -> tuple[np.ndarray, np.ndarray]:
    """Outline of a lung as (distance from midline, row) arrays, before tilt."""
    height = geom.base - geom.apex
    span = geom.lateral - geom.medial
    d_apex = geom.medial + 0.36 * span
    medial_bottom = min(geom.dome + 35.0, geom.base - 10.0)
    v_medial_bottom = (medial_bottom - geom.apex) / height
    amp, freq, phase = geom.wiggle

    v_med = np.linspace(v_medial_bottom, 0.0, n)
    d_med = d_apex - (d_apex - geom.medial) * _arc(v_med / 0.3)
    v_lat = np.linspace(0.0, 1.0, n + 8)[1:]
    d_lat = d_apex + (geom.lateral - d_apex) * _arc(v_lat / 0.62)
    d_lat -= 18.0 * (np.clip(v_lat - 0.62, 0, None) / 0.38) ** 2
    d_lat += amp * np.sin(freq * np.pi * v_lat + phase) * np.sin(np.pi * v_lat)
    # Diaphragm: from the costophrenic angle (lateral, lowest) over the dome to the medial end.
    d_cp = d_lat[-1]
    d_peak = geom.medial + 0.45 * span
    d_base = np.linspace(d_cp, geom.medial, n)[1:-1]
    lateral_part = geom.dome + (geom.base - geom.dome) * (np.clip(d_base - d_peak, 0, None) / (d_cp - d_peak)) ** 1.7
    medial_part = geom.dome + (medial_bottom - geom.dome) * (np.clip(d_peak - d_base, 0, None) / (d_peak - geom.medial)) ** 2
    y_base = np.where(d_base >= d_peak, lateral_part, medial_part)
    d = np.concatenate([d_med, d_lat, d_base])
    y = np.concatenate([geom.apex + v_med * height, geom.apex + v_lat * height, y_base])
    return d, y


def _tilt(points: np.ndarray, centre: np.ndarray, tilt_deg: float) -> np.ndarray:
    theta = np.deg2rad(tilt_deg)
    c, s = np.cos(theta), np.sin(theta)
    rot = np.array([[c, -s], [s, c]])
    return (points - centre) @ rot.T + centre


def lung_centre(anatomy: Anatomy, side: str) -> np.ndarray:
    geom = anatomy.lungs[side]
    sign = SIDE_SIGN[side]
    return np.array([anatomy.midline + sign * (geom.medial + geom.lateral) / 2, (geom.apex + geom.base) / 2])


def lung_outline(anatomy: Anatomy, side: str) -> np.ndarray:
    """Canonical vertices (N, 2) of one lung field (before the heart and mediastinum are cut out)."""
    geom = anatomy.lungs[side]
    d, y = _lung_d_y(geom)
    points = np.stack([anatomy.midline + SIDE_SIGN[side] * d, y], axis=1)
    return _tilt(points, lung_centre(anatomy, side), geom.tilt_deg)


def lung_point(anatomy: Anatomy, side: str, u: float, v: float) -> np.ndarray:
    """Canonical (x, y) of normalised lung coordinates: ``u`` 0 medial -> 1 lateral, ``v`` 0 apex -> 1 base."""
    geom = anatomy.lungs[side]
    d = geom.medial + u * (geom.lateral - geom.medial)
    y = geom.apex + v * (geom.base - geom.apex)
    point = np.array([[anatomy.midline + SIDE_SIGN[side] * d, y]])
    return _tilt(point, lung_centre(anatomy, side), geom.tilt_deg)[0]


def heart_outline(anatomy: Anatomy, shrink: float = 0.0, n: int = 48) -> np.ndarray:
    """Canonical vertices (n, 2) of the cardiac silhouette, optionally shrunk by ``shrink`` px."""
    h = anatomy.heart
    wobble = anatomy.extras.get("heart_wobble")
    if wobble is None or len(wobble) != n:
        wobble = np.ones(n)
    return ellipse_points(h["cx"], h["cy"], h["a"] - shrink, h["b"] - shrink, h["angle"], n, wobble)


def mediastinum_outline(anatomy: Anatomy) -> np.ndarray:
    """Canonical vertices of the upper mediastinum (trachea, great vessels, aortic knob) down into the heart."""
    m, car, h = anatomy.midline, anatomy.carina, anatomy.heart
    knob_y = car - 40.0
    return np.array([
        (m - 40, -20), (m - 42, car - 80), (m - 58, car + 30), (m - 66, h["cy"] - 0.35 * h["b"]),
        (m - 40, h["cy"] + 0.5 * h["b"]), (m + 30, h["cy"] + 0.5 * h["b"]), (m + 58, h["cy"] - 0.4 * h["b"]),
        (m + 62, knob_y + 80), (m + 60 + anatomy.aortic_knob, knob_y + 15), (m + 52 + anatomy.aortic_knob, knob_y - 35),
        (m + 45, knob_y - 90), (m + 40, -20),
    ])


def body_outline(anatomy: Anatomy) -> np.ndarray:
    """Canonical vertices of the soft-tissue outline: neck, shoulders, chest wall, flanks."""
    m = anatomy.midline
    reach = max(g.lateral for g in anatomy.lungs.values()) + anatomy.chest_wall
    half = [(-300, 125), (40, 130), (95, 250), (150, reach + 60), (320, reach + 10), (600, reach), (1400, reach + 40)]
    left = [(m - w, y) for y, w in half]
    right = [(m + w, y) for y, w in reversed(half)]
    return np.array(left + right, dtype=float)


# --- drawing ------------------------------------------------------------------------------------


@dataclass
class AnatomyLayers:
    """Soft density layers (float32 (S, S) in [0, 1]) and the hard lung mask (uint8 0/1/2).

    ``lungs``: air in the lung fields (the whole fields, behind the heart too, plus trachea and
    gastric bubble); ``cardio``: mediastinum, heart (and breast shadows); ``lung_mask``: the labelled
    lung fields, which stop at the heart's border.
    """

    body: np.ndarray
    lungs: np.ndarray
    cardio: np.ndarray
    bones: np.ndarray
    vessels: np.ndarray
    lung_mask: np.ndarray


def draw_lung_mask(canvas: Canvas, anatomy: Anatomy, heart_shrink: float = 14.0):
    """The hard lung mask (PIL 'L', 0/1/2): both fields minus the mediastinum and the heart's core.

    The heart core is the silhouette shrunk by ``heart_shrink`` px, so the mask reaches a little under
    the heart's border as annotators' outlines do. ``heart_shrink=None`` keeps the fields behind the heart.
    """
    mask, draw = canvas.new_layer()
    for side in SIDES:
        canvas.polygon(draw, lung_outline(anatomy, side), SIDE_MASK_VALUE[side])
    canvas.polygon(draw, mediastinum_outline(anatomy), 0)
    if heart_shrink is not None:
        canvas.polygon(draw, heart_outline(anatomy, shrink=heart_shrink), 0)
    return mask


def keep_largest_regions(lung_mask: np.ndarray) -> np.ndarray:
    """Each lung label reduced to its largest 4-connected region (the heart can cut off a sliver)."""
    out = lung_mask.copy()
    for value in SIDE_MASK_VALUE.values():
        regions, count = ndimage.label(lung_mask == value)
        if count > 1:
            sizes = np.bincount(regions.ravel())
            sizes[0] = 0
            out[(regions > 0) & (regions != int(np.argmax(sizes)))] = 0
    return out


def draw_anatomy(canvas: Canvas, anatomy: Anatomy, rng: np.random.Generator) -> AnatomyLayers:
    """Rasterise the normal anatomy at the canvas size. ``rng`` draws the vessel tree."""
    lung_mask = keep_largest_regions(np.asarray(draw_lung_mask(canvas, anatomy), dtype=np.uint8))

    body_image, draw = canvas.new_layer()
    canvas.polygon(draw, body_outline(anatomy), 255)
    body = canvas.soften(body_image, 12.0)

    air_image = draw_lung_mask(canvas, anatomy, heart_shrink=None).point(lambda v: 255 if v else 0)
    draw = ImageDraw.Draw(air_image)
    left = anatomy.lungs["left"]
    bubble_x = anatomy.midline + 0.55 * left.lateral
    canvas.polygon(draw, ellipse_points(bubble_x, left.dome + 75.0, 70.0, 42.0, 0.0, 24), 110)
    m, car = anatomy.midline, anatomy.carina
    canvas.polygon(draw, [(m - 16, -20), (m + 16, -20), (m + 14, car), (m - 14, car)], 95)
    canvas.line(draw, [(m, car - 5), (m - 75, car + 70)], 80, 20)
    canvas.line(draw, [(m, car - 5), (m + 80, car + 80)], 80, 20)
    lungs = canvas.soften(air_image, 7.0)

    cardio_image, draw = canvas.new_layer()
    if anatomy.breasts:
        for side in SIDES:
            geom = anatomy.lungs[side]
            cx = anatomy.midline + SIDE_SIGN[side] * (geom.lateral - 40.0)
            canvas.polygon(draw, ellipse_points(cx, geom.base - 40.0, 190.0, 140.0, 0.0, 32), 60)
    canvas.polygon(draw, mediastinum_outline(anatomy), 235)
    canvas.polygon(draw, heart_outline(anatomy), 255)
    cardio = canvas.soften(cardio_image, 8.0)

    bones_image, draw = canvas.new_layer()
    _draw_spine(canvas, draw, anatomy)
    _draw_ribs(canvas, draw, anatomy)
    _draw_clavicles(canvas, draw, anatomy)
    bones = canvas.soften(bones_image, 3.0)

    vessels_image, draw = canvas.new_layer()
    _draw_vessels(canvas, draw, anatomy, rng)
    vessels = canvas.soften(vessels_image, 3.0)
    return AnatomyLayers(body, lungs, cardio, bones, vessels, lung_mask)


def _draw_spine(canvas: Canvas, draw, anatomy: Anatomy) -> None:
    m = anatomy.midline
    canvas.polygon(draw, [(m - 44, -300), (m + 44, -300), (m + 48, 1300), (m - 48, 1300)], 200)
    for y in np.arange(anatomy.extras.get("spine_phase", 20.0), 1044.0, 72.0):
        canvas.line(draw, [(m - 44, y), (m + 44, y + 3)], 120, 9)


def rib_centreline(anatomy: Anatomy, side: str, k: int, n: int = 14) -> np.ndarray:
    """Canonical centreline (n, 2) of posterior rib ``k`` (0 = highest) on one side."""
    geom = anatomy.lungs[side]
    sign = SIDE_SIGN[side]
    reach = geom.lateral + 45.0
    y0 = geom.apex - 40.0 + k * anatomy.rib_spacing * (1.0 + 0.025 * k)
    drop = anatomy.rib_drop * (0.75 + 0.05 * k)
    d = np.linspace(22.0, reach, n)
    t = (d - 22.0) / (reach - 22.0)
    y = y0 + drop * t**2.6 - 38.0 * np.sin(np.pi * t) ** 0.8
    return np.stack([anatomy.midline + sign * d, y], axis=1)


def _draw_ribs(canvas: Canvas, draw, anatomy: Anatomy) -> None:
    for side in SIDES:
        geom = anatomy.lungs[side]
        sign = SIDE_SIGN[side]
        for k in range(11):
            line = rib_centreline(anatomy, side, k)
            width = 24.0 + 1.2 * k
            canvas.line(draw, line, 210, width)
            canvas.line(draw, line, 140, width * 0.5)
            if 1 <= k <= 7:  # anterior ribs: faint bands curving down towards the sternum
                start = line[-1]
                t = np.linspace(0.0, 1.0, 8)
                d = geom.lateral + 40.0 - t * (geom.lateral - 110.0)
                y = start[1] + 10.0 + 150.0 * t**0.8
                canvas.line(draw, np.stack([anatomy.midline + sign * d, y], axis=1), 40, 20)


def _draw_clavicles(canvas: Canvas, draw, anatomy: Anatomy) -> None:
    for side in SIDES:
        geom = anatomy.lungs[side]
        t = np.linspace(0.0, 1.0, 12)
        d = 40.0 + t * (geom.lateral + 20.0)
        y = geom.apex + 95.0 - 125.0 * t + 28.0 * np.sin(np.pi * t)
        line = np.stack([anatomy.midline + SIDE_SIGN[side] * d, y], axis=1)
        canvas.line(draw, line, 255, 32, round_joints=True)
        canvas.line(draw, line, 200, 16)


def _draw_vessels(canvas: Canvas, draw, anatomy: Anatomy, rng: np.random.Generator) -> None:
    """Branching pulmonary vessels radiating from each hilum, and the hilar shadows.

    Per side, 14 to 19 vessels of 4 segments each: a random initial direction (0 = straight lateral,
    negative = towards the apex) that wanders by N(0, 0.35) rad per segment, each segment 0.7 times
    as wide as the previous one, and with probability 0.4 a half-width side branch at its start.
    All random draws for a side are made at once (arrays), not per segment.
    """
    segments_per_vessel = 4
    starts, ends, widths = [], [], []
    for side in SIDES:
        geom = anatomy.lungs[side]
        sign = SIDE_SIGN[side]
        hilum = lung_point(anatomy, side, 0.22, 0.45)
        canvas.polygon(draw, ellipse_points(hilum[0], hilum[1], 40.0, 75.0, 0.0, 16), 150)
        reach = (geom.base - geom.apex) * 0.65
        n = int(rng.integers(14, 20))
        phi0 = rng.uniform(-1.35, 1.15, n)
        step = rng.uniform(0.35, 0.8, n) * reach / 4.0  # (n,) canonical px per segment
        origin = hilum + rng.normal(0.0, 12.0, size=(n, 2))
        width0 = rng.uniform(6.0, 9.0, n)
        phi = phi0[:, None] + np.cumsum(rng.normal(0.0, 0.35, (n, segments_per_vessel)), axis=1)  # (n, 4)
        moves = step[:, None, None] * np.stack([sign * np.cos(phi), np.sin(phi)], axis=2)  # (n, 4, 2)
        seg_ends = origin[:, None, :] + np.cumsum(moves, axis=1)
        seg_starts = np.concatenate([origin[:, None, :], seg_ends[:, :-1]], axis=1)
        seg_widths = width0[:, None] * 0.7 ** np.arange(segments_per_vessel)  # (n, 4)
        branch = rng.random((n, segments_per_vessel)) < 0.4
        psi = phi + np.where(rng.random((n, segments_per_vessel)) < 0.5, -1.0, 1.0) * rng.uniform(
            0.4, 0.8, (n, segments_per_vessel))
        branch_moves = 0.6 * step[:, None, None] * np.stack([sign * np.cos(psi), np.sin(psi)], axis=2)
        starts += [seg_starts.reshape(-1, 2), seg_starts[branch]]
        ends += [seg_ends.reshape(-1, 2), (seg_starts + branch_moves)[branch]]
        widths += [seg_widths.ravel(), 0.5 * seg_widths[branch]]
    canvas.segments(draw, np.concatenate(starts), np.concatenate(ends), 255, np.concatenate(widths))
