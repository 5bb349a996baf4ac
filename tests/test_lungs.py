"""Lung segmentation: classical segmenter, U-Net, checkpoints, Dice, the `gren lungs` commands."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from gren.cli import main as gren_main
from gren.core.errors import DataError, GrenError
from gren.lungs.classical import LUNG_OUTLINE, ClassicalSegmenter, outline_from_masks, prior_mask
from gren.lungs.dice import lung_dice, summarize_dice
from gren.lungs.folder import find_samples, load_pairs, read_mask
from gren.lungs.segment import load_segmenter, segment_lungs
from gren.lungs.tools import fold_split, parse_holdout
from gren.lungs.unet import (
    LungUNet,
    UNetSegmenter,
    load_checkpoint,
    save_checkpoint,
    segmentation_loss,
    train_unet,
)


def synthetic_chest(height: int, width: int, seed: int = 0, shift: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """A chest-like film: dark air, bright body ellipse, two dark lung ellipses, bright mediastinum.

    Returns (image uint8 (H, W), mask uint8 (H, W)) with 1 = image-left lung, 2 = image-right lung.
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:height, :width]
    y, x = yy / height, xx / width
    image = np.full((height, width), 20.0)
    body = ((x - 0.5) / 0.47) ** 2 + ((y - 0.55) / 0.6) ** 2 <= 1
    image[body] = 175
    mask = np.zeros((height, width), np.uint8)
    for label, cx in ((1, 0.29 + shift), (2, 0.71 + shift)):
        lung = ((x - cx) / 0.16) ** 2 + ((y - 0.44) / 0.29) ** 2 <= 1
        mask[lung] = label
        image[lung] = 70
    mediastinum = (np.abs(x - 0.5 - shift) < 0.07) & (y > 0.1)
    image[mediastinum] = 215
    mask[mediastinum] = 0
    image += rng.normal(0, 8, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8), mask


# ---- Dice -----------------------------------------------------------------------------------------
def test_lung_dice_known_values():
    target = np.zeros((10, 10), np.uint8)
    target[:, :4] = 1
    target[:, 6:] = 2
    assert np.allclose(lung_dice(target, target), [1.0, 1.0])
    predicted = target.copy()
    predicted[:, 2:4] = 0  # half of lung 1
    assert np.allclose(lung_dice(predicted, target), [2 * 20 / (20 + 40), 1.0])
    swapped = np.where(target == 1, 2, np.where(target == 2, 1, 0)).astype(np.uint8)
    assert np.allclose(lung_dice(swapped, target), [0.0, 0.0])
    summary = summarize_dice(np.array([[1.0, 0.5], [0.5, 0.5]]))
    assert summary == pytest.approx({"right_lung": 0.75, "left_lung": 0.5, "mean": 0.625})
    with pytest.raises(ValueError):
        lung_dice(target, target[:5])


# ---- classical ------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape, shift", [((256, 256), 0.0), ((300, 420), 0.04), ((512, 384), -0.04)])
def test_classical_on_synthetic_chest(shape, shift):
    image, truth = synthetic_chest(*shape, seed=1, shift=shift)
    masks, fallback = ClassicalSegmenter().segment(image[None])
    assert masks.shape == (1, *shape) and masks.dtype == np.uint8
    assert set(np.unique(masks)) <= {0, 1, 2}
    assert not fallback[0]
    dice = lung_dice(masks[0], truth)
    assert dice.min() > 0.8, dice
    # Sides: label 1 (patient's right lung) on the image left.
    columns = np.arange(shape[1])
    assert columns[(masks[0] == 1).any(axis=0)].mean() < shape[1] / 2 < columns[(masks[0] == 2).any(axis=0)].mean()


def test_classical_on_synth_generator_films():
    from gren.data.synth import render
    segmenter = ClassicalSegmenter()
    scores = []
    for seed in range(3):
        case = render.render_case(np.random.default_rng(seed), size=256)
        masks, _ = segmenter.segment(case.image[None])
        scores.append(lung_dice(masks[0], case.lung_mask).mean())
    assert np.mean(scores) > 0.8, scores


