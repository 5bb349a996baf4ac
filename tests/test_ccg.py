"""CCG (gren.methods.ccg) and its superpixel fields (gren.methods.superpixels): facts beyond the registry tests."""

from __future__ import annotations

import imagehash
import numpy as np
import pytest
import torch
from PIL import Image

from _train_fakes import make_item
from gren.data.cache import CacheDataset, PreparedCache
from gren.data.dataset import collate
from gren.data.fields import extend_cache, fields_needed_by
from gren.data.prepare import prepare_cache
from gren.data.synth import synthesize
from gren.hashing import hamming, phash_with_margin
from gren.methods import build_method, method_defaults
from gren.methods.ccg import pairwise_distance
from gren.methods.superpixels import (
    MAX_SUPERPIXELS,
    compute_superpixel_hashes,
    compute_superpixels,
    superpixel_cell_weights,
    superpixel_crops,
    superpixel_labels,
)
from gren.train.config import resolve_config

SIZE = 128


@pytest.fixture(scope="module")
def synthetic_cache(tmp_path_factory):
    """A prepared cache of 8 synthetic films (128 px), without the superpixel fields."""
    raw = tmp_path_factory.mktemp("synth") / "data"
    synthesize(raw, 8, size=SIZE, seed=1, progress=False)
    out = tmp_path_factory.mktemp("cache") / "cache"
    prepare_cache(raw, out, size=SIZE, lungs="masks", workers=0, progress=False)
    return raw, out


def config(name: str, *overrides: str) -> dict:
    return resolve_config(None, ["model.backbone=resnet18", "model.output_stride=16", "model.head_hidden=32",
                                 "data.size=64", "data.workers=0", "device.device=cpu", *overrides], method=name)


def build(name: str, *overrides: str, seed: int = 0):
    torch.manual_seed(seed)
    return build_method(name, config(name, *overrides))


def fake_batch(n: int = 4) -> dict:
    return collate([make_item(i, 64, annotated=i % 2 == 0) for i in range(n)])


# -- superpixel fields -----------------------------------------------------------------------------------------

def test_slic_fields_on_synthetic_films(synthetic_cache):
    _, cache_dir = synthetic_cache
    images = np.asarray(PreparedCache(cache_dir).images)
    maps = compute_superpixels(images, None)
    hashes = compute_superpixel_hashes(images, None)
    exact = compared = 0
    for image, labels, bits in zip(images, maps, hashes):
        assert labels.shape == image.shape and labels.dtype == np.uint8
        count = int(labels.max()) + 1
        assert 4 <= count <= 14, f"about 10 superpixels expected, got {count}"
        assert set(np.unique(labels)) == set(range(count))  # contiguous, each non-empty: they tile the film
        np.testing.assert_array_equal(labels, superpixel_labels(image))  # deterministic
        crops = superpixel_crops(image, labels)
        assert bits.shape == (count, 64) and bits.dtype == bool and len(crops) == count
        assert sum(int((labels == k).sum()) for k in range(count)) == image.size
        _, margin = phash_with_margin([torch.from_numpy(c) for c in crops])
        for crop, row, tie in zip(crops, bits, margin):
            reference = imagehash.phash(Image.fromarray(crop)).hash.reshape(-1)
            if float(tie) > 1e-6:  # a tie at the median makes imagehash's own bits noise
                compared += 1
                exact += bool((reference == row).all())
    assert compared >= 30 and exact == compared


def test_crops_are_masked_to_their_superpixel():
    image = np.zeros((32, 32), np.uint8)
    image[:, 16:] = 200
    labels = np.zeros((32, 32), np.uint8)
    labels[:, 16:] = 1
    labels[:4, :4] = 2
    crops = superpixel_crops(image, labels)
    assert [c.shape for c in crops] == [(32, 16), (32, 16), (4, 4)]
    assert (crops[0] == 0).all() and (crops[1] == 200).all()


