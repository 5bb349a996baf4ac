"""Training options: data.augment (lung-safe augmentation, off by default), the validation split carved from the
training fold (metrics every epoch, best.pt only when asked), TensorBoard hyperparameters without stray runs."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from _train_fakes import FakeLesionDataset, small_config
from eval_helpers import TINY_OVERRIDES, make_tiny_dataset, tiny_run
from gren.core.checkpoint import load_checkpoint
from gren.core.errors import GrenError
from gren.train.engine import TrainingData, fit, open_training_data, train
from gren.train.validation import carve_validation, metric_value, parse_metric


def _config(*overrides):
    from gren.train.config import resolve_config

    config = resolve_config(None, [*TINY_OVERRIDES, *overrides], method="baseline")
    config["method"] = "baseline"
    return config


def _lines(run):
    return [json.loads(s) for s in (run / "metrics.jsonl").read_text().splitlines() if s.strip()]


def test_augmentation_is_off_by_default_and_applied_when_asked(tmp_path):
    data = make_tiny_dataset(tmp_path / "data", n=32, size=96)
    plain = open_training_data(data, _config(), tmp_path / "plain")
    assert plain.dataset.augment is None
    torch.manual_seed(0)
    first = plain.dataset[0]["image"]
    torch.manual_seed(1)
    assert torch.equal(first, plain.dataset[0]["image"])

    augmented = open_training_data(data, _config("data.augment=true"), tmp_path / "augmented")
    from gren.data.cache import LungSafeAugment

    assert isinstance(augmented.dataset.augment, LungSafeAugment)
    epochs = []
    for epoch in range(2):  # what two epochs' loaders draw for the same image
        torch.manual_seed(100 + epoch)
        epochs.append(augmented.dataset[0])
    assert not torch.equal(epochs[0]["image"], epochs[1]["image"])
    assert not torch.equal(epochs[0]["image"], first)
    for item in epochs:  # never flipped: the patient's right lung (mask 1) stays on the image left
        columns = torch.nonzero(item["lung_masks"] == 1)[:, 1].float().mean()
        assert columns < item["lung_masks"].shape[1] / 2
    with pytest.raises(GrenError, match="data.augment"):
        open_training_data(data, _config("data.augment=maybe"), tmp_path / "bad")


def test_validation_split_by_patient_from_the_annotated_training_images():
    rows = pd.DataFrame({
        "image_id": [f"{i:08d}_{j:03d}" for i in range(20) for j in range(2)],
        "patient_id": [str(i) for i in range(20) for _ in range(2)],
        "annotated": [i % 2 == 0 and j == 0 for i in range(20) for j in range(2)],  # 10 annotated images
    })
    training, validation = carve_validation(rows, 0.3, seed=0)
    assert len(validation) == 3 and validation["annotated"].all()
    assert not set(validation["patient_id"]) & set(training["patient_id"])  # a patient is on one side only
    assert len(training) == len(rows) - 2 * 3  # the held-out patients' label-only images leave training too
    again, _ = carve_validation(rows, 0.3, seed=0)
    assert again["image_id"].tolist() == training["image_id"].tolist()
    others = {tuple(sorted(carve_validation(rows, 0.3, seed=s)[1]["image_id"])) for s in range(5)}
    assert len(others) > 1  # the seed decides
    unchanged, none = carve_validation(rows, 0.0, seed=0)
    assert unchanged is rows and none.empty
    by_image, held = carve_validation(rows, 0.3, seed=0, split_by="image")
    assert len(held) == 3 and len(by_image) == len(rows) - 3
    with pytest.raises(GrenError, match="validation.fraction"):
        carve_validation(rows, 1.0, seed=0)
    assert parse_metric("accuracy@0.5") == ("accuracy", "0.5") and parse_metric("auc") == ("auc", None)
    with pytest.raises(GrenError, match="validation.metric"):
        parse_metric("accuracy@0.2")
    assert metric_value({"accuracy_mean": {"0.1": 0.25}}, "accuracy@0.1") == 0.25


def test_validation_every_epoch_best_checkpoint_and_tensorboard(tmp_path):
    data = make_tiny_dataset(tmp_path / "data", n=32, size=96)
    run = tmp_path / "run"
    history = train(data, "baseline", run, protocol="0.5_0.8", fold=0,
                    overrides=[*TINY_OVERRIDES, "train.epochs=3", "validation.fraction=0.4", "validation.every=2",
                               "validation.select=true", "validation.metric=auc", "data.augment=true"])
    held = pd.read_csv(run / "validation.csv", dtype=str)
    split = pd.read_csv(run / "split.csv", dtype=str)
    roles = split.set_index("image_id").loc[held["image_id"], "role"]
    assert len(held) > 0 and (roles == "train").all()  # from the training fold, never the test fold
    lines = _lines(run)
    assert [("validation" in line) for line in lines] == [False, True, True]  # every 2 epochs, and the last
    summary = lines[1]["validation"]
    assert set(summary["accuracy_mean"]) == {"0.1", "0.3", "0.5", "0.7"} and 0 <= summary["auc_mean"] <= 1
    assert summary["n_images"] == len(held) and [line["epoch"] for line in history] == [1, 2, 3]
    best = load_checkpoint(run / "checkpoints" / "best.pt")
    aucs = {line["epoch"]: line["validation"]["auc_mean"] for line in lines if "validation" in line}
    assert best["epoch"] == max(aucs, key=lambda e: (aucs[e], -e)) and best["validation"]["metric"] == "auc"
    from gren.eval.evaluate import evaluate_run

    result = evaluate_run(run, checkpoint="best", progress=False, write=False)
    assert result["checkpoint"].endswith("best.pt")

    assert not [p for p in (run / "tb").iterdir() if p.is_dir()]  # hparams written into tb/, no stray run folder
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tb"), size_guidance={"tensors": 0}).Reload()
    assert [s.step for s in events.Scalars("validation/auc_mean")] == [2, 3]
    hparams = events.PluginTagToContent("hparams")
    assert b"optim.lr" in hparams["_hparams_/experiment"] and b"validation.fraction" in hparams["_hparams_/experiment"]
    assert b"validation/auc_mean" in hparams["_hparams_/experiment"]  # the metrics it charts
    assert "config/text_summary" in events.Tags()["tensors"]


def test_no_validation_by_default(tmp_path):
    _, run = tiny_run(tmp_path)
    assert not (run / "validation.csv").exists() and not (run / "checkpoints" / "best.pt").exists()
    assert all("validation" not in line for line in _lines(run))


def test_validation_keeps_resume_bit_exact(tmp_path):
    def config(epochs):
        cfg = small_config(train={"epochs": epochs, "batch_size": 4, "max_steps_per_epoch": 2},
                           optim={"lr": 0.01}, validation={"fraction": 0.5, "batch_size": 3})
        cfg["method"] = "baseline"
        return cfg

    dataset = FakeLesionDataset(n=12, size=64, n_annotated=4)
    validation = FakeLesionDataset(n=6, size=64, n_annotated=6, seed=3)
    data = TrainingData(dataset, dataset.annotated, dataset.unannotated, validation=validation)
    straight = fit(config(2), tmp_path / "straight", data)
    fit(config(1), tmp_path / "resumed", data)
    torch.manual_seed(999)
    resumed = fit(config(2), tmp_path / "resumed", data, resume=True)
    a = load_checkpoint(tmp_path / "straight" / "checkpoints" / "last.pt")["model"]
    b = load_checkpoint(tmp_path / "resumed" / "checkpoints" / "last.pt")["model"]
    assert all(torch.equal(v, b[k]) for k, v in a.items())
    assert [line["validation"] for line in straight] == [line["validation"] for line in resumed]
    assert all(line["validation"]["n_boxes"] == 6 for line in straight)
    # validation consumes no training randomness: the weights equal a run without validation
    plain = TrainingData(dataset, dataset.annotated, dataset.unannotated)
    fit(config(2), tmp_path / "plain", plain)
    c = load_checkpoint(tmp_path / "plain" / "checkpoints" / "last.pt")["model"]
    assert all(torch.equal(v, c[k]) for k, v in a.items())
    assert np.isfinite(straight[-1]["loss"]["total"])
