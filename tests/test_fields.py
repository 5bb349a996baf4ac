"""Per-image cache fields declared by methods: registry, extension of an existing cache, collate, training."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from gren.core.errors import DataError
from gren.core.fields import FIELDS, CacheField, register_field
from gren.data.cache import CacheDataset, PreparedCache
from gren.data.dataset import collate
from gren.data.fields import ensure_fields, extend_cache, fields_needed_by
from gren.data.prepare import prepare_cache
from test_cache import make_nih_folder

SIZE = 32


def mean_intensity(images: np.ndarray, masks: np.ndarray) -> list[np.ndarray]:
    return [np.array(image.mean(), dtype=np.float32) for image in images]


def bright_rows(images: np.ndarray, masks: np.ndarray) -> list[np.ndarray]:
    """Ragged: (row index, count of pixels > 200) for each image row with any such pixel."""
    out = []
    for image in images:
        counts = (image > 200).sum(axis=1)
        rows = np.flatnonzero(counts)
        out.append(np.stack([rows, counts[rows]], axis=1).astype(np.int16))
    return out


TEST_FIELDS = (CacheField("test_mean", np.dtype(np.float32), (), compute=mean_intensity),
               CacheField("test_bright_rows", np.dtype(np.int16), (2,), ragged=True, compute=bright_rows))


@pytest.fixture
def fields():
    for field in TEST_FIELDS:
        register_field(field)
    yield TEST_FIELDS
    for field in TEST_FIELDS:
        FIELDS.pop(field.name, None)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    raw = make_nih_folder(tmp_path_factory.mktemp("raw"))
    out = tmp_path_factory.mktemp("cache") / "cache"
    prepare_cache(raw, out, size=SIZE, lungs="masks", workers=0, progress=False)
    return raw, out


def test_builtin_fields_and_their_kinds():
    assert FIELDS["boxes"].ragged and FIELDS["box_labels"].ragged and not FIELDS["image"].ragged
    assert all(FIELDS[n].builtin for n in ("image", "labels", "lung_masks", "lung_hashes", "lung_fallback"))
    with pytest.raises(ValueError, match="registered twice"):
        register_field(CacheField("boxes", np.dtype(np.float64), (4,)))


def test_an_existing_cache_is_extended_not_rebuilt(fields, prepared, tmp_path):
    import shutil

    _, source = prepared
    cache_dir = tmp_path / "cache"
    shutil.copytree(source, cache_dir)
    before = {p.name: p.stat().st_mtime_ns for p in cache_dir.iterdir() if p.suffix == ".npy"}
    added = extend_cache(cache_dir, ["test_mean", "test_bright_rows"], progress=False)
    assert added == ["test_mean", "test_bright_rows"]
    after = {p.name: p.stat().st_mtime_ns for p in cache_dir.iterdir() if p.suffix == ".npy"}
    assert {k: after[k] for k in before} == before  # nothing of the cache was rewritten
    assert {"test_mean.npy", "test_bright_rows.values.npy", "test_bright_rows.offsets.npy"} <= set(after)
    assert extend_cache(cache_dir, ["test_mean"], progress=False) == []  # already there: no work
    cache = PreparedCache(cache_dir)
    assert cache.extra_fields == ["test_bright_rows", "test_mean"]
    images = np.asarray(cache.images)
    for row in range(len(cache)):
        assert cache.field("test_mean", row) == pytest.approx(images[row].mean())
        np.testing.assert_array_equal(cache.field("test_bright_rows", row), bright_rows(images[row:row + 1], None)[0])
    # items carry the fields; collate stacks the fixed one and keeps the ragged one as a list
    items = [CacheDataset(cache)[i] for i in range(3)]
    batch = collate(items)
    assert batch["test_mean"].shape == (3,) and isinstance(batch["test_bright_rows"], list)
    assert [len(rows) for rows in batch["test_bright_rows"]] == [len(item["test_bright_rows"]) for item in items]
    assert isinstance(batch["boxes"], list) and batch["image"].shape == (3, 1, SIZE, SIZE)


def test_unknown_and_misdeclared_fields_are_clear_errors(fields, prepared, tmp_path):
    import shutil

    _, source = prepared
    cache_dir = tmp_path / "cache"
    shutil.copytree(source, cache_dir)
    with pytest.raises(DataError, match="unknown cache field"):
        extend_cache(cache_dir, ["nope"], progress=False)
    register_field(CacheField("test_wrong", np.dtype(np.float32), (3,), compute=mean_intensity))
    try:
        with pytest.raises(DataError, match="test_wrong: a row of shape"):
            extend_cache(cache_dir, ["test_wrong"], progress=False)
        assert "test_wrong" not in PreparedCache(cache_dir).extra_fields  # the cache is as it was
    finally:
        FIELDS.pop("test_wrong")
    with pytest.raises(DataError, match="no cache field 'test_mean'"):
        PreparedCache(cache_dir).field("test_mean", 0)


def test_training_a_method_that_needs_a_field_extends_the_cache(fields, prepared, tmp_path, monkeypatch):
    import shutil

    from gren.methods import register_method, unregister_method
    from gren.methods.grid_mil import GridMILMethod
    from gren.train.config import resolve_config
    from gren.train.engine import open_training_data

    _, source = prepared
    cache_dir = tmp_path / "cache"
    shutil.copytree(source, cache_dir)

    class NeedsMean(GridMILMethod):
        needs = GridMILMethod.needs | {"test_mean"}

    register_method("test-needs-mean")(NeedsMean)
    try:
        assert fields_needed_by(["test-needs-mean", "baseline"]) == ["test_mean"]
        config = resolve_config(None, [f"data.size={SIZE}", "data.protocol=1.0_0.6", "data.folds=2"],
                                method="test-needs-mean")
        data = open_training_data(cache_dir, config, tmp_path / "run")
        assert "test_mean" in data.dataset[0] and "test_mean" in PreparedCache(cache_dir).extra_fields
        # a read-only cache that lacks the field: the exact command to run, no traceback
        readonly = tmp_path / "readonly"
        shutil.copytree(source, readonly)
        monkeypatch.setattr(os, "access", lambda path, mode: False)
        with pytest.raises(DataError, match=r"gren prepare --data .* --fields test_mean"):
            ensure_fields(PreparedCache(readonly), ["test_mean"])
    finally:
        unregister_method("test-needs-mean")


def test_cli_prepare_fields(fields, prepared, tmp_path, capsys):
    from gren.cli import main

    raw, _ = prepared
    out = tmp_path / "cache"
    assert main(["-q", "prepare", "--data", str(raw), "--out", str(out), "--size", str(SIZE), "--lungs", "masks",
                 "--workers", "0", "--fields", "test_mean"]) == 0
    assert "extra fields     test_mean (test_mean added now)" in capsys.readouterr().out
    assert torch.is_tensor(CacheDataset(PreparedCache(out))[0]["test_mean"])


def test_training_from_a_cache_reads_its_metadata_once(prepared, tmp_path, monkeypatch):
    from gren.data import cache_format
    from gren.train.config import resolve_config
    from gren.train.engine import open_training_data

    _, cache_dir = prepared
    calls = []
    original = cache_format.read_meta

    def counting(path):
        calls.append(path)
        return original(path)

    monkeypatch.setattr(cache_format, "read_meta", counting)
    config = resolve_config(None, [f"data.size={SIZE}", "data.protocol=1.0_0.6", "data.folds=2"], method="gren")
    open_training_data(cache_dir, config, tmp_path / "run")
    assert len(calls) == 1, calls
