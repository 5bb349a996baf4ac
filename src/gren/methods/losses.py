"""Localization losses: per-cell box BCE and the multi-instance (MIL) loss (GREN eq. 1-3).

Shapes: ``B`` images, ``K`` classes, ``h x w`` grid cells; boxes are in input pixels.

Per image ``i`` and class ``k`` (eq. 3), ``lambda_i^k = 1`` when image ``i`` has at least one box
of class ``k``: that (image, class) pair gets the box loss (eq. 1, BCE summed over the cells, a
cell being positive when any box of class ``k`` covers it even partly), weighted by ``beta``.
Otherwise (``lambda_i^k = 0``) it gets the MIL loss (eq. 2) on the image-level label. So:

* a label-only image uses MIL for all 14 classes;
* an annotated image uses the box loss for the classes it has boxes for and MIL for the rest,
  including a positive label that came without a box (MIL with y = 1: "somewhere") and all its
  negative classes (MIL with y = 0: ``P(c) -> 0``, i.e. every cell pushed negative).

Reduction: sum over classes and cells as the paper writes it, mean over images (so the scale does
not depend on the batch size). Per cell the box BCE and the MIL gradient then have the same size.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

# Below this value of x = sum_j -log(1 - p_j), 1 - exp(-x) is computed as x (1 - x / 2).
_SMALL_X = 1e-4


def box_targets(boxes: Sequence[torch.Tensor], box_labels: Sequence[torch.Tensor], grid_hw: tuple[int, int],
                image_hw: tuple[int, int], num_classes: int = 14) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-cell box targets on an ``h x w`` grid covering an ``H x W`` image.

    Args:
        boxes: per image a float tensor ``(n_i, 4)``, ``x1, y1, x2, y2`` in input pixels.
        box_labels: per image an int64 tensor ``(n_i,)`` of class indices.
        grid_hw: ``(h, w)`` cells; cell ``(r, c)`` spans pixels ``[c W/w, (c+1) W/w) x [r H/h, (r+1) H/h)``.
        image_hw: ``(H, W)`` input pixels.

    Returns:
        ``targets (B, K, h, w)`` float32, 1 where a box of that class overlaps the cell with positive
        area (a box edge lying exactly on a cell border does not make the neighbour positive), and
        ``has_box (B, K)`` bool.
    """
    grid_h, grid_w = grid_hw
    image_h, image_w = image_hw
    batch = len(boxes)
    device = boxes[0].device if batch else torch.device("cpu")
    targets = torch.zeros(batch, num_classes, grid_h, grid_w, device=device)
    has_box = torch.zeros(batch, num_classes, dtype=torch.bool, device=device)
    col_lo = torch.arange(grid_w, device=device, dtype=torch.float32) * (image_w / grid_w)
    row_lo = torch.arange(grid_h, device=device, dtype=torch.float32) * (image_h / grid_h)
    col_hi, row_hi = col_lo + image_w / grid_w, row_lo + image_h / grid_h
    for i, (image_boxes, labels) in enumerate(zip(boxes, box_labels)):
        if image_boxes.numel() == 0:
            continue
        xyxy = image_boxes.to(device=device, dtype=torch.float32).reshape(-1, 4)
        labels = labels.to(device=device, dtype=torch.long).reshape(-1)
        cols = (xyxy[:, 0:1] < col_hi) & (xyxy[:, 2:3] > col_lo)  # (n, w)
        rows = (xyxy[:, 1:2] < row_hi) & (xyxy[:, 3:4] > row_lo)  # (n, h)
        cover = (rows[:, :, None] & cols[:, None, :]).float()  # (n, h, w)
        targets[i].index_put_((labels,), cover, accumulate=True)
        has_box[i, labels] = True
    return targets.clamp_(max=1.0), has_box


def _log_sum_softplus(logits: torch.Tensor) -> torch.Tensor:
    """``log(sum_j softplus(l_j))`` over the last axis, finite even when every ``softplus`` underflows."""
    # log(softplus(l)) = log(log1p(e^l)), ~= l for l << 0 (relative error e^l / 2).
    safe = torch.where(logits < -20.0, torch.zeros_like(logits), logits)
    log_softplus = torch.where(logits < -20.0, logits, torch.log(F.softplus(safe)))
    return torch.logsumexp(log_softplus, dim=-1)


def mil_log_probs(cell_logits: torch.Tensor, rescale: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Image-level ``log P(c)`` and ``log(1 - P(c))`` with ``P(c) = 1 - prod_j (1 - p_j)``, ``p_j = sigmoid(l_j)``.

    Args:
        cell_logits: ``(..., n)`` logits of the ``n`` cells of each (image, class).
        rescale: Li et al.'s ``p -> rescale + (1 - rescale) p`` (they use 0.98); 0 for none.

    Returns:
        ``(log_p, log_not_p)``, each ``(...)``; finite with finite gradients for any finite logits
        (all cells at 0 or all at 1 included). ``log(1 - p_j) = -softplus(l_j)``; with
        ``x = sum_j softplus(l_j)``, ``log(1 - P) = -x`` and ``log P = log(1 - exp(-x))``, computed as
        ``log(x) - x/2`` for tiny ``x`` (``log x`` itself from a log-sum-exp, so that ``x`` underflowing to 0
        cannot give ``-inf``), ``log(-expm1(-x))`` otherwise.
    """
    cell_logits = cell_logits.float()
    if rescale:
        # 1 - p' = (1 - rescale)(1 - p): each cell adds -log(1 - rescale) to x, so x >= n * 0.02-ish.
        x = (F.softplus(cell_logits) - math.log(1.0 - rescale)).sum(dim=-1)
        return torch.log(-torch.expm1(-x)), -x
    log_x = _log_sum_softplus(cell_logits)
    x = torch.exp(log_x)
    small = x < _SMALL_X
    x_big = torch.where(small, torch.ones_like(x), x)  # keeps the unused branch's gradient finite
    log_p = torch.where(small, log_x - x / 2.0, torch.log(-torch.expm1(-x_big)))
    return log_p, -x


class LocalizationLoss(nn.Module):
    """``L = mean_i sum_k [beta lambda_ik box_ik + (1 - lambda_ik) mil_ik]`` (paper eq. 3).

    ``forward(logits (B, K, h, w), labels (B, K), targets (B, K, h, w), has_box (B, K))`` returns
    ``{"box", "mil", "total"}`` (scalars; ``box`` already multiplied by ``beta``).
    """

    def __init__(self, beta: float = 4.0, mil_rescale: float = 0.0):
        super().__init__()
        self.beta = float(beta)
        self.mil_rescale = float(mil_rescale)

    def forward(self, logits: torch.Tensor, labels: torch.Tensor, targets: torch.Tensor,
                has_box: torch.Tensor) -> dict[str, torch.Tensor]:
        batch = logits.shape[0]
        logits = logits.float()
        cells = logits.flatten(2)  # (B, K, n)
        box_bce = F.binary_cross_entropy_with_logits(cells, targets.flatten(2).to(cells), reduction="none").sum(-1)
        log_p, log_not_p = mil_log_probs(cells, self.mil_rescale)
        labels = labels.to(log_p)
        mil = -(labels * log_p + (1.0 - labels) * log_not_p)  # (B, K)
        lam = has_box.to(log_p)
        box_term = (self.beta * lam * box_bce).sum() / batch
        mil_term = ((1.0 - lam) * mil).sum() / batch
        return {"box": box_term, "mil": mil_term, "total": box_term + mil_term}
