"""Participation protocols X_Y and K folds: invariants on the real records and on generated ones."""

from __future__ import annotations

import json
import logging

import numpy as np
import pandas as pd
import pytest

from gren.cli import main as gren_main
from gren.core.errors import DataError, GrenError
from gren.data.splits import (
    make_folds,
    parse_protocol,
    read_fold_csv,
    split_summary,
    write_fold_csv,
)
from nih_helpers import cached_index


@pytest.fixture(scope="module")
def real_records(nih_dir):
    return cached_index(str(nih_dir)).records


def synthetic_records(n_patients=120, seed=0) -> pd.DataFrame:
    """Patients with 1-6 images; about a third of the patients have box images."""
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(n_patients):
        has_boxes = rng.random() < 0.35
        for k in range(int(rng.integers(1, 7))):
            rows.append((f"{p:08d}_{k:03d}", str(p), bool(has_boxes and rng.random() < 0.7)))
    return pd.DataFrame(rows, columns=["image_id", "patient_id", "annotated"])


def _sets(fold, role, annotated=None):
    rows = fold[fold["role"] == role]
    if annotated is not None:
        rows = rows[rows["annotated"] == annotated]
    return rows


def check_patient_separation(fold):
    train_patients = set(_sets(fold, "train")["patient_id"])
    test_patients = set(_sets(fold, "test")["patient_id"])
    assert not train_patients & test_patients
    assert not set(_sets(fold, "train", annotated=False)["patient_id"]) & test_patients
    assert not _sets(fold, "test", annotated=False).shape[0]  # only annotated images are tested


@pytest.mark.realdata
def test_real_0_5_0_8_five_folds(real_records):
    folds = make_folds(real_records, "0.5_0.8", folds=5, seed=0)
    assert len(folds) == 5
    annotated = real_records["annotated"].to_numpy()
    max_patient_images = real_records.groupby("patient_id").size().max()
    tested = np.zeros(len(real_records), dtype=int)
    for fold in folds:
        assert fold["image_id"].tolist() == real_records["image_id"].tolist()
        check_patient_separation(fold)
        tested += (fold["role"] == "test").to_numpy()
        n_train_annotated = len(_sets(fold, "train", annotated=True))
        assert abs(n_train_annotated - 0.8 * annotated.sum()) <= max_patient_images
        sampled = len(_sets(fold, "train", annotated=False)) + fold.attrs["dropped_test_patient"]
        assert abs(sampled - 0.5 * (~annotated).sum()) <= max_patient_images
        assert set(fold["role"]) <= {"train", "test", "unused"}
    assert (tested[annotated] == 1).all()  # every annotated image tested exactly once
    assert (tested[~annotated] == 0).all()


@pytest.mark.realdata
def test_real_split_cli(nih_dir, tmp_path):
    out = tmp_path / "split"
    argv = ["data", "split", "--data", str(nih_dir), "--protocol", "1.0_0.4", "--folds", "5", "--seed", "3"]
    assert gren_main([*argv, "--out", str(out)]) == 0
    summary = json.loads((out / "split.json").read_text())
    assert summary["protocol"] == "1.0_0.4" and summary["annotated_images"] == 640
    assert summary["times_tested"] == {"3": 640}  # 2 of 5 groups train, 3 test
    fold = read_fold_csv(out / "fold_4.csv")
    assert len(fold) == 2_220 and fold["annotated"].sum() == 640
    check_patient_separation(fold)
    assert gren_main([*argv, "--out", str(out), "--protocol", "0.8"]) == 2


def test_deterministic_from_seed():
    records = synthetic_records()
    a = make_folds(records, "0.5_0.8", folds=5, seed=7)
    b = make_folds(records, "0.5_0.8", folds=5, seed=7)
    c = make_folds(records, "0.5_0.8", folds=5, seed=8)
    for x, y in zip(a, b):
        pd.testing.assert_frame_equal(x, y)
    assert any(not x["role"].equals(z["role"]) for x, z in zip(a, c))


@pytest.mark.parametrize("split_by", ["patient", "image"])
@pytest.mark.parametrize("seed", [0, 1])
def test_invariants_on_generated_records(split_by, seed):
    records = synthetic_records(seed=seed)
    folds = make_folds(records, "0.5_0.8", folds=5, seed=seed, split_by=split_by)
    annotated = records["annotated"].to_numpy()
    tested = sum((f["role"] == "test").to_numpy().astype(int) for f in folds)
    assert (tested[annotated] == 1).all() and (tested[~annotated] == 0).all()
    unit = records["patient_id"] if split_by == "patient" else records["image_id"]
    tolerance = records.groupby(unit).size().max() if split_by == "patient" else 1
    for fold in folds:
        if split_by == "patient":
            check_patient_separation(fold)
        else:
            assert fold.attrs["dropped_test_patient"] == 0
        assert abs(len(_sets(fold, "train", annotated=True)) - 0.8 * annotated.sum()) <= tolerance
        sampled = len(_sets(fold, "train", annotated=False)) + fold.attrs["dropped_test_patient"]
        assert abs(sampled - 0.5 * (~annotated).sum()) <= tolerance


