"""Bad inputs a new user meets in a data folder (GREN issue 15): odd links and names, a damaged gzip,
a symlinked images/ folder changed behind the cache, split and training on the same images, tiny
films, EXIF orientation. Every case: a clear message or a logged, counted skip; no traceback; the
data folder left as it was."""

from __future__ import annotations

import gzip
import json
import logging
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from gren.cli import main
from gren.core.errors import DataError
from gren.core.imageio import read_gray, read_gray_resized
from gren.data.cache import PreparedCache
from gren.data.nih import load_index, scan_files
from gren.data.prepare import source_stamp
from gren.data.source import default_cache_dir, open_prepared, split_records
from gren.data.splits import make_folds, read_fold_csv
from nih_helpers import HEADER_2020, entry_line
from robustness_helpers import make_dataset, snapshot, truncate

BAD_NAME = b"img_\xff\xfe.png"  # not UTF-8


@pytest.fixture
def odd_folder(tmp_path):
    """A dataset whose images/ holds a dangling link, a self-loop link, a link to a folder above it and
    a file whose name is not UTF-8, plus a dangling link at the top level."""
    root = make_dataset(tmp_path / "data", n=8)
    images = root / "images"
    os.symlink("no_such_file.png", images / "dangling.png")
    os.symlink("loop.png", images / "loop.png")
    (images / "sub").mkdir()
    os.symlink("..", images / "sub" / "up")
    os.symlink("/nonexistent/folder", root / "old_images")
    os.symlink("top_loop", root / "top_loop")
    os.mkfifo(images / "img_007.png.fifo.png")
    with open(os.path.join(os.fsencode(images), BAD_NAME), "wb") as handle:
        handle.write((images / "img_000.png").read_bytes())
    return root


def _skipped(problems):
    return {p["file"] if isinstance(p, dict) else p.file: (p["message"] if isinstance(p, dict) else p.message)
            for p in problems if (p["kind"] if isinstance(p, dict) else p.kind) == "skipped"}


def test_scan_skips_and_names_bad_links_and_names(odd_folder, caplog):
    caplog.set_level(logging.WARNING)
    problems = []
    files = scan_files(odd_folder, problems=problems)
    names = {p.name for p in files}
    assert "img_000.png" in names and "dangling.png" not in names and "loop.png" not in names
    skipped = _skipped(problems)
    assert len(skipped) == 7, skipped
    by_name = {os.path.basename(k): v for k, v in skipped.items()}
    assert "dangling symbolic link" in by_name["dangling.png"] and "no_such_file.png" in by_name["dangling.png"]
    assert "symbolic link loop" in by_name["loop.png"]
    assert "symbolic link loop" in by_name["up"] and "folder above it" in by_name["up"]
    assert "dangling symbolic link" in by_name["old_images"]
    assert "symbolic link loop" in by_name["top_loop"]
    assert "not a regular file or folder (a FIFO)" in by_name["img_007.png.fifo.png"]
    assert "not valid UTF-8" in by_name["img_\\xff\\xfe.png"]
    for name in ("dangling.png", "loop.png", "old_images", "img_\\xff\\xfe.png"):
        assert name in caplog.text  # each named in the log


