"""`gren predict`'s outputs: heat-map overlays (pixel checks), regions.csv / regions.coco.json against the
per-image JSON, ground_truth [] for images the dataset does not know, no NaN in any JSON."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from PIL import Image

from gren.core.labels import LABEL_INDEX, LABELS
from gren.eval.predict import (
    CSV_COLUMNS,
    HEAT_ALPHA,
    class_colour,
    draw_overlay,
    finite_or_null,
    heatmap_classes,
    predict_files,
)

EFFUSION, MASS = LABEL_INDEX["Effusion"], LABEL_INDEX["Mass"]


class TwoClassPredictor:
    """8 x 8 maps: Effusion high (0.9) on the top-left 2 x 2 cells, Mass 0.7 on cell (6, 6), all else 0;
    ``low`` scales every map below the 0.5 threshold (the case that used to draw a bare film)."""

    size, name = 64, "fake"

    def __init__(self, low: bool = False, nan_class: int | None = None):
        self.low, self.nan_class = low, nan_class

    def __call__(self, grays):
        maps = np.zeros((len(grays), len(LABELS), 8, 8), dtype=np.float32)
        maps[:, EFFUSION, 0:2, 0:2] = 0.9
        maps[:, MASS, 6, 6] = 0.7
        if self.low:
            maps *= 0.3
        probs = np.full((len(grays), len(LABELS)), 0.01, dtype=np.float32)
        probs[:, EFFUSION], probs[:, MASS] = 0.8, 0.6
        if self.nan_class is not None:
            probs[:, self.nan_class] = np.nan
        return maps, probs, np.full(probs.shape, 0.5, dtype=np.float32)


def _strict_json(path):
    def refuse(name):
        raise AssertionError(f"{path}: non-standard JSON constant {name}")

    return json.loads(path.read_text(), parse_constant=refuse)


@pytest.fixture()
def films(tmp_path):
    folder = tmp_path / "films"
    folder.mkdir()
    Image.fromarray(np.full((640, 640), 128, dtype=np.uint8)).save(folder / "flat.png")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (300, 200), dtype=np.uint8)).save(folder / "small.png")
    return folder


def test_heatmap_coloured_where_the_map_is_high_and_outlined_above_the_threshold():
    gray = np.full((640, 640), 128, dtype=np.uint8)
    maps = np.zeros((len(LABELS), 8, 8), dtype=np.float32)
    maps[EFFUSION, 0:2, 0:2] = 0.9  # pixels 0-159 of 640
    maps[EFFUSION, 4, 4] = 0.45  # half as high, below the 0.5 threshold: tinted, not outlined
    image = np.asarray(draw_overlay(gray, maps, [EFFUSION], {}, None, 0.5, heat_classes=[EFFUSION])).astype(int)
    assert image.shape[1] == 640 and image.shape[0] > 640  # the film's own size, the legend strip below it
    film = image[:640]
    colour = np.array(class_colour(EFFUSION))
    expected_high = 128 * (1 - HEAT_ALPHA) + colour * HEAT_ALPHA  # full colour at the image's maximum (0.9)
    assert np.abs(film[80, 80] - expected_high).max() <= 1
    expected_half = 128 * (1 - HEAT_ALPHA / 2) + colour * HEAT_ALPHA / 2  # opacity proportional to the value
    assert np.abs(film[360, 360] - expected_half).max() <= 1
    assert (film[500, 500] == 128).all() and (film[80, 400] == 128).all()  # zero map: the bare film
    assert (film[80, 158] == colour).all() and (film[158, 80] == colour).all()  # outline of the positive cells
    assert not (film[320:400, 320:400] == colour).all(axis=-1).any()  # below the threshold: no outline
    legend = image[640:]
    assert (np.abs(legend - colour).max(axis=-1) == 0).sum() > 50  # the class's swatch in the legend


def test_no_cell_above_the_threshold_still_draws_the_map(films, tmp_path):
    out = tmp_path / "out"
    predict_files([films / "flat.png"], None, out, predictor=TwoClassPredictor(low=True), progress=False)
    record = _strict_json(out / "flat.json")
    assert record["regions"] == [] and record["heatmap_classes"] == ["Effusion", "Mass"]
    film = np.asarray(Image.open(out / "flat.png")).astype(int)[:640]
    assert np.abs(film[40, 40] - 128).max() > 40  # Effusion's map (0.27 at most) is visible
    assert np.abs(film[6 * 80 + 40, 6 * 80 + 40] - 128).max() > 20  # and Mass's
    assert (film[400, 100] == 128).all()


def test_csv_and_coco_match_the_json_records(films, tmp_path):
    out = tmp_path / "out"
    paths = [films / "flat.png", films / "small.png"]
    summary = predict_files(paths, None, out, predictor=TwoClassPredictor(), progress=False)
    records = [_strict_json(out / f"{p.stem}.json") for p in paths]
    assert len(summary["written"]) == 2
    with open(out / "regions.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert tuple(rows[0]) == CSV_COLUMNS
    expected = [(r["image"], region) for r in records for region in r["regions"]]
    assert len(rows) == len(expected) == 4  # Effusion and Mass on each film
    for row, (image, region) in zip(rows, expected):
        assert row["image"] == image and row["label"] == region["label"]
        assert float(row["probability"]) == pytest.approx(region["probability"])
        assert [float(row[k]) for k in ("x1", "y1", "x2", "y2")] == pytest.approx(region["box"])
        assert int(row["cells"]) == region["cells"]
        assert float(row["max_cell_probability"]) == pytest.approx(region["max_cell_probability"])
    coco = _strict_json(out / "regions.coco.json")
    assert [c["name"] for c in coco["categories"]] == list(LABELS)
    images = {image["id"]: image for image in coco["images"]}
    assert [(i["file_name"], i["width"], i["height"]) for i in coco["images"]] == \
        [(r["image"], *r["image_size"]) for r in records]
    assert len(coco["annotations"]) == 4
    for annotation, (image, region) in zip(coco["annotations"], expected):
        assert images[annotation["image_id"]]["file_name"] == image
        assert LABELS[annotation["category_id"] - 1] == region["label"]
        x1, y1, x2, y2 = region["box"]
        assert annotation["bbox"] == pytest.approx([x1, y1, x2 - x1, y2 - y1], abs=0.011)
        assert annotation["score"] == pytest.approx(region["probability"])
    small = records[1]
    assert small["image_size"] == [200, 300]
    effusion = next(r for r in small["regions"] if r["label"] == "Effusion")
    assert effusion["box"] == pytest.approx([0.0, 0.0, 50.0, 75.0])  # 2 x 2 cells of 25 x 37.5 px


def test_ground_truth_is_an_empty_list_for_images_the_dataset_does_not_know(films, tmp_path):
    from eval_helpers import make_tiny_dataset

    data = make_tiny_dataset(tmp_path / "data", n=4, size=96)
    out = tmp_path / "out"
    known = data / "images" / "00000000_000.png"
    predict_files([known, films / "flat.png"], None, out, data=data, predictor=TwoClassPredictor(), progress=False)
    assert _strict_json(out / "00000000_000.json")["ground_truth"][0]["label"] == "Atelectasis"
    assert _strict_json(out / "flat.json")["ground_truth"] == []
    predict_files([films / "flat.png"], None, tmp_path / "none", predictor=TwoClassPredictor(), progress=False)
    assert "ground_truth" not in _strict_json(tmp_path / "none" / "flat.json")  # no dataset at all


def test_no_nan_in_json(films, tmp_path):
    out = tmp_path / "out"
    predict_files([films / "flat.png"], None, out, predictor=TwoClassPredictor(nan_class=LABEL_INDEX["Hernia"]),
                  progress=False)
    record = _strict_json(out / "flat.json")
    assert record["probabilities"]["Hernia"] is None and record["probabilities"]["Effusion"] == pytest.approx(0.8)
    _strict_json(out / "regions.coco.json")
    assert finite_or_null({"a": [np.float32("inf"), np.float64(1.5), np.int64(2)], "b": float("nan")}) == \
        {"a": [None, 1.5, 2], "b": None}


def test_heatmap_classes_fall_back_to_the_most_probable():
    probs = np.zeros(len(LABELS))
    probs[[3, 5, 7]] = [0.6, 0.4, 0.9]
    assert heatmap_classes(probs, [], 0.5, top_k=3) == [7, 3]
    assert heatmap_classes(probs, [5], 0.5, top_k=1) == [5]  # the reported classes are kept first
    assert heatmap_classes(probs, [5], 0.5, top_k=2) == [7, 5]  # then others; returned most probable first
    assert heatmap_classes(probs, [], 0.95, top_k=3) == [7]  # none passes: the single most probable class
