"""Localization and classification metrics, vectorised over boxes.

The localization metric is the one of Li et al. 2018 and GREN (DESIGN.md section 4): for every
ground-truth box of class ``c`` take the model's probability map for ``c`` (an ``h x w`` grid of
cells covering the whole image), keep the cells with ``p > 0.5``, form the union of those cells in
pixels and compute its IoU with the box. The box is a hit at threshold ``T`` when ``IoU >= T``.
Accuracy of class ``c`` is hits / boxes of ``c``; the headline is the mean over the 8 box classes at
``T`` in ``{0.1, 0.3, 0.5, 0.7}``. IoBB (intersection over the box area, Wang et al. 2017) is
reported in the same shape.

Geometry: cell ``(i, j)`` of an ``h x w`` map over a ``W x H`` image is the pixel rectangle
``[j W / w, (j + 1) W / w) x [i H / h, (i + 1) H / h)`` (fractional edges allowed). Cells do not
overlap, so the area of the union of the positive cells is ``n_pos * (W / w) * (H / h)`` and its
intersection with a box is the sum over positive cells of the cell/box intersection areas, which
factorises into an outer product of per-column widths and per-row heights. IoU and IoBB are
invariant under an axis-aligned rescaling of image and box together, so they can be computed in
any pixel space (the original file's or the ``S x S`` cache's) as long as box and image size agree.

The cell threshold belongs to the method (:class:`gren.methods.protocol.Localization`): ``0.5`` for the
grid-MIL methods, a fraction of the normalised map for CAM methods; every function here takes it as a
scalar or one value per map. :func:`wang_box_scores` is Wang et al.'s own rule, reported beside ours:
a box around each 8-connected component of the positive cells, and a ground-truth box is scored by the
best IoU (IoBB) of any component box of its class.

Classes without test boxes get accuracy ``None`` (``null`` in JSON) and are left out of the mean;
labels whose test images are all positive or all negative get AUC ``None`` and are left out of the
mean AUC.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from gren.core.labels import BOX_CLASSES, LABELS

IOU_THRESHOLDS: tuple[float, ...] = (0.1, 0.3, 0.5, 0.7)
CELL_THRESHOLD = 0.5


def _as_tensor(x, dtype=torch.float64) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach().to(device="cpu", dtype=dtype)
    return torch.as_tensor(np.asarray(x), dtype=dtype)


def threshold_key(t: float) -> str:
    """The JSON key of an IoU threshold: ``0.1 -> "0.1"``."""
    return f"{t:g}"


def grid_box_overlap(
    prob: torch.Tensor | np.ndarray,
    box_xyxy: torch.Tensor | np.ndarray | Sequence[float],
    image_size: Sequence[float] | torch.Tensor | np.ndarray,
    threshold: float = CELL_THRESHOLD,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Areas behind IoU and IoBB for a batch of maps and boxes, in one pass.

    Args:
        prob: ``(N, h, w)`` probability maps (or one ``(h, w)`` map), each covering its whole image.
        box_xyxy: ``(N, 4)`` boxes (or one ``(4,)``) ``x1, y1, x2, y2`` in image pixels.
        image_size: ``(width, height)`` in pixels, shared, or ``(N, 2)`` one per map.
        threshold: a cell is positive when ``prob > threshold``: a scalar, or ``(N,)`` one per map.

    Returns:
        ``(intersection, positive_area, box_area)``, each float64 ``(N,)`` in square pixels:
        the area of (union of positive cells) & box, the area of the union of positive cells, and
        the box area.
    """
    maps = _as_tensor(prob, dtype=torch.float32)
    boxes = _as_tensor(box_xyxy)
    if maps.dim() == 2:
        maps = maps.unsqueeze(0)
    if boxes.dim() == 1:
        boxes = boxes.unsqueeze(0)
    if maps.dim() != 3 or boxes.dim() != 2 or boxes.shape[1] != 4 or boxes.shape[0] != maps.shape[0]:
        raise ValueError(f"expected maps (N, h, w) and boxes (N, 4), got {tuple(maps.shape)} and {tuple(boxes.shape)}")
    n, h, w = maps.shape
    sizes = _as_tensor(image_size)
    if sizes.dim() == 1:
        sizes = sizes.unsqueeze(0).expand(n, 2)
    if sizes.shape != (n, 2):
        raise ValueError(f"image_size must be (width, height) or (N, 2), got {tuple(sizes.shape)}")
    width, height = sizes[:, 0:1], sizes[:, 1:2]  # (N, 1)
    cell_w, cell_h = width / w, height / h  # (N, 1) pixels per cell
    cols = torch.arange(w, dtype=torch.float64).unsqueeze(0)  # (1, w)
    rows = torch.arange(h, dtype=torch.float64).unsqueeze(0)  # (1, h)
    x1, y1, x2, y2 = (boxes[:, k : k + 1] for k in range(4))
    # per-column overlap width and per-row overlap height of cell and box, in pixels
    overlap_w = (torch.minimum((cols + 1) * cell_w, x2) - torch.maximum(cols * cell_w, x1)).clamp_min(0)  # (N, w)
    overlap_h = (torch.minimum((rows + 1) * cell_h, y2) - torch.maximum(rows * cell_h, y1)).clamp_min(0)  # (N, h)
    positive = maps > _per_map(threshold, n)  # (N, h, w) bool
    # sum_ij pos_ij * oh_i * ow_j  ==  oh^T (pos ow): the big product in float32, the rest in float64
    per_row = torch.bmm(positive.to(torch.float32), overlap_w.to(torch.float32).unsqueeze(2)).squeeze(2)  # (N, h)
    intersection = (per_row.to(torch.float64) * overlap_h).sum(dim=1)
    positive_area = positive.sum(dim=(1, 2)).to(torch.float64) * (cell_w * cell_h).squeeze(1)
    box_area = ((x2 - x1).clamp_min(0) * (y2 - y1).clamp_min(0)).squeeze(1)
    return intersection, positive_area, box_area


