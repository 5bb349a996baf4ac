"""GREN's B+Attention (gren.methods.b_attention): the mirror-difference attention, beyond the registry tests."""

from __future__ import annotations

import torch

from _train_fakes import make_item
from gren.data.dataset import collate
from gren.methods import build_method
from gren.methods.b_attention import MirrorDifferenceAttention
from gren.train.config import resolve_config


def build(name: str, seed: int = 0):
    torch.manual_seed(seed)
    config = resolve_config(None, ["model.backbone=resnet18", "model.output_stride=16", "model.head_hidden=32",
                                   "data.size=64", "data.workers=0", "device.device=cpu"], method=name)
    return build_method(name, config)


def test_it_starts_as_the_baseline():
    images = collate([make_item(i, 64) for i in range(2)])["image"]
    attention, baseline = build("b-attention"), build("baseline")
    torch.testing.assert_close(attention.predict(images).maps, baseline.predict(images).maps)
    _, weights = attention.attended(images)
    torch.testing.assert_close(weights, torch.ones_like(weights))


def test_attention_reads_the_left_right_difference():
    torch.manual_seed(0)
    module = MirrorDifferenceAttention(channels=8, hidden=4)
    torch.nn.init.normal_(module.score.weight)
    torch.nn.init.normal_(module.score.bias)
    half = torch.randn(2, 8, 5, 3)
    symmetric = torch.cat([half, torch.flip(half, dims=(-1,))], dim=-1)  # (2, 8, 5, 6), mirror-symmetric
    weights = module(symmetric)
    assert weights.shape == (2, 1, 5, 6)
    torch.testing.assert_close(weights, weights[:, :, :1, :1].expand_as(weights))  # no difference: one value
    asymmetric = symmetric.clone()
    asymmetric[:, :, 2, 0] += 5.0  # a finding on one side only
    changed = module(asymmetric)
    assert ((changed > 0) & (changed < 2)).all()
    assert not torch.allclose(changed[:, :, 2, 0], weights[:, :, 2, 0])
    torch.testing.assert_close(changed[:, :, 2, 5], changed[:, :, 2, 0])  # the mirrored cell sees the same |F - F'|
    torch.testing.assert_close(changed[:, :, 0, 1], weights[:, :, 0, 1])  # other cells unchanged


def test_training_moves_the_attention():
    method = build("b-attention")
    batch = collate([make_item(i, 64, annotated=i % 2 == 0) for i in range(4)])
    optimizer = torch.optim.SGD(method.parameters(), lr=0.1)
    for _ in range(3):
        optimizer.zero_grad()
        method(batch)["total"].backward()
        optimizer.step()
    assert method.attention.score.weight.abs().sum() > 0
    _, weights = method.attended(batch["image"])
    assert weights.std() > 0 and ((weights > 0) & (weights <= 2)).all()
