"""Wang et al.'s CAM method: LSE pooling, the weighted cross-entropy, the maps, and Wang's box rule."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from gren.methods.cam import weighted_bce
from gren.methods.maps import class_activation_maps, lse_pool, minmax_normalize
from gren.metrics import component_boxes, wang_box_scores
from test_methods import build, fake_batch


def test_lse_pool_is_wangs_formula_between_mean_and_max():
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    for r in (0.1, 1.0, 10.0):
        star = x.flatten(2).amax(-1)
        expected = star + torch.log(torch.exp(r * (x.flatten(2) - star[..., None])).mean(-1)) / r
        torch.testing.assert_close(lse_pool(x, r), expected)
    mean, peak = x.mean(dim=(2, 3)), x.amax(dim=(2, 3))
    assert (lse_pool(x, 1e-4) - mean).abs().max() < 1e-3 and (lse_pool(x, 1e4) - peak).abs().max() < 1e-2
    with pytest.raises(ValueError, match="r > 0"):
        lse_pool(x, 0)


def test_weighted_cross_entropy_by_hand():
    logits = torch.tensor([[2.0, -1.0, 0.5], [0.0, 1.0, -2.0]])
    labels = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])  # |P| = 2, |N| = 4
    f = torch.sigmoid(logits)
    beta_p, beta_n = 6 / 2, 6 / 4
    by_hand = (beta_p * (-torch.log(f[labels == 1])).sum() + beta_n * (-torch.log(1 - f[labels == 0])).sum()) / 6
    torch.testing.assert_close(weighted_bce(logits, labels), by_hand)
    all_negative = torch.zeros(2, 3)  # no positives: the beta_P term drops, beta_N = 1
    expected = (-torch.log(1 - torch.sigmoid(logits))).sum() / 6
    torch.testing.assert_close(weighted_bce(logits, all_negative), expected)


def test_maps_are_the_normalised_cams_of_the_classifier():
    method = build("cam")
    images = fake_batch(2)["image"]
    loc = method.predict(images)
    method.eval()
    with torch.no_grad():
        activations = method.activations(images)
        cams = torch.einsum("kd,bdhw->bkhw", method.classifier.weight, activations)
        scores = torch.sigmoid(method.classifier(lse_pool(activations, method.lse_r)))
    torch.testing.assert_close(loc.maps, minmax_normalize(cams))
    torch.testing.assert_close(loc.scores, scores)
    assert loc.maps.amin(dim=(2, 3)).max() == 0 and torch.allclose(loc.maps.amax(dim=(2, 3)), torch.ones(1))
    assert loc.threshold == pytest.approx(180 / 255, abs=1e-5)
    assert build("cam", ["cam.threshold=0.23529"]).predict(images).threshold == pytest.approx(60 / 255, abs=1e-5)
    torch.testing.assert_close(class_activation_maps(activations, method.classifier.weight), cams)
    assert method.needs == frozenset({"image", "labels"}) and "wang" in method.eval_rules


def test_component_boxes_and_wangs_rule():
    positive = np.zeros((4, 4), dtype=bool)
    positive[0, 0] = positive[0, 1] = True  # one component: cells (0, 0)-(0, 1)
    positive[3, 3] = True  # another
    boxes = component_boxes(positive, (40, 40))
    np.testing.assert_allclose(boxes, [[0, 0, 20, 10], [30, 30, 40, 40]])
    maps = torch.zeros(1, 14, 4, 4)
    maps[0, 2][torch.from_numpy(positive)] = 0.9
    truth = [torch.tensor([[0.0, 0.0, 20.0, 10.0], [30.0, 30.0, 40.0, 40.0], [0.0, 0.0, 40.0, 40.0]])]
    ious, iobbs, names = wang_box_scores(maps, truth, [torch.tensor([2, 2, 2])], (40, 40), 0.5)
    # each gt box is matched by its own component box; the whole-image box best by the larger one
    np.testing.assert_allclose(ious.numpy(), [1.0, 1.0, 200 / 1600])
    np.testing.assert_allclose(iobbs.numpy(), [1.0, 1.0, 200 / 1600])
    assert names == ["Effusion"] * 3
    # per-(image, class) thresholds: above every value, no component, 0
    none, _, _ = wang_box_scores(maps, truth, [torch.tensor([2, 2, 2])], (40, 40), torch.full((1, 14), 0.95))
    assert none.tolist() == [0.0, 0.0, 0.0] and not math.isnan(float(none.sum()))
