"""The method protocol, for every registered method (parametrised over the registry).

A new method gets every test here by being registered; the assertions are the protocol's only
(gren.methods.protocol): the training step's losses, gradients, the test-time Localization, the batch
keys it needs, the load_run round trip, each loss weight removing exactly its part, one epoch through
the engine and the evaluator. Grid-specific checks live in tests/test_grid_methods.py.
"""

from __future__ import annotations

import copy

import pytest
import torch

from _train_fakes import FakeLesionDataset, make_item, small_config
from gren.core.checkpoint import save_checkpoint
from gren.core.errors import GrenError
from gren.core.labels import LABELS
from gren.data.dataset import collate
from gren.methods import (
    METHODS,
    Localization,
    Method,
    build_method,
    load_run,
    method_defaults,
    register_method,
)
from gren.train.config import resolve_config

NAMES = sorted(METHODS)
SIZE = 64


def fake_batch(n: int = 4, size: int = SIZE) -> dict:
    return collate([make_item(i, size, annotated=i % 2 == 0, fallback=i == 3) for i in range(n)])


BASE_OVERRIDES = ("model.backbone=resnet18", "model.output_stride=16", "model.head_hidden=32", f"data.size={SIZE}",
                  "data.workers=0", "device.device=cpu", "train.log_every=1", "cam.channels=32")


def method_config(name: str, overrides=()) -> dict:
    """The small CPU config of ``method`` (its own sections only, as ``gren train`` resolves it)."""
    return resolve_config(None, [*BASE_OVERRIDES, *overrides], method=name, foreign="drop")


def build(name: str, overrides=(), seed: int = 0) -> Method:
    torch.manual_seed(seed)
    return build_method(name, method_config(name, overrides))


