"""Dice overlap of left/right lung masks (labels 1 = image-left lung, 2 = image-right lung)."""

from __future__ import annotations

import numpy as np

LUNG_LABELS = (1, 2)


def lung_dice(predicted: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Per-image, per-lung Dice.

    Args:
        predicted, target: uint8 label masks (B, H, W) or (H, W) with 0/1/2, same shape.

    Returns:
        float64 (B, 2) (or (2,) for a single mask): Dice of label 1 and label 2. A lung absent from
        both masks scores 1.0.
    """
    predicted = np.asarray(predicted)
    target = np.asarray(target)
    if predicted.shape != target.shape:
        raise ValueError(f"mask shapes differ: predicted {predicted.shape}, target {target.shape}")
    single = predicted.ndim == 2
    if single:
        predicted, target = predicted[None], target[None]
    scores = np.empty((len(predicted), len(LUNG_LABELS)), np.float64)
    for column, label in enumerate(LUNG_LABELS):
        pred_lung = (predicted == label).reshape(len(predicted), -1)
        true_lung = (target == label).reshape(len(target), -1)
        overlap = (pred_lung & true_lung).sum(axis=1)
        total = pred_lung.sum(axis=1) + true_lung.sum(axis=1)
        scores[:, column] = np.where(total > 0, 2.0 * overlap / np.maximum(total, 1), 1.0)
    return scores[0] if single else scores


def summarize_dice(scores: np.ndarray) -> dict[str, float]:
    """Means over images of (B, 2) Dice: ``right_lung`` (label 1), ``left_lung`` (label 2), ``mean``
    (mean over images of the two lungs' mean)."""
    scores = np.asarray(scores, np.float64).reshape(-1, 2)
    if len(scores) == 0:
        return {"right_lung": float("nan"), "left_lung": float("nan"), "mean": float("nan")}
    return {
        "right_lung": float(scores[:, 0].mean()),
        "left_lung": float(scores[:, 1].mean()),
        "mean": float(scores.mean(axis=1).mean()),
    }
