"""``gren prepare`` / :mod:`gren.data.cache` / :mod:`gren.data.source` on tiny generated NIH-layout folders."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from gren.core.errors import DataError, GrenError
from gren.core.imageio import read_gray_resized, read_mask
from gren.core.labels import LABEL_INDEX, LABELS
from gren.data import cache_format as fmt
from gren.data import source
from gren.data.cache import CacheDataset, LungSafeAugment, PreparedCache, prepare_cache
from gren.data.dataset import collate, normalize_uint8
from gren.data.nih import load_index
from gren.data.prepare import STALL_AFTER_CHUNKS_ENV
from gren.data.source import open_prepared
from gren.hashing import phash
from gren.lungs.regions import lung_crops, lung_hashes

SIZE = 32
CHUNK = 2

# image id -> (width, height, labels, has dataset mask)
IMAGES = {
    "00000001_000": (64, 64, "Cardiomegaly", True),
    "00000001_001": (96, 80, "Effusion|Mass", False),
    "00000002_000": (50, 50, "No Finding", True),
    "00000003_000": (128, 128, "Nodule", False),
    "00000004_000": (40, 72, "Infiltration", False),
    "00000005_000": (70, 70, "Atelectasis|Pleural_Thickening", False),
    "00000006_000": (64, 64, "Pneumothorax", False),
}
TRUNCATED = "00000007_000"  # valid PNG header, pixel data cut off: fails at decode time
GARBAGE = "00000008_000"  # not an image at all: the index leaves it out
ABSENT = "00000009_000"  # listed, no file


def _chest(width: int, height: int, seed: int) -> np.ndarray:
    """A smooth, non-degenerate uint8 (height, width) test image."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    image = 120 + 60 * np.sin(xx / width * 3 * np.pi + seed) * np.cos(yy / height * 2 * np.pi)
    image += rng.normal(0, 10, size=(height, width))
    return np.clip(image, 0, 255).astype(np.uint8)


