"""The localization metric against hand-computed cases and a pixel raster."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from gren.core.labels import BOX_CLASSES, LABELS
from gren.metrics import (
    accuracy_by_class,
    auc_by_label,
    box_counts,
    grid_box_iobb,
    grid_box_iobb_batch,
    grid_box_iou,
    grid_box_iou_batch,
    image_scores,
    localization_report,
    noisy_or_probability,
    score_boxes,
)


def test_cell_exactly_the_box():
    assert grid_box_iou([[1.0, 0.0], [0.0, 0.0]], (0, 0, 50, 50), (100, 100)) == pytest.approx(1.0)


def test_cells_straddling_box_edges():
    # 4 x 4 grid over 100 x 100: cells of 25 px; positive cells (0,0) and (0,1) -> [0,50) x [0,25)
    prob = np.zeros((4, 4))
    prob[0, 0] = prob[0, 1] = 0.9
    box = (10, 10, 40, 40)  # area 900; overlap [10,40) x [10,25) = 450
    assert grid_box_iou(prob, box, (100, 100)) == pytest.approx(450 / (1250 + 900 - 450))
    assert grid_box_iobb(prob, box, (100, 100)) == pytest.approx(0.5)


def test_fractional_cell_edges():
    # 3 x 3 grid over 100 x 100: the centre cell is [100/3, 200/3)^2
    prob = torch.zeros(3, 3)
    prob[1, 1] = 0.7
    iou = grid_box_iou(prob, (0, 0, 50, 50), (100, 100))
    assert iou == pytest.approx(1 / 12)  # (2500/9) / (10000/9 + 2500 - 2500/9)


def test_non_square_image_and_grid():
    # image 300 wide x 100 high, grid h=4, w=3: cells 100 px wide, 25 px high
    prob = np.zeros((4, 3))
    prob[1, 2] = 1.0  # x [200, 300), y [25, 50)
    box = (250, 0, 300, 40)  # area 2000, overlap [250,300) x [25,40) = 750
    assert grid_box_iou(prob, box, (300, 100)) == pytest.approx(750 / (2500 + 2000 - 750))
    assert grid_box_iobb(prob, box, (300, 100)) == pytest.approx(750 / 2000)


def test_no_positive_cell_and_all_positive():
    box = (0, 0, 50, 100)
    assert grid_box_iou(np.full((5, 7), 0.2), box, (100, 100)) == 0.0
    assert grid_box_iobb(np.full((5, 7), 0.2), box, (100, 100)) == 0.0
    assert grid_box_iou(np.full((5, 7), 0.9), box, (100, 100)) == pytest.approx(0.5)
    assert grid_box_iobb(np.full((5, 7), 0.9), box, (100, 100)) == pytest.approx(1.0)


def test_threshold_is_strict():
    prob = np.full((2, 2), 0.5)
    assert grid_box_iou(prob, (0, 0, 10, 10), (10, 10)) == 0.0
    assert grid_box_iou(prob, (0, 0, 10, 10), (10, 10), threshold=0.4) == pytest.approx(1.0)


def test_degenerate_box_is_zero_not_nan():
    assert grid_box_iobb(np.ones((2, 2)), (5, 5, 5, 9), (10, 10)) == 0.0


def test_batch_matches_pixel_raster():
    """Integer-aligned cells and boxes: the continuous areas equal counted pixels."""
    rng = np.random.default_rng(0)
    n, h, w, cell = 40, 6, 8, 8
    width, height = w * cell, h * cell
    maps = rng.random((n, h, w))
    x = np.sort(rng.integers(0, width + 1, size=(n, 2)), axis=1)
    y = np.sort(rng.integers(0, height + 1, size=(n, 2)), axis=1)
    boxes = np.stack([x[:, 0], y[:, 0], x[:, 1] + 1, y[:, 1] + 1], axis=1).clip(0, [width, height, width, height])
    ious = grid_box_iou_batch(maps, boxes, (width, height)).numpy()
    iobbs = grid_box_iobb_batch(maps, boxes, (width, height)).numpy()
    for k in range(n):
        cells = np.kron(maps[k] > 0.5, np.ones((cell, cell), dtype=bool))
        box = np.zeros((height, width), dtype=bool)
        box[boxes[k, 1] : boxes[k, 3], boxes[k, 0] : boxes[k, 2]] = True
        inter, union = (cells & box).sum(), (cells | box).sum()
        assert ious[k] == pytest.approx(inter / union if union else 0.0)
        assert iobbs[k] == pytest.approx(inter / box.sum() if box.sum() else 0.0)


def test_per_item_image_sizes():
    maps = torch.ones(2, 2, 2)
    boxes = torch.tensor([[0.0, 0.0, 50.0, 50.0], [0.0, 0.0, 50.0, 50.0]])
    ious = grid_box_iou_batch(maps, boxes, [[100, 100], [50, 50]])
    assert ious.tolist() == pytest.approx([0.25, 1.0])


def test_accuracy_several_boxes_and_missing_class():
    # Atelectasis: 3 boxes (IoU .05, .35, .75); Cardiomegaly: 1 box (.5); others none
    ious = [0.05, 0.35, 0.75, 0.5]
    classes = ["Atelectasis", "Atelectasis", "Atelectasis", "Cardiomegaly"]
    table = accuracy_by_class(ious, classes)
    assert table["Atelectasis"] == pytest.approx({"0.1": 2 / 3, "0.3": 2 / 3, "0.5": 1 / 3, "0.7": 1 / 3})
    assert table["Cardiomegaly"] == {"0.1": 1.0, "0.3": 1.0, "0.5": 1.0, "0.7": 0.0}
    assert table["Nodule"] == {"0.1": None, "0.3": None, "0.5": None, "0.7": None}
    assert table["mean"]["0.5"] == pytest.approx((1 / 3 + 1.0) / 2)  # classes without boxes excluded
    assert table["mean"]["0.7"] == pytest.approx((1 / 3 + 0.0) / 2)
    assert list(table) == [*BOX_CLASSES, "mean"]


def test_accuracy_hit_at_exact_threshold():
    table = accuracy_by_class([0.3], ["Mass"])
    assert table["Mass"]["0.3"] == 1.0 and table["Mass"]["0.5"] == 0.0


def test_empty_accuracy_mean_is_none():
    table = accuracy_by_class([], [])
    assert table["mean"] == {"0.1": None, "0.3": None, "0.5": None, "0.7": None}


def test_localization_report_shape():
    report = localization_report([1.0, 0.0], [1.0, 0.2], ["Nodule", "Effusion"])
    assert set(report) == {"accuracy", "iobb", "n_boxes"}
    assert report["n_boxes"]["Nodule"] == 1 and report["n_boxes"]["Mass"] == 0
    assert box_counts(["Mass", "Mass"])["Mass"] == 2


def test_auc_per_label_and_single_class_is_none():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, size=(30, 14))
    labels[:, 13] = 0  # Hernia: one class only
    scores = labels + 0.01 * rng.random((30, 14))  # perfectly ranked
    scores[:, 0] = -scores[:, 0]  # perfectly inverted for Atelectasis
    result = auc_by_label(scores, labels)
    assert result["Hernia"] is None
    assert result["Atelectasis"] == pytest.approx(0.0)
    assert result["Cardiomegaly"] == pytest.approx(1.0)
    assert result["mean"] == pytest.approx(12 / 13)
    assert list(result) == [*LABELS, "mean"]


def test_image_scores_noisy_or_and_max():
    maps = torch.tensor([[0.5, 0.5], [0.0, 0.0]]).reshape(1, 1, 2, 2)
    assert noisy_or_probability(maps).item() == pytest.approx(0.75)
    assert image_scores(maps, "max").item() == pytest.approx(0.5)
    # the log-space score keeps ranking where the probability saturates to 1.0
    sat = torch.stack([torch.full((1, 16, 16), 0.9), torch.full((1, 16, 16), 0.95)])
    assert noisy_or_probability(sat).flatten().tolist() == [1.0, 1.0]
    s = image_scores(sat).flatten()
    assert s[1] > s[0] and math.isfinite(float(s[1]))
    with pytest.raises(ValueError):
        image_scores(maps, "mean")


def test_score_boxes_picks_the_map_of_each_box_class():
    maps = torch.zeros(2, 14, 2, 2)
    maps[0, 1, 0, 0] = 1.0  # image 0, Cardiomegaly: top-left cell
    maps[1, 5] = 1.0  # image 1, Nodule: everything
    boxes = [torch.tensor([[0.0, 0.0, 5.0, 5.0], [0.0, 0.0, 5.0, 5.0]]), torch.tensor([[0.0, 0.0, 10.0, 5.0]])]
    labels = [torch.tensor([1, 0]), torch.tensor([5])]
    ious, iobbs, names = score_boxes(maps, boxes, labels, (10, 10))
    assert names == ["Cardiomegaly", "Atelectasis", "Nodule"]
    assert ious.tolist() == pytest.approx([1.0, 0.0, 0.5])
    assert iobbs.tolist() == pytest.approx([1.0, 0.0, 1.0])
    empty = score_boxes(maps, [torch.zeros(0, 4)] * 2, [torch.zeros(0, dtype=torch.long)] * 2, (10, 10))
    assert empty[0].numel() == 0 and empty[2] == []
