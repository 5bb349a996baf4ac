"""`gren evaluate`: the scoring loop on a perfect and a blank predictor, the eval.json schema and markdown."""

from __future__ import annotations

import json

import pytest
import torch

from gren.core.labels import BOX_CLASSES, LABEL_INDEX, LABELS
from gren.eval.evaluate import eval_markdown, evaluate_predictions, read_eval, write_eval

SIZE = 32


def _items():
    """Six 32 x 32 items: boxes of several classes (two on one image), one image without boxes."""
    specs = [
        ("a", [("Atelectasis", (0, 0, 16, 16))]),
        ("b", [("Cardiomegaly", (8, 8, 24, 30)), ("Nodule", (2, 3, 6, 9))]),
        ("c", [("Effusion", (16, 0, 32, 32))]),
        ("d", [("Atelectasis", (4, 4, 12, 28))]),
        ("e", [("Mass", (10.5, 10.5, 20.25, 19.75))]),
        ("f", []),
    ]
    items = []
    for index, (image_id, boxes) in enumerate(specs):
        labels = torch.zeros(len(LABELS))
        for name, _ in boxes:
            labels[LABEL_INDEX[name]] = 1
        items.append({
            "image": torch.zeros(1, SIZE, SIZE),
            "labels": labels,
            "boxes": torch.tensor([b for _, b in boxes], dtype=torch.float32).reshape(-1, 4),
            "box_labels": torch.tensor([LABEL_INDEX[n] for n, _ in boxes], dtype=torch.int64),
            "image_id": image_id,
            "index": index,
        })
    return items


def perfect(batch):
    """A map per pixel (h = w = S) that is 1 exactly on each box of its class."""
    probs = torch.zeros(len(batch["image_id"]), len(LABELS), SIZE, SIZE)
    centres = torch.arange(SIZE) + 0.5
    for i, (boxes, labels) in enumerate(zip(batch["boxes"], batch["box_labels"])):
        for (x1, y1, x2, y2), k in zip(boxes.tolist(), labels.tolist()):
            inside_y = (centres >= y1) & (centres < y2)
            inside_x = (centres >= x1) & (centres < x2)
            probs[i, k][inside_y[:, None] & inside_x[None, :]] = 1.0
    return probs


def blank(batch):
    return torch.zeros(len(batch["image_id"]), len(LABELS), 4, 4)


def test_perfect_predictor_scores_one():
    result = evaluate_predictions(perfect, _items(), batch_size=4, progress=False)
    for cls in ("Atelectasis", "Cardiomegaly", "Effusion", "Nodule"):
        assert result["accuracy"][cls] == {"0.1": 1.0, "0.3": 1.0, "0.5": 1.0, "0.7": 1.0}
        assert result["iobb"][cls]["0.7"] == 1.0
    assert result["accuracy"]["Mass"]["0.7"] == 1.0  # fractional box: IoU < 1 but well above 0.7
    assert result["accuracy"]["Pneumonia"]["0.1"] is None  # no boxes: null, excluded from the mean
    assert result["accuracy"]["mean"] == {"0.1": 1.0, "0.3": 1.0, "0.5": 1.0, "0.7": 1.0}
    assert result["n_boxes"] == {**{c: 0 for c in BOX_CLASSES}, "Atelectasis": 2, "Cardiomegaly": 1,
                                 "Effusion": 1, "Nodule": 1, "Mass": 1}
    assert result["auc"]["Atelectasis"] == pytest.approx(1.0)
    assert result["auc"]["Hernia"] is None and result["n_images"] == 6


def test_blank_predictor_scores_zero():
    result = evaluate_predictions(blank, _items(), batch_size=3, progress=False)
    for block in ("accuracy", "iobb"):
        assert result[block]["mean"] == {"0.1": 0.0, "0.3": 0.0, "0.5": 0.0, "0.7": 0.0}
    assert result["auc"]["Atelectasis"] == pytest.approx(0.5)  # all scores tie


def test_loc_ids_restrict_boxes_but_not_auc():
    result = evaluate_predictions(perfect, _items(), loc_ids={"a", "b"}, batch_size=2, progress=False)
    assert sum(result["n_boxes"].values()) == 3
    assert result["n_images"] == 2 and result["n_images_auc"] == 6


def test_wrong_map_shape_is_a_clear_error():
    from gren.core.errors import GrenError

    with pytest.raises(GrenError, match="expected"):
        evaluate_predictions(lambda b: torch.zeros(len(b["image_id"]), 3, 2, 2), _items(), progress=False)


