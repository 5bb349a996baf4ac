"""Bad files and faults (GREN issue 15): DICOM in datasets, huge images, foreign checkpoints, a full
disk (a real 2 MB tmpfs where it can be mounted, faked ENOSPC always), lungs commands that must not
die on one bad image or a bad --out, and the progress helper."""

from __future__ import annotations

import errno
import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from gren.cli import main
from gren.core.checkpoint import load_checkpoint, save_checkpoint
from gren.core.errors import GrenError, ImageReadError
from gren.core.imageio import image_size, is_image_file, read_gray, read_gray_resized
from gren.core.progress import Progress, format_duration
from gren.data import prepare as prepare_module
from gren.data.cache import PreparedCache
from gren.data.nih import load_index
from gren.data.prepare import prepare_cache
from robustness_helpers import lung_mask, make_dataset, snapshot, tiny_tmpfs, truncate

REPO = Path(__file__).resolve().parents[1]


# --- DICOM ------------------------------------------------------------------------------------------


def write_dicom(path: Path, pixels: np.ndarray | None, rows: int | None = None, columns: int | None = None,
                photometric: str = "MONOCHROME2") -> Path:
    pydicom = pytest.importorskip("pydicom")
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    if pixels is None:
        pixels = np.zeros((2, 2), dtype=np.uint16)  # a header that lies about its size
    ds.Rows = rows or pixels.shape[0]
    ds.Columns = columns or pixels.shape[1]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def test_huge_dicom_is_refused_from_its_header(tmp_path):
    path = write_dicom(tmp_path / "huge.dcm", None, rows=14000, columns=14000)
    assert path.stat().st_size < 10_000
    for reader in (image_size, read_gray):
        with pytest.raises(ImageReadError, match=r"huge\.dcm: image of 14000 x 14000 pixels .* exceeds the limit"):
            reader(path)


