"""The synthetic NIH-layout generator (gren.data.synth, `gren data synth`)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from gren.cli import main as cli_main
from gren.core.errors import GrenError
from gren.core.labels import BOX_CLASSES, LABELS
from gren.data.synth import CaseSpec, FindingSpec, make_plan, render_case, synthesize
from gren.data.synth.stats import BOX_STATS, LABEL_PREVALENCE

N = 60
SIZE = 128
DATA_ENTRY = "Data_Entry_2017_v2020.csv"
BBOX = "BBox_List_2017.csv"


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("synth") / "data"
    summary = synthesize(out, N, size=SIZE, seed=3, progress=False)
    return out, summary


def _bbox_table(path: Path) -> pd.DataFrame:
    table = pd.read_csv(path)
    boxes = table.iloc[:, :6].copy()
    boxes.columns = ["image", "label", "x", "y", "w", "h"]
    return boxes


# --- determinism ---------------------------------------------------------------------------------


def test_same_seed_gives_identical_bytes_and_workers_do_not_matter(dataset, tmp_path):
    out, _ = dataset
    again = synthesize(tmp_path / "again", N, size=SIZE, seed=3, workers=2, progress=False)
    assert again["n"] == N
    assert _files(out) == _files(tmp_path / "again")


def test_different_seed_gives_different_data(tmp_path):
    synthesize(tmp_path / "a", 6, size=64, seed=0, progress=False)
    synthesize(tmp_path / "b", 6, size=64, seed=1, progress=False)
    a, b = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert a[DATA_ENTRY] != b[DATA_ENTRY]
    shared = [k for k in a if k.startswith("images/") and k in b]
    assert shared and all(a[k] != b[k] for k in shared)


def test_render_case_is_deterministic_per_generator_state():
    spec = CaseSpec((FindingSpec("Nodule", "left", boxed=True),), "AP", "F")
    one = render_case(np.random.default_rng(7), 96, spec)
    two = render_case(np.random.default_rng(7), 96, spec)
    other = render_case(np.random.default_rng(8), 96, spec)
    assert np.array_equal(one.image, two.image) and np.array_equal(one.lung_mask, two.lung_mask)
    assert one.findings[0].boxes == two.findings[0].boxes
    assert not np.array_equal(one.image, other.image)


# --- schema -------------------------------------------------------------------------------------


def test_csvs_have_the_real_headers_and_columns(dataset):
    out, _ = dataset
    entry_header = (out / DATA_ENTRY).read_text().splitlines()[0]
    assert entry_header == ("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,"
                            "View Position,OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]")
    assert (out / BBOX).read_text().splitlines()[0] == "Image Index,Finding Label,Bbox [x,y,w,h],,,"
    entries = pd.read_csv(out / DATA_ENTRY)
    assert len(entries) == N and entries.shape[1] == 11
    assert entries["Image Index"].is_unique
    assert all(re.fullmatch(r"\d{8}_\d{3}\.png", name) for name in entries["Image Index"])
    stems = entries["Image Index"].str.slice(0, 8).astype(int)
    assert (stems == entries["Patient ID"]).all()
    assert (entries["Image Index"].str.slice(9, 12).astype(int) == entries["Follow-up #"]).all()
    assert set(entries["View Position"]) <= {"PA", "AP"} and set(entries["Patient Gender"]) <= {"M", "F"}
    assert entries["Patient Age"].between(1, 95).all()
    assert (entries.iloc[:, 7] == 1024).all() and (entries.iloc[:, 8] == 1024).all()
    allowed = set(LABELS) | {"No Finding"}
    for cell in entries["Finding Labels"]:
        parts = cell.split("|")
        assert set(parts) <= allowed and parts == sorted(parts)
        assert "No Finding" not in parts or parts == ["No Finding"]
    boxes = _bbox_table(out / BBOX)
    assert "Infiltration" not in set(boxes["label"])  # the real file spells it Infiltrate
    assert set(boxes["label"]) <= (set(BOX_CLASSES) - {"Infiltration"}) | {"Infiltrate"}
    assert set(boxes["image"]) <= set(entries["Image Index"])
    labels = dict(zip(entries["Image Index"], entries["Finding Labels"]))
    for row in boxes.itertuples():
        name = "Infiltration" if row.label == "Infiltrate" else row.label
        assert name in labels[row.image].split("|")


def test_same_schema_as_the_real_files(dataset, nih_dir):
    out, _ = dataset
    real_entries = pd.read_csv(nih_dir / "Data_Entry_2017_v2020.csv.gz", nrows=5)
    assert list(pd.read_csv(out / DATA_ENTRY).columns) == list(real_entries.columns)
    assert list(pd.read_csv(out / BBOX).columns) == list(pd.read_csv(nih_dir / "BBox_List_2017.csv").columns)


def test_loads_with_the_project_index(dataset):
    from gren.data import nih
    out, summary = dataset
    index = nih.load_index(out)
    assert len(index.records) == N and not index.missing and not index.problems
    assert int(index.records["annotated"].sum()) == summary["images"]["with_boxes"]
    assert len(index.boxes) == sum(summary["boxes"].values())
    assert (index.records["mask_path"] != "").all()
    assert index.label_matrix().sum(axis=0)[LABELS.index("Infiltration")] == summary["labels"].get("Infiltration", 0)
    boxes = index.boxes
    assert (boxes[["x1", "y1", "x2", "y2"]].to_numpy() <= SIZE).all()  # scaled to the real file size


# --- images and masks ---------------------------------------------------------------------------


def test_images_and_masks_are_8bit_with_lungs_on_the_right_sides(dataset):
    out, _ = dataset
    for path in sorted((out / "images").glob("*.png"))[:20]:
        image = Image.open(path)
        assert image.mode == "L" and image.size == (SIZE, SIZE)
        mask = np.asarray(Image.open(out / "masks" / path.name))
        assert mask.shape == (SIZE, SIZE) and set(np.unique(mask)) == {0, 1, 2}
        cols = np.arange(SIZE)[None, :]
        right_lung_x = (cols * (mask == 1)).sum() / (mask == 1).sum()
        left_lung_x = (cols * (mask == 2)).sum() / (mask == 2).sum()
        assert right_lung_x < SIZE / 2 < left_lung_x  # mask 1 (patient's right) on the image left
        pixels = np.asarray(image, dtype=float)
        mediastinum = pixels[int(0.3 * SIZE): int(0.6 * SIZE), int(0.47 * SIZE): int(0.53 * SIZE)]
        assert pixels[mask > 0].mean() + 25 < mediastinum.mean()  # lungs are the dark fields


def test_boxes_lie_in_the_image_and_on_lungs_or_heart(dataset):
    out, _ = dataset
    boxes = _bbox_table(out / BBOX)
    assert len(boxes) > 0
    assert (boxes[["x", "y"]] >= 0).all().all() and (boxes["w"] > 0).all() and (boxes["h"] > 0).all()
    assert ((boxes["x"] + boxes["w"]) <= 1024).all() and ((boxes["y"] + boxes["h"]) <= 1024).all()
    scale = SIZE / 1024
    for row in boxes.itertuples():
        mask = np.asarray(Image.open(out / "masks" / row.image))
        x1, y1 = int(row.x * scale), int(row.y * scale)
        x2, y2 = int(np.ceil((row.x + row.w) * scale)), int(np.ceil((row.y + row.h) * scale))
        lung_share = (mask[y1:y2, x1:x2] > 0).mean()
        if row.label == "Cardiomegaly":
            assert row.w > 300 and 420 < row.x + row.w / 2 < 720  # the enlarged heart, left of the patient's midline
        else:
            assert lung_share > 0.4, (row.image, row.label, lung_share)


@pytest.mark.parametrize("label", BOX_CLASSES)
def test_each_box_class_is_drawn_in_its_lung(label):
    side = "right"
    spec = CaseSpec((FindingSpec(label, "center" if label == "Cardiomegaly" else side, boxed=True),))
    areas = []
    for k in range(3):
        case = render_case(np.random.default_rng([11, k]), 128, spec)
        (finding,) = case.findings
        assert len(finding.boxes) == 1
        x1, y1, x2, y2 = finding.boxes[0]
        assert 0 <= x1 < x2 <= 1024 and 0 <= y1 < y2 <= 1024
        areas.append((x2 - x1) * (y2 - y1))
        if label != "Cardiomegaly":
            assert (x1 + x2) / 2 < 512  # the patient's right lung is the image left
            window = case.lung_mask[int(y1 / 8): int(np.ceil(y2 / 8)), int(x1 / 8): int(np.ceil(x2 / 8))]
            assert (window == 1).mean() > 0.4
    if label == "Nodule":
        assert np.median(areas) < 150**2
    if label == "Cardiomegaly":
        assert np.median(areas) > 350 * 280


def test_lesions_change_the_film_and_bilateral_gives_two_boxes():
    normal = render_case(np.random.default_rng(5), 128, CaseSpec(()))
    both = render_case(np.random.default_rng(5), 128, CaseSpec((FindingSpec("Effusion", "both", boxed=True),)))
    assert len(both.findings[0].boxes) == 2
    (a, b) = sorted(both.findings[0].boxes)
    assert (a[0] + a[2]) / 2 < 512 < (b[0] + b[2]) / 2
    assert np.abs(normal.image.astype(int) - both.image.astype(int)).max() > 30


def test_hard_lesions_are_fainter():
    def contrast(hard: bool) -> float:
        spec = CaseSpec((FindingSpec("Mass", "left", boxed=True, hard=hard),))
        case = render_case(np.random.default_rng(2), 128, spec)
        plain = render_case(np.random.default_rng(2), 128, CaseSpec(()))
        return float(np.abs(case.image.astype(int) - plain.image.astype(int)).sum())

    assert contrast(True) < contrast(False)


# --- the mix ------------------------------------------------------------------------------------


def test_class_mix_follows_the_plan(dataset):
    out, summary = dataset
    images = summary["images"]
    assert images["no_finding"] == N // 3
    assert abs(images["with_boxes"] - N / 3) <= 2 and abs(images["labels_only"] - N / 3) <= 2
    assert set(summary["boxes"]) == set(BOX_CLASSES)  # every box class appears, even in a small set
    assert summary["patients"] < N  # some patients have several films
    assert json.loads((out / "synth.json").read_text()) == summary
    entries = pd.read_csv(out / DATA_ENTRY)
    assert (entries["Finding Labels"] == "No Finding").sum() == images["no_finding"]
    assert (entries["Finding Labels"].str.contains("|", regex=False)).any()  # co-occurring findings


def test_plan_is_deterministic_and_prevalence_covers_all_labels():
    assert set(LABEL_PREVALENCE) == set(LABELS) and set(BOX_STATS) == set(BOX_CLASSES)
    plan = make_plan(300, seed=4)
    assert plan == make_plan(300, seed=4) and plan != make_plan(300, seed=5)
    ids = [p.image_id for p in plan]
    assert ids == sorted(ids) and len(set(ids)) == 300
    boxed = [f for p in plan for f in p.spec.findings if f.boxed]
    assert any(f.side == "both" for f in boxed) and sum(f.side in ("right", "left") for f in boxed) > 0.7 * len(boxed)
    labels = {f.label for p in plan for f in p.spec.findings}
    assert labels == set(LABELS)


# --- folders, CLI, preview -----------------------------------------------------------------------


def test_refuses_a_foreign_folder_and_overwrites_with_force(tmp_path):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(GrenError, match="not a previous"):
        synthesize(foreign, 3, size=64, progress=False)
    synthesize(foreign, 3, size=64, progress=False, force=True)
    assert (foreign / "notes.txt").read_text() == "keep me"
    assert len(list((foreign / "images").glob("*.png"))) == 3


def test_rerun_replaces_a_previous_output(tmp_path):
    out = tmp_path / "synth"
    synthesize(out, 8, size=64, progress=False)
    synthesize(out, 4, size=64, seed=1, progress=False)  # no --force needed, no stale files left
    assert len(list((out / "images").glob("*.png"))) == 4 == len(list((out / "masks").glob("*.png")))
    assert json.loads((out / "synth.json").read_text())["n"] == 4


def test_cli_writes_dataset_and_preview(tmp_path, capsys):
    out = tmp_path / "cli"
    assert cli_main(["-q", "data", "synth", "--out", str(out), "--n", "5", "--size", "64", "--seed", "2",
                     "--preview", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["n"] == 5 and summary["seed"] == 2
    preview = Image.open(out / "preview.png")
    assert preview.mode == "RGB" and preview.size == (1024, 1024)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x.txt").write_text("x")
    assert cli_main(["-q", "data", "synth", "--out", str(tmp_path / "other"), "--n", "2"]) == 2
    assert cli_main(["-q", "data", "synth", "--out", str(tmp_path / "bad"), "--n", "0"]) == 2
