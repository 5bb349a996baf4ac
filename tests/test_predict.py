"""`gren predict`: regions from cells, PNG/JPEG/16-bit/DICOM/corrupt inputs, JSON + overlay outputs."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from gren.core.errors import ImageReadError
from gren.core.labels import LABEL_INDEX, LABELS
from gren.eval.predict import cell_regions, predict_files, read_any_gray, reported_classes


class FakePredictor:
    """8 x 8 maps: Effusion positive on two separate blobs, everything else low."""

    size, name = 64, "fake"

    def __call__(self, grays):
        maps = np.full((len(grays), len(LABELS), 8, 8), 0.05, dtype=np.float32)
        k = LABEL_INDEX["Effusion"]
        maps[:, k, 1:3, 1:3] = 0.9
        maps[:, k, 5, 6] = 0.8
        probs = 1 - np.prod(1 - maps, axis=(2, 3))
        return maps, probs, np.full(probs.shape, 0.5, dtype=np.float32)


def test_cell_regions_boxes_in_image_pixels():
    prob = np.zeros((4, 8))
    prob[0:2, 0:2] = 0.9  # rows 0-1, cols 0-1
    prob[3, 5] = 0.7
    prob[2, 7] = 0.6  # touches (3, 6)? no: (3,5) and (2,7) are two apart -> separate
    regions = cell_regions(prob, (800, 200))  # cells 100 wide, 50 high
    # largest first, then in row-major order of their first cell
    assert [r["box"] for r in regions] == [[0.0, 0.0, 200.0, 100.0], [700.0, 100.0, 800.0, 150.0],
                                           [500.0, 150.0, 600.0, 200.0]]
    assert regions[0]["cells"] == 4 and regions[0]["max_cell_probability"] == pytest.approx(0.9)
    prob[2, 6] = 0.8  # diagonal links: one 8-connected component of three cells
    assert len(cell_regions(prob, (800, 200))) == 2
    assert cell_regions(np.zeros((3, 3)), (30, 30)) == []


def test_reported_classes_threshold_then_top_k():
    maps = np.zeros((14, 2, 2))
    maps[3, 0, 0] = maps[5, 0, 0] = maps[7, 0, 0] = 0.9
    probs = np.zeros(14)
    probs[[3, 5, 7, 9]] = [0.6, 0.95, 0.3, 0.99]  # 9 has no positive cell
    assert reported_classes(probs, maps, 0.5, 0.5, top_k=3) == [5, 3]
    assert reported_classes(probs, maps, 0.5, 0.5, top_k=1) == [5]
    assert reported_classes(probs, maps, 0.97, 0.5, top_k=2) == [5, 3]  # none passes: top classes with cells


@pytest.fixture()
def inputs(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "in"
    folder.mkdir()
    Image.fromarray(rng.integers(0, 255, (120, 100), dtype=np.uint8)).save(folder / "gray8.png")
    Image.fromarray(rng.integers(0, 255, (90, 130, 3), dtype=np.uint8)).save(folder / "colour.jpg")
    Image.fromarray(rng.integers(0, 4095, (64, 64)).astype(np.uint16)).save(folder / "deep16.png")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    return folder


def test_predict_files_json_overlay_and_failures(inputs, tmp_path):
    out = tmp_path / "out"
    paths = sorted(inputs.iterdir()) + [inputs / "missing.png"]
    summary = predict_files(paths, None, out, predictor=FakePredictor(), progress=False)
    assert sorted(summary["failed"]) == [str(inputs / "broken.png"), str(inputs / "missing.png")]
    assert "broken.png" in summary["failed"][str(inputs / "broken.png")]
    assert len(summary["written"]) == 3
    record = json.loads((out / "colour.json").read_text())
    assert record["image_size"] == [130, 90] and record["grid"] == [8, 8] and record["model_input_size"] == 64
    assert set(record["probabilities"]) == set(LABELS)
    assert [r["label"] for r in record["regions"]] == ["Effusion", "Effusion"]
    assert record["regions"][0]["box"] == pytest.approx([130 / 8, 90 / 8, 3 * 130 / 8, 3 * 90 / 8], abs=0.01)
    assert "ground_truth" not in record  # no dataset at all
    overlay = np.asarray(Image.open(out / "colour.png"))
    # small images are drawn enlarged to 512 px; the legend strip comes below the 354 px film
    assert overlay.shape[1:] == (512, 3) and overlay.shape[0] > 354
    inside, outside = overlay[80, 120], overlay[240, 120]  # a predicted cell vs a negative one
    assert inside[0] > inside[1] + 40 and abs(int(outside[0]) - int(outside[1])) < 12  # faint where the maps are low
    assert (out / "deep16.png").is_file() and (out / "gray8.json").is_file()


def test_ground_truth_from_dataset_drawn_green(tmp_path):
    from eval_helpers import make_tiny_dataset

    data = make_tiny_dataset(tmp_path / "data", n=4, size=96)
    out = tmp_path / "out"
    image = data / "images" / "00000000_000.png"
    predict_files([image], None, out, data=data, predictor=FakePredictor(), progress=False)
    record = json.loads((out / "00000000_000.json").read_text())
    (x1, y1, x2, y2) = record["ground_truth"][0]["box"]
    assert record["ground_truth"][0]["label"] == "Atelectasis" and 0 <= x1 < x2 <= 96 and 0 <= y1 < y2 <= 96
    overlay = np.asarray(Image.open(out / "00000000_000.png")).astype(int)
    green = (overlay[..., 1] > 180) & (overlay[..., 0] < 100) & (overlay[..., 2] < 100)
    assert green.sum() > (x2 - x1 + y2 - y1) * 512 / 96  # the outline (partly under labels) is green
    plain = predict_files([image], None, tmp_path / "plain", predictor=FakePredictor(), progress=False)
    assert not plain["failed"]
    overlay = np.asarray(Image.open(tmp_path / "plain" / "00000000_000.png")).astype(int)
    assert ((overlay[..., 1] > 180) & (overlay[..., 0] < 100) & (overlay[..., 2] < 100)).sum() == 0


def test_dicom_monochrome1_rescaled_and_inverted(tmp_path):
    pydicom = pytest.importorskip("pydicom")
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    pixels = np.zeros((40, 50), dtype=np.uint16)
    pixels[:, 25:] = 1000  # right half dense
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME1"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.RescaleSlope, ds.RescaleIntercept = 2, -100
    ds.PixelData = pixels.tobytes()
    path = tmp_path / "film.dcm"
    ds.save_as(path, enforce_file_format=True)
    gray = read_any_gray(path)
    assert gray.shape == (40, 50) and gray.dtype == np.uint8
    assert gray[:, :25].min() == 255 and gray[:, 25:].max() == 0  # MONOCHROME1: high values are dark
    (tmp_path / "bad.dcm").write_bytes(b"not dicom at all")
    with pytest.raises(ImageReadError, match="bad.dcm"):
        read_any_gray(tmp_path / "bad.dcm")


def test_dicom_without_pydicom_is_a_clear_message(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pydicom", None)
    (tmp_path / "x.dcm").write_bytes(b"\0" * 132)
    with pytest.raises(ImageReadError, match=r"pip install 'gren\[dicom\]'"):
        read_any_gray(tmp_path / "x.dcm")


def test_cli_predict_with_a_checkpoint(inputs, tmp_path):
    """The real path: a (randomly initialised) tiny checkpoint loaded by load_run, via the CLI."""
    from eval_helpers import TINY_OVERRIDES
    from gren.cli import main
    from gren.core.checkpoint import save_checkpoint
    from gren.methods import build_method
    from gren.train.config import resolve_config

    config = resolve_config(None, TINY_OVERRIDES)
    config["method"] = "baseline"
    torch.manual_seed(0)
    method = build_method("baseline", config)
    ckpt = tmp_path / "tiny.pt"
    save_checkpoint(ckpt, model=method.state_dict(), config=config, epoch=1)
    out = tmp_path / "cli"
    assert main(["predict", str(inputs / "gray8.png"), str(inputs / "deep16.png"), "--checkpoint", str(ckpt),
                 "--out", str(out)]) == 0
    record = json.loads((out / "gray8.json").read_text())
    assert record["method"] == "baseline" and record["model_input_size"] == 64 and record["grid"] == [4, 4]
    assert main(["predict", str(inputs / "broken.png"), str(inputs / "gray8.png"), "--checkpoint", str(ckpt),
                 "--out", str(out)]) == 1


def test_ground_truth_defaults_to_the_runs_dataset(tmp_path):
    import yaml

    from eval_helpers import make_tiny_dataset

    data = make_tiny_dataset(tmp_path / "data", n=4, size=96)
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({"method": "baseline", "data": {"path": str(data)}}))
    image = data / "images" / "00000000_000.png"
    predict_files([image], run, tmp_path / "out", predictor=FakePredictor(), progress=False)
    record = json.loads((tmp_path / "out" / "00000000_000.json").read_text())
    assert record["ground_truth"][0]["label"] == "Atelectasis"
    (run / "config.yaml").write_text(yaml.safe_dump({"method": "baseline", "data": {"path": str(tmp_path / "gone")}}))
    predict_files([image], run, tmp_path / "out2", predictor=FakePredictor(), progress=False)
    assert not json.loads((tmp_path / "out2" / "00000000_000.json").read_text()).get("ground_truth")