def test_pixel_limit_applies_to_png_and_dicom(tmp_path, monkeypatch):
    png = tmp_path / "a.png"
    Image.fromarray(np.zeros((64, 64), dtype=np.uint8)).save(png)
    dcm = write_dicom(tmp_path / "a.dcm", np.zeros((64, 64), dtype=np.uint16))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # error beyond 2000 pixels, like Pillow
    for path in (png, dcm):
        with pytest.raises(ImageReadError, match=path.name):
            read_gray(path)
        with pytest.raises(ImageReadError, match=path.name):
            image_size(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # no limit
    assert read_gray(dcm).shape == (64, 64) and image_size(png) == (64, 64)


def _dicom_dataset(tmp_path, n=8):
    data = make_dataset(tmp_path / "data", n=n, size=40)
    sources = {}
    for i in (0, 3, 5):
        png = data / "images" / f"img_{i:03d}.png"
        pixels = np.asarray(Image.open(png), dtype=np.uint16) * 16  # 12-bit values
        png.unlink()
        sources[f"img_{i:03d}"] = write_dicom(data / "images" / f"img_{i:03d}.dcm", pixels)
    return data, sources


def test_dicom_files_in_a_dataset_are_indexed_prepared_and_read_like_predict(tmp_path):
    from gren.eval.predict import read_any_gray

    data, sources = _dicom_dataset(tmp_path)
    assert is_image_file("x.DCM") and is_image_file("x.dicom")
    index = load_index(data)
    records = index.records.set_index("image_id")
    assert len(records) == 8
    for stem, path in sources.items():
        assert records.loc[stem, "path"] == str(path)
        assert (records.loc[stem, "width"], records.loc[stem, "height"]) == (40, 40)
        assert np.array_equal(read_any_gray(path), read_gray(path))  # predict reads through data.io
    summary = prepare_cache(data, tmp_path / "cache", size=32, workers=1, progress=False)
    assert summary["n_images"] == 8 and summary["n_failed"] == 0
    cache = PreparedCache(tmp_path / "cache")
    for stem, path in sources.items():
        assert np.array_equal(cache.images[cache.row_of(stem)], read_gray_resized(path, 32))
    gray = read_gray(sources["img_000"])
    assert gray.dtype == np.uint8 and gray.max() >= 250 and gray.min() <= 5  # windowed to the full 8 bits


def test_dicom_without_pydicom_names_the_extra(tmp_path, monkeypatch, capsys):
    data, sources = _dicom_dataset(tmp_path)
    monkeypatch.setitem(sys.modules, "pydicom", None)
    with pytest.raises(ImageReadError, match=r"img_000\.dcm.*pip install 'gren\[dicom\]'"):
        load_index(data)
    summary = prepare_cache(data, tmp_path / "cache", size=32, workers=1, progress=False)
    assert summary["n_images"] == 5 and summary["n_failed"] == 3
    assert all("gren[dicom]" in f["error"] for f in summary["failures"])
    assert main(["data", "check", "--data", str(data), "--json"]) == 0
    problems = json.loads(capsys.readouterr().out)["problems"]
    assert sum("gren[dicom]" in p["message"] for p in problems) == 3


# --- checkpoints ------------------------------------------------------------------------------------


def _real_checkpoint(path: Path) -> Path:
    save_checkpoint(path, model={"w": torch.zeros(3)}, config={"method": "x"}, epoch=1)
    return path


@pytest.mark.parametrize("content, reason", [
    (b"", "empty file"),
    (b"hello, this is my checkpoint\n", "a text file, not a torch file"),
    (b'{"model": 1}', "a JSON/text file, not a torch file"),
    (bytes(range(3, 200)), "not a torch file"),
])
def test_foreign_checkpoint_says_why(tmp_path, content, reason):
    path = tmp_path / "model.pt"
    path.write_bytes(content)
    with pytest.raises(GrenError) as info:
        load_checkpoint(path)
    assert str(info.value).startswith(f"{path}: not a GREN checkpoint ({reason}")


def test_truncated_and_foreign_torch_files(tmp_path):
    good = _real_checkpoint(tmp_path / "good.pt")
    assert load_checkpoint(good)["epoch"] == 1
    cut = tmp_path / "cut.pt"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(GrenError, match=r"cut\.pt: not a GREN checkpoint \(a damaged or truncated torch file"):
        load_checkpoint(cut)
    other = tmp_path / "list.pt"
    torch.save([torch.ones(2)], other)
    with pytest.raises(GrenError, match=r"list\.pt: not a GREN checkpoint \(a torch file holding a list"):
        load_checkpoint(other)
    with pytest.raises(GrenError, match=r"missing\.pt: checkpoint not found"):
        load_checkpoint(tmp_path / "missing.pt")


def test_predict_with_an_empty_checkpoint_is_one_line_exit_2(tmp_path, caplog):
    empty = tmp_path / "empty.pt"
    empty.touch()
    image = tmp_path / "x.png"
    Image.fromarray(np.zeros((32, 32), dtype=np.uint8)).save(image)
    caplog.set_level(logging.ERROR)
    assert main(["predict", str(image), "--checkpoint", str(empty), "--out", str(tmp_path / "out")]) == 2
    assert f"{empty}: not a GREN checkpoint (empty file)" in caplog.text


def test_checkpoint_save_on_a_full_disk_faked(tmp_path, monkeypatch):
    path = _real_checkpoint(tmp_path / "run" / "last.pt")

    def full(*args, **kwargs):
        Path(args[1]).write_bytes(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:603] . PytorchStreamWriter failed writing "
                           "file data/0: file write failed")

    from gren.core import checkpoint as checkpoint_module

    monkeypatch.setattr(torch, "save", full)
    monkeypatch.setattr(checkpoint_module.shutil, "disk_usage", lambda p: type("U", (), {"free": 0})())
    with pytest.raises(GrenError, match=r"last\.pt: cannot write checkpoint: no space left on device \(0\.0 MB"):
        save_checkpoint(path, model={}, config={})
    monkeypatch.undo()
    assert load_checkpoint(path)["epoch"] == 1  # the previous checkpoint is intact
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.pt"]  # no .tmp left behind

    def read_only(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(args[1]))

    monkeypatch.setattr(torch, "save", read_only)
    with pytest.raises(GrenError, match=r"last\.pt: cannot write checkpoint \(Permission denied\)"):
        save_checkpoint(path, model={}, config={})