def _per_map(threshold, n: int):
    """A scalar threshold as it is; a tensor / array of ``n`` values as ``(n, 1, 1)`` float32."""
    if isinstance(threshold, (int, float)):
        return float(threshold)
    values = _as_tensor(threshold, dtype=torch.float32).reshape(-1)
    if values.numel() == 1:
        return float(values[0])
    if values.numel() != n:
        raise ValueError(f"threshold must be a scalar or one value per map ({n}), got {values.numel()} values")
    return values.reshape(n, 1, 1)


def _safe_ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    return torch.where(den > 0, num / den.clamp_min(1e-12), torch.zeros_like(num))


def grid_box_iou_batch(prob, box_xyxy, image_size, threshold: float = CELL_THRESHOLD) -> torch.Tensor:
    """IoU of the union of positive cells with the box, float64 ``(N,)``; see :func:`grid_box_overlap`.

    No positive cell gives 0 (and so does a degenerate box).
    """
    inter, pos_area, box_area = grid_box_overlap(prob, box_xyxy, image_size, threshold)
    return _safe_ratio(inter, pos_area + box_area - inter)


def grid_box_iobb_batch(prob, box_xyxy, image_size, threshold: float = CELL_THRESHOLD) -> torch.Tensor:
    """Intersection of the positive cells with the box over the box area, float64 ``(N,)``."""
    inter, _, box_area = grid_box_overlap(prob, box_xyxy, image_size, threshold)
    return _safe_ratio(inter, box_area)


def grid_box_iou(prob, box_xyxy, image_size, threshold: float = CELL_THRESHOLD) -> float:
    """IoU of the union of the cells with ``prob > threshold`` and one box.

    Args:
        prob: ``(h, w)`` map (tensor or array) covering the image.
        box_xyxy: ``(x1, y1, x2, y2)`` in image pixels.
        image_size: ``(width, height)`` of the image in pixels.
        threshold: cell positivity threshold (strict ``>``).

    >>> grid_box_iou([[1.0, 0.0], [0.0, 0.0]], (0, 0, 50, 50), (100, 100))
    1.0
    """
    return float(grid_box_iou_batch(prob, box_xyxy, image_size, threshold)[0])


def grid_box_iobb(prob, box_xyxy, image_size, threshold: float = CELL_THRESHOLD) -> float:
    """IoBB (intersection / box area) of the cells with ``prob > threshold`` and one box."""
    return float(grid_box_iobb_batch(prob, box_xyxy, image_size, threshold)[0])


