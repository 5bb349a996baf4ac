"""gren.lungs.quality: gross-failure flags of lung masks, and how both segmenters fall back on them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage as ndi

from gren.lungs.classical import ClassicalSegmenter, prior_mask
from gren.lungs.folder import find_samples, load_pairs
from gren.lungs.quality import (
    FLAG_PREFIX,
    MEASURED,
    RANGES,
    body_mask,
    check_mask,
    check_masks,
    film_features,
    measure_ranges,
)
from gren.lungs.segment import segment_with_reasons
from gren.lungs.unet import LungUNet, UNetSegmenter


def chest(size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """A chest-like film with air around the body: (image uint8 (S, S), mask uint8 (S, S) 0/1/2).

    Body: bright ellipse over 12-88 % of the width, from 5 % of the height down past the film's bottom
    edge (the abdomen continues below it, as on real films); lungs: dark ellipses in its upper part.
    """
    y, x = np.mgrid[:size, :size] / size
    image = np.full((size, size), 15.0)
    body = ((x - 0.5) / 0.38) ** 2 + ((y - 0.6) / 0.55) ** 2 <= 1
    image[body] = 180
    mask = np.zeros((size, size), np.uint8)
    for label, cx in ((1, 0.33), (2, 0.67)):
        lung = ((x - cx) / 0.12) ** 2 + ((y - 0.42) / 0.24) ** 2 <= 1
        mask[lung], image[lung] = label, 75
    image += np.random.default_rng(0).normal(0, 6, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8), mask


@pytest.fixture(scope="module")
def real(lungs_dir):
    samples = find_samples(lungs_dir, require_masks=True)
    images, masks = load_pairs(samples)
    return samples, images, masks


def test_plausible_chest_is_not_flagged():
    image, mask = chest()
    assert check_mask(image, mask) == ""
    body = body_mask(image)
    assert body.shape == (128, 128) and 0.4 < body.mean() < 0.7  # the ellipse, not the whole frame


def test_never_fires_on_the_real_films_true_masks(real):
    samples, images, masks = real
    reasons = check_masks(images, masks)
    assert [s.stem for s, r in zip(samples, reasons) if r] == []


def test_ranges_are_the_measured_ones_widened(real):
    _, images, masks = real
    measured = measure_ranges(images, masks)
    assert set(measured) == set(MEASURED)
    for name, (lo, hi) in MEASURED.items():
        assert measured[name][0] == pytest.approx(lo, abs=2e-3), name
        assert measured[name][1] == pytest.approx(hi, abs=2e-3), name
        assert RANGES[name][0] <= lo and RANGES[name][1] >= hi


def _flag(image: np.ndarray, mask: np.ndarray, *features: str) -> str:
    reason = check_mask(image, mask)
    assert reason.startswith(FLAG_PREFIX), reason
    assert any(f in reason for f in features), reason
    return reason


def test_spill_outside_the_body_is_flagged():
    image, mask = chest()
    spilled = mask.copy()
    spilled[mask == 1] = 0
    spilled[50:200, 0:50] = 1  # lung 1 out in the air left of the body
    assert film_features(image, spilled)["outside_1"] > RANGES["outside_1"][1]
    _flag(image, spilled, "outside_1")


def abdomen_spill(mask: np.ndarray, label: int = 2) -> np.ndarray:
    """``mask`` with lung ``label`` extended straight down to the bottom of the film."""
    out = mask.copy()
    columns = np.nonzero((mask == label).any(axis=0))[0]
    block = out[120:252, columns[0]:columns[-1]]
    block[block == 0] = label
    return out


def test_spill_into_the_neck_and_abdomen_is_flagged():
    image, mask = chest()
    neck = mask.copy()
    columns = np.nonzero((mask == 1).any(axis=0))[0]
    block = neck[2:130, columns[0]:columns[-1]]  # lung 1 straight up to the top of the film
    block[block == 0] = 1
    _flag(image, neck, "dtop", "top_1", "aspect_1", "cy_1")
    _flag(image, abdomen_spill(mask), "dbot", "bottom_2", "aspect_2", "cy_2")


def test_too_small_too_large_and_swapped_are_flagged():
    image, mask = chest()
    small = mask.copy()
    small[(mask == 2) & ~ndi.binary_erosion(mask == 2, iterations=14)] = 0
    _flag(image, small, "area_2", "ratio", "width_2")
    large = mask.copy()
    large[ndi.binary_dilation(mask == 1, iterations=30) & (mask == 0)] = 1
    _flag(image, large, "area_1", "ratio", "width_1")
    swapped = np.where(mask == 1, 2, np.where(mask == 2, 1, 0)).astype(np.uint8)
    _flag(image, swapped, "cx_1", "cx_2", "image left")
    missing = np.where(mask == 2, 0, mask).astype(np.uint8)
    _flag(image, missing, "lung 2 missing")


class _FixedUNet(UNetSegmenter):
    """A U-Net segmenter whose 'network' returns the given masks (to test the fallback path)."""

    def __init__(self, masks: np.ndarray):
        super().__init__(LungUNet(base_width=4, levels=2), {"size": 32})
        self._masks = masks

    def probabilities(self, images):
        return torch.nn.functional.one_hot(torch.from_numpy(self._masks).long(), 3).permute(0, 3, 1, 2).float()


def test_unet_segmenter_falls_back_on_flagged_masks():
    image, mask = chest()
    spilled = abdomen_spill(mask)
    masks, fallback, reasons = _FixedUNet(np.stack([mask, spilled])).segment(np.stack([image, image]),
                                                                             return_reasons=True)
    assert list(fallback) == [False, True]
    assert reasons[0] == "" and reasons[1].startswith(FLAG_PREFIX)
    np.testing.assert_array_equal(masks[0], mask)
    np.testing.assert_array_equal(masks[1], prior_mask(256, 256))
    # without the check the same mask is kept
    unchecked = _FixedUNet(spilled[None])
    unchecked.check = False
    assert not unchecked.segment(image[None])[1][0]


def test_classical_segmenter_flags_through_the_same_rules(monkeypatch):
    image, _ = chest()
    segmenter = ClassicalSegmenter()
    masks, fallback, reasons = segment_with_reasons(segmenter, image[None])
    assert not fallback[0] and reasons == [""]
    import gren.lungs.quality as quality

    # Ranges no mask can meet: every classical fit is flagged and gets the prior.
    monkeypatch.setitem(quality.RANGES, "area_1", (2.0, 3.0))
    masks, fallback, reasons = segment_with_reasons(segmenter, image[None])
    assert fallback[0] and reasons[0].startswith(FLAG_PREFIX) and "area_1" in reasons[0]


def test_a_tongue_leaking_into_the_arm_is_flagged():
    image, mask = chest()
    leak = mask.copy()
    rows = np.nonzero((mask == 1).any(axis=1))[0]
    bottom = rows[-1]
    for k in range(60):  # a thin diagonal tongue from the lung's base out to the left
        y, x = bottom - 20 + k, 60 - k
        leak[y:y + 6, max(x, 0):max(x, 0) + 6][leak[y:y + 6, max(x, 0):max(x, 0) + 6] == 0] = 1
    assert film_features(image, leak)["solidity_1"] < RANGES["solidity_1"][0]
    _flag(image, leak, "solidity_1")


def test_lungs_evaluate_reports_flag_counts(tmp_path, capsys):
    import json

    from PIL import Image

    from gren.cli import main as gren_main

    image, mask = chest()
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    Image.fromarray(image).save(tmp_path / "images" / "good.png")
    Image.fromarray(mask).save(tmp_path / "masks" / "good.png")
    Image.fromarray(image).save(tmp_path / "images" / "spill.png")
    Image.fromarray(abdomen_spill(mask)).save(tmp_path / "masks" / "spill.png")  # a "true" mask that spills
    assert gren_main(["-q", "lungs", "evaluate", "--data", str(tmp_path), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["n_images"] == 2 and result["true_masks_flagged"] == 1
    assert {"flagged", "fallback"} <= set(result) and result["flagged"] <= result["fallback"]
    assert all("reason" in row and "flagged" in row for row in result["images"])