# --- a full disk ------------------------------------------------------------------------------------


@pytest.fixture
def tmpfs(tmp_path):
    with tiny_tmpfs(tmp_path, "2m") as mount:
        if mount is None:
            pytest.skip("cannot mount a tmpfs here (needs root); the faked-ENOSPC tests still run")
        yield mount


def test_prepare_on_a_full_tmpfs(tmp_path, tmpfs, monkeypatch, caplog):
    data = make_dataset(tmp_path / "data", n=40, size=48)
    before = snapshot(data)
    out = tmpfs / "cache"
    # As a user runs it: a subprocess must end with exit 2 and one line, not "Bus error" (135).
    done = subprocess.run([sys.executable, "-m", "gren.cli", "prepare", "--data", str(data), "--out", str(out),
                           "--size", "192", "--workers", "1"], capture_output=True, text=True, timeout=300,
                          env={"PYTHONPATH": str(REPO / "src"), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})
    assert done.returncode == 2, done.stderr
    errors = [line for line in done.stderr.splitlines() if "ERROR" in line]
    assert len(errors) == 1 and "not enough free space" in errors[0] and "Traceback" not in done.stderr
    # Past the up-front check (as if it misjudged): the reservation itself fails cleanly.
    monkeypatch.setattr(prepare_module, "check_free_space", lambda *a, **k: None)
    caplog.set_level(logging.ERROR)
    assert main(["prepare", "--data", str(data), "--out", str(out), "--size", "192", "--workers", "1"]) == 2
    assert "no space left on device" in caplog.text and str(out) in caplog.text
    assert snapshot(data) == before


def test_prepare_full_disk_faked(tmp_path, monkeypatch):
    data = make_dataset(tmp_path / "data", n=6, size=40)

    def no_space(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(prepare_module.os, "posix_fallocate", no_space, raising=False)
    with pytest.raises(GrenError, match=r"images\.npy: no space left on device"):
        prepare_cache(data, tmp_path / "c1", size=32, workers=1, progress=False)
    monkeypatch.undo()

    def marker_write_fails(self, task):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "c2" / "work" / "chunks" / "x.json"))

    monkeypatch.setattr(prepare_module._ChunkWriter, "process", marker_write_fails)
    with pytest.raises(GrenError, match=r"x\.json: no space left on device.*rerun resumes it"):
        prepare_cache(data, tmp_path / "c2", size=32, workers=1, progress=False)
    monkeypatch.setattr(prepare_module.shutil, "disk_usage", lambda p: type("U", (), {"free": 1000})())
    with pytest.raises(GrenError, match=r"not enough free space for the cache"):
        prepare_cache(data, tmp_path / "c3", size=32, workers=1, progress=False)


def test_checkpoint_and_synth_on_a_full_tmpfs(tmpfs, caplog):
    save_checkpoint(tmpfs / "last.pt", model={"w": torch.zeros(4)}, config={})
    with pytest.raises(GrenError, match=r"last\.pt: cannot write checkpoint: no space left on device"):
        save_checkpoint(tmpfs / "last.pt", model={"w": torch.zeros(1_000_000)}, config={})  # 4 MB
    assert load_checkpoint(tmpfs / "last.pt")["model"]["w"].shape == (4,)
    assert [p.name for p in tmpfs.iterdir()] == ["last.pt"]
    (tmpfs / "last.pt").unlink()
    caplog.set_level(logging.ERROR)
    assert main(["-q", "data", "synth", "--out", str(tmpfs / "synth"), "--n", "400", "--size", "128"]) == 2
    assert "no space left on device" in caplog.text and "synthetic dataset" in caplog.text


def test_synth_full_disk_faked(tmp_path, monkeypatch, caplog):
    from gren.data.synth import writer

    def full(path, plans):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(writer, "_write_data_entry", full)
    caplog.set_level(logging.ERROR)
    assert main(["-q", "data", "synth", "--out", str(tmp_path / "s"), "--n", "2", "--size", "64"]) == 2
    assert "Data_Entry_2017_v2020.csv: no space left on device" in caplog.text


# --- lungs commands ---------------------------------------------------------------------------------