def test_protocol_1_0_0_0_identical_folds(caplog):
    records = synthetic_records()
    with caplog.at_level(logging.WARNING, logger="gren.data.splits"):
        folds = make_folds(records, "1.0_0.0", folds=5, seed=0)
    assert any("identical" in r.getMessage() for r in caplog.records)
    for fold in folds[1:]:
        pd.testing.assert_frame_equal(fold, folds[0])
    fold = folds[0]
    assert (fold.loc[fold["annotated"], "role"] == "test").all()
    check_patient_separation(fold)
    test_patients = set(_sets(fold, "test")["patient_id"])
    pool = fold[~fold["annotated"]]
    assert (pool.loc[~pool["patient_id"].isin(test_patients), "role"] == "train").all()
    assert fold.attrs["dropped_test_patient"] == int(pool["patient_id"].isin(test_patients).sum())


def test_protocol_1_0_0_4_each_image_tested_three_times():
    records = synthetic_records()
    folds = make_folds(records, "1.0_0.4", folds=5, seed=0)
    tested = sum((f["role"] == "test").to_numpy().astype(int) for f in folds)
    assert (tested[records["annotated"].to_numpy()] == 3).all()


def test_non_integer_y_times_k_warns(caplog):
    with caplog.at_level(logging.WARNING, logger="gren.data.splits"):
        folds = make_folds(synthetic_records(), "0.5_0.5", folds=5, seed=0)
    assert any("Y = 0.6" in r.getMessage() for r in caplog.records)  # round(2.5) = 3 of 5 groups
    summary = split_summary(folds, "0.5_0.5", 0, "patient")
    assert summary["times_tested"] == {"2": int(synthetic_records()["annotated"].sum())}


def test_single_fold_holdout():
    records = synthetic_records()
    (fold,) = make_folds(records, "0.5_0.8", folds=1, seed=0)
    check_patient_separation(fold)
    n_annotated = int(records["annotated"].sum())
    tolerance = records.groupby("patient_id").size().max()
    assert abs(len(_sets(fold, "train", annotated=True)) - 0.8 * n_annotated) <= tolerance
    assert len(_sets(fold, "test")) > 0


@pytest.mark.parametrize(
    "text, message",
    [
        ("0.5-0.8", "not of the form X_Y"),
        ("half_0.8", "not of the form X_Y"),
        ("1.5_0.2", r"X \(unannotated fraction\) = 1.5 is not in \[0, 1\]"),
        ("0_0", "nothing to train"),
    ],
)
def test_bad_protocols(text, message):
    with pytest.raises(GrenError, match=message):
        parse_protocol(text)


def test_protocol_parsing_and_other_errors():
    assert (parse_protocol("0.5_0.8").unannotated, parse_protocol("0.5_0.8").annotated) == (0.5, 0.8)
    assert str(parse_protocol("1_0")) == "1.0_0.0" and str(parse_protocol(".25_0.75")) == "0.25_0.75"
    records = synthetic_records()
    with pytest.raises(GrenError, match="split_by"):
        make_folds(records, split_by="hospital")
    with pytest.raises(DataError, match="annotated"):
        make_folds(records.assign(annotated=False))
    with pytest.raises(DataError, match="lack column"):
        make_folds(records.drop(columns="patient_id"))
    with pytest.raises(GrenError, match="no group to test"):
        make_folds(records, "0.5_0.9", folds=5)  # round(4.5) = 5 of 5


def test_fold_csv_roundtrip_and_errors(tmp_path):
    fold = make_folds(synthetic_records(), "0.5_0.8", folds=5, seed=0)[2]
    write_fold_csv(fold, tmp_path / "fold_2.csv")
    assert (tmp_path / "fold_2.csv").read_text().splitlines()[0] == "image_id,patient_id,role,annotated"
    back = read_fold_csv(tmp_path / "fold_2.csv")
    pd.testing.assert_frame_equal(back, fold[["image_id", "patient_id", "role", "annotated"]])
    (tmp_path / "bad.csv").write_text("image_id,patient_id,role,annotated\na,1,train,yes\nb,2,validate,no\n")
    with pytest.raises(DataError, match=r"bad.csv:3: role 'validate'"):
        read_fold_csv(tmp_path / "bad.csv")
    (tmp_path / "bad2.csv").write_text("image_id,role\na,train\n")
    with pytest.raises(DataError, match=r"bad2.csv:1: missing column\(s\) patient_id, annotated"):
        read_fold_csv(tmp_path / "bad2.csv")
    (tmp_path / "bad3.csv").write_text("image_id,patient_id,role,annotated\na,1,train,maybe\n")
    with pytest.raises(DataError, match=r"bad3.csv:2: annotated 'maybe'"):
        read_fold_csv(tmp_path / "bad3.csv")
    with pytest.raises(DataError, match="not found"):
        read_fold_csv(tmp_path / "none.csv")
