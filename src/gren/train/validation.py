"""The optional validation split: carved from the training fold, scored during training.

``validation.fraction > 0`` holds out that share of the fold's *annotated* training images (so that
localization can be measured), by patient (``data.split_by``: no patient on both sides, their label-only
images leave the training pool too), deterministic from ``seed``; never from the test fold. Every
``validation.every`` epochs (and after the last) the model is scored on them with the same code as
``gren evaluate`` (:func:`gren.train.scoring.evaluate_predictions`), and the epoch's ``metrics.jsonl``
line gains ``"validation": {"auc_mean", "accuracy_mean": {"0.1": a, ...}, "iobb_mean": {...},
"n_images", "n_boxes"}``. The validation score selects nothing unless ``validation.select`` is true,
and then only ``checkpoints/best.pt`` (by ``validation.metric``); ``last.pt`` is always the last epoch.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import pandas as pd
import torch

from gren.core.checkpoint import rng_state, set_rng_state
from gren.core.errors import GrenError
from gren.metrics import IOU_THRESHOLDS, threshold_key

log = logging.getLogger(__name__)

VALIDATION_CSV = "validation.csv"


def carve_validation(train_rows: pd.DataFrame, fraction: float, seed: int,
                     split_by: str = "patient") -> tuple[pd.DataFrame, pd.DataFrame]:
    """Split a fold's training rows into ``(training, validation)``.

    ``train_rows``: the fold's ``role == "train"`` rows (``image_id``, ``patient_id``, ``annotated``).
    Units (patients, or images with ``split_by="image"``) that have annotated images are shuffled with
    ``numpy.random.default_rng([seed, 1])`` and taken until their annotated images reach
    ``round(fraction * annotated)`` (at least one unit); the validation rows are those units' annotated
    images, and every image of those units leaves the training rows.
    """
    fraction = float(fraction)
    if fraction <= 0.0:
        return train_rows, train_rows.iloc[:0]
    if not fraction < 1.0:
        raise GrenError(f"validation.fraction {fraction}: expected 0 (no validation) up to below 1")
    key = "patient_id" if split_by == "patient" else "image_id"
    annotated_rows = train_rows[train_rows["annotated"].astype(bool)]
    if annotated_rows.empty:
        raise GrenError("validation.fraction > 0 needs annotated images in the training fold (the protocol's "
                        "second number is 0?); set validation.fraction=0")
    units = np.array(sorted(annotated_rows[key].astype(str).unique()))
    order = np.random.default_rng([int(seed), 1]).permutation(len(units))
    counts = annotated_rows[key].astype(str).value_counts()
    target = max(1, round(fraction * len(annotated_rows)))
    chosen, held = [], 0
    for unit in units[order]:
        if held >= target:
            break
        chosen.append(unit)
        held += int(counts[unit])
    chosen_set = set(chosen)
    in_validation = train_rows[key].astype(str).isin(chosen_set)
    validation = train_rows[in_validation & train_rows["annotated"].astype(bool)]
    training = train_rows[~in_validation]
    if not training["annotated"].astype(bool).any():
        log.warning("validation.fraction %.2f leaves no annotated image for training", fraction)
    return training, validation


def parse_metric(name: str) -> tuple[str, str | None]:
    """``"auc"`` -> ``("auc", None)``; ``"accuracy@0.1"`` -> ``("accuracy", "0.1")``; else a GrenError."""
    text = str(name).strip()
    if text == "auc":
        return "auc", None
    kind, _, t = text.partition("@")
    keys = [threshold_key(v) for v in IOU_THRESHOLDS]
    if kind in ("accuracy", "iobb") and t:
        try:
            key = threshold_key(float(t))
        except ValueError:
            key = None
        if key in keys:
            return kind, key
    raise GrenError(f"validation.metric {name!r}: expected auc, accuracy@T or iobb@T with T one of {', '.join(keys)}")


def metric_value(summary: dict, name: str) -> float | None:
    """The value of ``validation.metric`` ``name`` in a :func:`validate` summary (None when undefined)."""
    kind, key = parse_metric(name)
    value = summary.get("auc_mean") if kind == "auc" else summary.get(f"{kind}_mean", {}).get(key)
    return None if value is None or not math.isfinite(float(value)) else float(value)


def validate(method, dataset, device: torch.device, batch_size: int = 16) -> dict:
    """Score ``method`` on ``dataset`` (every item's boxes count) in eval mode, without touching the RNG.

    Returns ``{"auc_mean", "accuracy_mean": {T: a}, "iobb_mean": {T: a}, "n_images", "n_boxes"}`` (means over
    the box classes with boxes, None when undefined); the method is left in train mode.
    """
    from gren.train.scoring import evaluate_predictions

    state = rng_state()  # the DataLoader draws a base seed from the global RNG: keep training's stream intact
    try:
        def predict(batch):
            return method.predict(batch["image"].to(device)).detach_cpu()

        result = evaluate_predictions(predict, dataset, batch_size=int(batch_size), progress=False)
    finally:
        set_rng_state(state)
        method.train()

    def finite(value):
        return None if value is None or not math.isfinite(float(value)) else round(float(value), 6)

    return {"auc_mean": finite(result["auc"].get("mean")),
            "accuracy_mean": {t: finite(v) for t, v in result["accuracy"]["mean"].items()},
            "iobb_mean": {t: finite(v) for t, v in result["iobb"]["mean"].items()},
            "n_images": int(result["n_images"]), "n_boxes": int(sum(result["n_boxes"].values()))}