def test_a_cache_is_extended_with_what_each_ccg_method_needs(synthetic_cache, tmp_path, capsys):
    import shutil

    from gren.cli import main

    raw, source = synthetic_cache
    assert fields_needed_by(["ccg"]) == ["superpixel_hashes"]
    assert fields_needed_by(["ccg-kr"]) == ["superpixel_hashes", "superpixels"]
    cache_dir = tmp_path / "cache"
    shutil.copytree(source, cache_dir)
    assert main(["-q", "prepare", "--data", str(raw), "--out", str(cache_dir), "--size", str(SIZE), "--lungs",
                 "masks", "--workers", "0", "--methods", "ccg"]) == 0
    assert PreparedCache(cache_dir).extra_fields == ["superpixel_hashes"]
    assert extend_cache(cache_dir, fields_needed_by(["ccg-kr"]), progress=False) == ["superpixels"]
    cache = PreparedCache(cache_dir)
    item = CacheDataset(cache)[2]
    image = np.asarray(cache.images[2])
    np.testing.assert_array_equal(item["superpixels"].numpy(), superpixel_labels(image))
    np.testing.assert_array_equal(item["superpixel_hashes"].numpy(), compute_superpixel_hashes(image[None], None)[0])
    batch = collate([CacheDataset(cache)[i] for i in range(3)])
    assert batch["superpixels"].shape == (3, SIZE, SIZE) and isinstance(batch["superpixel_hashes"], list)


def test_superpixel_cell_weights_are_area_fractions():
    labels = torch.zeros(1, 8, 8, dtype=torch.uint8)
    labels[0, :, 6:] = 1  # right quarter
    weights = superpixel_cell_weights(labels, (2, 2), count=MAX_SUPERPIXELS)
    assert weights.shape == (1, MAX_SUPERPIXELS, 2, 2)
    torch.testing.assert_close(weights.sum(1), torch.ones(1, 2, 2))
    torch.testing.assert_close(weights[0, 1], torch.tensor([[0.0, 0.5], [0.0, 0.5]]))


# -- the graph terms -------------------------------------------------------------------------------------------

def test_defaults_as_published():
    defaults = method_defaults("ccg-kr")
    assert defaults["train"]["batch_size"] == 2
    assert [defaults["ccg"][k] for k in ("w_base", "w_ir", "w_ik", "w_kr")] == [0.25] * 4
    assert config("ccg")["train"]["batch_size"] == 2 and "w_kr" not in config("ccg")["ccg"]


def test_base_loss_is_scaled_by_w_base():
    batch = fake_batch()
    base = build("baseline")(batch)
    ccg = build("ccg")(batch)
    half = build("ccg", "ccg.w_base=0.5")(batch)
    for part in ("box", "mil"):
        torch.testing.assert_close(ccg[part], 0.25 * base[part])
        torch.testing.assert_close(half[part], 0.5 * base[part])


def test_graph_terms_are_zero_for_identical_features():
    method = build("ccg-kr")
    batch = fake_batch()
    one = torch.randn(1, method.backbone.out_channels, 4, 4)
    parts = method.extra_losses({"features": one.expand(4, -1, -1, -1).clone()}, batch)
    assert set(parts) == {"ir", "ik", "kr"}
    for name, value in parts.items():
        assert abs(float(value.detach())) < 1e-5, f"{name} = {float(value.detach())} for identical features"
    different = method.extra_losses({"features": torch.randn(4, method.backbone.out_channels, 4, 4)}, batch)
    assert all(float(v.detach()) > 1e-3 for v in different.values())


