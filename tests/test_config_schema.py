"""The typed config schema (GREN issue 15 item 4): every bad value is one clear line and exit 2 before any
data is read; the defaults, the bundled configs and every registered method pass their own schema; a
method declares rules for its own keys; predict's and evaluate's options are checked too."""

from __future__ import annotations

import logging

import pytest
import torch

from gren.cli import main
from gren.core.errors import GrenError
from gren.core.schema import Rule
from gren.methods.baseline import Baseline as BaselineMethod
from gren.methods.registry import discover, register_method, unregister_method
from gren.train.config import (
    SCHEMA,
    bundled_configs,
    config_schema,
    default_config,
    flat_keys,
    method_schema,
    resolve_config,
)
from robustness_helpers import make_dataset, snapshot

# (override, what the message must say): each was a traceback or passed silently before the schema.
BAD_OVERRIDES = [
    ("train.batch_size=0", r"train.batch_size must be a whole number >= 1, got 0"),
    ("optim.lr=-0.01", r"optim.lr must be a number > 0, got -0.01"),
    ("device.device=foo", r"device.device=foo: expected auto, cpu, cuda or cuda:N"),
    ("train.epochs=[1,2]", r"train.epochs takes a single value, not a list"),
    ("graph.form=bogus", r"graph.form must be one of pull, paper, contrastive, got bogus"),
    ("data.workers=-1", r"data.workers must be a whole number >= 0, got -1"),
    ("train.epochs=1.5", r"train.epochs must be a whole number >= 1, got 1.5 \(not a whole number\)"),
    ("train.epochs=-1", r"train.epochs must be a whole number >= 1, got -1"),
    ("optim.lr=true", r"optim.lr must be a number > 0, got true"),
    ("device.amp=fp16", r"device.amp must be one of bf16, none, got fp16"),
    ("optim.lr=nan", r"optim.lr must be a number > 0, got nan \(not a finite number\)"),
    ("optim.lr=.inf", r"optim.lr must be a number > 0, got inf \(not a finite number\)"),
    ("optim.momentum=1.5", r"optim.momentum must be a number >= 0 and < 1, got 1.5"),
    ("model.output_stride=12", r"model.output_stride must be one of 8, 16, 32, got 12"),
    ("model.backbone=resnet9", r"model.backbone=resnet9: expected one of resnet18, resnet34, resnet50 or timm:NAME"),
    ("data.protocol=1.5_0.2", r"X \(unannotated fraction\) = 1.5 is not in \[0, 1\]"),
    ("data.split_by=hospital", r"data.split_by must be one of patient, image, got hospital"),
    ("data.annotated_fraction=2", r"data.annotated_fraction must be a number >= 0 and <= 1 or null, got 2"),
    ("data.fold=7", r"data.fold 7 out of range: data.folds is 5"),
    ("train.max_steps_per_epoch=0", r"train.max_steps_per_epoch must be a whole number >= 1 or null, got 0"),
    ("device.compile=maybe", r"device.compile must be true or false, got maybe"),
    ("seed=-3", r"seed must be a whole number >= 0, got -3"),
    ("model.weights=/no/such/weights.pt", r"/no/such/weights.pt not found"),
    ("loss.beta=-1", r"loss.beta must be a number >= 0, got -1"),
    ("graph.lambda_intra=nan", r"graph.lambda_intra must be a number >= 0, got nan"),
]


@pytest.mark.parametrize("override, message", BAD_OVERRIDES)
def test_bad_values_are_refused_when_the_config_is_resolved(override, message):
    with pytest.raises(GrenError, match=message) as caught:
        resolve_config(None, [override], method="gren")
    assert "\n" not in str(caught.value) and override in str(caught.value) or "data.fold" in override


@pytest.fixture(scope="module")
def raw_data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("schema") / "data", n=12, size=40)


@pytest.mark.parametrize("extra, message", [
    *[([override], message) for override, message in BAD_OVERRIDES[:12]],
    (["--protocol", "2_0.5"], r"--protocol 2_0.5: .*X \(unannotated fraction\) = 2 is not in \[0, 1\]"),
    (["--fold", "9"], r"data.fold 9 out of range: data.folds is 5"),
])
def test_gren_train_stops_before_any_data_is_read(raw_data, tmp_path, caplog, extra, message):
    """One error line, exit 2, and nothing written: no cache in the data folder, no run folder."""
    before = snapshot(raw_data, skip=())
    caplog.set_level(logging.ERROR)
    out = tmp_path / "run"
    argv = ["train", "--data", str(raw_data), "--method", "gren", "--out", str(out), *extra]
    assert main(argv) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "\n" not in errors[0], errors
    import re

    assert re.search(message, errors[0]), errors[0]
    assert snapshot(raw_data, skip=()) == before  # not even .gren_cache
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_asked_for_without_cuda_stops_before_the_data(raw_data, tmp_path, caplog):
    before = snapshot(raw_data, skip=())
    caplog.set_level(logging.ERROR)
    assert main(["train", "--data", str(raw_data), "--method", "baseline", "--out", str(tmp_path / "r"),
                 "device.device=cuda"]) == 2
    assert "CUDA is not available" in caplog.text
    assert snapshot(raw_data, skip=()) == before and not (tmp_path / "r").exists()