def score_boxes(
    maps: torch.Tensor | np.ndarray,
    boxes: Sequence[torch.Tensor | np.ndarray],
    box_labels: Sequence[torch.Tensor | np.ndarray],
    image_size: Sequence[float] | torch.Tensor | np.ndarray,
    threshold: float = CELL_THRESHOLD,
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """IoU and IoBB of every ground-truth box of a batch against the map of its own class.

    Args:
        maps: ``(B, K, h, w)`` probability maps in LABELS order, each covering its image.
        boxes: ``B`` arrays ``(n_i, 4)`` xyxy in the pixels of the image the maps cover.
        box_labels: ``B`` arrays ``(n_i,)`` of LABELS indices.
        image_size: ``(width, height)`` shared by the batch, or ``(B, 2)``.
        threshold: a cell is positive when ``map > threshold``: a scalar or ``(B, K)``.

    Returns:
        ``(ious (M,), iobbs (M,), class names (M,))`` for the ``M = sum n_i`` boxes, float64.
    """
    probs = _as_tensor(maps, dtype=torch.float32)
    if probs.dim() != 4 or len(boxes) != probs.shape[0] or len(box_labels) != probs.shape[0]:
        raise ValueError(f"expected maps (B, K, h, w) with B box lists, got {tuple(probs.shape)}, {len(boxes)} lists")
    sizes = _as_tensor(image_size)
    if sizes.dim() == 1:
        sizes = sizes.unsqueeze(0).expand(probs.shape[0], 2)
    counts = [len(b) for b in boxes]
    if sum(counts) == 0:
        empty = torch.zeros(0, dtype=torch.float64)
        return empty, empty.clone(), []
    image_of_box = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    label_of_box = torch.cat([_as_tensor(lab, dtype=torch.int64).reshape(-1) for lab in box_labels])
    all_boxes = torch.cat([_as_tensor(b).reshape(-1, 4) for b in boxes])
    box_maps = probs[image_of_box, label_of_box]  # (M, h, w)
    if not isinstance(threshold, (int, float)):
        threshold = _as_tensor(threshold, dtype=torch.float32)
        if threshold.dim() == 2:
            threshold = threshold[image_of_box, label_of_box]
    inter, pos_area, box_area = grid_box_overlap(box_maps, all_boxes, sizes[image_of_box], threshold)
    ious = _safe_ratio(inter, pos_area + box_area - inter)
    iobbs = _safe_ratio(inter, box_area)
    return ious, iobbs, [LABELS[int(k)] for k in label_of_box]


def component_boxes(positive: np.ndarray, image_size: Sequence[float]) -> np.ndarray:
    """Boxes around the 8-connected components of a positive-cell mask, in image pixels.

    Args:
        positive: ``(h, w)`` bool, covering the image.
        image_size: ``(width, height)`` in pixels.

    Returns:
        float64 ``(n, 4)`` ``x1, y1, x2, y2`` (cell ``(i, j)`` spans ``[j W / w, (j + 1) W / w)``), one per
        component, in scan order of their first cell.
    """
    from scipy import ndimage

    h, w = positive.shape
    width, height = float(image_size[0]), float(image_size[1])
    components, _ = ndimage.label(positive, structure=np.ones((3, 3), dtype=bool))
    boxes = [(cols.start * width / w, rows.start * height / h, cols.stop * width / w, rows.stop * height / h)
             for rows, cols in (found for found in ndimage.find_objects(components) if found is not None)]
    return np.asarray(boxes, dtype=np.float64).reshape(-1, 4)


def _box_iou_iobb(candidates: np.ndarray, box: np.ndarray) -> tuple[float, float]:
    """Best IoU and best IoBB of ``candidates (n, 4)`` against one ``box (4,)``; 0 when there are none."""
    if len(candidates) == 0:
        return 0.0, 0.0
    iw = (np.minimum(candidates[:, 2], box[2]) - np.maximum(candidates[:, 0], box[0])).clip(min=0)
    ih = (np.minimum(candidates[:, 3], box[3]) - np.maximum(candidates[:, 1], box[1])).clip(min=0)
    inter = iw * ih
    area_c = (candidates[:, 2] - candidates[:, 0]) * (candidates[:, 3] - candidates[:, 1])
    area_b = max((box[2] - box[0]) * (box[3] - box[1]), 0.0)
    union = area_c + area_b - inter
    iou = np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)
    iobb = inter / area_b if area_b > 0 else np.zeros_like(inter)
    return float(iou.max()), float(iobb.max())