def test_ir_and_ik_are_weighted_as_specified():
    method = build("ccg", "ccg.w_ir=0.5", "ccg.w_ik=0.75")
    batch = fake_batch()
    features = torch.randn(4, method.backbone.out_channels, 4, 4)
    parts = method.extra_losses({"features": features}, batch)
    n = 4
    flat = torch.nn.functional.normalize(features.flatten(1), dim=-1)
    distance = torch.cdist(flat, flat)
    off = ~torch.eye(n, dtype=torch.bool)
    # IR at initialisation: G = 1/n off the diagonal (the paper's init), sum G D / n^2
    expected_ir = 0.5 * (distance * off / n).sum() / n ** 2
    torch.testing.assert_close(parts["ir"], expected_ir, rtol=1e-4, atol=1e-6)
    # IK (fixed): G_k(u, v) = mean over superpixel pairs of 1 - Hamming / 64
    graph = torch.zeros(n, n)
    for u in range(n):
        for v in range(n):
            graph[u, v] = (1.0 - hamming(batch["superpixel_hashes"][u], batch["superpixel_hashes"][v]).float()
                           / 64).mean()
    expected_ik = 0.75 * (graph * distance * off).sum() / n ** 2
    torch.testing.assert_close(parts["ik"], expected_ik, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(pairwise_distance(features), distance * off, rtol=1e-4, atol=1e-5)
    fixed = build("ccg", "ccg.ir_weights=fixed").extra_losses({"features": features}, batch)
    torch.testing.assert_close(fixed["ir"], expected_ir / 2, rtol=1e-4, atol=1e-6)  # w_ir 0.25, G = 1/n


def test_kr_attention_shapes_and_formula():
    method = build("ccg-kr")
    channels = method.backbone.out_channels
    features = torch.randn(3, channels, 4, 5)
    enhanced_u, enhanced_v = method.cross_attention(features)
    assert enhanced_u.shape == enhanced_v.shape == (3, 3, channels, 20)
    u, v = 0, 2
    f_u, f_v = features[u].flatten(1), features[v].flatten(1)  # (C, hw)
    affinity = f_u.t() @ method.kr_affinity @ f_v  # P (hw, hw)
    torch.testing.assert_close(enhanced_u[u, v], f_u @ torch.softmax(affinity, dim=0), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(enhanced_v[u, v], f_v @ torch.softmax(affinity.t(), dim=0), rtol=1e-4, atol=1e-5)
    batch = collate([make_item(i, 64) for i in range(3)])
    similarity, pair_valid = method.kr_graph(enhanced_u, enhanced_v, batch["superpixels"], (4, 5))
    assert similarity.shape == pair_valid.shape == (3, 3, MAX_SUPERPIXELS, MAX_SUPERPIXELS)
    assert ((similarity >= 0) & (similarity <= 1)).all() and not similarity.requires_grad


def test_kr_is_training_only():
    method = build("ccg-kr")
    baseline = build("baseline")
    images = fake_batch(2)["image"]
    torch.testing.assert_close(method.predict(images).maps, baseline.predict(images).maps)


def test_learned_weights_stay_constrained_after_training():
    method = build("ccg-kr", "ccg.ik_weights=learned", "train.batch_size=4")
    optimizer = torch.optim.SGD(method.parameters(), lr=5.0)
    batch = fake_batch(4)
    start = method.ir_logits.detach().clone()
    for _ in range(5):
        optimizer.zero_grad()
        method(batch)["total"].backward()
        optimizer.step()
    assert not torch.equal(method.ir_logits.detach(), start), "the IR logits must learn"
    graph = method.ir_graph(4, torch.device("cpu")).detach()
    assert (graph >= 0).all() and (graph <= 1).all() and (graph.diagonal() == 0).all()
    torch.testing.assert_close(graph.sum(1), torch.full((4,), 3 / 4))
    assert method.ik_weights.layer.weight.abs().sum() > 0
    ik = method.ik_graph(batch, 4, torch.device("cpu")).detach()
    assert ((ik > 0) & (ik < 1)).all()
    # a smaller batch than the logits were built for uses their top-left block, a larger one pads with 0
    assert method.ir_graph(2, torch.device("cpu")).shape == (2, 2)
    torch.testing.assert_close(method.ir_graph(6, torch.device("cpu")).sum(1), torch.full((6,), 5 / 6))


def test_bad_choices_are_clear_errors():
    from gren.core.errors import GrenError

    for key in ("ccg.ir_weights=nope", "ccg.ik_weights=nope", "ccg.distance=nope"):
        with pytest.raises(GrenError, match=key.split("=")[0]):
            build("ccg", key)