def _lung_mask(width: int, height: int) -> np.ndarray:
    mask = np.zeros((height, width), dtype=np.uint8)
    mask[height // 5: 4 * height // 5, width // 8: width // 2 - 2] = 1
    mask[height // 4: 3 * height // 4, width // 2 + 2: 7 * width // 8] = 2
    return mask


def make_nih_folder(root: Path) -> Path:
    """Write a Data_Entry CSV, a BBox CSV (with its broken header), images of several sizes and formats,
    some masks, one truncated and one garbage image and one listed-but-absent image."""
    (root / "images").mkdir(parents=True)
    (root / "images_002" / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rows = ["Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
            "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]"]
    for k, (image_id, (width, height, labels, has_mask)) in enumerate(IMAGES.items()):
        folder = root / ("images_002/images" if k % 3 == 2 else "images")
        suffix = ".jpg" if k == 3 else ".png"
        Image.fromarray(_chest(width, height, k)).save(folder / f"{image_id}{suffix}")
        if has_mask:
            Image.fromarray(_lung_mask(width, height)).save(root / "masks" / f"{image_id}.png")
        rows.append(f"{image_id}.png,{labels},0,{image_id[:8]},50,M,PA,{width},{height},0.14,0.14")
    buffer = root / "images" / f"{TRUNCATED}.png"
    Image.fromarray(_chest(64, 64, 99)).save(buffer)
    buffer.write_bytes(buffer.read_bytes()[:120])
    (root / "images" / f"{GARBAGE}.png").write_bytes(b"this is not a png file at all" * 4)
    for image_id in (TRUNCATED, GARBAGE, ABSENT):
        rows.append(f"{image_id}.png,No Finding,0,{image_id[:8]},50,F,AP,64,64,0.14,0.14")
    (root / "Data_Entry_2017.csv").write_text("\n".join(rows) + "\n")
    boxes = [
        "Image Index,Finding Label,Bbox [x,y,w,h],,,",
        "00000001_000.png,Cardiomegaly,256,384,512,256,,,",
        "00000001_001.png,Effusion,100,200,300,400,,,",
        "00000001_001.png,Mass,600,100,200,100,,,",
        "00000003_000.png,Nodule,700,700,64,64,,,",
    ]
    (root / "BBox_List_2017.csv").write_text("\n".join(boxes) + "\n")
    return root


@pytest.fixture(scope="module")
def raw_dir(tmp_path_factory) -> Path:
    return make_nih_folder(tmp_path_factory.mktemp("nih"))


@pytest.fixture(scope="module")
def reference(raw_dir, tmp_path_factory) -> tuple[Path, dict]:
    """An uninterrupted, single-process prepare of ``raw_dir``: (cache dir, summary)."""
    out = tmp_path_factory.mktemp("ref") / "cache"
    summary = prepare_cache(raw_dir, out, size=SIZE, workers=1, chunk_size=CHUNK, progress=False)
    return out, summary


def _arrays(cache: PreparedCache) -> dict[str, np.ndarray]:
    return {name: np.array(getattr(cache, name)) for name in ("images", "lung_masks", "lung_hashes",
                                                               "lung_fallback", "labels")}


def test_round_trip_images_masks_boxes_labels_hashes(raw_dir, reference):
    out, summary = reference
    cache = PreparedCache(out)
    index = load_index(raw_dir, on_bad_image="skip")
    assert cache.size == SIZE and len(cache) == len(IMAGES)
    assert cache.image_ids == list(IMAGES)
    assert summary["n_images"] == len(IMAGES) and summary["n_missing"] == 1
    assert {f["image_id"] for f in summary["failures"]} == {TRUNCATED, GARBAGE}
    assert summary["n_failed"] == 2 and not summary["reused"]
    assert cache.images.shape == (len(IMAGES), SIZE, SIZE) and cache.images.dtype == np.uint8
    assert cache.lung_hashes.shape == (len(IMAGES), 2, 64) and cache.lung_hashes.dtype == bool

    records = index.records.set_index("image_id")
    for row, image_id in enumerate(cache.image_ids):
        width, height, labels, has_mask = IMAGES[image_id]
        path = records.loc[image_id, "path"]
        np.testing.assert_array_equal(cache.images[row], read_gray_resized(path, SIZE))
        if has_mask:
            np.testing.assert_array_equal(cache.lung_masks[row], read_mask(raw_dir / "masks" / f"{image_id}.png", SIZE))
            assert cache.records.loc[row, "mask_source"] == "dataset"
            assert not cache.lung_fallback[row]
        else:
            assert cache.records.loc[row, "mask_source"] == "unet"  # auto: the shipped U-Net
        assert set(np.unique(cache.lung_masks[row])) <= {0, 1, 2}
        expected_labels = np.zeros(len(LABELS), dtype=np.uint8)
        for name in labels.split("|"):
            if name in LABEL_INDEX:
                expected_labels[LABEL_INDEX[name]] = 1
        np.testing.assert_array_equal(cache.labels[row], expected_labels)
        boxes, box_labels = cache.boxes(row)
        real_boxes, real_labels = index.boxes_for(image_id)
        scale = np.array([SIZE / width, SIZE / height] * 2, dtype=np.float32)
        np.testing.assert_allclose(boxes, real_boxes * scale, rtol=1e-5)
        np.testing.assert_array_equal(box_labels, real_labels)
    # 00000001_001 (96 x 80): Effusion box 100,200,300,400 in the 1024 space -> S pixels.
    boxes, box_labels = cache.boxes(cache.row_of("00000001_001"))
    np.testing.assert_allclose(boxes[0], [100 * SIZE / 1024, 200 * SIZE / 1024, 400 * SIZE / 1024,
                                          600 * SIZE / 1024], rtol=1e-5)
    assert box_labels.tolist() == [LABEL_INDEX["Effusion"], LABEL_INDEX["Mass"]]
    assert cache.boxes(cache.row_of("00000002_000"))[0].shape == (0, 4)

    expected_hashes = lung_hashes(torch.from_numpy(np.array(cache.images)), torch.from_numpy(np.array(cache.lung_masks)))
    if isinstance(expected_hashes, tuple):
        expected_hashes = expected_hashes[0]
    np.testing.assert_array_equal(cache.lung_hashes, np.asarray(expected_hashes, dtype=bool))
    assert cache.lung_hashes.any()
    for row in range(len(cache)):  # and, spelled out, gren.hashing.phash of the cached lung crops
        right, left = lung_crops(np.array(cache.images[row]), np.array(cache.lung_masks[row]))
        np.testing.assert_array_equal(cache.lung_hashes[row], phash([right, left]).numpy())
    assert not (out / fmt.WORK_DIR).exists()


def test_second_run_does_no_work(raw_dir, reference):
    out, _ = reference
    meta_before = (out / fmt.META_FILE).read_bytes()
    summary = prepare_cache(raw_dir, out, size=SIZE, workers=1, chunk_size=CHUNK, progress=False)
    assert summary["reused"] and summary["images_decoded"] == 0 and summary["chunks_processed"] == 0
    assert summary["chunks_skipped"] == summary["chunks_total"] > 0
    assert (out / fmt.META_FILE).read_bytes() == meta_before


def test_killed_prepare_is_refused_then_resumed_to_the_same_cache(raw_dir, reference, tmp_path):
    out = tmp_path / "killed"
    env = dict(os.environ, **{STALL_AFTER_CHUNKS_ENV: "2"})
    command = [sys.executable, "-m", "gren.cli", "-q", "prepare", "--data", str(raw_dir), "--out", str(out),
               "--size", str(SIZE), "--workers", "1", "--chunk-size", str(CHUNK)]
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    markers = out / fmt.WORK_DIR / fmt.CHUNKS_DIR
    deadline = time.monotonic() + 120
    try:
        while len(list(markers.glob("*.json"))) < 2:
            assert process.poll() is None, process.stderr.read().decode()
            assert time.monotonic() < deadline, "prepare did not write two chunks in time"
            time.sleep(0.05)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
        process.stderr.close()
    assert PreparedCache.is_cache(out) and not PreparedCache.is_complete(out)
    with pytest.raises(DataError, match="incomplete cache.*rerun `gren prepare"):
        PreparedCache(out)

    # open_prepared resumes an interrupted cache from the data folder recorded in it, with its chunk size
    resumed, uninterrupted = open_prepared(out, size=SIZE, workers=1), PreparedCache(reference[0])
    summary = resumed.summary
    assert summary["chunks_skipped"] == 2 and summary["chunks_total"] == 4  # 8 decodable headers / 2
    assert summary["chunks_processed"] == summary["chunks_total"] - 2
    assert resumed.image_ids == uninterrupted.image_ids
    for name, values in _arrays(uninterrupted).items():
        np.testing.assert_array_equal(getattr(resumed, name), values, err_msg=name)
    for row in range(len(resumed)):
        for got, want in zip(resumed.boxes(row), uninterrupted.boxes(row)):
            np.testing.assert_array_equal(got, want)


def test_parallel_prepare_equals_serial(raw_dir, reference, tmp_path):
    summary = prepare_cache(raw_dir, tmp_path / "par", size=SIZE, workers=2, chunk_size=CHUNK, progress=False)
    assert summary["n_images"] == len(IMAGES)
    parallel, serial = PreparedCache(tmp_path / "par"), PreparedCache(reference[0])
    for name, values in _arrays(serial).items():
        np.testing.assert_array_equal(getattr(parallel, name), values, err_msg=name)


def test_cache_is_bound_to_its_parameters(raw_dir, reference, tmp_path):
    out, _ = reference
    with pytest.raises(GrenError, match="other parameters.*size 32 -> 48"):
        prepare_cache(raw_dir, out, size=48, workers=1, progress=False)
    with pytest.raises(GrenError, match="lungs spec"):
        prepare_cache(raw_dir, out, size=SIZE, lungs="classical", workers=1, progress=False)
    stranger = tmp_path / "stranger"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("mine")
    with pytest.raises(GrenError, match="not a gren cache"):
        prepare_cache(raw_dir, stranger, size=SIZE, workers=1, progress=False)
    with pytest.raises(GrenError, match="unet"):
        prepare_cache(raw_dir, tmp_path / "x", size=SIZE, lungs="unet:/no/such/weights.pt", progress=False)

    copy = tmp_path / "copy"
    prepare_cache(raw_dir, copy, size=SIZE, workers=1, chunk_size=CHUNK, progress=False)
    summary = prepare_cache(raw_dir, copy, size=48, workers=1, chunk_size=4, force=True, progress=False)
    assert summary["size"] == 48 and PreparedCache(copy).images.shape[1:] == (48, 48)


def test_unreadable_images_are_counted_not_fatal(raw_dir, reference):
    cache = PreparedCache(reference[0])
    assert TRUNCATED not in cache.image_ids and GARBAGE not in cache.image_ids
    failures = {f["image_id"]: f for f in cache.summary["failures"]}
    assert TRUNCATED in failures[TRUNCATED]["path"] and failures[TRUNCATED]["error"]
    assert cache.summary["n_failed"] == 2


def test_open_prepared_prepares_a_raw_folder_once(tmp_path):
    raw = make_nih_folder(tmp_path / "raw")
    cache = open_prepared(raw, size=SIZE, workers=1)
    assert cache.path == raw.resolve() / ".gren_cache" / f"s{SIZE}_auto"
    meta = cache.path / fmt.META_FILE
    stamp = meta.stat().st_mtime_ns
    again = open_prepared(raw, size=SIZE, workers=1)
    assert again.path == cache.path and meta.stat().st_mtime_ns == stamp
    assert open_prepared(cache.path, size=SIZE).image_ids == cache.image_ids
    assert open_prepared(cache.path, size=None).size == SIZE
    with pytest.raises(DataError, match="size 32.*size 64"):
        open_prepared(cache.path, size=64)
    with pytest.raises(DataError, match="no such"):
        open_prepared(tmp_path / "nothing")


def test_open_prepared_read_only_folder_uses_user_cache(tmp_path, monkeypatch):
    raw = make_nih_folder(tmp_path / "ro")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    if hasattr(os, "geteuid") and os.geteuid() == 0:  # root writes anywhere: simulate a read-only folder
        monkeypatch.setattr(source, "_writable", lambda folder: False)
    raw.chmod(0o555)
    try:
        cache = open_prepared(raw, size=SIZE, workers=1)
    finally:
        raw.chmod(0o755)
    assert (tmp_path / "xdg" / "gren") in cache.path.parents and len(cache) == len(IMAGES)


def test_cache_dataset_items_and_dataloader_workers(reference):
    cache = PreparedCache(reference[0])
    dataset = CacheDataset(cache)
    assert len(dataset) == len(cache)
    item = dataset[1]
    assert set(item) == {"image", "labels", "boxes", "box_labels", "lung_masks", "lung_hashes", "lung_fallback",
                         "image_id", "index"}
    assert item["image"].shape == (1, SIZE, SIZE) and item["image"].dtype == torch.float32
    torch.testing.assert_close(item["image"][0], normalize_uint8(torch.from_numpy(np.array(cache.images[1]))))
    assert item["labels"].shape == (14,) and item["labels"].dtype == torch.float32
    assert item["boxes"].shape == (2, 4) and item["boxes"].dtype == torch.float32
    assert item["box_labels"].dtype == torch.int64 and item["lung_masks"].dtype == torch.uint8
    assert item["lung_hashes"].shape == (2, 64) and item["lung_hashes"].dtype == torch.bool
    assert isinstance(item["lung_fallback"], bool)
    assert item["image_id"] == "00000001_001" and item["index"] == 1

    subset = CacheDataset(reference[0], indices=["00000003_000", "00000001_000"])
    assert [subset[i]["image_id"] for i in range(2)] == ["00000003_000", "00000001_000"]
    assert subset.rows.tolist() == [cache.row_of("00000003_000"), 0]
    with pytest.raises(DataError, match="not in this cache"):
        CacheDataset(cache, indices=["nope"])
    assert len(pickle.dumps(cache)) < 50_000  # the memory maps are not pickled

    loader = DataLoader(dataset, batch_size=3, num_workers=2, collate_fn=collate)
    seen = []
    for batch in loader:
        assert batch["image"].shape[1:] == (1, SIZE, SIZE)
        rows = [cache.row_of(i) for i in batch["image_id"]]
        torch.testing.assert_close(batch["image"][:, 0], normalize_uint8(torch.from_numpy(cache.images[rows])))
        assert isinstance(batch["boxes"], list)
        seen += batch["image_id"]
    assert seen == cache.image_ids


def test_augment_moves_boxes_with_the_image_and_never_flips():
    torch.manual_seed(0)
    size = 64
    image = torch.full((1, size, size), -2.0)
    masks = torch.zeros((size, size), dtype=torch.uint8)
    image[:, 20:40, 8:24] = 2.0  # a bright box on the image-left side
    masks[20:40, 8:24] = 1
    boxes = torch.tensor([[8.0, 20.0, 24.0, 40.0]])
    labels = torch.tensor([3])
    augment = LungSafeAugment(min_scale=0.7, brightness=0.0, contrast=0.0)
    for _ in range(20):
        out_image, out_masks, out_boxes, out_labels = augment(image, masks, boxes, labels)
        assert out_image.shape == image.shape and out_masks.shape == masks.shape
        ys, xs = torch.nonzero(out_masks == 1, as_tuple=True)
        if len(out_boxes):
            x1, y1, x2, y2 = out_boxes[0].tolist()
            assert abs(xs.min().item() - x1) <= 2 and abs(xs.max().item() + 1 - x2) <= 2
            assert abs(ys.min().item() - y1) <= 2 and abs(ys.max().item() + 1 - y2) <= 2
            assert x2 <= size / 2 + 8  # still on the image-left side: no flip
            assert out_labels.tolist() == [3]
    identity = LungSafeAugment(min_scale=1.0, brightness=0.0, contrast=0.0)
    same = identity(image, masks, boxes, labels)
    torch.testing.assert_close(same[0], image)
    torch.testing.assert_close(same[2], boxes)


def test_cli_prints_json_summary(raw_dir, reference, capsys):
    from gren.cli import main

    code = main(["-q", "prepare", "--data", str(raw_dir), "--out", str(reference[0]), "--size", str(SIZE),
                 "--workers", "1", "--chunk-size", str(CHUNK), "--json"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["reused"] and summary["n_images"] == len(IMAGES)
    assert main(["-q", "prepare", "--data", str(raw_dir), "--out", str(reference[0]), "--size", "48"]) == 2


def test_concurrent_preparers_share_one_run(raw_dir, tmp_path):
    out = tmp_path / "shared"
    with ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(prepare_cache, raw_dir, out, size=SIZE, workers=1, chunk_size=CHUNK, progress=False)
                   for _ in range(2)]
        summaries = [f.result() for f in futures]
    assert sorted(s["reused"] for s in summaries) == [False, True]
    assert len(PreparedCache(out)) == len(IMAGES)


def test_training_split_is_recomputed_on_a_fresh_run_and_kept_on_resume(reference, tmp_path):
    from gren.data.splits import read_fold_csv, write_fold_csv
    from gren.train.config import resolve_config
    from gren.train.engine import open_training_data

    cache_dir, _ = reference
    config = resolve_config(None, [f"data.size={SIZE}", "data.protocol=1.0_0.6", "data.folds=2", "data.fold=0"])
    run_dir = tmp_path / "run"
    expected = open_training_data(cache_dir, config, run_dir)
    split = read_fold_csv(run_dir / "split.csv")
    stale = split.copy()
    stale["role"] = "unused"
    stale.loc[stale.index[0], "role"] = "train"  # a split left by an earlier start with other settings
    write_fold_csv(stale, run_dir / "split.csv")

    resumed = open_training_data(cache_dir, config, run_dir, resume=True)
    assert len(resumed.dataset) == 1  # a resumed run trains on the images it started with
    fresh = open_training_data(cache_dir, config, run_dir)
    assert len(fresh.dataset) == len(expected.dataset) > 1
    assert read_fold_csv(run_dir / "split.csv").equals(split)
    assert not list(run_dir.glob(".*partial"))
