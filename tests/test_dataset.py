"""RawDataset items, collate, normalize_uint8 and check_batch_scale."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from PIL import Image

from gren.core.errors import ImageReadError
from gren.core.labels import LABELS
from gren.data import dataset as dataset_module
from gren.data.dataset import (
    RawDataset,
    check_batch_scale,
    collate,
    denormalize_to_uint8,
    normalize_uint8,
)
from gren.data.nih import load_index
from nih_helpers import cached_index, make_nih_folder

ENTRIES = [
    ("00000001_000.png", "Effusion|Infiltration", 1),
    ("00000002_000.png", "No Finding", 2),
    ("00000003_000.png", "Cardiomegaly", 3),
]
IMAGES = {
    "00000001_000": ("images/00000001_000.png", (1024, 1024)),
    "00000002_000": ("images/00000002_000.jpg", (512, 512)),
    "00000003_000": ("images/00000003_000.png", (512, 256)),
}
BOXES = [
    "00000001_000.png,Infiltrate,100,200,300,400",
    "00000001_000.png,Effusion,600,500,100,100",
    "00000003_000.png,Cardiomegaly,512,256,256,512",
]


@pytest.fixture()
def folder(tmp_path):
    make_nih_folder(tmp_path, ENTRIES, BOXES, IMAGES)
    mask = np.zeros((512, 512), dtype=np.uint8)
    mask[100:400, 50:250] = 1
    mask[100:400, 262:462] = 2
    (tmp_path / "masks").mkdir()
    Image.fromarray(mask, "L").save(tmp_path / "masks" / "00000002_000.png")
    return tmp_path


def test_item_dict_shapes_types_and_box_scaling(folder):
    dataset = RawDataset(load_index(folder), size=128)
    assert len(dataset) == 3
    item = dataset[0]
    assert set(item) == {
        "image",
        "labels",
        "boxes",
        "box_labels",
        "lung_masks",
        "lung_fallback",
        "image_id",
        "index",
    }
    assert item["image"].shape == (1, 128, 128) and item["image"].dtype == torch.float32
    assert item["labels"].dtype == torch.float32 and item["labels"].shape == (14,)
    assert item["labels"][[LABELS.index("Effusion"), LABELS.index("Infiltration")]].tolist() == [1, 1]
    assert item["labels"].sum() == 2
    # 1024-space boxes on a 1024 file, returned at 128: x 1/8
    torch.testing.assert_close(
        item["boxes"], torch.tensor([[12.5, 25.0, 50.0, 75.0], [75.0, 62.5, 87.5, 75.0]])
    )
    assert item["box_labels"].tolist() == [LABELS.index("Infiltration"), LABELS.index("Effusion")]
    assert item["box_labels"].dtype == torch.int64 and item["boxes"].dtype == torch.float32
    assert (
        item["lung_fallback"] is True
        and item["lung_masks"].shape == (128, 128)
        and item["lung_masks"].max() == 0
    )
    assert item["image_id"] == "00000001_000" and item["index"] == 0
    assert -2.0 <= float(item["image"].min()) and float(item["image"].max()) <= 2.0
    # a 512 x 256 file returned at 128 x 128: overall the 1024-space box scales by 128/1024 on both axes
    item = dataset[2]
    torch.testing.assert_close(item["boxes"], torch.tensor([[64.0, 32.0, 96.0, 96.0]]))
    # no boxes: empty (0, 4)
    assert dataset[1]["boxes"].shape == (0, 4) and dataset[1]["box_labels"].shape == (0,)


def test_box_on_512_image_from_1024_space(folder):
    index = load_index(folder)
    item = RawDataset(index, size=512, image_ids=["00000003_000"])[0]
    # the 512 x 256 file is returned at 512 x 512: x unchanged from the file, y doubled
    torch.testing.assert_close(item["boxes"], torch.tensor([[256.0, 128.0, 384.0, 384.0]]))


def test_masks_and_subset_order(folder):
    dataset = RawDataset(load_index(folder), size=64, image_ids=["00000002_000", "00000001_000"])
    item = dataset[0]
    assert item["image_id"] == "00000002_000" and item["lung_fallback"] is False
    mask = item["lung_masks"]
    assert mask.dtype == torch.uint8 and set(mask.unique().tolist()) == {0, 1, 2}
    assert mask[32, 16] == 1 and mask[32, 48] == 2 and mask[0, 0] == 0
    assert dataset[-1]["image_id"] == "00000001_000"
    with pytest.raises(IndexError):
        dataset[2]


def test_collate(folder):
    dataset = RawDataset(load_index(folder), size=32)
    batch = collate([dataset[i] for i in range(3)])
    assert batch["image"].shape == (3, 1, 32, 32) and batch["labels"].shape == (3, 14)
    assert batch["lung_masks"].shape == (3, 32, 32)
    assert isinstance(batch["boxes"], list) and [b.shape[0] for b in batch["boxes"]] == [2, 0, 1]
    assert isinstance(batch["box_labels"], list) and batch["box_labels"][0].dtype == torch.int64
    assert batch["image_id"] == ["00000001_000", "00000002_000", "00000003_000"]
    assert batch["index"].tolist() == [0, 1, 2] and batch["lung_fallback"].dtype == torch.bool
    loader = torch.utils.data.DataLoader(dataset, batch_size=2, collate_fn=collate)
    assert [len(b["image_id"]) for b in loader] == [2, 1]
    with pytest.raises(ValueError):
        collate([])


def test_bad_image_error_or_skip(folder, caplog):
    index = load_index(folder)
    (folder / "images" / "00000002_000.jpg").write_bytes(b"\xff\xd8garbage")  # broken after indexing
    with pytest.raises(ImageReadError, match="00000002_000.jpg"):
        RawDataset(index, size=32)[1]
    dataset = RawDataset(index, size=32, on_bad_image="skip")
    with caplog.at_level(logging.WARNING, logger="gren.data.dataset"):
        item = dataset[1]
    assert item["image_id"] == "00000003_000" and item["index"] == 2  # the next readable one
    assert len(dataset.bad_images) == 1 and any("00000002_000.jpg" in r.getMessage() for r in caplog.records)
    assert dataset[1]["image_id"] == "00000003_000"
    with pytest.raises(ValueError):
        RawDataset(index, size=32, on_bad_image="ignore")


def test_normalize_uint8_values():
    x = torch.tensor([0, 51, 127, 255], dtype=torch.uint8)
    y = normalize_uint8(x)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, torch.tensor([-2.0, -1.2, (127 / 255 - 0.5) / 0.25, 2.0]))
    assert normalize_uint8(np.zeros((2, 3), dtype=np.uint8)).shape == (2, 3)
    assert torch.equal(denormalize_to_uint8(y), x)


def test_check_batch_scale_warns_once_per_kind(caplog, monkeypatch):
    monkeypatch.setattr(dataset_module, "_warned", set())
    good = normalize_uint8(torch.randint(0, 256, (2, 1, 16, 16), dtype=torch.uint8))
    with caplog.at_level(logging.WARNING, logger="gren.data.dataset"):
        assert check_batch_scale(good) is None
        assert check_batch_scale(good * 0.25 + 0.5) == "0-1"  # x / 255, not shifted
        assert check_batch_scale(good * 0.25 + 0.5) == "0-1"
        assert check_batch_scale((good * 0.25 + 0.5) * 255) == "0-255"
        assert check_batch_scale(torch.randint(0, 256, (2, 1, 4, 4), dtype=torch.uint8)) == "uint8"
        assert check_batch_scale(torch.zeros(2, 1, 4, 4)) == "constant"
        assert check_batch_scale(torch.full((1, 4), float("nan"))) == "non-finite"
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 5 and sum("(0-1)" in m for m in messages) == 1


@pytest.mark.realdata
def test_real_annotated_item(nih_dir):
    index = cached_index(str(nih_dir))
    annotated = index.records[index.records["annotated"]]
    image_id = annotated["image_id"].iloc[0]
    item = RawDataset(index, size=128, image_ids=[image_id])[0]
    boxes_file, labels = index.boxes_for(image_id)  # pixels of the 512 file
    torch.testing.assert_close(item["boxes"], torch.from_numpy(boxes_file) * (128 / 512))
    assert item["box_labels"].tolist() == labels.tolist()
    assert item["image"].shape == (1, 128, 128) and float(item["image"].std()) > 0.1
