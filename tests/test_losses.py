"""Box target assignment, the log-space MIL loss and the per-class routing of eq. 3."""

from __future__ import annotations

import math

import pytest
import torch

from gren.methods.losses import LocalizationLoss, box_targets, mil_log_probs


def naive_mil(logits: torch.Tensor, rescale: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    p = torch.sigmoid(logits.double())
    p = rescale + (1 - rescale) * p
    prod = torch.prod(1 - p, dim=-1)
    return torch.log(1 - prod), torch.log(prod)


@pytest.mark.parametrize("rescale", [0.0, 0.98])
def test_mil_matches_the_naive_product(rescale):
    torch.manual_seed(0)
    logits = torch.randn(6, 3, 5) * 3
    log_p, log_not_p = mil_log_probs(logits, rescale)
    ref_p, ref_not_p = naive_mil(logits, rescale)
    torch.testing.assert_close(log_p.double(), ref_p, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(log_not_p.double(), ref_not_p, rtol=1e-5, atol=1e-6)


def test_mil_small_x_branch_matches_float64():
    logits = torch.full((2, 4), -12.0)  # x = 4 * softplus(-12) ~ 2.5e-5: the series branch
    log_p, _ = mil_log_probs(logits)
    ref, _ = naive_mil(logits)
    torch.testing.assert_close(log_p.double(), ref, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("value", [-1e4, -200.0, -60.0, -30.0, 0.0, 30.0, 200.0, 1e4])
@pytest.mark.parametrize("rescale", [0.0, 0.98])
def test_mil_is_finite_at_the_extremes(value, rescale):
    logits = torch.full((2, 14, 16), value, requires_grad=True)
    log_p, log_not_p = mil_log_probs(logits, rescale)
    loss = -(log_p[0].sum() + log_not_p[1].sum())  # one positive, one negative image
    loss.backward()
    assert torch.isfinite(log_p).all() and torch.isfinite(log_not_p).all()
    assert torch.isfinite(logits.grad).all()
    if value == -200.0 and rescale == 0.0:
        # P = 1 - prod(1 - p) ~ n * e^l: log P ~ log(16) - 200 even though every p underflows
        assert log_p[0, 0].item() == pytest.approx(math.log(16) - 200.0, abs=1e-4)


def test_mil_mixed_extremes_keep_finite_gradients():
    logits = torch.tensor([[-1e4, 1e4, 0.0, -50.0]], requires_grad=True)
    log_p, log_not_p = mil_log_probs(logits)
    (log_p.sum() + log_not_p.sum()).backward()
    assert torch.isfinite(logits.grad).all()
    assert log_p.item() == pytest.approx(0.0, abs=1e-6)


def test_box_targets_partial_cover_and_edges():
    # 64 px image, 4 x 4 grid: cells of 16 px.
    boxes = [torch.tensor([[0.0, 0.0, 16.0, 16.0],  # exactly cell (0, 0): border does not spill over
                           [15.0, 15.0, 17.0, 17.0],  # straddles 4 cells
                           [40.0, 50.0, 64.0, 64.0]]),  # partial cover at the bottom right
             torch.zeros(0, 4)]
    labels = [torch.tensor([0, 1, 0]), torch.zeros(0, dtype=torch.int64)]
    targets, has_box = box_targets(boxes, labels, (4, 4), (64, 64), num_classes=3)
    expected_0 = torch.zeros(4, 4)
    expected_0[0, 0] = 1
    expected_0[3, 2:] = 1
    expected_1 = torch.zeros(4, 4)
    expected_1[0:2, 0:2] = 1
    assert torch.equal(targets[0, 0], expected_0)
    assert torch.equal(targets[0, 1], expected_1)
    assert targets[0, 2].sum() == 0 and targets[1].sum() == 0
    assert has_box.tolist() == [[True, True, False], [False, False, False]]


def test_box_targets_non_square_grid_and_image():
    targets, _ = box_targets([torch.tensor([[10.0, 5.0, 30.0, 6.0]])], [torch.tensor([0])], (2, 4), (20, 40), 1)
    # columns of 10 px: box x 10..30 covers columns 1 and 2; rows of 10 px: y 5..6 in row 0
    assert targets[0, 0].tolist() == [[0, 1, 1, 0], [0, 0, 0, 0]]


def test_localization_loss_routes_each_class():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 2, 2)
    labels = torch.tensor([[1.0, 1.0, 0.0], [0.0, 1.0, 0.0]])
    targets = torch.zeros(2, 3, 2, 2)
    targets[0, 0, 0, 0] = 1
    has_box = torch.tensor([[True, False, False], [False, False, False]])
    parts = LocalizationLoss(beta=4.0)(logits, labels, targets, has_box)
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits[0, 0], targets[0, 0], reduction="sum")
    log_p, log_not_p = naive_mil(logits.flatten(2))
    mil = -(labels.double() * log_p + (1 - labels.double()) * log_not_p)
    # image 0: class 0 by its box; its boxless positive class 1 and negative class 2 by MIL; image 1 all MIL
    expected_mil = (mil[0, 1] + mil[0, 2] + mil[1].sum()) / 2
    assert parts["box"].item() == pytest.approx(4.0 * bce.item() / 2, rel=1e-5)
    assert parts["mil"].item() == pytest.approx(expected_mil.item(), rel=1e-5)
    assert parts["total"].item() == pytest.approx(parts["box"].item() + parts["mil"].item(), rel=1e-6)