@pytest.mark.parametrize("out, expected", [
    ("sheet", "expected a file name ending in .png, .jpg, .jpeg"),
    ("sheet.pdf", "expected a file name ending in .png"),
    (".", "is a folder"),
])
def test_lungs_preview_checks_out_before_any_work(tmp_path, monkeypatch, caplog, out, expected):
    monkeypatch.chdir(tmp_path)
    caplog.set_level(logging.ERROR)
    # --data does not exist: a check made after the work would report that instead.
    assert main(["lungs", "preview", "--data", str(tmp_path / "none"), "--out", out]) == 2
    assert expected in caplog.text and str(tmp_path / "none") not in caplog.text
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_lungs_preview_parent_is_a_file(tmp_path, caplog):
    (tmp_path / "file").write_text("x")
    caplog.set_level(logging.ERROR)
    assert main(["lungs", "preview", "--data", str(tmp_path), "--out", str(tmp_path / "file" / "a.png")]) == 2
    assert "exists and is not a folder" in caplog.text


def test_lungs_evaluate_skips_an_unreadable_image(tmp_path, capsys, caplog):
    root = tmp_path / "lungs"
    rng = np.random.default_rng(0)
    for i in range(5):
        image = np.clip(rng.normal(120, 30, (64, 64)), 0, 255).astype(np.uint8)
        image[lung_mask(64) > 0] //= 3  # dark lung fields
        (root / "images").mkdir(parents=True, exist_ok=True)
        (root / "masks").mkdir(exist_ok=True)
        Image.fromarray(image).save(root / "images" / f"f{i}.png")
        Image.fromarray(lung_mask(64)).save(root / "masks" / f"f{i}.png")
    truncate(root / "images" / "f2.png", 0.3)
    before = snapshot(root)
    caplog.set_level(logging.WARNING)
    assert main(["-q", "lungs", "evaluate", "--data", str(root), "--json", "--batch-size", "2"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["n_images"] == 4 and result["n_skipped"] == 1 and result["skipped"][0]["stem"] == "f2"
    assert sorted(r["stem"] for r in result["images"]) == ["f0", "f1", "f3", "f4"]
    assert "f2.png" in caplog.text and "1 of 5 images skipped" in caplog.text
    assert snapshot(root) == before
    caplog.clear()
    sheet = tmp_path / "out" / "sheet.png"
    assert main(["-q", "lungs", "preview", "--data", str(root), "--out", str(sheet), "--n", "5",
                 "--tile", "64", "--columns", "2"]) == 0
    assert Image.open(sheet).size == (128, 128)  # 4 tiles: the unreadable film left out
    assert "skipped f2" in caplog.text and snapshot(root) == before


# --- progress ---------------------------------------------------------------------------------------


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_progress_logs_at_an_interval_and_at_the_end(caplog):
    caplog.set_level(logging.INFO)
    clock = FakeClock()
    bar = Progress(total=100, desc="stage", unit="img", interval=30, mode="log", clock=clock,
                   logger=logging.getLogger("gren.test"))
    for _ in range(10):
        clock.now += 5
        bar.update(5)  # 1 img/s
    bar.close()
    bar.close()
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0] == "stage: 30/100 img (30%), 1 img/s, 1m10s left"
    assert lines[-1] == "stage: 50/100 img (50%), 1 img/s, done in 50s"
    assert len(lines) == 2  # at 30 s and at the end (60 s is not reached)


def test_progress_is_silent_when_info_is_off_and_iterates(caplog):
    logger = logging.getLogger("gren.test.quiet")
    logger.setLevel(logging.WARNING)
    try:
        bar = Progress(range(3), desc="x", mode="log", logger=logger, interval=0)
        assert bar.mode == "off" and list(bar) == [0, 1, 2]
    finally:
        logger.setLevel(logging.NOTSET)
    caplog.set_level(logging.INFO)
    assert list(Progress(range(4), desc="y", mode="log", interval=0, logger=logging.getLogger("gren.t"))) == \
        [0, 1, 2, 3]
    assert caplog.records[-1].getMessage().startswith("y: 4/4 it (100%)")
    assert format_duration(9.4) == "9s" and format_duration(4000) == "1h06m"
