"""gren.lungs.regions: lung crops for hashing, mirroring, empty-mask fallback, batched lung hashes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gren.hashing import phash
from gren.lungs.regions import lung_boxes, lung_crops, lung_crops_with_fallback, lung_hashes, prior_box


def hand_made(height: int = 60, width: int = 80) -> tuple[np.ndarray, np.ndarray]:
    """An image whose pixel value encodes its column, and a mask with a lung on each side."""
    image = np.tile(np.arange(width, dtype=np.uint8) * 3, (height, 1))
    image[:, : width // 2] += 1  # image-left half odd values
    mask = np.zeros((height, width), dtype=np.uint8)
    mask[10:50, 5:30] = 1  # patient's right lung = image left
    mask[12:48, 45:75] = 2  # patient's left lung = image right
    mask[12, 45] = 0  # box is still the bounding box
    return image, mask


def test_crops_sides_and_mirroring():
    image, mask = hand_made()
    right, left = lung_crops(image, mask, mirror_left=False, fill="keep")
    assert right.shape == (40, 25) and left.shape == (36, 30)
    assert np.array_equal(right, image[10:50, 5:30])
    assert np.array_equal(left, image[12:48, 45:75])
    _, mirrored = lung_crops(image, mask, mirror_left=True, fill="keep")
    assert np.array_equal(mirrored, left[:, ::-1])
    assert mirrored[0, 0] == image[12, 74]  # lateral chest wall now on the left, as for the right lung


def test_mean_fill_replaces_outside_mask_pixels():
    image, mask = hand_made()
    mask[10:20, 5:15] = 0  # a notch inside the right lung's box
    right, _ = lung_crops(image, mask, fill="mean")
    inside = mask[10:50, 5:30] == 1
    expected = np.uint8(np.rint(image[10:50, 5:30][inside].mean()))
    assert (right[:10, :10] == expected).all()
    assert np.array_equal(right[inside], image[10:50, 5:30][inside])
    with pytest.raises(ValueError, match="fill"):
        lung_crops(image, mask, fill="zero")


def test_empty_mask_falls_back_to_prior_box():
    image, mask = hand_made()
    mask[mask == 2] = 0
    boxes, fallback = lung_boxes(mask)
    assert fallback.tolist() == [False, True]
    assert tuple(boxes[1]) == prior_box(2, 60, 80)
    right, left, flags = lung_crops_with_fallback(image, mask, mirror_left=False)
    assert np.array_equal(right, image[10:50, 5:30])  # a full rectangle: mean fill changes nothing
    x0, y0, x1, y1 = prior_box(2, 60, 80)
    assert np.array_equal(left, image[y0:y1, x0:x1]) and flags.tolist() == [False, True]
    # an all-empty mask: both priors, nothing crashes, image-left / image-right halves
    _, both = lung_boxes(np.zeros_like(mask))
    assert both.tolist() == [True, True]
    assert prior_box(1, 60, 80)[2] <= 40 <= prior_box(2, 60, 80)[0]


def test_lung_hashes_batch_matches_per_crop_hashes():
    rng = np.random.default_rng(0)
    images, masks = [], []
    for index in range(5):
        coarse = rng.integers(0, 256, (12, 12)).astype(np.float64)
        image = np.kron(coarse, np.ones((8, 8)))[:90, :96].astype(np.uint8)
        mask = np.zeros((90, 96), dtype=np.uint8)
        mask[10 + index : 70, 8 : 40 + index] = 1
        if index != 3:  # image 3: left lung missing
            mask[15 : 75 - index, 55:90] = 2
        images.append(image)
        masks.append(mask)
    hashes, fallback = lung_hashes(np.stack(images), np.stack(masks), return_fallback=True)
    assert hashes.shape == (5, 2, 64) and hashes.dtype == torch.bool
    assert fallback[:, 1].tolist() == [False, False, False, True, False] and not fallback[:, 0].any()
    for index in range(5):
        right, left = lung_crops(images[index], masks[index])
        assert torch.equal(hashes[index], phash([right, left]))
    assert torch.equal(
        lung_hashes(torch.from_numpy(np.stack(images)), torch.from_numpy(np.stack(masks))), hashes
    )
    with pytest.raises(ValueError, match="masks"):
        lung_hashes(np.stack(images), np.stack(masks)[:2])
