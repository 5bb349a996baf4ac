"""HAM (Ouyang et al. 2021): its ordinal terms and box term by hand, LSE pooling, the refined-map threshold,
detached CAM weights, the dropout stream, the augmentation's lung bookkeeping, stride 8 and its defaults."""

from __future__ import annotations

import math

import pytest
import torch

from gren.methods.ham import HamAugment, bound_loss, box_term, union_loss
from gren.methods.maps import lse_pool, refine_maps, refined_threshold_in_normalized_units
from gren.models.backbone import build_backbone
from gren.train.config import resolve_config
from test_methods import build, fake_batch


def _hand_case():
    """Two images, two classes, 2 x 2 CAMs; image 0 has class 0, image 1 class 1."""
    cams = torch.zeros(2, 2, 2, 2)
    cams[0, 0] = torch.tensor([[2.0, 0.0], [1.0, 0.0]])
    cams[0, 1] = torch.tensor([[0.0, 0.0], [0.0, 3.0]])  # a negative class: ignored everywhere
    cams[1, 1] = torch.tensor([[0.0, 0.0], [0.0, 3.0]])
    cam_a = torch.zeros(2, 2, 2)
    cam_a[0] = torch.tensor([[1.0, 0.0], [2.0, 1.0]])  # image 1's abnormal map is all 0
    labels = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    return cams, cam_a, labels


def test_bound_loss_by_hand():
    cams, cam_a, labels = _hand_case()
    # image 0, class 0: gate(cam_c > 0.75) = [[1, 0], [1, 0]]; min(cam_c, cam_a) = [[1, 0], [1, 0]]; covered 2 of
    # mass 3 -> 1/3. Image 1, class 1: cam_a = 0 covers nothing -> 1. Mean over the two classes: 2/3.
    assert float(bound_loss(cams, cam_a, labels)) == pytest.approx(2 / 3, abs=1e-6)
    # a disease map wholly inside a larger abnormal map costs nothing
    inside = bound_loss(cams[:1, :1], cams[:1, 0] + 1.0, labels[:1, :1])
    assert float(inside) == pytest.approx(0.0, abs=1e-6)
    assert float(bound_loss(cams, cam_a, torch.zeros(2, 2))) == 0.0


def test_union_loss_by_hand():
    cams, cam_a, labels = _hand_case()
    # image 0: union of positive classes = class 0 = [[2, 0], [1, 0]] (class 1 is negative there);
    # gate(cam_a > 0.75) = [[1, 0], [1, 1]]; min(union, cam_a) = [[1, 0], [1, 0]]; covered 2 of mass 4 -> 1/2.
    # image 1: its abnormal map is empty -> 0. Mean over the two abnormal images: 1/4.
    assert float(union_loss(cams, cam_a, labels)) == pytest.approx(0.25, abs=1e-6)
    assert float(union_loss(cams, cam_a, torch.zeros(2, 2))) == 0.0


def test_box_term_by_hand():
    refined = torch.tensor([[[1.0, 0.0], [0.5, 0.0]], [[0.0, 0.0], [0.0, 1.0]], [[1.0, 1.0], [0.0, 0.0]]])
    target = torch.tensor([[[1.0, 1.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 1.0]], [[1.0, 1.0], [0.0, 0.0]]])
    classes = torch.tensor([3, 3, 5])
    # class 3: squared errors 1.25 + 0, masses 3.5 + 2 -> 1.25 / 5.5; class 5: perfect -> 0; mean of the two.
    assert float(box_term(refined, target, classes, 14)) == pytest.approx(1.25 / 5.5 / 2)


def test_lse_pooling_is_the_formula_at_hams_r():
    x = torch.randn(3, 5, 4, 4, dtype=torch.float64)
    star = x.flatten(2).amax(-1)
    expected = star + torch.log(torch.exp(6.0 * (x.flatten(2) - star[..., None])).mean(-1)) / 6.0
    torch.testing.assert_close(lse_pool(x, 6.0), expected)
    method = build("ham").eval()
    features = torch.randn(2, method.classes_fc.in_features, 4, 4)
    abnormal, classes, _, _ = method.heads(features)
    torch.testing.assert_close(classes, method.classes_fc(lse_pool(features, 6.0)))
    torch.testing.assert_close(abnormal, method.abnormal_fc(lse_pool(features, 6.0))[:, 0])


def test_refined_map_threshold_is_a_normalised_cam_of_0_469():
    assert refined_threshold_in_normalized_units(0.999) == pytest.approx(0.4 + math.log(999) / 100)
    ramp = torch.linspace(0, 1, 101).reshape(1, 1, 1, 101)  # normalised values 0.00 .. 1.00
    refined = refine_maps(ramp * 7.0 + 2.0, (1, 101))  # min-max normalisation undoes the affine change
    positive = (refined >= 0.999)[0, 0, 0]
    assert positive[47:].all() and not positive[:47].any()  # 0.47 and above, 0.46 and below
    method = build("ham")
    loc = method.predict(fake_batch(2)["image"])
    assert loc.threshold == 0.999 and loc.maps.shape[-2:] == (64, 64)  # refined maps at the input resolution
    assert float(loc.maps.min()) >= 0 and float(loc.maps.max()) <= 1