def test_outline_from_masks_follows_the_masks():
    truths = [synthetic_chest(200, 200, seed=s)[1] for s in range(3)]
    outline = outline_from_masks(truths)
    assert set(outline) == {1, 2} and len(outline[1]) > 10
    ys, lefts, rights = np.array(outline[1]).T
    # The synthetic lung 1 is an ellipse centred at x = 0.29, y = 0.44 (frame fractions).
    assert abs(ys[np.argmax(rights - lefts)] - 0.44) < 0.05
    assert abs((lefts + rights).mean() / 2 - 0.29) < 0.03
    assert np.array(outline[2])[:, 1].min() > 0.5  # lung 2 on the image right
    image = synthetic_chest(200, 200, seed=7)[0]
    masks, fallback = ClassicalSegmenter(outline=outline).segment(image[None])
    assert not fallback[0] and lung_dice(masks[0], synthetic_chest(200, 200, seed=7)[1]).min() > 0.85
    assert outline != LUNG_OUTLINE


@pytest.mark.parametrize("kind", ["blank", "noise"])
def test_classical_falls_back_to_prior(kind):
    rng = np.random.default_rng(0)
    image = np.zeros((200, 240), np.uint8) if kind == "blank" else rng.integers(0, 256, (200, 240), dtype=np.uint8)
    masks, fallback = segment_lungs(image)
    assert fallback.tolist() == [True]
    assert np.array_equal(masks[0], prior_mask(200, 240))
    assert (masks[0] == 1).any() and (masks[0] == 2).any()


def test_classical_is_batched_and_deterministic():
    images = np.stack([synthetic_chest(128, 128, seed=s)[0] for s in range(3)])
    first, fb1 = ClassicalSegmenter().segment(images)
    second, fb2 = ClassicalSegmenter().segment(images)
    assert first.shape == images.shape and fb1.shape == (3,)
    assert np.array_equal(first, second) and np.array_equal(fb1, fb2)


@pytest.mark.realdata
def test_classical_dice_on_real_films(lungs_dir):
    samples = find_samples(lungs_dir, require_masks=True)
    chosen = samples[:90]  # all the shared films (a few seconds): the target is a mean Dice >= 0.85
    images, truths = load_pairs(chosen)
    masks, fallback = load_segmenter("classical").segment(np.stack(images))
    scores = lung_dice(masks, np.stack(truths))
    assert scores.mean(axis=1).mean() >= 0.85, dict(zip([s.stem for s in chosen], scores.mean(axis=1)))
    # Sides: each predicted lung overlaps its own ground-truth lung, not the other one.
    for mask, truth in zip(masks, truths):
        assert ((mask == 1) & (truth == 1)).sum() > ((mask == 1) & (truth == 2)).sum()
        assert ((mask == 2) & (truth == 2)).sum() > ((mask == 2) & (truth == 1)).sum()


# ---- U-Net ----------------------------------------------------------------------------------------
def test_unet_forward_shape():
    model = LungUNet(base_width=4, levels=4)
    logits = model(torch.randn(2, 1, 64, 64))
    assert logits.shape == (2, 3, 64, 64)


def test_unet_training_reduces_loss_and_checkpoint_round_trip(tmp_path):
    pairs = [synthetic_chest(64, 64, seed=s, shift=0.03 * (s % 3 - 1)) for s in range(6)]
    images, masks = [p[0] for p in pairs], [p[1] for p in pairs]
    model, config = train_unet(images, masks, size=32, epochs=12, batch_size=3, lr=1e-2, base_width=8,
                               levels=3, seed=0, progress=False)
    history = config["loss_history"]
    assert len(history) == 12 and history[-1] < 0.8 * history[0], history

    path = save_checkpoint(tmp_path / "lungs.pt", model, config)
    payload = torch.load(path, weights_only=True)  # tensors and plain data only
    assert payload["config"]["size"] == 32
    loaded, loaded_config = load_checkpoint(path)
    batch = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model(batch), loaded(batch))
    assert loaded_config["base_width"] == 8

    segmenter = load_segmenter(f"unet:{path}")
    test_image = synthetic_chest(96, 80, seed=99)[0]
    out, fallback = segmenter.segment(np.stack([test_image, test_image]))
    assert out.shape == (2, 96, 80) and fallback.shape == (2,)
    assert set(np.unique(out)) <= {0, 1, 2}


def test_segmentation_loss_prefers_the_truth():
    target = torch.zeros(1, 8, 8, dtype=torch.long)
    target[:, :, :3] = 1
    target[:, :, 5:] = 2
    perfect = torch.nn.functional.one_hot(target, 3).permute(0, 3, 1, 2).float() * 20
    assert segmentation_loss(perfect, target) < segmentation_loss(torch.zeros(1, 3, 8, 8), target)


