"""The NIH data layer: exact counts on the real CSVs and images, header variants, bad rows, image search."""

from __future__ import annotations

import json
import logging

import numpy as np
import pandas as pd
import pytest

from gren.cli import main as gren_main
from gren.commands.data_check import format_report
from gren.core.errors import DataError, ImageReadError
from gren.core.labels import BOX_CLASSES, LABELS
from gren.data.nih import labels_to_matrix, load_index, read_bbox_list, read_data_entry
from nih_helpers import BBOX_HEADER, cached_index, make_nih_folder, write_image, write_text

# ---------------------------------------------------------------- real data


@pytest.fixture(scope="module")
def real_index(nih_dir):
    return cached_index(str(nih_dir))


@pytest.mark.realdata
def test_real_counts(real_index):
    summary = real_index.summary()
    assert summary["images"]["listed"] == 112_120
    assert summary["images"]["found"] == 2_220
    assert summary["images"]["missing"] == 112_120 - 2_220 == len(real_index.missing)
    assert summary["box_images"] == {"listed": 880, "found": 640, "missing": 240}
    assert summary["boxes"]["rows"] == 984
    assert summary["boxes"]["usable"] == 708 == len(real_index.boxes)
    assert summary["boxes"]["missing_image"] == 984 - 708
    assert summary["boxes"]["classes"] == 8
    usable = {c: v["usable"] for c, v in summary["boxes"]["per_class"].items()}
    assert usable == {
        "Atelectasis": 133, "Cardiomegaly": 106, "Effusion": 108, "Infiltration": 91,
        "Mass": 56, "Nodule": 61, "Pneumonia": 88, "Pneumothorax": 65,
    }  # fmt: skip
    listed = {c: v["listed"] for c, v in summary["boxes"]["per_class"].items()}
    assert listed == {
        "Atelectasis": 180, "Cardiomegaly": 146, "Effusion": 153, "Infiltration": 123,
        "Mass": 85, "Nodule": 79, "Pneumonia": 120, "Pneumothorax": 98,
    }  # fmt: skip
    assert summary["labels"]["No Finding"] == 1_071
    assert summary["labels_listed"]["No Finding"] == 60_361
    assert summary["labels_listed"]["Hernia"] == 227
    assert summary["views"] == {"AP": 642, "PA": 1_578}
    assert summary["problems"] == []
    assert int(real_index.records["annotated"].sum()) == 640
    json.dumps(summary)  # plain data


@pytest.mark.realdata
def test_real_unannotated_pool_matches_readme(real_index):
    records = real_index.records
    pool = records[~records["annotated"] & (records["labels"] != "No Finding")]
    assert len(pool) == 509
    counts = pd.Series(pool["labels"].str.split("|").explode()).value_counts()
    assert counts["Infiltration"] == 121 and counts["Atelectasis"] == 90 and counts["Nodule"] == 84


@pytest.mark.realdata
def test_real_records_and_boxes_scaled_to_file_size(real_index, nih_dir):
    records = real_index.records
    assert list(records.columns) == [
        "image_id", "path", "patient_id", "view", "width", "height", "labels", "annotated", "mask_path",
    ]  # fmt: skip
    assert records["image_id"].is_unique
    assert (records["width"] == 512).all() and (records["height"] == 512).all()
    assert records["patient_id"].map(type).eq(str).all()
    assert records.set_index("image_id").loc["00000002_000", "patient_id"] == "2"
    # stems found twice (images/*.jpg and originals/*.png): the images/ file is taken
    assert records.set_index("image_id").loc["00001369_000", "path"].endswith("images/00001369_000.jpg")
    raw = pd.read_csv(nih_dir / "BBox_List_2017.csv", header=None, skiprows=1)
    raw = raw[raw[0].str.replace(".png", "", regex=False).isin(set(records["image_id"]))]
    assert len(raw) == 708
    first = raw.iloc[0]
    boxes, labels = real_index.boxes_for(first[0].replace(".png", ""))
    x, y, w, h = first[2:6].astype(float)
    np.testing.assert_allclose(boxes[0], np.array([x, y, x + w, y + h]) * 512 / 1024, rtol=1e-5)
    assert labels[0] == LABELS.index("Infiltration" if first[1] == "Infiltrate" else first[1])
    matrix = real_index.label_matrix()
    assert matrix.shape == (2_220, 14) and matrix.dtype == np.uint8
    assert matrix[:, LABELS.index("Hernia")].sum() == real_index.summary()["labels"]["Hernia"]
    assert set(real_index.boxes["label"]) == set(BOX_CLASSES)