def wang_box_scores(
    maps: torch.Tensor | np.ndarray,
    boxes: Sequence[torch.Tensor | np.ndarray],
    box_labels: Sequence[torch.Tensor | np.ndarray],
    image_size: Sequence[float],
    threshold: float | torch.Tensor | np.ndarray = CELL_THRESHOLD,
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Wang et al. 2017's rule: per ground-truth box, the best IoU / IoBB of any component box of its class.

    The positive cells (``map > threshold``) of the box's class are split into 8-connected components,
    each bounded by a box (:func:`component_boxes`); a ground-truth box is a hit at ``T`` when one of them
    reaches ``IoU >= T`` (Wang: "a hit when any box of the class reaches IoU > T"; ``>=`` here, as for
    our rule, so the two differ only in boxes vs union). Same arguments and returns as :func:`score_boxes`.
    """
    probs = _as_tensor(maps, dtype=torch.float32).numpy()
    if probs.ndim != 4 or len(boxes) != probs.shape[0]:
        raise ValueError(f"expected maps (B, K, h, w) with B box lists, got {probs.shape}, {len(boxes)} lists")
    batch, classes = probs.shape[:2]
    limits = _as_tensor(threshold, dtype=torch.float32).numpy()
    limits = np.broadcast_to(limits.reshape(limits.shape if limits.ndim == 2 else (1, 1)), (batch, classes))
    ious, iobbs, names = [], [], []
    for i in range(batch):
        image_boxes = _as_tensor(boxes[i]).numpy().reshape(-1, 4)
        labels = _as_tensor(box_labels[i], dtype=torch.int64).numpy().reshape(-1)
        candidates: dict[int, np.ndarray] = {}
        for box, k in zip(image_boxes, labels):
            k = int(k)
            if k not in candidates:
                candidates[k] = component_boxes(probs[i, k] > limits[i, k], image_size)
            iou, iobb = _box_iou_iobb(candidates[k], box)
            ious.append(iou)
            iobbs.append(iobb)
            names.append(LABELS[k])
    return torch.tensor(ious, dtype=torch.float64), torch.tensor(iobbs, dtype=torch.float64), names


def accuracy_by_class(
    scores: torch.Tensor | np.ndarray,
    box_classes: Sequence[str],
    thresholds: Sequence[float] = IOU_THRESHOLDS,
    classes: Sequence[str] = BOX_CLASSES,
) -> dict[str, dict[str, float | None]]:
    """Per-class hit rates at each threshold, plus their mean over classes.

    Args:
        scores: ``(N,)`` IoU (or IoBB) of each ground-truth box.
        box_classes: the class name of each box (length ``N``).
        thresholds: a box is a hit at ``T`` when its score ``>= T``.
        classes: the rows of the result (default the 8 box classes); boxes of other classes are ignored.

    Returns:
        ``{class: {"0.1": acc, ...}, ..., "mean": {"0.1": acc, ...}}``. A class without boxes has
        ``None`` at every threshold and is excluded from the mean; the mean is ``None`` when no
        class has a box.
    """
    values = _as_tensor(scores).reshape(-1)
    names = np.asarray(list(box_classes), dtype=object)
    if len(names) != values.numel():
        raise ValueError(f"{values.numel()} scores but {len(names)} box classes")
    ts = torch.tensor(list(thresholds), dtype=torch.float64)
    hits = values.unsqueeze(1) >= ts.unsqueeze(0) - 1e-6  # (N, T), tolerant to float32 rounding at T
    table: dict[str, dict[str, float | None]] = {}
    for cls in classes:
        mask = torch.from_numpy(names == cls)
        count = int(mask.sum())
        if count == 0:
            table[cls] = {threshold_key(t): None for t in thresholds}
        else:
            rate = hits[mask].to(torch.float64).mean(dim=0)
            table[cls] = {threshold_key(t): float(rate[k]) for k, t in enumerate(thresholds)}
    mean: dict[str, float | None] = {}
    for t in thresholds:
        key = threshold_key(t)
        present = [table[c][key] for c in classes if table[c][key] is not None]
        mean[key] = float(np.mean(present)) if present else None
    table["mean"] = mean
    return table


def box_counts(box_classes: Sequence[str], classes: Sequence[str] = BOX_CLASSES) -> dict[str, int]:
    """Number of ground-truth boxes of each class: ``{class: n}``."""
    names = list(box_classes)
    return {c: names.count(c) for c in classes}


def image_scores(maps: torch.Tensor | np.ndarray, mode: str = "noisy_or") -> torch.Tensor:
    """Image-level scores from cell probability maps ``(N, K, h, w)`` -> float64 ``(N, K)``.

    ``mode="noisy_or"`` (default, the MIL image probability the methods train with):
    ``1 - prod_j (1 - p_j)``, reported as ``-sum_j log(1 - p_j)`` (the log-space form, monotone in the
    noisy-or probability, so the ranking and hence the AUC are identical, but it does not saturate to
    1.0 over many cells). Use :func:`noisy_or_probability` for the probability itself.
    ``mode="max"``: the largest cell probability.
    """
    probs = _as_tensor(maps, dtype=torch.float32)
    if probs.dim() != 4:
        raise ValueError(f"expected maps (N, K, h, w), got {tuple(probs.shape)}")
    if mode == "max":
        return probs.amax(dim=(2, 3)).to(torch.float64)
    if mode == "noisy_or":
        # p is clamped to 1 - 2**-24 (the largest float32 below 1): a cell at p = 1 adds ~16.6
        return -torch.log1p(-probs.clamp(0.0, 1.0 - 2.0**-24)).sum(dim=(2, 3), dtype=torch.float64)
    raise ValueError(f"unknown image score mode {mode!r} (expected 'noisy_or' or 'max')")


def noisy_or_probability(maps: torch.Tensor | np.ndarray) -> torch.Tensor:
    """``1 - prod_j (1 - p_j)`` over the cells of ``(N, K, h, w)`` maps -> float64 ``(N, K)``."""
    return -torch.expm1(-image_scores(maps, "noisy_or"))


def auc_by_label(
    scores: torch.Tensor | np.ndarray,
    labels: torch.Tensor | np.ndarray,
    names: Sequence[str] = LABELS,
) -> dict[str, float | None]:
    """Per-label ROC AUC (scikit-learn) and their mean.

    Args:
        scores: ``(N, K)`` image-level scores.
        labels: ``(N, K)`` 0/1 ground truth.
        names: the ``K`` label names (default the 14 LABELS).

    Returns:
        ``{label: auc or None, ..., "mean": mean over labels with an AUC (None if none)}``; a label
        whose images are all positive or all negative gets ``None``.
    """
    from sklearn.metrics import roc_auc_score

    score_arr = _as_tensor(scores).numpy()
    label_arr = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels).astype(np.int64)
    if score_arr.ndim != 2 or score_arr.shape != label_arr.shape or score_arr.shape[1] != len(names):
        raise ValueError(f"expected scores and labels (N, {len(names)}), got {score_arr.shape} and {label_arr.shape}")
    result: dict[str, float | None] = {}
    for k, name in enumerate(names):
        column = label_arr[:, k]
        if column.min(initial=1) == column.max(initial=0):  # empty or one class only
            result[name] = None
        else:
            result[name] = float(roc_auc_score(column, score_arr[:, k]))
    present = [v for v in result.values() if v is not None]
    result["mean"] = float(np.mean(present)) if present else None
    return result


def localization_report(
    ious: torch.Tensor | np.ndarray,
    iobbs: torch.Tensor | np.ndarray,
    box_classes: Sequence[str],
    thresholds: Sequence[float] = IOU_THRESHOLDS,
) -> dict:
    """``{"accuracy": ..., "iobb": ..., "n_boxes": ...}`` in the eval.json shape."""
    return {
        "accuracy": accuracy_by_class(ious, box_classes, thresholds),
        "iobb": accuracy_by_class(iobbs, box_classes, thresholds),
        "n_boxes": box_counts(box_classes),
    }


def is_missing(value) -> bool:
    """True for ``None`` / NaN entries of a metric table."""
    return value is None or (isinstance(value, float) and math.isnan(value))