def test_unet_segmenter_falls_back_when_a_lung_is_missing():
    class Background(torch.nn.Module):
        def forward(self, images):
            logits = torch.zeros(images.shape[0], 3, *images.shape[-2:])
            logits[:, 0] = 5
            return logits

    segmenter = UNetSegmenter(Background(), {"size": 32})
    masks, fallback = segmenter.segment(np.zeros((1, 50, 60), np.uint8))
    assert fallback.tolist() == [True] and np.array_equal(masks[0], prior_mask(50, 60))


def test_load_segmenter_errors(tmp_path):
    with pytest.raises(GrenError, match="expected classical"):
        load_segmenter("watershed")
    with pytest.raises(GrenError, match="not found"):
        load_segmenter(f"unet:{tmp_path / 'missing.pt'}")
    torch.save({"something": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(GrenError, match="not a lung U-Net checkpoint"):
        load_segmenter(f"unet:{tmp_path / 'other.pt'}")
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(GrenError, match="not a readable"):
        load_segmenter(f"unet:{tmp_path / 'junk.pt'}")


# ---- folders, splits ------------------------------------------------------------------------------
def write_folder(root, n: int = 4, size: int = 64, with_masks: bool = True):
    (root / "images").mkdir(parents=True)
    if with_masks:
        (root / "masks").mkdir()
    for k in range(n):
        image, mask = synthetic_chest(size, size, seed=k)
        Image.fromarray(image).save(root / "images" / f"film{k}.png")
        if with_masks:
            Image.fromarray(mask).save(root / "masks" / f"film{k}.png")
    return root


def test_folder_reading_and_bad_masks(tmp_path):
    root = write_folder(tmp_path / "d", n=3)
    samples = find_samples(root, require_masks=True)
    assert [s.stem for s in samples] == ["film0", "film1", "film2"]
    Image.fromarray(np.full((64, 64), 7, np.uint8)).save(root / "masks" / "film0.png")
    with pytest.raises(DataError, match="film0.png.*expected 0"):
        read_mask(root / "masks" / "film0.png")
    with pytest.raises(DataError, match="no masks"):
        find_samples(write_folder(tmp_path / "nomask", n=1, with_masks=False), require_masks=True)
    with pytest.raises(DataError, match="not a folder"):
        find_samples(tmp_path / "absent")


def test_fold_split_covers_every_id_once(tmp_path):
    ids = [f"s{k}" for k in range(23)]
    tested = []
    for fold in range(5):
        train, test = fold_split(ids, 5, fold, seed=3)
        assert not set(train) & set(test) and len(train) + len(test) == len(ids)
        tested += test
    assert sorted(tested) == sorted(ids)
    (tmp_path / "hold.txt").write_text("a.png\n# comment\nb\n")
    assert parse_holdout(str(tmp_path / "hold.txt")) == {"a", "b"}
    assert parse_holdout("x, y.jpg") == {"x", "y"}


# ---- CLI ------------------------------------------------------------------------------------------
def test_cli_train_evaluate_preview(tmp_path, capsys):
    root = write_folder(tmp_path / "data", n=4)
    ckpt = tmp_path / "lungs.pt"
    assert gren_main(["-q", "lungs", "train", "--data", str(root), "--out", str(ckpt), "--size", "32",
                      "--epochs", "2", "--base-width", "4", "--folds", "2", "--fold", "1"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["train_images"] == 2 and summary["holdout"]["n_images"] == 2
    assert ckpt.is_file()

    assert gren_main(["-q", "lungs", "evaluate", "--data", str(root), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["n_images"] == 4 and len(result["images"]) == 4
    assert result["mean"] > 0.8 and result["fallback"] == 0

    assert gren_main(["-q", "lungs", "evaluate", "--data", str(root), "--lungs", f"unet:{ckpt}"]) == 0
    assert "| unet:" in capsys.readouterr().out

    sheet = tmp_path / "sheet.png"
    assert gren_main(["-q", "lungs", "preview", "--data", str(root), "--out", str(sheet), "--n", "3",
                      "--tile", "64", "--columns", "2"]) == 0
    assert Image.open(sheet).size == (128, 128)
    bare = write_folder(tmp_path / "bare", n=2, with_masks=False) / "images"
    assert gren_main(["-q", "lungs", "preview", "--data", str(bare), "--out", str(tmp_path / "b.png")]) == 0

    assert gren_main(["-q", "lungs", "evaluate", "--data", str(bare)]) == 2  # no masks: clear error
    assert gren_main(["-q", "lungs", "evaluate", "--data", str(root), "--lungs", "unet:nope.pt"]) == 2
