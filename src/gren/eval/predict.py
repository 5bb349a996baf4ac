"""``gren predict``: heat maps, region boxes and overlays for image files with a trained model.

Per input image ``DIR/<stem>.json``::

    {"image": path, "image_size": [W, H], "model_input_size": S, "grid": [h, w], "method": name,
     "cell_threshold": the method's (0.5 for grid-MIL, 180/255 for CAM; a list when it differs per class)
                       or --threshold, "class_threshold": 0.5,
     "probabilities": {label: the method's image-level score (Localization.scores), ... 14},
     "heatmap_classes": [label, ...],     # the classes whose map the overlay draws
     "regions": [{"label", "probability", "box": [x1, y1, x2, y2] (image pixels), "cells", "max_cell_probability"}],
     "ground_truth": [{"label", "box"}]    # with --data or the run's dataset: [] when it does not know the image;
    }                                      # absent only when no dataset is available at all

(no NaN: non-finite numbers are written as null), and ``DIR/<stem>.png``: the film at its own resolution
(:func:`draw_overlay`) with the continuous map of each drawn class as a heat map (one colour per class,
opacity proportional to the map value), the cells above the cell threshold outlined in the class's
colour, the regions named with their class probability, the ground-truth boxes in green and a legend
strip below the film. Reported classes (their regions are listed): those whose image probability is at
least ``class_threshold`` (most probable first, at most ``top_k``); when none passes, the ``top_k`` most
probable classes that have a positive cell. Drawn classes (:func:`heatmap_classes`): the reported ones,
then the others above ``class_threshold``, else the most probable class, so an overlay always shows what
the model sees even when no cell passes the threshold. Regions are the 8-connected components of
positive cells, as boxes in the image's own pixels (cell ``(i, j)`` spans
``[j W / w, (j + 1) W / w) x [i H / h, (i + 1) H / h)``).

For downstream tools, one call also writes ``DIR/regions.csv`` (``image, label, probability, x1, y1, x2,
y2, cells, max_cell_probability``: one row per region) and ``DIR/regions.coco.json`` (COCO-style
``images``, ``categories`` (the 14 labels, ids 1-14), ``annotations`` with ``bbox [x, y, w, h]`` in image
pixels and ``score``) of all its regions.

Inputs: PNG / JPEG of any size and depth (:func:`gren.core.imageio.read_gray`), and DICOM with the
optional ``pydicom`` (``pip install 'gren[dicom]'``): modality LUT (rescale slope / intercept), the
file's VOI window (else the 0.5-99.5 percentile range) to 8 bits, MONOCHROME1 inverted.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

from gren.core.atomic import write_text_atomic
from gren.core.errors import GrenError, ImageReadError
from gren.core.imageio import DICOM_SUFFIXES, is_dicom, read_dicom_gray, read_gray  # noqa: F401 - re-exported
from gren.core.labels import LABELS
from gren.core.progress import progress as progress_bar

log = logging.getLogger(__name__)

OVERLAY_MAX_SIDE = 4096  # films larger than this are drawn reduced (memory); NIH's 1024 px at their own size
OVERLAY_MIN_SIDE = 512  # smaller films are drawn enlarged so that the text stays legible
HEAT_ALPHA = 0.6  # opacity of a class's tint where its map is 1
GREEN = (40, 220, 40)  # ground truth
# tab20 indices of the class colours (LABELS order): the eight box classes get tab20's strong colours without
# green and grey, the other six its light ones; greens (4, 5) and greys (14, 15) are left out.
CLASS_PALETTE = (6, 0, 2, 8, 18, 12, 10, 16, 3, 1, 9, 19, 13, 11)
REGIONS_CSV = "regions.csv"
REGIONS_COCO = "regions.coco.json"
CSV_COLUMNS = ("image", "label", "probability", "x1", "y1", "x2", "y2", "cells", "max_cell_probability")


def read_any_gray(path: str | os.PathLike) -> np.ndarray:
    """uint8 (H, W) from a PNG / JPEG (any depth, colour -> luma) or a DICOM file
    (:func:`gren.core.imageio.read_gray`, which reads DICOM by suffix or by its ``DICM`` magic)."""
    if not Path(path).is_file():
        raise ImageReadError(f"{path}: file not found")
    return read_gray(path)


def resize_gray(gray: np.ndarray, size: int) -> np.ndarray:
    """Resize to ``S x S`` exactly as ``gren prepare`` does (Pillow bilinear, antialiased)."""
    if gray.shape == (size, size):
        return gray
    return np.asarray(Image.fromarray(gray, mode="L").resize((size, size), Image.Resampling.BILINEAR), dtype=np.uint8)


def cell_regions(prob: np.ndarray, image_size: tuple[int, int], threshold: float = 0.5) -> list[dict]:
    """8-connected components of the cells with ``prob > threshold`` as boxes in image pixels.

    Args:
        prob: ``(h, w)`` map covering the image.
        image_size: ``(width, height)`` in pixels.

    Returns:
        ``[{"box": [x1, y1, x2, y2], "cells": n, "max_cell_probability": p}]``, largest first.
    """
    h, w = prob.shape
    width, height = image_size
    components, count = ndimage.label(prob > threshold, structure=np.ones((3, 3), dtype=bool))
    regions = []
    for k, found in enumerate(ndimage.find_objects(components), start=1):
        if found is None:
            continue
        rows, cols = found
        member = components[found] == k
        regions.append({
            "box": [round(cols.start * width / w, 2), round(rows.start * height / h, 2),
                    round(cols.stop * width / w, 2), round(rows.stop * height / h, 2)],
            "cells": int(member.sum()),
            "max_cell_probability": round(float(prob[found][member].max()), 4),
        })
    regions.sort(key=lambda r: -r["cells"])
    assert len(regions) <= count
    return regions


def reported_classes(probabilities: np.ndarray, maps: np.ndarray, class_threshold: float,
                     cell_threshold: float | np.ndarray, top_k: int) -> list[int]:
    """LABELS indices to report (see the module docstring): ``probabilities (K,)``, ``maps (K, h, w)``,
    ``cell_threshold`` a scalar or ``(K,)``."""
    limits = np.broadcast_to(np.asarray(cell_threshold, dtype=np.float64), probabilities.shape)
    order = np.argsort(-probabilities, kind="stable")
    has_cell = [bool((maps[k] > limits[k]).any()) for k in range(len(probabilities))]
    passing = [int(k) for k in order if probabilities[k] >= class_threshold and has_cell[k]]
    if passing:
        return passing[:top_k]
    return [int(k) for k in order if has_cell[k]][:top_k]


def _run_data(source: str | os.PathLike | None) -> str | None:
    """The dataset a run directory was trained on (its config's ``data.path``) when it still exists."""
    if source is None or not Path(source).is_dir():
        return None
    from gren.eval.evaluate import read_run_config, run_data_path

    try:
        path = run_data_path(read_run_config(source))
    except GrenError:
        return None
    if path and Path(path).exists():
        log.info("ground-truth boxes from the run's dataset %s (--data to choose another)", path)
        return path
    return None


@dataclass
class GroundTruth:
    """Boxes from ``--data`` (a raw NIH-layout folder or a prepared cache) by image stem."""

    path: Path
    _index: object = None
    _cache: object = None
    _sizes: dict = field(default_factory=dict)

    @classmethod
    def open(cls, path: str | os.PathLike) -> GroundTruth:
        from gren.data.cache import PreparedCache

        path = Path(path)
        if PreparedCache.is_cache(path):
            return cls(path, _cache=PreparedCache(path))
        from gren.data.nih import load_index

        index = load_index(path)
        sizes = {r.image_id: (int(r.width), int(r.height)) for r in index.records.itertuples()}
        return cls(path, _index=index, _sizes=sizes)

    def boxes(self, stem: str, image_size: tuple[int, int]) -> list[dict] | None:
        """Ground-truth boxes of ``stem`` scaled to ``image_size`` pixels; None when the dataset lacks it."""
        width, height = image_size
        if self._cache is not None:
            try:
                row = self._cache.row_of(stem)
            except GrenError:
                return None
            boxes, labels = self._cache.boxes(row)
            sx, sy = width / self._cache.size, height / self._cache.size
        else:
            if stem not in self._sizes:
                return None
            boxes, labels = self._index.boxes_for(stem)
            ref_w, ref_h = self._sizes[stem]
            sx, sy = width / ref_w, height / ref_h
        return [{"label": LABELS[int(k)], "box": [round(float(b[0]) * sx, 2), round(float(b[1]) * sy, 2),
                                                   round(float(b[2]) * sx, 2), round(float(b[3]) * sy, 2)]}
                for b, k in zip(boxes, labels)]


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def class_colour(k: int) -> tuple[int, int, int]:
    """The fixed RGB colour of LABELS index ``k`` in every overlay (matplotlib's tab10 / tab20 without their
    greens and greys, which are kept for the ground truth and the film)."""
    from matplotlib import colormaps

    rgb = colormaps["tab20"](CLASS_PALETTE[k % len(CLASS_PALETTE)])[:3]
    return tuple(int(round(255 * c)) for c in rgb)


def heatmap_classes(probabilities: np.ndarray, reported: Sequence[int], class_threshold: float,
                    top_k: int) -> list[int]:
    """LABELS indices whose continuous map is drawn: the reported classes (those with regions), then the other
    classes whose image probability is ``>= class_threshold``, most probable first, at most ``max(top_k, 1)``;
    when that leaves none, the single most probable class (an overlay is never a bare film).
    ``probabilities``: ``(K,)``."""
    order = [int(k) for k in np.argsort(-probabilities, kind="stable")]
    chosen = list(dict.fromkeys([*reported, *[k for k in order if probabilities[k] >= class_threshold]]))
    chosen = chosen[:max(1, top_k)] or order[:1]
    return sorted(chosen, key=lambda k: -probabilities[k])


def _cell_mask(cells: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A ``(h, w)`` array of cell values -> ``(height, width)`` float32, each cell the block of pixels it covers
    (cell ``(i, j)`` spans ``[j W / w, (j + 1) W / w) x [i H / h, (i + 1) H / h)``; no interpolation)."""
    h, w = cells.shape
    width, height = size
    rows = np.minimum((np.arange(height) * h) // height, h - 1)
    cols = np.minimum((np.arange(width) * w) // width, w - 1)
    return np.asarray(cells, dtype=np.float32)[rows[:, None], cols[None, :]]


def draw_overlay(gray: np.ndarray, maps: np.ndarray, classes: Sequence[int], regions: dict[int, list[dict]],
                 ground_truth: list[dict] | None, cell_threshold: float | np.ndarray,
                 probabilities: np.ndarray | None = None, heat_classes: Sequence[int] | None = None,
                 method: str | None = None, heat_scale: str = "image") -> Image.Image:
    """RGB overlay: each class's continuous map as a heat map over the film, its cells above the threshold
    outlined, its regions named; the ground truth in green; a legend strip below the film.

    Args:
        gray: uint8 ``(H, W)``, the film in its own pixels.
        maps: ``(K, h, w)`` map values in [0, 1] covering the film.
        classes: the reported classes (LABELS indices) whose ``regions`` are labelled.
        regions: per reported class, :func:`cell_regions` (boxes in film pixels).
        ground_truth: ``[{"label", "box"}]`` in film pixels, or None.
        cell_threshold: scalar or ``(K,)``; cells ``> threshold`` are outlined.
        probabilities: ``(K,)`` image-level probabilities, written in the labels and the legend.
        heat_classes: classes whose map is drawn (default ``classes``); colours by :func:`class_colour`.
        heat_scale: ``"image"`` (default): full colour at the highest value of the drawn maps of this image;
            ``"class"``: at each class map's own maximum; ``"absolute"``: at 1.

    The heat map of class ``k`` tints every pixel towards the class colour with opacity proportional to
    the map value, ``HEAT_ALPHA * map / top`` (each cell a flat block: what is drawn is what is scored),
    ``top`` written in the legend. The default scale is one per image (classes stay comparable) rather
    than 1 because a grid-MIL model's cells are often all far below 1 while its image probability is
    high (the noisy-or of many small cells: 0.1 per cell gives 0.8 over 16 cells), which an absolute
    scale draws as a bare film; the legend's ``top`` and the threshold outline keep the absolute level
    readable. The most probable
    class is drawn last (on top). The film keeps its own resolution (its longer side
    enlarged to :data:`OVERLAY_MIN_SIDE` when smaller so that the text is legible, reduced to
    :data:`OVERLAY_MAX_SIDE` when larger); the legend strip is added below it, so no film pixel is hidden.
    """
    height, width = gray.shape
    longest = max(width, height)
    scale = min(OVERLAY_MAX_SIDE / longest, max(1.0, OVERLAY_MIN_SIDE / longest))
    out_w, out_h = max(1, round(width * scale)), max(1, round(height * scale))
    film = np.asarray(Image.fromarray(gray, mode="L").resize((out_w, out_h), Image.Resampling.BILINEAR))
    heat_classes = list(classes if heat_classes is None else heat_classes)
    limits = np.broadcast_to(np.asarray(cell_threshold, dtype=np.float64), (maps.shape[0],))
    line = max(2, round(max(out_w, out_h) / 300))
    tops = heat_tops(maps, heat_classes, heat_scale)
    base = Image.fromarray(heat_overlay(film, maps, heat_classes, limits, tops, line), mode="RGB")
    draw = ImageDraw.Draw(base)
    font = _font(max(10, round(max(out_w, out_h) / 40)))
    stroke = max(1, line // 2)

    def scaled(box):
        return [box[0] * scale, box[1] * scale, max(box[0] * scale, box[2] * scale - 1),
                max(box[1] * scale, box[3] * scale - 1)]

    placed: list[tuple[float, float, float, float]] = []  # label boxes drawn so far, to avoid overprinting
    for item in ground_truth or []:
        box = scaled(item["box"])
        draw.rectangle(box, outline=GREEN, width=line)
        draw.text((box[0] + line, box[3] - line), f"GT {item['label']}", fill=GREEN, font=font, anchor="lb",
                  stroke_width=stroke, stroke_fill=(0, 60, 0))
        placed.append(draw.textbbox((box[0] + line, box[3] - line), f"GT {item['label']}", font=font, anchor="lb",
                                    stroke_width=stroke))
    for k in classes:
        for region in regions.get(k, []):
            box = scaled(region["box"])
            text = LABELS[k] if probabilities is None else f"{LABELS[k]} {probabilities[k]:.2f}"
            x, y = box[0] + 2 * line, box[1] + 2 * line
            left, top, right, bottom = draw.textbbox((x, y), text, font=font, stroke_width=stroke)
            step = bottom - top + line
            while any(left < r and right > lf and top < b and bottom > t for lf, t, r, b in placed):
                y, top, bottom = y + step, top + step, bottom + step
            placed.append((left, top, right, bottom))
            draw.text((x, y), text, fill=class_colour(k), font=font, stroke_width=stroke, stroke_fill=(0, 0, 0))
    return _with_legend(base, heat_classes, limits, probabilities, regions, ground_truth is not None and
                        len(ground_truth) > 0, font, method, tops)


def heat_overlay(film: np.ndarray, maps: np.ndarray, classes: Sequence[int], limits: np.ndarray,
                 tops: dict[int, float], line: int, outline: tuple[int, int, int] | None = None) -> np.ndarray:
    """uint8 ``(H, W, 3)``: the uint8 ``(H, W)`` ``film`` tinted by each class's map (``maps`` ``(K, h, w)``
    covering it) with opacity ``HEAT_ALPHA * map / tops[k]``, then the outline (``line`` px, dark rim; in
    ``outline`` or the class's colour) of its cells ``> limits[k]``; the first of ``classes`` is drawn on top."""
    height, width = film.shape
    canvas = np.repeat(np.asarray(film, dtype=np.float32)[..., None], 3, axis=2)
    drawn_order = list(classes)[::-1]
    for k in drawn_order:
        value = np.clip(np.nan_to_num(_cell_mask(maps[k], (width, height))) / tops[k], 0.0, 1.0)
        alpha = HEAT_ALPHA * value[..., None]
        canvas = canvas * (1.0 - alpha) + np.asarray(class_colour(k), dtype=np.float32) * alpha
    for k in drawn_order:
        positive = _cell_mask((maps[k] > limits[k]).astype(np.float32), (width, height)) > 0.5
        if positive.any():
            edge = positive & ~ndimage.binary_erosion(positive, iterations=line, border_value=0)
            halo = ndimage.binary_dilation(edge, iterations=1) & ~edge
            canvas[halo] = 0.0  # a dark rim keeps the outline visible on bright film
            canvas[edge] = class_colour(k) if outline is None else outline
    return np.clip(canvas + 0.5, 0, 255).astype(np.uint8)


HEAT_SCALES = ("image", "class", "absolute")


def heat_tops(maps: np.ndarray, classes: Sequence[int], heat_scale: str = "image") -> dict[int, float]:
    """The map value drawn at full colour for each of ``classes`` (``maps`` ``(K, h, w)``): the highest finite
    value of all their maps (``"image"``), of each map (``"class"``), or 1 (``"absolute"``); at least 1e-6."""
    if heat_scale not in HEAT_SCALES:
        raise GrenError(f"heat_scale {heat_scale!r}: expected one of {', '.join(HEAT_SCALES)}")

    def top(values: np.ndarray) -> float:
        finite = np.asarray(values, dtype=np.float64)[np.isfinite(values)]
        return max(float(finite.max()) if finite.size else 1.0, 1e-6)

    if heat_scale == "absolute":
        return {k: 1.0 for k in classes}
    if heat_scale == "class":
        return {k: top(maps[k]) for k in classes}
    shared = top(maps[list(classes)]) if len(classes) else 1.0
    return {k: shared for k in classes}


def _with_legend(film: Image.Image, heat_classes: Sequence[int], limits: np.ndarray, probabilities: np.ndarray | None,
                 regions: dict[int, list[dict]], has_truth: bool, font, method: str | None,
                 tops: dict[int, float]) -> Image.Image:
    """``film`` with a dark legend strip below: one line per drawn class (colour, name, image probability,
    threshold, region count), the ground truth's colour, and how to read the tint."""
    probe = ImageDraw.Draw(film)
    _, top, _, bottom = probe.textbbox((0, 0), "Ag", font=font)
    row = int(bottom - top) + 8
    lines: list[tuple[tuple[int, int, int] | None, str]] = []
    for k in heat_classes:
        prob = "" if probabilities is None else f"  p = {float(probabilities[k]):.2f}"
        count = len(regions.get(k, []))
        lines.append((class_colour(k), f"{LABELS[k]}{prob}  full colour at {tops[k]:.2f}  outline: cells > "
                                       f"{float(limits[k]):.2f} ({count} region{'s' if count != 1 else ''})"))
    if has_truth:
        lines.append((GREEN, "ground-truth box"))
    lines.append((None, "tint opacity proportional to the map value" + (f"; model: {method}" if method else "")))
    strip = Image.new("RGB", (film.width, row * len(lines) + 8), (20, 20, 20))
    draw = ImageDraw.Draw(strip)
    for i, (colour, text) in enumerate(lines):
        y = 4 + i * row
        x = 8
        if colour is not None:
            draw.rectangle([x, y + 2, x + row - 8, y + row - 6], fill=colour)
            x += row
        draw.text((x, y), text, fill=(235, 235, 235), font=font)
    out = Image.new("RGB", (film.width, film.height + strip.height))
    out.paste(film, (0, 0))
    out.paste(strip, (0, film.height))
    return out


class Predictor:
    """A loaded model that turns uint8 gray images into maps:
    ``predictor(grays) -> (maps (B, K, h, w), probs (B, K), thresholds (B, K))``."""

    def __init__(self, source: str | os.PathLike, device: str = "auto"):
        from gren.core.device import select_device
        from gren.methods import load_run

        self.method, self.config = load_run(source, map_location="cpu")
        self.device = select_device(device)
        self.method.to(self.device)
        self.size = int(self.config["data"]["size"])
        self.name = str(self.config.get("method", "?"))

    def __call__(self, grays: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``grays``: uint8 (H_i, W_i) images -> ``maps (B, K, h, w)``, ``image probabilities (B, K)`` (the
        method's scores) and the method's cell ``thresholds (B, K)``.

        Raises:
            GrenError: the model produced non-finite maps or scores (its weights are not finite).
        """
        from gren.data.dataset import normalize_uint8

        batch = np.stack([resize_gray(g, self.size) for g in grays])[:, None]  # (B, 1, S, S)
        images = normalize_uint8(torch.from_numpy(batch)).to(self.device)
        loc = self.method.predict(images).detach_cpu()
        if not (bool(torch.isfinite(loc.maps).all()) and bool(torch.isfinite(loc.scores).all())):
            raise GrenError(f"the model ({self.name}) returned non-finite maps or scores; its weights are "
                            "probably not finite (was training stable?)")
        return loc.maps.numpy(), loc.scores.numpy(), loc.thresholds().numpy()


PREDICT_TOOL = "gren predict"


def check_predict_options(cell_threshold: float | None, class_threshold: float, top_k: int) -> None:
    """Refuse a non-finite threshold, a class threshold outside [0, 1] and ``top_k < 1`` (one line each)."""
    if cell_threshold is not None and (isinstance(cell_threshold, bool) or not np.isfinite(float(cell_threshold))):
        raise GrenError(f"--threshold must be a finite number (a cell is positive above it), got {cell_threshold}")
    if isinstance(class_threshold, bool) or not (np.isfinite(float(class_threshold)) and 0 <= class_threshold <= 1):
        raise GrenError(f"--class-threshold must be a probability in [0, 1], got {class_threshold}")
    if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 1:
        raise GrenError(f"--top-k must be a whole number >= 1, got {top_k}")


def planned_stems(paths: Sequence[Path]) -> list[str]:
    """The output stem of each input, in order: its file stem, ``<stem>_2``, ``<stem>_3``... for repeats."""
    seen: dict[str, int] = {}
    stems = []
    for path in paths:
        seen[path.stem] = seen.get(path.stem, 0) + 1
        stems.append(path.stem if seen[path.stem] == 1 else f"{path.stem}_{seen[path.stem]}")
    return stems


def output_names(out_stems: Sequence[str]) -> list[str]:
    """Every file :func:`predict_files` writes into ``out`` for these stems."""
    return [f"{stem}{suffix}" for stem in out_stems for suffix in (".json", ".png")] + [REGIONS_CSV, REGIONS_COCO]


def check_predict_out(paths: Sequence[Path], out: Path, out_stems: Sequence[str]):
    """Before any work: refuse an ``out`` that holds any of the inputs, a symbolic link at an output name, or an
    existing file there that predict did not write (:class:`gren.core.outputs.OutputFolder`, manifest
    ``out/.gren-outputs.json``). Returns the folder; ``folder.claim(output_names(out_stems))`` once the model
    is loaded, before the first write."""
    from gren.core.outputs import OutputFolder

    if out.is_dir():
        inside = [str(p) for p in paths if p.exists() and p.resolve().parent == out.resolve()]
        if inside:
            raise GrenError(f"--out {out} holds input images ({', '.join(inside[:3])}"
                            f"{f' and {len(inside) - 3} more' if len(inside) > 3 else ''}); their overlays would "
                            "replace them; choose another --out")
    folder = OutputFolder(out, PREDICT_TOOL)
    folder.prepare(output_names(out_stems), claim=False)
    return folder


def write_output(json_path: Path, overlay: Image.Image, record: dict, png_path: Path) -> None:
    """One image's JSON and overlay, each atomically (a link planted at a target is replaced, never followed)."""
    from gren.core.atomic import atomic_path, write_text_atomic

    write_text_atomic(json_path, json.dumps(record, indent=2, allow_nan=False) + "\n")
    with atomic_path(png_path) as partial:
        overlay.save(partial, format="PNG")


def predict_files(
    paths: Sequence[str | os.PathLike],
    source: str | os.PathLike,
    out: str | os.PathLike,
    cell_threshold: float | None = None,
    class_threshold: float = 0.5,
    top_k: int = 3,
    data: str | os.PathLike | None = None,
    device: str = "auto",
    progress: bool = True,
    predictor: Predictor | None = None,
) -> dict:
    """Predict each file; write ``out/<stem>.json`` and ``out/<stem>.png`` (module docstring).

    Args:
        paths: image files (PNG, JPEG, DICOM).
        source: a run directory or a checkpoint file.
        cell_threshold: a cell is positive when ``map > cell_threshold``; ``None`` (default): the method's
            own threshold (:class:`~gren.methods.protocol.Localization`).
        class_threshold: a class is reported when its image probability is ``>=`` this.
        top_k: at most this many classes reported per image.
        data: dataset folder or cache for ground-truth boxes (optional).

    Also writes ``out/regions.csv`` and ``out/regions.coco.json``: every region of this call's images
    (:func:`write_region_tables`).

    Returns:
        ``{"written": [json paths], "failed": {path: message}}``. Unreadable files are logged and
        listed in ``failed``; the others are still processed.

    Raises:
        GrenError: before any work: bad thresholds or ``top_k`` (:func:`check_predict_options`), an ``out``
            that holds inputs, links or files predict did not write (:func:`check_predict_out`).
    """
    check_predict_options(cell_threshold, class_threshold, top_k)
    paths = [Path(path) for path in paths]
    out = Path(out)
    out_stems = planned_stems(paths)
    folder = check_predict_out(paths, out, out_stems)
    predictor = predictor or Predictor(source, device)
    if data is None:
        data = _run_data(source)
    truth = GroundTruth.open(data) if data is not None else None
    folder.claim(output_names(out_stems))
    written: list[str] = []
    failed: dict[str, str] = {}
    records: list[dict] = []
    for path, out_stem in progress_bar(list(zip(paths, out_stems)), desc="predict", unit="image",
                                       disable=not progress, logger=log):
        try:
            gray = read_any_gray(path)
        except GrenError as err:
            log.error("%s", err)
            failed[str(path)] = str(err)
            continue
        stem = path.stem
        height, width = gray.shape
        maps, probs, limits = predictor([gray])
        maps, probs, limits = maps[0], probs[0], limits[0]
        if cell_threshold is not None:
            limits = np.full_like(limits, float(cell_threshold))
        shown_threshold = float(limits[0]) if np.all(limits == limits[0]) else [round(float(v), 6) for v in limits]
        classes = reported_classes(probs, maps, class_threshold, limits, top_k)
        regions = {k: cell_regions(maps[k], (width, height), float(limits[k])) for k in classes}
        heat = heatmap_classes(probs, classes, class_threshold, top_k)
        # [] (not absent) for an image the dataset does not know; absent only without any dataset
        ground_truth = (truth.boxes(stem, (width, height)) or []) if truth is not None else None
        record = {
            "image": str(path),
            "image_size": [width, height],
            "model_input_size": predictor.size,
            "grid": list(maps.shape[-2:]),
            "method": predictor.name,
            "cell_threshold": shown_threshold,
            "class_threshold": class_threshold,
            "probabilities": {LABELS[k]: round(float(probs[k]), 6) for k in range(len(LABELS))},
            "heatmap_classes": [LABELS[k] for k in heat],
            "regions": [{"label": LABELS[k], "probability": round(float(probs[k]), 6), **region}
                        for k in classes for region in regions[k]],
        }
        if ground_truth is not None:
            record["ground_truth"] = ground_truth
        record = finite_or_null(record)
        json_path = out / f"{out_stem}.json"
        overlay = draw_overlay(gray, maps, classes, regions, ground_truth, limits, probs, heat_classes=heat,
                               method=predictor.name)
        write_output(json_path, overlay, record, out / f"{out_stem}.png")
        written.append(str(json_path))
        records.append(record)
    write_region_tables(records, out)
    log.info("%d images predicted into %s, %d failed", len(written), out, len(failed))
    return {"written": written, "failed": failed}


def finite_or_null(value):
    """``value`` (nested dicts / lists of plain and numpy numbers) with every non-finite float replaced by None,
    numpy scalars as Python numbers: what ``json.dumps(..., allow_nan=False)`` accepts."""
    if isinstance(value, dict):
        return {k: finite_or_null(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_null(v) for v in value]
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(float(value)) else None
    return value


def region_rows(records: Sequence[dict]) -> list[dict]:
    """One row per region of the per-image records: :data:`CSV_COLUMNS` (box in image pixels)."""
    rows = []
    for record in records:
        for region in record["regions"]:
            x1, y1, x2, y2 = region["box"]
            rows.append({"image": record["image"], "label": region["label"], "probability": region["probability"],
                         "x1": x1, "y1": y1, "x2": x2, "y2": y2, "cells": region["cells"],
                         "max_cell_probability": region["max_cell_probability"]})
    return rows


def coco_regions(records: Sequence[dict]) -> dict:
    """The regions of ``records`` as a COCO-style detection file.

    ``images``: ``{"id" (1-based, in input order), "file_name" (the path given), "width", "height"}``;
    ``categories``: the 14 LABELS, ``id`` = LABELS index + 1; ``annotations``: ``{"id", "image_id",
    "category_id", "bbox": [x, y, w, h] (image pixels), "area", "score" (the class's image probability),
    "iscrowd": 0, "cells", "max_cell_probability"}``.
    """
    images, annotations = [], []
    for image_id, record in enumerate(records, start=1):
        width, height = record["image_size"]
        images.append({"id": image_id, "file_name": record["image"], "width": width, "height": height})
        for region in record["regions"]:
            x1, y1, x2, y2 = region["box"]
            w, h = round(x2 - x1, 2), round(y2 - y1, 2)
            annotations.append({"id": len(annotations) + 1, "image_id": image_id,
                                "category_id": LABELS.index(region["label"]) + 1, "bbox": [x1, y1, w, h],
                                "area": round(w * h, 2), "score": region["probability"], "iscrowd": 0,
                                "cells": region["cells"], "max_cell_probability": region["max_cell_probability"]})
    categories = [{"id": k + 1, "name": name, "supercategory": "finding"} for k, name in enumerate(LABELS)]
    return {"info": {"description": "gren predict regions"}, "images": images, "categories": categories,
            "annotations": annotations}


def write_region_tables(records: Sequence[dict], out: str | os.PathLike) -> tuple[Path, Path]:
    """Write ``out/regions.csv`` (:func:`region_rows`, a header even without regions) and
    ``out/regions.coco.json`` (:func:`coco_regions`); both list the regions of ``records`` only
    (a later call into the same folder replaces them)."""
    out = Path(out)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(CSV_COLUMNS), lineterminator="\n")
    writer.writeheader()
    writer.writerows(region_rows(records))
    csv_path = write_text_atomic(out / REGIONS_CSV, buffer.getvalue())
    coco = finite_or_null(coco_regions(records))
    coco_path = write_text_atomic(out / REGIONS_COCO, json.dumps(coco, indent=1, allow_nan=False) + "\n")
    return csv_path, coco_path