def test_cam_losses_do_not_train_the_classifier():
    method = build("ham", ["ham.w_abnormal=0", "ham.w_classes=0"])
    parts = method(fake_batch())
    assert float(parts["box"].detach()) > 0
    parts["total"].backward()
    for head in (method.classes_fc, method.abnormal_fc):
        assert head.weight.grad is None or float(head.weight.grad.abs().sum()) == 0.0
    assert float(method.head[0].weight.grad.abs().sum()) > 0  # the features are trained by the map losses


def test_dropout_masks_are_a_function_of_the_step():
    a, b = build("ham", seed=3), build("ham", seed=3)
    batch = fake_batch()
    first = a(batch)["total"]
    torch.testing.assert_close(first, b(batch)["total"])  # same step, same masks
    second = a(batch)["total"]
    assert float(second.detach()) != float(first.detach()) and a.extra_state() == {"dropout_steps": 2}
    b.load_extra_state({"dropout_steps": 2})
    torch.testing.assert_close(a(batch)["total"], b(batch)["total"])


def _item(size=64):
    image = torch.zeros(1, size, size)
    image[:, 10:20, 4:14] = 1.0
    masks = torch.zeros(size, size, dtype=torch.uint8)
    masks[8:56, 2:30] = 1
    masks[8:56, 34:62] = 2
    hashes = torch.stack([torch.zeros(64, dtype=torch.bool), torch.ones(64, dtype=torch.bool)])
    return {"image": image, "boxes": torch.tensor([[4.0, 10.0, 14.0, 20.0]]), "box_labels": torch.tensor([3]),
            "lung_masks": masks, "lung_hashes": hashes, "labels": torch.zeros(14), "index": 0}


def test_flip_mirrors_the_boxes_and_keeps_lung_1_on_the_image_left():
    out = HamAugment(max_percent=0, flip=1.0)(_item())
    torch.testing.assert_close(out["image"], _item()["image"].flip(-1))
    torch.testing.assert_close(out["boxes"], torch.tensor([[50.0, 10.0, 60.0, 20.0]]))
    masks = out["lung_masks"]
    assert masks.dtype == torch.uint8 and set(masks.unique().tolist()) == {0, 1, 2}
    assert (masks[:, :32] != 2).all() and (masks[:, 32:] != 1).all()  # 1 still the image-left lung
    assert bool(masks[30, 5] == 1) and bool(masks[30, 40] == 2)
    assert out["lung_hashes"][0].all() and not out["lung_hashes"][1].any()  # the former left lung is now mask 1
    untouched = HamAugment(max_percent=0, flip=0.0)(_item())
    for key in ("image", "boxes", "lung_masks", "lung_hashes"):
        assert torch.equal(untouched[key], _item()[key])


def test_resize_and_crop_keep_the_box_on_its_lesion():
    torch.manual_seed(0)
    augment = HamAugment(max_percent=12, flip=0.5)
    for _ in range(20):
        out = augment(_item())
        assert out["image"].shape == (1, 64, 64) and out["lung_masks"].shape == (64, 64)
        x1, y1, x2, y2 = out["boxes"][0].tolist()
        assert 0 <= x1 < x2 <= 64 and 0 <= y1 < y2 <= 64 and int(out["box_labels"][0]) == 3
        inside = out["image"][0, int(math.ceil(y1)) + 1:int(y2) - 1, int(math.ceil(x1)) + 1:int(x2) - 1]
        assert float(inside.min()) > 0.9
        lesion = out["image"][0] > 0.5
        rows, cols = lesion.nonzero(as_tuple=True)
        assert x1 - 1.5 <= float(cols.min()) and float(cols.max()) <= x2 + 0.5
        assert y1 - 1.5 <= float(rows.min()) and float(rows.max()) <= y2 + 0.5


def test_output_stride_8_backbones():
    for name in ("resnet18", "resnet50"):
        assert build_backbone(name, "none", 8)(torch.zeros(1, 1, 64, 64)).shape[-2:] == (8, 8)


def test_defaults_are_the_published_schedule_and_cpu_small_is_the_small_variant():
    config = resolve_config(None, [], method="ham")
    assert (config["model"]["backbone"], config["model"]["output_stride"]) == ("resnet50", 8)
    assert config["optim"]["name"] == "adam" and config["optim"]["lr"] == pytest.approx(2e-5)
    assert (config["optim"]["weight_decay"], config["optim"]["step_epochs"], config["train"]["epochs"]) == (1e-4, 10, 30)
    weights = [config["ham"][f"w_{p}"] for p in ("abnormal", "classes", "box", "bound", "union")]
    assert weights == [0.01, 1.0, 0.5, 0.001, 0.001]
    small = resolve_config("cpu-small", [], method="ham")
    assert (small["model"]["backbone"], small["model"]["output_stride"]) == ("resnet18", 16)
