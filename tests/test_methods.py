"""Every registered method: forward / backward / shapes / predict / load_run (parametrised over METHODS)."""

from __future__ import annotations

import pytest
import torch

from _train_fakes import make_item, small_config
from gren.data.dataset import collate
from gren.errors import GrenError
from gren.methods import METHODS, build_method, load_run, register_method
from gren.methods.gren import GrenMethod
from gren.train.checkpoint import save_checkpoint


def fake_batch(n: int = 4, size: int = 64) -> dict:
    return collate([make_item(i, size, annotated=i % 2 == 0, fallback=i == 3) for i in range(n)])


@pytest.fixture(scope="module")
def config():
    return small_config()


@pytest.mark.parametrize("name", sorted(METHODS))
def test_forward_backward_shapes(name, config):
    torch.manual_seed(0)
    method = build_method(name, config)
    assert method.name == name
    batch = fake_batch()
    outputs = method(batch["image"])
    assert outputs["logits"].shape == (4, 14, 4, 4)
    assert outputs["probs"].shape == (4, 14, 4, 4)
    assert outputs["features"].shape[0] == 4 and outputs["features"].dim() == 4
    assert ((outputs["probs"] >= 0) & (outputs["probs"] <= 1)).all()
    parts = method.losses(outputs, batch)
    assert {"total", "box", "mil"} <= set(parts)
    if isinstance(method, GrenMethod):
        expected = ({"intra"} if method.use_intra else set()) | ({"inter"} if method.use_inter else set())
        assert set(parts) - {"total", "box", "mil"} == expected
    assert all(v.dim() == 0 and torch.isfinite(v) for v in parts.values())
    parts["total"].backward()
    grads = [p.grad for p in method.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
    probs = method.predict(batch["image"])
    assert probs.shape == (4, 14, 4, 4) and not probs.requires_grad and method.training


@pytest.mark.parametrize("name", sorted(METHODS))
def test_load_run_rebuilds_the_method(name, config, tmp_path):
    torch.manual_seed(1)
    method = build_method(name, {**config, "method": name})
    run = tmp_path / "run"
    save_checkpoint(run / "checkpoints" / "last.pt", model=method.state_dict(), config={**config, "method": name},
                    epoch=1)
    loaded, loaded_config = load_run(run)
    assert loaded_config["method"] == name and not loaded.training
    images = fake_batch(2)["image"]
    torch.testing.assert_close(loaded.predict(images), method.predict(images))


def test_fallback_images_leave_the_graph(config):
    method = build_method("gren", config)
    batch = fake_batch()
    batch["lung_fallback"][:] = True
    parts = method.losses(method(batch["image"]), batch)
    assert parts["intra"].item() == 0.0 and parts["inter"].item() == 0.0
    batch["lung_fallback"][:2] = False  # two valid images: one inter pair, two intra edges
    parts = method.losses(method(batch["image"]), batch)
    assert parts["intra"].item() > 0 and parts["inter"].item() > 0


def test_hash_methods_need_hashes(config):
    method = build_method("gren", config)
    batch = fake_batch()
    del batch["lung_hashes"]
    with pytest.raises(GrenError, match="lung hashes"):
        method.losses(method(batch["image"]), batch)


def test_registry_errors(config):
    with pytest.raises(GrenError, match="unknown method 'nope'.*baseline"):
        build_method("nope", config)
    with pytest.raises(ValueError, match="registered twice"):
        register_method("baseline")(lambda cfg: None)
    with pytest.raises(GrenError, match="no checkpoint"):
        load_run(config and __import__("pathlib").Path(__file__).parent)
