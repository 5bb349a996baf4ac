"""``gren predict``: heat maps, region boxes and overlays for image files with a trained model.

Per input image ``DIR/<stem>.json``::

    {"image": path, "image_size": [W, H], "model_input_size": S, "grid": [h, w], "method": name,
     "cell_threshold": the method's (0.5 for grid-MIL, 180/255 for CAM) or --threshold, "class_threshold": 0.5,
     "probabilities": {label: the method's image-level score (Localization.scores), ... 14},
     "regions": [{"label", "probability", "box": [x1, y1, x2, y2] (image pixels), "cells", "max_cell_probability"}],
     "ground_truth": [{"label", "box"}]    # only with --data, when the dataset knows the image
    }

and ``DIR/<stem>.png``: the image with the predicted area (cells with ``p > cell_threshold`` of the
reported classes) in translucent red, region outlines labelled with the class name, and the ground
truth boxes in green. Reported classes: those whose image probability is at least ``class_threshold``
(most probable first, at most ``top_k``); when none passes, the ``top_k`` most probable classes that
have a positive cell. Regions are the 8-connected components of positive cells, as boxes in the
image's own pixels (cell ``(i, j)`` spans ``[j W / w, (j + 1) W / w) x [i H / h, (i + 1) H / h)``).

Inputs: PNG / JPEG of any size and depth (:func:`gren.core.imageio.read_gray`), and DICOM with the
optional ``pydicom`` (``pip install 'gren[dicom]'``): modality LUT (rescale slope / intercept), the
file's VOI window (else the 0.5-99.5 percentile range) to 8 bits, MONOCHROME1 inverted.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

from gren.core.errors import GrenError, ImageReadError
from gren.core.imageio import DICOM_SUFFIXES, is_dicom, read_dicom_gray, read_gray  # noqa: F401 - re-exported
from gren.core.labels import LABELS
from gren.core.progress import progress as progress_bar

log = logging.getLogger(__name__)

OVERLAY_MAX_SIDE = 1024
OVERLAY_MIN_SIDE = 512
RED = (230, 30, 30)
GREEN = (40, 220, 40)


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


def draw_overlay(gray: np.ndarray, maps: np.ndarray, classes: Sequence[int], regions: dict[int, list[dict]],
                 ground_truth: list[dict] | None, cell_threshold: float | np.ndarray,
                 probabilities: np.ndarray | None = None) -> Image.Image:
    """RGB overlay: predicted cells translucent red, region outlines + names, ground truth in green.

    ``gray`` uint8 (H, W) in image pixels; ``maps`` (K, h, w); boxes in image pixels. The overlay's
    longer side is the image's, clamped to [:data:`OVERLAY_MIN_SIDE`, :data:`OVERLAY_MAX_SIDE`] so that
    the class names stay legible.
    """
    height, width = gray.shape
    longest = max(width, height)
    scale = min(OVERLAY_MAX_SIDE / longest, max(1.0, OVERLAY_MIN_SIDE / longest))
    out_w, out_h = max(1, round(width * scale)), max(1, round(height * scale))
    base = Image.fromarray(gray, mode="L").resize((out_w, out_h), Image.Resampling.BILINEAR).convert("RGB")
    if classes:
        limits = np.broadcast_to(np.asarray(cell_threshold, dtype=np.float64), (maps.shape[0],))
        positive = (maps[list(classes)] > limits[list(classes), None, None]).any(axis=0).astype(np.uint8) * 255
        mask = Image.fromarray(positive, mode="L").resize((out_w, out_h), Image.Resampling.NEAREST)
        red = Image.new("RGB", (out_w, out_h), RED)
        base = Image.composite(Image.blend(base, red, 0.4), base, mask)
    draw = ImageDraw.Draw(base)
    line = max(2, round(max(out_w, out_h) / 300))
    font = _font(max(10, round(max(out_w, out_h) / 40)))

    def scaled(box):
        return [box[0] * scale, box[1] * scale, max(box[0] * scale, box[2] * scale - 1),
                max(box[1] * scale, box[3] * scale - 1)]

    for item in ground_truth or []:
        box = scaled(item["box"])
        draw.rectangle(box, outline=GREEN, width=line)
        draw.text((box[0] + line, box[3] - line), f"GT {item['label']}", fill=GREEN, font=font, anchor="lb",
                  stroke_width=max(1, line // 2), stroke_fill=(0, 60, 0))
    placed: list[tuple[float, float, float, float]] = []  # label boxes drawn so far, to avoid overprinting
    for k in classes:
        for region in regions.get(k, []):
            box = scaled(region["box"])
            draw.rectangle(box, outline=RED, width=line)
            text = LABELS[k] if probabilities is None else f"{LABELS[k]} {probabilities[k]:.2f}"
            x, y = box[0] + line, box[1] + line
            left, top, right, bottom = draw.textbbox((x, y), text, font=font, stroke_width=max(1, line // 2))
            step = bottom - top + line
            while any(left < r and right > lf and top < b and bottom > t for lf, t, r, b in placed):
                y, top, bottom = y + step, top + step, bottom + step
            placed.append((left, top, right, bottom))
            draw.text((x, y), text, fill=(255, 235, 235), font=font,
                      stroke_width=max(1, line // 2), stroke_fill=(120, 0, 0))
    return base


class Predictor:
    """A loaded model that turns uint8 gray images into maps:
    ``predictor(grays) -> (maps (B, K, h, w), probs (B, K), thresholds (B, K))``."""

    def __init__(self, source: str | os.PathLike, device: str = "auto"):
        from gren.eval.evaluate import pick_device
        from gren.methods import load_run

        self.method, self.config = load_run(source, map_location="cpu")
        self.device = pick_device(device)
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
    return [f"{stem}{suffix}" for stem in out_stems for suffix in (".json", ".png")]


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

    write_text_atomic(json_path, json.dumps(record, indent=2) + "\n")
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
    """Predict each file; write ``out/<stem>.json`` and ``out/<stem>.png``.

    Args:
        paths: image files (PNG, JPEG, DICOM).
        source: a run directory or a checkpoint file.
        cell_threshold: a cell is positive when ``map > cell_threshold``; ``None`` (default): the method's
            own threshold (:class:`~gren.methods.protocol.Localization`).
        class_threshold: a class is reported when its image probability is ``>=`` this.
        top_k: at most this many classes reported per image.
        data: dataset folder or cache for ground-truth boxes (optional).

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
        ground_truth = truth.boxes(stem, (width, height)) if truth is not None else None
        record = {
            "image": str(path),
            "image_size": [width, height],
            "model_input_size": predictor.size,
            "grid": list(maps.shape[-2:]),
            "method": predictor.name,
            "cell_threshold": shown_threshold,
            "class_threshold": class_threshold,
            "probabilities": {LABELS[k]: round(float(probs[k]), 6) for k in range(len(LABELS))},
            "regions": [{"label": LABELS[k], "probability": round(float(probs[k]), 6), **region}
                        for k in classes for region in regions[k]],
        }
        if ground_truth is not None:
            record["ground_truth"] = ground_truth
        json_path = out / f"{out_stem}.json"
        overlay = draw_overlay(gray, maps, classes, regions, ground_truth, limits, probs)
        write_output(json_path, overlay, record, out / f"{out_stem}.png")
        written.append(str(json_path))
    log.info("%d images predicted into %s, %d failed", len(written), out, len(failed))
    return {"written": written, "failed": failed}
