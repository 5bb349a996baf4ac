"""Grid-MIL methods (baseline and the GREN variants): grid shapes, the graph terms' inputs, predict_upsample."""

from __future__ import annotations

import pytest
import torch

from gren.core.errors import GrenError
from gren.methods import METHODS, GridMILMethod
from gren.methods.gren import GrenMethod
from test_methods import build, fake_batch

GRID = sorted(name for name, cls in METHODS.items() if issubclass(cls, GridMILMethod))


def test_the_grid_methods_are_registered():
    assert {"baseline", "gren", "gren-intra", "gren-inter", "gren-cosine"} <= set(GRID)


@pytest.mark.parametrize("name", GRID)
def test_grid_shapes_parts_and_cells(name):
    method = build(name)
    batch = fake_batch()
    outputs = method.grid_outputs(batch["image"])
    assert outputs["logits"].shape == (4, 14, 4, 4)  # 64 px at stride 16
    assert outputs["features"].shape[0] == 4 and outputs["features"].dim() == 4
    parts = method(batch)
    expected = {"total", "box", "mil"} | set(method.loss_weights())  # a subclass's extra terms have weights
    if isinstance(method, GrenMethod):
        expected |= ({"intra"} if method.use_intra else set()) | ({"inter"} if method.use_inter else set())
    assert set(parts) == expected
    loc = method.predict(batch["image"])
    assert loc.maps.shape == (4, 14, 4, 4) and float(loc.thresholds().unique()) == 0.5
    method.eval()
    with torch.no_grad():
        torch.testing.assert_close(loc.maps, torch.sigmoid(method.grid_outputs(batch["image"])["logits"]))
    # the image probability is the MIL noisy-or of the cells
    noisy_or = 1 - torch.prod(1 - loc.maps.double().flatten(2), dim=-1)
    torch.testing.assert_close(loc.scores.double(), noisy_or, rtol=1e-5, atol=1e-6)


def test_predict_upsample_is_the_papers_test_protocol():
    method = build("baseline", ["model.predict_upsample=8"])
    loc = method.predict(fake_batch(2)["image"])
    assert loc.maps.shape[-2:] == (32, 32)  # a 4 x 4 map upsampled x8 before the head


def test_fallback_images_leave_the_graph():
    method = build("gren")
    batch = fake_batch()
    batch["lung_fallback"][:] = True
    parts = method(batch)
    assert parts["intra"].item() == 0.0 and parts["inter"].item() == 0.0
    batch["lung_fallback"][:2] = False  # two valid images: one inter pair, two intra edges
    parts = method(batch)
    assert parts["intra"].item() > 0 and parts["inter"].item() > 0


def test_hash_methods_need_hashes():
    method = build("gren")
    batch = fake_batch()
    del batch["lung_hashes"]
    with pytest.raises(GrenError, match="lung hashes"):
        method(batch)
    assert "lung_hashes" in method.needs and "lung_hashes" not in build("gren-cosine").needs