def test_data_check_reports_bad_entries_as_problems(odd_folder, capsys):
    before = snapshot(odd_folder)
    assert main(["data", "check", "--data", str(odd_folder), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["images"]["found"] == 8 and summary["images"]["skipped_entries"] == 7
    assert len(_skipped(summary["problems"])) == 7
    assert main(["data", "check", "--data", str(odd_folder)]) == 0
    text = capsys.readouterr().out
    assert "skipped (dangling/looping links, non-UTF-8 names, FIFOs): 7" in text and "dangling symbolic link" in text
    assert main(["data", "check", "--data", str(odd_folder), "--strict"]) == 2  # strict: problems are errors
    assert snapshot(odd_folder) == before


def test_prepare_and_raw_folder_training_data_survive_bad_entries(odd_folder, tmp_path, capsys):
    before = snapshot(odd_folder)
    out = tmp_path / "cache"
    assert main(["-q", "prepare", "--data", str(odd_folder), "--out", str(out), "--size", "32",
                 "--workers", "1", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["n_images"] == 8 and summary["n_failed"] == 0
    assert snapshot(odd_folder) == before
    # `gren train --data RAWFOLDER` goes through open_prepared: the cache goes into DATA/.gren_cache
    cache = open_prepared(odd_folder, size=32, lungs="auto", workers=1)
    assert len(cache) == 8
    assert snapshot(odd_folder) == before  # only .gren_cache (skipped by the snapshot) was added
    assert (odd_folder / ".gren_cache").is_dir()


def test_stamp_ignores_bad_entries_but_sees_real_changes(odd_folder):
    first = source_stamp(odd_folder)
    assert first["n_image_files"] == 16  # 8 images + 8 masks; the non-UTF-8 name and the links are skipped
    os.symlink("another_missing.png", odd_folder / "images" / "dangling2.png")
    assert source_stamp(odd_folder)["sha256"] == first["sha256"]  # a new bad link changes nothing it reads
    os.utime(odd_folder / "images" / "img_003.png", ns=(1, 1))
    assert source_stamp(odd_folder)["sha256"] != first["sha256"]


def _gzip_csv(root, rows=3000):
    lines = [HEADER_2020] + [entry_line(f"x_{i:05d}_{i * 7919 % 10007:05d}.png", "Effusion|Nodule", 10000 + i)
                             for i in range(rows)]
    raw = gzip.compress(("\n".join(lines) + "\n").encode(), mtime=0)
    root.mkdir(parents=True, exist_ok=True)
    path = root / "Data_Entry_2017_v2020.csv.gz"
    path.write_bytes(raw)
    return path, raw


@pytest.mark.parametrize("damage", ["truncated", "flipped"])
def test_corrupt_gzip_csv_is_a_data_error_naming_the_file(tmp_path, damage, caplog):
    path, raw = _gzip_csv(tmp_path / "data")
    if damage == "truncated":
        path.write_bytes(raw[: len(raw) // 2])
    else:
        middle = bytearray(raw)
        for k in range(len(raw) // 2, len(raw) // 2 + 64):
            middle[k] ^= 0x5A
        path.write_bytes(bytes(middle))
    with pytest.raises(DataError) as info:
        load_index(tmp_path / "data")
    message = str(info.value)
    assert str(path) in message and "gzip" in message and "Traceback" not in message
    caplog.set_level(logging.ERROR)
    assert main(["data", "check", "--data", str(tmp_path / "data")]) == 2
    assert str(path) in caplog.text and "gzip" in caplog.text


def test_symlinked_images_folder_is_followed_for_staleness(tmp_path):
    real = make_dataset(tmp_path / "elsewhere", n=6, size=40)
    data = tmp_path / "data"
    data.mkdir()
    for name in ("Data_Entry_2017_v2020.csv", "BBox_List_2017.csv"):
        shutil.copy(real / name, data / name)
    os.symlink(real / "images", data / "images")
    os.symlink(real / "masks", data / "masks")
    cache = open_prepared(data, size=32, lungs="auto", workers=1)
    row = cache.row_of("img_002")
    old = np.array(cache.images[row])
    # Replace the image behind the symlinked folder: same name, same size in pixels, other content.
    target = real / "images" / "img_002.png"
    Image.fromarray(np.full((40, 40), 7, dtype=np.uint8), "L").save(target)
    again = open_prepared(data, size=32, lungs="auto", workers=1)
    new = np.array(again.images[again.row_of("img_002")])
    assert not np.array_equal(new, old)
    assert np.array_equal(new, read_gray_resized(target, 32))


def test_split_and_training_use_the_same_images(tmp_path, capsys):
    data = make_dataset(tmp_path / "data", n=60, size=40, boxed=24)
    truncate(data / "images" / "img_017.png", 0.4)  # header fine, pixels cut: only decoding fails
    before = snapshot(data)
    index = load_index(data)  # header-only: the truncated image is still listed
    assert "img_017" in set(index.records["image_id"])

    # 1. no cache yet: data split decodes the images to find what training will drop
    assert main(["-q", "data", "split", "--data", str(data), "--protocol", "0.5_0.8", "--folds", "5",
                 "--out", str(tmp_path / "split_a")]) == 0
    assert snapshot(data) == before
    # 2. training prepares the raw folder and deals its folds from the cache's records (engine.open_training_data)
    cache = open_prepared(data, size=32, lungs="auto", workers=1)
    assert "img_017" not in cache.image_ids and len(cache) == 59
    train_folds = make_folds(cache.records, "0.5_0.8", folds=5, seed=0)
    # 3. data split with that cache present (no decoding), and data split on the cache itself
    assert main(["-q", "data", "split", "--data", str(data), "--out", str(tmp_path / "split_b")]) == 0
    assert main(["-q", "data", "split", "--data", str(cache.path), "--out", str(tmp_path / "split_c")]) == 0
    for name in ("split_a", "split_b", "split_c"):
        for k in range(5):
            written = read_fold_csv(tmp_path / name / f"fold_{k}.csv")
            assert written["image_id"].tolist() == train_folds[k]["image_id"].tolist()
            assert written["role"].tolist() == train_folds[k]["role"].tolist(), (name, k)
    # The failure this guards against: folds dealt from the header-only index differ for many images.
    old = make_folds(index.records, "0.5_0.8", folds=5, seed=0)[0].set_index("image_id")["role"]
    new = train_folds[0].set_index("image_id")["role"]
    assert (old.loc[new.index] != new).sum() > 0


def test_split_records_strict_refuses_undecodable(tmp_path):
    data = make_dataset(tmp_path / "data", n=10, size=40)
    truncate(data / "images" / "img_004.png", 0.4)
    with pytest.raises(DataError, match="undecodable"):
        split_records(data, strict=True, progress=False)
    records, _ = split_records(data, progress=False)
    assert len(records) == 9


def test_tiny_film_is_reported_and_kept(tmp_path, capsys):
    data = make_dataset(tmp_path / "data", n=4, size=40)
    Image.fromarray(np.full((1, 1), 100, dtype=np.uint8), "L").save(data / "images" / "img_001.png")
    index = load_index(data)
    tiny = [p for p in index.problems if p.kind == "tiny"]
    assert len(tiny) == 1 and "img_001.png" in tiny[0].file and "1 x 1 pixels" in tiny[0].message
    assert "img_001" in set(index.records["image_id"])
    assert main(["data", "check", "--data", str(data)]) == 0
    assert "smaller than 32 px (kept): 1" in capsys.readouterr().out


def test_exif_orientation_is_ignored_and_logged(tmp_path, caplog):
    caplog.set_level(logging.DEBUG, logger="gren")
    pixels = np.zeros((20, 40), dtype=np.uint8)
    pixels[:, :20] = 200
    image = Image.fromarray(pixels, "L")
    exif = image.getexif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    path = tmp_path / "rotated.jpg"
    image.save(path, exif=exif.tobytes(), quality=100)
    gray = read_gray(path)
    assert gray.shape == (20, 40)  # stored pixels, not rotated
    assert gray[:, :15].mean() > 150 and gray[:, 25:].mean() < 50
    assert "EXIF orientation 6 ignored" in caplog.text
    plain = tmp_path / "plain.jpg"
    image.save(plain, quality=100)
    caplog.clear()
    read_gray(plain)
    assert "EXIF" not in caplog.text


def test_prepare_logs_progress_unless_quiet(tmp_path, caplog, monkeypatch, capsys):
    monkeypatch.setenv("GREN_PROGRESS", "log")
    data = make_dataset(tmp_path / "data", n=6, size=40)
    caplog.set_level(logging.INFO)
    assert main(["prepare", "--data", str(data), "--out", str(tmp_path / "c1"), "--size", "32",
                 "--workers", "1"]) == 0
    assert "prepare: decode, segment, hash: 6/6 img (100%)" in caplog.text and "done in" in caplog.text
    caplog.clear()
    assert main(["-q", "prepare", "--data", str(data), "--out", str(tmp_path / "c2"), "--size", "32",
                 "--workers", "1"]) == 0
    assert "decode, segment, hash" not in caplog.text and "INFO" not in caplog.text
    caplog.clear()
    caplog.set_level(logging.DEBUG)
    assert main(["-v", "prepare", "--data", str(data), "--out", str(tmp_path / "c3"), "--size", "32",
                 "--workers", "1"]) == 0
    assert any(r.levelno == logging.DEBUG and r.name.startswith("gren") for r in caplog.records)
    assert not any(r.levelno == logging.DEBUG and not r.name.startswith("gren") for r in caplog.records)
    main(["-q", "data", "check", "--data", "/nonexistent"])  # leave the levels as a plain run sets them
    logging.getLogger("gren").setLevel(logging.NOTSET)
    capsys.readouterr()
    assert PreparedCache.is_complete(tmp_path / "c3")
    assert default_cache_dir(data, 32, "auto").name == "s32_auto"


@pytest.mark.parametrize("command", [
    ["prepare", "--data", "{data}", "--out", "{file}", "--size", "32", "--workers", "1"],
    ["data", "split", "--data", "{data}", "--out", "{file}", "--folds", "2", "--protocol", "0.5_0.5"],
    ["data", "synth", "--out", "{file}", "--n", "2"],
    ["lungs", "preview", "--data", "{data}", "--out", "{file}/sheet.png"],
])
def test_an_output_path_that_is_a_file_is_one_line(tmp_path, caplog, command):
    data = make_dataset(tmp_path / "data", n=6, size=40)
    target = tmp_path / "taken"
    target.write_text("mine")
    before = snapshot(tmp_path)
    caplog.set_level(logging.ERROR)
    argv = [part.format(data=data, file=target) for part in command]
    assert main(argv) == 2
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "taken" in errors[0].getMessage() and "not a folder" in errors[0].getMessage()
    assert snapshot(tmp_path) == before and target.read_text() == "mine"


def test_split_write_failure_names_the_file(tmp_path, monkeypatch):
    from gren.core.errors import GrenError
    from gren.data import splits

    data = make_dataset(tmp_path / "data", n=12, size=40)
    folds = make_folds(load_index(data).records, "0.5_0.5", folds=2, seed=0)

    def full(self, path, *args, **kwargs):
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(splits.pd.DataFrame, "to_csv", full)
    with pytest.raises(GrenError, match=r"\.fold_0\.csv\.\w+\.tmp: cannot write the split \(No space left on device\)"):
        splits.write_split(folds, tmp_path / "out", {})