@pytest.mark.parametrize("name", NAMES)
def test_forward_returns_a_finite_total_that_is_the_sum_of_its_parts(name):
    method = build(name)
    assert method.name == name and isinstance(method, Method)
    parts = method(fake_batch())
    assert "total" in parts and len(parts) >= 2, "forward must return total and at least one named part"
    assert all(v.dim() == 0 and torch.isfinite(v) for v in parts.values())
    named = sum(v for k, v in parts.items() if k != "total")
    torch.testing.assert_close(parts["total"], named, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_gradients_reach_every_trainable_parameter(name):
    method = build(name)
    method(fake_batch())["total"].backward()
    missing = [n for n, p in method.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"no gradient reaches {missing[:5]}"
    grads = [p.grad for p in method.parameters() if p.requires_grad]
    assert all(torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("name", NAMES)
def test_the_fake_batch_provides_what_the_method_needs(name):
    method = build(name)
    assert {"image", "labels"} <= set(method.needs) <= set(fake_batch(2))


@pytest.mark.parametrize("name", NAMES)
def test_localize_shapes_ranges_and_threshold(name):
    method = build(name)
    images = fake_batch()["image"]
    method.train()
    loc = method.predict(images)
    assert method.training, "predict must restore the training mode"
    assert isinstance(loc, Localization) and tuple(loc.labels) == LABELS
    batch, classes, h, w = loc.maps.shape
    assert (batch, classes) == (4, len(LABELS)) and h >= 1 and w >= 1 and SIZE % h == 0 and SIZE % w == 0
    assert tuple(loc.scores.shape) == (4, len(LABELS))
    assert torch.isfinite(loc.maps).all() and ((loc.scores >= 0) & (loc.scores <= 1)).all()
    limits = loc.thresholds()
    assert tuple(limits.shape) == (4, len(LABELS)) and torch.isfinite(limits).all()
    assert loc.positive().shape == loc.maps.shape
    if not method.localize_needs_grad:
        assert not loc.maps.requires_grad and not loc.scores.requires_grad
    if loc.evidence is not None:  # strictly increasing with the scores: same ranking
        order = torch.argsort(loc.evidence.flatten())
        assert (loc.scores.flatten()[order].diff() >= 0).all()


@pytest.mark.parametrize("name", NAMES)
def test_predict_upsample_multiplies_the_map_at_test_time_only(name):
    plain, upsampled = build(name), build(name, ["model.predict_upsample=2"])
    images = fake_batch(2)["image"]
    small, large = plain.predict(images), upsampled.predict(images)
    assert large.maps.shape[-2:] == (2 * small.maps.shape[-2], 2 * small.maps.shape[-1])
    batch = fake_batch()
    torch.testing.assert_close(plain(batch)["total"], upsampled(batch)["total"])  # training is unchanged


@pytest.mark.parametrize("name", NAMES)
def test_load_run_round_trip(name, tmp_path):
    method = build(name, seed=1)
    config = method_config(name)
    run = tmp_path / "run"
    save_checkpoint(run / "checkpoints" / "last.pt", model=method.state_dict(), config=config, epoch=1,
                    method_state=method.extra_state())
    loaded, loaded_config = load_run(run)
    assert loaded_config["method"] == name and not loaded.training and type(loaded) is type(method)
    images = fake_batch(2)["image"]
    a, b = loaded.predict(images), method.predict(images)
    torch.testing.assert_close(a.maps, b.maps)
    torch.testing.assert_close(a.scores, b.scores)


@pytest.mark.parametrize("name", NAMES)
def test_each_loss_weight_removes_exactly_its_part(name):
    """Setting a part's weight (``Method.loss_weights``, e.g. graph.lambda_intra) to 0 removes exactly it."""
    reference = build(name)
    batch = fake_batch()
    parts = {k: v.detach() for k, v in reference(batch).items()}
    for part, key in reference.loss_weights().items():
        assert part in parts, f"{name}: {key} scales {part!r}, which forward does not return"
        zeroed = build(name, [f"{key}=0"])
        other = {k: v.detach() for k, v in zeroed(batch).items()}
        assert float(other.get(part, torch.tensor(0.0))) == 0.0, f"{key}=0 leaves {part} = {other.get(part)}"
        torch.testing.assert_close(other["total"], parts["total"] - parts[part], rtol=1e-5, atol=1e-6)
        for k in parts.keys() - {"total", part}:
            torch.testing.assert_close(other[k], parts[k], msg=f"{key}=0 changed {k}")


@pytest.mark.parametrize("name", NAMES)
def test_defaults_are_merged_under_the_users_config(name):
    defaults = method_defaults(name)
    config = method_config(name)
    for section, values in defaults.items():
        for key, value in (values.items() if isinstance(values, dict) else [(None, values)]):
            got = config[section] if key is None else config[section][key]
            if f"{section}.{key}" not in {o.split("=", 1)[0] for o in BASE_OVERRIDES}:  # set by method_config
                assert got == value or isinstance(value, float) and got == pytest.approx(value)
    with pytest.raises(GrenError, match="unknown key"):
        resolve_config(None, ["nosuch.key=1"], method=name)


@pytest.mark.parametrize("name", NAMES)
def test_one_epoch_through_the_engine_and_the_evaluator(name, tmp_path):
    from gren.eval.evaluate import evaluate_predictions, method_predictor
    from gren.train.engine import TrainingData, fit

    config = method_config(name, ["train.epochs=1", "train.batch_size=4", "train.max_steps_per_epoch=2",
                                  "optim.lr=0.01"])
    dataset = FakeLesionDataset(n=12, size=SIZE, n_annotated=4)
    history = fit(config, tmp_path / "run", TrainingData(dataset, dataset.annotated, dataset.unannotated))
    assert history[-1]["steps"] == 2 and "total" in history[-1]["loss"]
    method, _ = load_run(tmp_path / "run")
    result = evaluate_predictions(method_predictor(method, torch.device("cpu")), dataset, batch_size=6,
                                  progress=False, rules=("cells", "wang"))
    assert result["n_boxes"]["Effusion"] == 4 and result["auc"]["Effusion"] is not None
    assert set(result["wang"]) == {"accuracy", "iobb"}


def test_the_engine_refuses_data_without_the_needed_keys(tmp_path):
    from gren.train.engine import TrainingData, fit

    dataset = FakeLesionDataset(n=8, size=SIZE, n_annotated=4)
    data = TrainingData(dataset, dataset.annotated, dataset.unannotated,
                        provides=frozenset({"image", "labels", "boxes", "box_labels"}), source="FOLDER")
    with pytest.raises(GrenError, match="needs lung_hashes, lung_masks in each batch, which FOLDER does not"):
        fit(method_config("gren", ["train.epochs=1"]), tmp_path / "run", data)


def test_registry_errors_and_plain_modules():
    config = small_config()
    with pytest.raises(GrenError, match="unknown method 'nope'.*baseline"):
        build_method("nope", config)
    with pytest.raises(ValueError, match="registered twice"):
        register_method("baseline")(type("Other", (Method,), {}))
    with pytest.raises(TypeError, match="Method subclass"):
        register_method("plain")(lambda cfg: None)
    with pytest.raises(GrenError, match="no checkpoint"):
        load_run(__import__("pathlib").Path(__file__).parent)


def test_a_method_config_key_of_another_method_is_dropped_only_when_asked():
    with pytest.raises(GrenError, match="unknown key 'graph.lambda_intra'"):
        resolve_config(None, ["graph.lambda_intra=0"], method="baseline")
    config = resolve_config(None, ["graph.lambda_intra=0", "optim.lr=0.5"], method="baseline", foreign="drop")
    assert "graph" not in config and config["optim"]["lr"] == 0.5
    assert resolve_config(None, ["graph.lambda_intra=0"], method="gren")["graph"]["lambda_intra"] == 0.0
    with pytest.raises(GrenError, match="unknown key"):  # a key of no method stays an error
        resolve_config(None, ["graph.nosuch=1"], method="baseline", foreign="drop")
    assert copy.deepcopy(config) == config


def test_loading_a_trained_run_does_not_announce_random_initialisation(tmp_path, caplog):
    import logging

    method = build("baseline")
    run = tmp_path / "run"
    save_checkpoint(run / "checkpoints" / "last.pt", model=method.state_dict(), config=method_config("baseline"),
                    epoch=1)
    with caplog.at_level(logging.INFO, logger="gren"):
        load_run(run)
    assert "random initialisation" not in caplog.text
    with caplog.at_level(logging.INFO, logger="gren"):
        build("baseline")
    assert "random initialisation" in caplog.text


@pytest.mark.parametrize("name", NAMES)
def test_a_training_step_under_bf16_autocast(name):
    """The GPU path's bf16 autocast, run on the CPU (torch supports it there): finite losses and gradients."""
    method = build(name)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        parts = method(fake_batch())
    assert all(torch.isfinite(v.float()) for v in parts.values())
    parts["total"].float().backward()
    grads = [p.grad for p in method.parameters() if p.requires_grad and p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        loc = method.predict(fake_batch(2)["image"])
    assert torch.isfinite(loc.maps.float()).all() and torch.isfinite(loc.scores.float()).all()