def test_eval_json_schema_and_markdown(tmp_path):
    result = evaluate_predictions(perfect, _items(), batch_size=4, progress=False)
    result["method"] = "perfect"
    write_eval(tmp_path, result)
    loaded = json.loads((tmp_path / "eval.json").read_text())
    assert list(loaded["accuracy"]) == [*BOX_CLASSES, "mean"]
    assert list(loaded["iobb"]) == [*BOX_CLASSES, "mean"]
    assert all(list(v) == ["0.1", "0.3", "0.5", "0.7"] for v in loaded["accuracy"].values())
    assert list(loaded["auc"]) == [*LABELS, "mean"]
    assert list(loaded["n_boxes"]) == list(BOX_CLASSES)
    assert loaded["accuracy"]["Pneumonia"]["0.5"] is None
    assert read_eval(tmp_path)["method"] == "perfect"
    text = (tmp_path / "eval.md").read_text()
    assert "| 0.5 | 1.00 | 1.00 | 1.00 | - | 1.00 | 1.00 | - | - | 1.00 |" in text  # Infiltration: no box
    assert text == eval_markdown(result, title="perfect")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A one-epoch baseline run at 64 px on a tiny generated NIH-layout folder (shared by the module)."""
    from eval_helpers import tiny_run

    return tiny_run(tmp_path_factory.mktemp("tiny"))


def test_evaluate_run_on_a_trained_run(tiny):
    from gren.cli import main
    from gren.eval.evaluate import evaluate_run, read_split, run_data_path

    data, run = tiny
    split = read_split(run)
    n_test = int(((split["role"] == "test") & split["annotated"]).sum())
    assert main(["evaluate", "--run", str(run), "--data", str(data), "--checkpoint", "epoch_001"]) == 0
    result = json.loads((run / "eval.json").read_text())
    assert {"accuracy", "iobb", "auc", "n_boxes", "method", "fold", "n_images"} <= set(result)
    assert result["method"] == "baseline" and result["fold"] == 0 and result["n_images"] == n_test
    assert sum(result["n_boxes"].values()) == n_test  # one box per annotated image in the tiny set
    for block in ("accuracy", "iobb"):
        for values in result[block].values():
            assert all(v is None or 0.0 <= v <= 1.0 for v in values.values())
    assert (run / "eval.md").read_text().startswith("# Evaluation: baseline")

    heldout = evaluate_run(run, data=data, auc_images="heldout", progress=False, write=False)
    assert heldout["n_images_auc"] > heldout["n_images"] and heldout["n_boxes"] == result["n_boxes"]

    from gren.core.errors import GrenError
    from gren.eval.evaluate import read_run_config

    with pytest.raises(GrenError, match="epoch_009"):
        evaluate_run(run, data=data, checkpoint="epoch_009", progress=False)
    if run_data_path(read_run_config(run)) is None:  # the run does not record its data: --data is needed
        with pytest.raises(GrenError, match="--data"):
            evaluate_run(run, progress=False)
    with pytest.raises(GrenError, match="not a training run"):
        evaluate_run(data, data=data, progress=False)


def test_crossval_on_a_raw_folder_with_the_real_engine(tiny, tmp_path):
    from eval_helpers import TINY_OVERRIDES
    from gren.eval.crossval import run_crossval

    data, _ = tiny  # a raw NIH-layout folder (prepared once into data/.gren_cache on first use)
    summary = run_crossval(data, "baseline", tmp_path / "cv", protocol="0.5_0.8", folds=5, only_folds=[0, 1],
                           overrides=TINY_OVERRIDES, progress=False)
    assert summary["trained"] == [("baseline", 0), ("baseline", 1)]
    assert [r["fold"] for r in summary["results"]["baseline"]] == [0, 1]
    table = (tmp_path / "cv" / "table.md").read_text()
    assert "| 0.1 | baseline |" in table and "±" in table
    again = run_crossval(data, "baseline", tmp_path / "cv", protocol="0.5_0.8", folds=5, only_folds=[0, 1],
                         overrides=TINY_OVERRIDES, progress=False)
    assert again["trained"] == [] and len(again["skipped"]) == 2


def test_hash_similarities_hand_computed():
    import numpy as np

    from gren.eval.report import hash_similarities

    hashes = np.zeros((3, 2, 64), dtype=bool)
    hashes[1, 0, :16] = True  # image 1: right lung differs from image 0's in 16 bits, left lung equal
    hashes[2, :, :] = True  # image 2: both lungs differ from image 0's in all 64 bits
    inter, intra = hash_similarities(hashes)
    assert np.allclose(inter, [[1, 1 - 8 / 64, 0], [1 - 8 / 64, 1, 1 - 56 / 64], [0, 1 - 56 / 64, 1]])
    assert np.allclose(intra, [1, 1 - 16 / 64, 1])


def test_report_writes_the_three_figures(tiny, tmp_path):
    import shutil

    import numpy as np

    from gren.cli import main

    data, run = tiny
    curves_only = tmp_path / "curves_only"
    shutil.copytree(run, curves_only, ignore=shutil.ignore_patterns("checkpoints"))
    out = tmp_path / "figures"
    assert main(["report", "--runs", str(run), str(curves_only), "--out", str(out), "--images", "3"]) == 0
    written = sorted(p.name for p in out.glob("*.png"))
    assert written == ["hash_similarity.png", "localization.png", "training_curves.png"], written
    from PIL import Image

    for name in written:
        with Image.open(out / name) as figure:
            levels = np.unique(np.asarray(figure.convert("L")))
            assert min(figure.size) > 200 and len(levels) > 10  # not blank
    assert main(["report", "--runs", str(tmp_path / "missing"), "--out", str(out)]) == 2


def _crossval_three(data, out, overrides):
    from gren.eval.crossval import run_crossval

    return run_crossval(data, "baseline,gren,cam", out, protocol="0.5_0.8", folds=5, only_folds=[0],
                        overrides=[*overrides, "cam.channels=16"], progress=False)


def test_crossval_baseline_gren_cam_and_cams_auc_comes_from_its_classifier(tiny, tmp_path):
    import numpy as np
    from sklearn.metrics import roc_auc_score

    from eval_helpers import TINY_OVERRIDES
    from gren.data.cache import CacheDataset
    from gren.data.source import open_prepared
    from gren.eval.evaluate import read_split
    from gren.methods import load_run

    data, _ = tiny
    summary = _crossval_three(data, tmp_path / "cv", TINY_OVERRIDES)
    assert summary["trained"] == [("baseline", 0), ("gren", 0), ("cam", 0)]
    table = (tmp_path / "cv" / "table.md").read_text()
    assert all(f"| {m} |" in table for m in ("baseline", "gren", "cam"))
    cam_eval = summary["results"]["cam"][0]
    assert "wang" in cam_eval and "wang" not in summary["results"]["baseline"][0]
    assert cam_eval["cell_threshold"] == pytest.approx(180 / 255, abs=1e-5)
    assert summary["results"]["baseline"][0]["cell_threshold"] == 0.5
    # CAM's AUC is that of its classifier's probabilities on the same images (not of its normalised maps)
    run = tmp_path / "cv" / "cam" / "fold_0"
    method, config = load_run(run)
    split = read_split(run)
    test_ids = split.loc[(split["role"] == "test") & split["annotated"], "image_id"].tolist()
    dataset = CacheDataset(open_prepared(data, size=64, lungs="masks"), test_ids)
    images = torch.stack([dataset[i]["image"] for i in range(len(dataset))])
    labels = np.stack([dataset[i]["labels"].numpy() for i in range(len(dataset))])
    scores = method.predict(images).scores.numpy()
    both = [k for k in range(len(LABELS)) if 0 < labels[:, k].sum() < len(labels)]
    assert both, "the tiny test fold should have a label with positives and negatives"
    for k in both:
        assert cam_eval["auc"][LABELS[k]] == pytest.approx(roc_auc_score(labels[:, k], scores[:, k]))


@pytest.mark.slow
@pytest.mark.realdata
def test_crossval_baseline_gren_cam_on_the_real_nih_sample(nih_dir, tmp_path, monkeypatch):
    from eval_helpers import TINY_OVERRIDES

    monkeypatch.setenv("GREN_CACHE_DIR", str(tmp_path / "user-cache"))  # ../shared is read-only in CI
    overrides = [o for o in TINY_OVERRIDES if not o.startswith("data.lungs=")] + ["data.lungs=classical"]
    summary = _crossval_three(nih_dir, tmp_path / "cv", overrides)
    assert [m for m, _ in summary["trained"]] == ["baseline", "gren", "cam"]
    for method in ("baseline", "gren", "cam"):
        result = summary["results"][method][0]
        assert result["n_images"] > 100 and sum(result["n_boxes"].values()) > 100
        assert result["auc"]["mean"] is not None


def test_evaluate_with_the_published_test_time_upsampling_keeps_both_results(tiny, tmp_path):
    import shutil

    from gren.eval.evaluate import evaluate_run

    data, trained = tiny
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    plain = evaluate_run(run, data=data, progress=False)
    upsampled = evaluate_run(run, data=data, progress=False, predict_upsample=4)
    assert plain["predict_upsample"] == 1 and upsampled["predict_upsample"] == 4
    assert (run / "eval.json").is_file() and (run / "eval-upsample4.json").is_file()
    assert read_eval(run / "eval.json")["predict_upsample"] == 1  # not replaced
    assert upsampled["n_boxes"] == plain["n_boxes"]
    with pytest.raises(Exception, match="predict-upsample"):
        evaluate_run(run, data=data, progress=False, predict_upsample=0)