@pytest.mark.realdata
def test_real_data_check_cli(nih_dir, capsys):
    """The acceptance figures of `gren data check` on the real folder (JSON and table)."""
    assert gren_main(["data", "check", "--data", str(nih_dir), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["images"]["found"] == 2_220 and summary["boxes"]["usable"] == 708
    text = format_report(summary)
    assert "images found:   2,220" in text and "708 usable of 984 rows" in text and "(240 missing)" in text


# ---------------------------------------------------------------- generated folders

ENTRIES = [
    ("00000001_000.png", "Effusion|Infiltration", 1),
    ("00000001_001.png", "No Finding", 1),
    ("00000002_000.png", "Cardiomegaly", 2),
    ("00000003_000.png", "Nodule", 3),
]
IMAGES = {
    "00000001_000": ("images/00000001_000.png", (1024, 1024)),
    "00000001_001": ("images_001/images/00000001_001.JPG", (512, 512)),
    "00000002_000": ("images_002/images/00000002_000.jpeg", (512, 256)),
}
BOXES = [
    "00000001_000.png,Infiltrate,100,200,300,400",
    "00000002_000.png,Cardiomegaly,512,256,256,512",
    "00000003_000.png,Nodule,10,10,20,20",  # image missing
]


@pytest.mark.parametrize("variant, gz", [("2017", False), ("2017", True), ("2020", False), ("2020", True)])
def test_header_variants_and_gz(tmp_path, variant, gz):
    make_nih_folder(tmp_path, ENTRIES, BOXES, IMAGES, variant=variant, gz=gz)
    index = load_index(tmp_path, strict=True)
    records = index.records.set_index("image_id")
    assert list(records.index) == ["00000001_000", "00000001_001", "00000002_000"]
    assert index.missing == ["00000003_000"]
    assert records.loc["00000001_000", "labels"] == "Effusion|Infiltration"
    assert records.loc["00000002_000", ["width", "height"]].tolist() == [512, 256]
    assert records["annotated"].tolist() == [True, False, True]
    assert index.problems == []
    listed = read_data_entry(next(tmp_path.glob("Data_Entry*")), [])
    assert listed[["original_width", "original_height"]].iloc[0].tolist() == [2500, 2048]
    assert listed["view"].tolist() == ["PA"] * 4


def test_boxes_scale_to_real_image_size(tmp_path):
    make_nih_folder(tmp_path, ENTRIES, BOXES, IMAGES)
    index = load_index(tmp_path)
    boxes, labels = index.boxes_for("00000001_000")  # 1024 x 1024 file: unchanged
    np.testing.assert_allclose(boxes, [[100, 200, 400, 600]])
    assert labels.tolist() == [LABELS.index("Infiltration")]
    boxes, _ = index.boxes_for("00000002_000")  # 512 wide, 256 high
    np.testing.assert_allclose(boxes, [[256, 64, 384, 192]])
    empty, empty_labels = index.boxes_for("00000001_001")
    assert empty.shape == (0, 4) and empty_labels.shape == (0,)
    summary = index.summary()
    assert summary["box_images"] == {"listed": 3, "found": 2, "missing": 1}
    assert summary["boxes"]["missing_image"] == 1 and summary["boxes"]["usable"] == 2


def test_missing_images_one_warning_with_count(tmp_path, caplog):
    entries = ENTRIES + [(f"0000009{i}_000.png", "No Finding", 90 + i) for i in range(5)]
    make_nih_folder(tmp_path, entries, BOXES, IMAGES)
    with caplog.at_level(logging.WARNING, logger="gren.data.nih"):
        index = load_index(tmp_path)
    warnings = [r.getMessage() for r in caplog.records if "not under" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].startswith("6 of 9 images")
    assert "(1 of them have boxes)" in warnings[0]
    assert len(index.missing) == 6


def test_both_label_lists_prefers_v2020(tmp_path, caplog):
    make_nih_folder(tmp_path, ENTRIES[:2], [], IMAGES, variant="2020")
    write_text(tmp_path / "Data_Entry_2017.csv", [
        "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
        "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y],",
        "00000002_000.png,Mass,0,2,45,M,PA,2500,2048,0.1,0.1,",
    ])  # fmt: skip
    with caplog.at_level(logging.INFO, logger="gren.data.nih"):
        index = load_index(tmp_path)
    assert index.summary()["data_entry_csv"].endswith("Data_Entry_2017_v2020.csv")
    assert any("using Data_Entry_2017_v2020.csv" in r.getMessage() for r in caplog.records)


def test_patient_ids_are_string_keys(tmp_path):
    make_nih_folder(tmp_path, [("00000001_000.png", "Mass", "00000001"), ("00000001_001.png", "Mass", 1)], [],
                    {k: IMAGES[k] for k in ("00000001_000", "00000001_001")})  # fmt: skip
    records = load_index(tmp_path).records
    assert records["patient_id"].tolist() == ["1", "1"]


def _problem_lines(index, file_name):
    return {p.line: p.message for p in index.problems if p.file.endswith(file_name)}


def test_bad_box_rows_reported_with_file_and_line(tmp_path):
    boxes = [
        "00000001_000.png,Infiltrate,100,200,300,400",  # line 2: fine
        "00000001_000.png,Tumour,1,2,3,4",  # 3: unknown label
        "00000001_000.png,Effusion,10,20,0,40",  # 4: zero width
        "00000001_000.png,Effusion,2000,20,10,40",  # 5: off the image
        "00000001_000.png,Effusion,abc,20,10,40",  # 6: malformed number
        "00000001_000.png,Infiltrate,100,200,300,400",  # 7: duplicate of line 2
        "00000099_000.png,Mass,10,20,30,40",  # 8: not in Data_Entry
        "00000001_000.png,Effusion,1000,10,50,50",  # 9: overhangs: clipped, kept
        "00000001_000.png,Cardiomegaly,10,10,50,50",  # 10: not among the findings: kept
        "00000001_000.png,Effusion,10,20,30,40,7",  # 11: extra value: ignored, kept
    ]
    make_nih_folder(tmp_path, ENTRIES, boxes, IMAGES)
    index = load_index(tmp_path)
    lines = _problem_lines(index, "BBox_List_2017.csv")
    assert set(lines) == {3, 4, 5, 6, 7, 8, 9, 10, 11}
    assert "unknown box label 'Tumour'" in lines[3]
    assert "non-positive" in lines[4]
    assert "off the 1024 x 1024 image" in lines[5]
    assert "malformed" in lines[6]
    assert "duplicate" in lines[7] and "line 2" in lines[7]
    assert "does not list" in lines[8]
    assert "clipped" in lines[9]
    assert "not among the Finding Labels" in lines[10]
    assert "ignored" in lines[11]
    boxes_kept, _ = index.boxes_for("00000001_000")
    assert len(boxes_kept) == 4
    np.testing.assert_allclose(boxes_kept[1], [1000, 10, 1024, 60])  # clipped at the right edge
    summary = index.summary()
    assert summary["boxes"]["rows"] == 10 and summary["boxes"]["invalid"] == 6
    assert all(p["file"].endswith("BBox_List_2017.csv") for p in summary["problems"])
    with pytest.raises(DataError, match=r"BBox_List_2017.csv:3: unknown box label"):
        load_index(tmp_path, strict=True)


def test_bad_data_entry_rows(tmp_path):
    entries = [
        ("00000001_000.png", "Effusion|Flu", 1),  # line 2: unknown label dropped
        ("00000001_001.png", "No Finding", 1),
        ("00000001_000.png", "Mass", 1),  # line 4: duplicate
        ("00000002_000.png", "", ""),  # line 5: empty labels and patient
        ("00000003_000.png", "No Finding|Mass", 3),  # line 6: mixed
    ]
    make_nih_folder(tmp_path, entries, None, IMAGES)
    write_text(tmp_path / "Data_Entry_2017_v2020.csv", [
        *(tmp_path / "Data_Entry_2017_v2020.csv").read_text().splitlines(), "", ",,,,,,,,,,",
        "00000004_000.png,Mass,0,4,45,M,PA,2500,2048,0.1,0.1,extra",
    ])  # fmt: skip  (blank line 7 and an all-empty line 8 are skipped; line 9 has an extra value)
    index = load_index(tmp_path)
    lines = _problem_lines(index, "Data_Entry_2017_v2020.csv")
    assert set(lines) == {2, 4, 5, 6, 9}
    assert "'Flu'" in lines[2] and "duplicate Image Index '00000001_000' (first on line 2)" in lines[4]
    assert "empty Finding Labels" in lines[5] or "empty Patient ID" in lines[5]
    assert sum(p.line == 5 for p in index.problems) == 2
    records = index.records.set_index("image_id")
    assert records.loc["00000001_000", "labels"] == "Effusion"
    assert records.loc["00000002_000", ["labels", "patient_id"]].tolist() == ["No Finding", "00000002"]
    with pytest.raises(DataError, match="strict"):
        load_index(tmp_path, strict=True)


def test_bad_headers_and_missing_files(tmp_path):
    with pytest.raises(DataError, match="no Data_Entry CSV"):
        load_index(tmp_path)
    with pytest.raises(DataError, match="data folder not found"):
        load_index(tmp_path / "nowhere")
    write_text(tmp_path / "Data_Entry_2017.csv", ["Image,Labels", "a.png,Mass"])
    with pytest.raises(DataError, match=r"Data_Entry_2017.csv:1: header lacks column\(s\) Image Index"):
        load_index(tmp_path)
    write_text(tmp_path / "bad_bbox.csv", ["Image,Label,x,y,w,h"])
    with pytest.raises(DataError, match="unexpected header"):
        read_bbox_list(tmp_path / "bad_bbox.csv", None, [])
    write_text(tmp_path / "empty.csv", [BBOX_HEADER])
    boxes, rows = read_bbox_list(tmp_path / "empty.csv", None, [])
    assert rows == 0 and len(boxes) == 0


def test_no_bbox_file_and_masks(tmp_path):
    make_nih_folder(tmp_path, ENTRIES, None, IMAGES)
    write_image(tmp_path / "masks" / "00000001_000.png")  # named like an image, but a mask
    write_image(tmp_path / "masks" / "00000003_000.png")  # the mask of a missing image: still missing
    index = load_index(tmp_path)
    assert len(index.boxes) == 0 and not index.records["annotated"].any()
    paths = index.records.set_index("image_id")["path"]
    assert paths["00000001_000"] == str(tmp_path / "images" / "00000001_000.png")
    assert index.missing == ["00000003_000"]
    masks = index.records.set_index("image_id")["mask_path"]
    assert masks["00000001_000"].endswith("masks/00000001_000.png") and masks["00000001_001"] == ""
    assert index.summary()["images"]["with_mask"] == 1


def test_unreadable_images_error_or_skip(tmp_path):
    make_nih_folder(tmp_path, ENTRIES, BOXES, IMAGES)
    (tmp_path / "images_002" / "images" / "00000002_000.jpeg").write_bytes(b"garbage")
    with pytest.raises(ImageReadError, match="00000002_000.jpeg"):
        load_index(tmp_path)
    index = load_index(tmp_path, on_bad_image="skip")
    assert "00000002_000" not in set(index.records["image_id"])
    assert index.summary()["images"]["unreadable"] == 1
    assert any("00000002_000.jpeg" in p.file for p in index.problems)
    # truncated: the header reads, only a full decode (verify) finds it
    path = tmp_path / "images" / "00000001_000.png"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    header_only = load_index(tmp_path, on_bad_image="skip")
    assert "00000001_000" in set(header_only.records["image_id"])
    verified = load_index(tmp_path, on_bad_image="skip", verify=True)
    assert "00000001_000" not in set(verified.records["image_id"])
    assert verified.summary()["images"]["unreadable"] == 2


def test_subset_and_label_matrix(tmp_path):
    make_nih_folder(tmp_path, ENTRIES, BOXES, IMAGES)
    index = load_index(tmp_path)
    sub = index.subset(["00000002_000", "00000001_000"])
    assert sub.image_ids == ["00000002_000", "00000001_000"]
    assert set(sub.boxes["image_id"]) == {"00000001_000", "00000002_000"}
    matrix = sub.label_matrix()
    assert matrix[0, LABELS.index("Cardiomegaly")] == 1 and matrix[0].sum() == 1
    assert matrix[1, [LABELS.index("Effusion"), LABELS.index("Infiltration")]].tolist() == [1, 1]
    with pytest.raises(DataError, match="not in the index"):
        index.subset(["nope"])
    assert labels_to_matrix(pd.Series(["No Finding"])).sum() == 0


def test_data_check_cli_on_generated_folder(tmp_path, capsys):
    make_nih_folder(tmp_path, ENTRIES, BOXES, IMAGES)
    assert gren_main(["data", "check", "--data", str(tmp_path), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["images"]["found"] == 3 and summary["boxes"]["usable"] == 2
    assert gren_main(["data", "check", "--data", str(tmp_path / "nowhere")]) == 2
    empty = tmp_path / "empty"
    make_nih_folder(empty, ENTRIES, BOXES, {})
    assert gren_main(["data", "check", "--data", str(empty)]) == 1
    assert "usable: NO" in capsys.readouterr().out


def test_bom_crlf_quotes_and_spelling_variants(tmp_path):
    lines = [
        "\ufeff" + "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
        "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]",
        '00000001_000.png,"Pleural Thickening|effusion",0,1,45,M,AP,2500,2048,0.1,0.1',
    ]
    (tmp_path / "Data_Entry_2017_v2020.csv").write_bytes("\r\n".join(lines).encode() + b"\r\n")
    write_image(tmp_path / "images" / "00000001_000.png")
    index = load_index(tmp_path, strict=True)
    assert index.records["labels"].tolist() == ["Effusion|Pleural_Thickening"]
    assert index.records["view"].tolist() == ["AP"]
