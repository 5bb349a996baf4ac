"""Scoring a predictor over a dataset: localization accuracy / IoBB over its boxes and AUC over its labels.

The core of ``gren evaluate`` (:mod:`gren.eval.evaluate` re-exports it) and of the validation split that
training can score every epoch (:mod:`gren.train.validation`); it lives in ``train/`` because ``train/``
may not import ``eval/`` (tests/test_layers.py). Everything comes from the method's
:class:`~gren.methods.protocol.Localization` (module docstring of :mod:`gren.eval.evaluate`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch
from torch.utils.data import DataLoader, Dataset

from gren.core.errors import GrenError
from gren.core.labels import LABELS
from gren.core.progress import progress as progress_bar
from gren.methods.protocol import Localization
from gren.metrics import (
    CELL_THRESHOLD,
    IOU_THRESHOLDS,
    auc_by_label,
    image_scores,
    localization_report,
    score_boxes,
    wang_box_scores,
)

log = logging.getLogger(__name__)

RULES = ("cells", "wang")

PredictFn = Callable[[dict], "Localization | torch.Tensor"]
"""``batch (collated dict) -> Localization`` (or bare probability maps ``(B, K, h, w)``, taken as a grid-MIL
model's: threshold 0.5, noisy-or image scores) covering each ``S x S`` image."""


def as_localization(output: Localization | torch.Tensor) -> Localization:
    """A predictor's output as a CPU :class:`Localization` (bare maps: threshold 0.5, noisy-or scores)."""
    if isinstance(output, Localization):
        return output.detach_cpu()
    maps = torch.as_tensor(output).detach().float().cpu()
    if maps.dim() != 4:
        raise GrenError(f"the method returned maps of shape {tuple(maps.shape)}, expected (B, {len(LABELS)}, h, w)")
    evidence = image_scores(maps, "noisy_or")
    return Localization(maps, -torch.expm1(-evidence).float(), CELL_THRESHOLD,
                        tuple(LABELS[:maps.shape[1]]) if maps.shape[1] <= len(LABELS) else tuple(map(str, range(maps.shape[1]))),
                        evidence)


def parse_rules(rules: str | Sequence[str] | None, default: Sequence[str] = ()) -> tuple[str, ...]:
    """``"cells,wang"`` -> ``("cells", "wang")``; ``cells`` always comes first; unknown rules are errors."""
    items = rules.split(",") if isinstance(rules, str) else list(rules if rules is not None else default)
    chosen = ["cells"] + [r.strip() for r in items if r.strip() and r.strip() != "cells"]
    bad = [r for r in chosen if r not in RULES]
    if bad:
        raise GrenError(f"evaluation rule(s) {', '.join(map(repr, bad))}: expected {', '.join(RULES)}")
    return tuple(dict.fromkeys(chosen))


def evaluate_predictions(
    predict: PredictFn,
    dataset: Dataset,
    loc_ids: set[str] | None = None,
    batch_size: int = 16,
    workers: int = 0,
    progress: bool = True,
    thresholds: tuple[float, ...] = IOU_THRESHOLDS,
    rules: Sequence[str] = ("cells",),
) -> dict:
    """Run ``predict`` over ``dataset`` and score it.

    Args:
        predict: ``batch -> Localization`` (maps ``(B, K=14, h, w)`` covering each item's ``S x S`` image,
            scores ``(B, 14)``, threshold), or bare maps (see :data:`PredictFn`).
        dataset: items as in docs/architecture.md (``image`` (1, S, S), ``labels`` (14,), ``boxes`` (n, 4)
            in S pixels, ``box_labels`` (n,), ``image_id``).
        loc_ids: image ids whose boxes count for localization (default: every item). The others only
            contribute to AUC.
        batch_size, workers: DataLoader settings.
        rules: box rules to report (:data:`RULES`; ``cells`` always).

    Returns:
        ``{"accuracy", "iobb", "n_boxes", "auc", "n_images", "n_images_auc"}`` in the eval.json shape, plus
        ``"wang": {"accuracy", "iobb"}`` with that rule, and ``"cell_threshold"`` (the method's, when one value).
    """
    from gren.data.dataset import collate

    rules = parse_rules(list(rules))
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers, collate_fn=collate)
    ious, iobbs, names, scores, labels = [], [], [], [], []
    wang_ious, wang_iobbs = [], []
    thresholds_seen: set[float] = set()
    n_loc_images = 0
    for batch in progress_bar(loader, desc="evaluate", unit="batch", disable=not progress, logger=log):
        loc = as_localization(predict(batch))
        maps = loc.maps
        size = batch["image"].shape[-1], batch["image"].shape[-2]  # (width, height) of the S x S input
        if maps.shape[0] != len(batch["image_id"]) or maps.shape[1] != len(LABELS):
            raise GrenError(f"the method returned maps of shape {tuple(maps.shape)}, expected "
                            f"({len(batch['image_id'])}, {len(LABELS)}, h, w)")
        if not (bool(torch.isfinite(maps).all()) and bool(torch.isfinite(loc.scores).all())):
            raise GrenError(f"the method returned non-finite maps or scores for {', '.join(batch['image_id'][:3])}; "
                            "its weights are probably not finite (was training stable?)")
        limits = loc.thresholds()
        thresholds_seen.update(float(v) for v in limits.unique()[:3])
        keep = [loc_ids is None or image_id in loc_ids for image_id in batch["image_id"]]
        n_loc_images += sum(keep)
        boxes = [b if k else b[:0] for b, k in zip(batch["boxes"], keep)]
        box_labels = [lab if k else lab[:0] for lab, k in zip(batch["box_labels"], keep)]
        iou, iobb, cls = score_boxes(maps, boxes, box_labels, size, limits)
        ious.append(iou)
        iobbs.append(iobb)
        names.extend(cls)
        if "wang" in rules:
            wang_iou, wang_iobb, _ = wang_box_scores(maps, boxes, box_labels, size, limits)
            wang_ious.append(wang_iou)
            wang_iobbs.append(wang_iobb)
        scores.append(loc.evidence if loc.evidence is not None else loc.scores.to(torch.float64))
        labels.append(batch["labels"].cpu())

    def joined(parts: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64)

    result = localization_report(joined(ious), joined(iobbs), names, thresholds)
    if "wang" in rules:
        wang = localization_report(joined(wang_ious), joined(wang_iobbs), names, thresholds)
        result["wang"] = {"accuracy": wang["accuracy"], "iobb": wang["iobb"]}
    result["rules"] = list(rules)
    if len(thresholds_seen) == 1:
        result["cell_threshold"] = thresholds_seen.pop()
    if scores:
        result["auc"] = auc_by_label(torch.cat(scores), torch.cat(labels).round().to(torch.int64))
    else:
        result["auc"] = {**{name: None for name in LABELS}, "mean": None}
    result["n_images"] = n_loc_images
    result["n_images_auc"] = int(sum(len(s) for s in scores))
    return result
