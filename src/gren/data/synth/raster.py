"""Drawing helpers: shapes given in the 1024 x 1024 space, rasterised at S x S with PIL.

Every shape of the generator is a polygon or a polyline in the *canonical* 1024-space frame of one
case; :class:`Canvas` applies the case's global pose (rotation, zoom, shift about the image centre)
and the scale ``S / 1024``, draws with PIL (C code, no per-pixel Python) and blurs with PIL's
Gaussian filter to make soft density layers. Layers are 8-bit while drawn and returned as float32
arrays in [0, 1].
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

CANONICAL = 1024.0


@lru_cache(maxsize=8)
def pixel_grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Column and row coordinates of the pixel centres, in 1024-space units: two (S, S) float32 arrays."""
    coords = (np.arange(size, dtype=np.float32) + 0.5) * (CANONICAL / size)
    cols, rows = np.meshgrid(coords, coords)
    cols.setflags(write=False)
    rows.setflags(write=False)
    return cols, rows


class Canvas:
    """Rasterises canonical 1024-space geometry at ``size`` pixels under a global pose.

    ``angle_deg`` rotates about the image centre (positive = clockwise on screen), ``zoom`` scales
    about it and ``shift`` (dx, dy) moves in 1024-space pixels. ``to_image(points)`` maps canonical
    points (N, 2) to 1024-space image coordinates; ``to_pixels`` further to S-pixel coordinates.
    """

    def __init__(self, size: int, angle_deg: float = 0.0, zoom: float = 1.0, shift=(0.0, 0.0)):
        self.size = int(size)
        self.scale = self.size / CANONICAL
        theta = np.deg2rad(angle_deg)
        c, s = np.cos(theta), np.sin(theta)
        self.linear = zoom * np.array([[c, -s], [s, c]])
        centre = np.array([CANONICAL / 2, CANONICAL / 2])
        self.offset = centre - self.linear @ centre + np.asarray(shift, dtype=float)
        self.zoom = zoom

    def to_image(self, points) -> np.ndarray:
        """Canonical (N, 2) x, y -> image 1024-space (N, 2)."""
        pts = np.asarray(points, dtype=float).reshape(-1, 2)
        return pts @ self.linear.T + self.offset

    def to_pixels(self, points) -> list[float]:
        """Canonical (N, 2) -> flat PIL vertex list [x0, y0, x1, ...] in S pixels (pixel i spans [i, i + 1))."""
        pix = self.to_image(points) * self.scale - 0.5
        return pix.ravel().tolist()

    def width(self, canonical_px: float) -> int:
        """A line width given in canonical pixels, in S pixels (at least 1)."""
        return max(1, int(round(canonical_px * self.scale * self.zoom)))

    def new_layer(self, fill: int = 0) -> tuple[Image.Image, ImageDraw.ImageDraw]:
        image = Image.new("L", (self.size, self.size), fill)
        return image, ImageDraw.Draw(image)

    def polygon(self, draw: ImageDraw.ImageDraw, points, fill: int) -> None:
        draw.polygon(self.to_pixels(points), fill=fill)

    def line(self, draw: ImageDraw.ImageDraw, points, fill: int, width_px: float, round_joints: bool = False) -> None:
        """A polyline ``width_px`` canonical pixels wide (round joints cost time; blur hides square ones)."""
        draw.line(self.to_pixels(points), fill=fill, width=self.width(width_px), joint="curve" if round_joints else None)

    def segments(self, draw: ImageDraw.ImageDraw, starts, ends, fill: int, widths_px) -> None:
        """Many straight segments at once: ``starts``/``ends`` canonical (N, 2), ``widths_px`` (N,)."""
        a = self.to_image(starts) * self.scale - 0.5
        b = self.to_image(ends) * self.scale - 0.5
        widths = np.maximum(1, np.rint(np.asarray(widths_px) * self.scale * self.zoom)).astype(int)
        for (x0, y0), (x1, y1), w in zip(a.tolist(), b.tolist(), widths.tolist()):
            draw.line((x0, y0, x1, y1), fill=fill, width=w)

    def soften(self, layer: Image.Image, radius_px: float, smooth: bool = False) -> np.ndarray:
        """Blur by ``radius_px`` canonical pixels; returns float32 (S, S) in [0, 1].

        A single box blur (cheap, linear edge ramps) by default; ``smooth`` uses PIL's Gaussian
        (three box passes) where the profile of an edge shows.
        """
        radius = radius_px * self.scale * self.zoom
        if radius >= 0.3:
            blur = ImageFilter.GaussianBlur(radius) if smooth else ImageFilter.BoxBlur(radius * 1.3)
            layer = layer.filter(blur)
        return np.asarray(layer, dtype=np.float32) * np.float32(1.0 / 255.0)


def ellipse_points(cx: float, cy: float, a: float, b: float, angle_rad: float = 0.0, n: int = 48,
                   wobble=None) -> np.ndarray:
    """Vertices (n, 2) of an ellipse with semi-axes ``a`` (along the rotated x axis) and ``b``.

    ``wobble``: optional (n,) radial factors (1 = none) to make the outline irregular.
    """
    t = np.linspace(0.0, 2.0 * np.pi, n, endpoint=False)
    r = np.ones(n) if wobble is None else np.asarray(wobble)
    ex, ey = a * np.cos(t) * r, b * np.sin(t) * r
    c, s = np.cos(angle_rad), np.sin(angle_rad)
    return np.stack([cx + ex * c - ey * s, cy + ex * s + ey * c], axis=1)


def radial_wobble(rng: np.random.Generator, n: int, amplitude: float, harmonics: int = 4) -> np.ndarray:
    """Smooth random radial factors (n,) around 1: a sum of low harmonics with random phases."""
    t = np.linspace(0.0, 2.0 * np.pi, n, endpoint=False)
    out = np.ones(n)
    for k in range(2, 2 + harmonics):
        out += amplitude / (k - 1) * rng.uniform(0.3, 1.0) * np.sin(k * t + rng.uniform(0, 2 * np.pi))
    return out


def smooth_noise(rng: np.random.Generator, size: int, cell_px: float) -> np.ndarray:
    """Band-limited noise (S, S) float32, roughly zero mean and unit std, features ~``cell_px`` wide.

    A coarse grid of normal draws (one per ``cell_px`` canonical pixels) upsampled bicubically.
    """
    cells = max(2, int(np.ceil(CANONICAL / cell_px)) + 1)
    grid = rng.standard_normal((cells, cells)).astype(np.float32)
    image = Image.fromarray(grid).resize((size, size), Image.BICUBIC)
    return np.array(image, dtype=np.float32)  # a writable copy


def footprint_box(alpha: np.ndarray, threshold: float) -> tuple[float, float, float, float] | None:
    """Bounding box (x1, y1, x2, y2) in 1024-space pixels of ``alpha > threshold``; None when empty."""
    inside = alpha > threshold
    rows = np.flatnonzero(inside.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(inside.any(axis=0))
    unit = CANONICAL / alpha.shape[0]
    return (cols[0] * unit, rows[0] * unit, (cols[-1] + 1) * unit, (rows[-1] + 1) * unit)