def test_a_config_file_with_a_bad_value_names_the_file(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("train:\n  epochs: 1.5\n")
    with pytest.raises(GrenError, match=r"mine.yaml: train.epochs must be a whole number >= 1, got 1.5"):
        resolve_config(path, method="baseline")
    path.write_text("optim:\n  lr: .nan\n")
    with pytest.raises(GrenError, match=r"mine.yaml: optim.lr .* got nan"):
        resolve_config(path, method="baseline")


def test_good_values_are_converted_as_before():
    config = resolve_config("cpu-small", ["optim.lr=1e-2", "train.epochs=2.0", "data.annotated_fraction=null",
                                          "train.max_steps_per_epoch=None", "model.weights=none", "data.protocol=all",
                                          "device.device=cuda:1", "data.lungs=masks"], method="gren")
    assert config["optim"]["lr"] == 0.01 and isinstance(config["optim"]["lr"], float)
    assert config["train"]["epochs"] == 2 and isinstance(config["train"]["epochs"], int)
    assert config["data"]["annotated_fraction"] is None and config["train"]["max_steps_per_epoch"] is None
    assert config["data"]["protocol"] == "all" and config["device"]["device"] == "cuda:1"
    assert resolve_config(None, ["optim.momentum=0"])["optim"]["momentum"] == 0.0


@pytest.mark.parametrize("method", sorted(discover()))
def test_every_method_passes_its_own_schema_with_every_bundled_config(method):
    for name in bundled_configs():
        resolve_config(None if name == "default" else name, method=method)
    defaults = flat_keys(default_config(method))
    stale = [key for key in config_schema(method) if key not in defaults]
    assert not stale, f"schema rules for keys that {method}'s config does not have: {stale}"


def test_shared_rules_name_shared_keys():
    assert set(SCHEMA) <= set(flat_keys(default_config(None)))


def test_a_method_declares_rules_for_its_own_keys_and_subclasses_inherit_them():
    class Tuned(BaselineMethod):
        defaults = {"tuned": {"mode": "fast", "weight": 0.5, "steps": 3}}
        schema = {"tuned.mode": Rule(choices=("fast", "exact")), "tuned.weight": Rule(ge=0)}

    class Stricter(Tuned):
        schema = {"tuned.steps": Rule(ge=2), "train.batch_size": Rule(ge=2)}  # may tighten a shared key too

    register_method("tuned-test")(Tuned)
    register_method("stricter-test")(Stricter)
    try:
        assert set(method_schema(Stricter)) == {"loss.beta", "loss.mil_rescale", "tuned.mode", "tuned.weight",
                                                "tuned.steps", "train.batch_size"}
        assert resolve_config(None, ["tuned.mode=exact", "tuned.steps=4"], method="stricter-test")["tuned"] == \
            {"mode": "exact", "weight": 0.5, "steps": 4}
        with pytest.raises(GrenError, match="tuned.mode must be one of fast, exact, got slow"):
            resolve_config(None, ["tuned.mode=slow"], method="tuned-test")
        with pytest.raises(GrenError, match=r"tuned.steps must be a whole number, got 2.5"):  # type from the default
            resolve_config(None, ["tuned.steps=2.5"], method="tuned-test")
        with pytest.raises(GrenError, match=r"tuned.steps must be a whole number >= 2, got 1"):
            resolve_config(None, ["tuned.steps=1"], method="stricter-test")
        with pytest.raises(GrenError, match=r"train.batch_size must be a whole number >= 2, got 1"):
            resolve_config(None, ["train.batch_size=1"], method="stricter-test")
        assert resolve_config(None, ["train.batch_size=1"], method="tuned-test")["train"]["batch_size"] == 1
        with pytest.raises(GrenError, match="tuned.weight must be a number >= 0"):  # method=None: every method's
            resolve_config(None, ["tuned.weight=-1"])
    finally:
        unregister_method("tuned-test")
        unregister_method("stricter-test")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from eval_helpers import tiny_run

    return tiny_run(tmp_path_factory.mktemp("tiny_schema"))


@pytest.mark.parametrize("option, message", [
    (["--top-k", "-1"], "--top-k must be a whole number >= 1, got -1"),
    (["--top-k", "0"], "--top-k must be a whole number >= 1, got 0"),
    (["--threshold", "nan"], "--threshold must be a finite number"),
    (["--threshold", "inf"], "--threshold must be a finite number"),
    (["--class-threshold", "1.5"], "--class-threshold must be a probability in [0, 1], got 1.5"),
    (["--class-threshold", "nan"], "--class-threshold must be a probability in [0, 1], got nan"),
])
def test_predict_options_are_checked_before_any_work(tiny, tmp_path, caplog, option, message):
    data, run = tiny
    image = sorted((data / "images").glob("*.png"))[0]
    before = snapshot(data)
    caplog.set_level(logging.ERROR)
    out = tmp_path / "pred"
    assert main(["predict", str(image), "--run", str(run), "--out", str(out), *option]) == 2
    assert message in caplog.text
    assert not out.exists() and snapshot(data) == before


def test_evaluate_batch_size_must_be_positive(tiny, capsys):
    _, run = tiny
    with pytest.raises(SystemExit) as exit_:
        main(["evaluate", "--run", str(run), "--batch-size", "0"])
    assert exit_.value.code == 2 and "expected a whole number >= 1, got 0" in capsys.readouterr().err
