"""Graph regularizers: lung pooling, edge weights, the three forms, the fallback rule."""

from __future__ import annotations

import math

import pytest
import torch

from gren.methods import graph


def test_lung_features_area_pooling():
    features = torch.zeros(1, 2, 2, 2)
    features[0, 0, :, 0] = 1.0  # channel 0 on the left half of the grid
    features[0, 1, :, 1] = 1.0  # channel 1 on the right half
    masks = torch.zeros(1, 8, 8, dtype=torch.uint8)
    masks[0, :, :4] = 1
    masks[0, :, 4:6] = 2  # left lung covers half of the right grid column
    vectors, area = graph.lung_features(features, masks)
    torch.testing.assert_close(vectors[0, 0], torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(vectors[0, 1], torch.tensor([0.0, 1.0]))
    torch.testing.assert_close(area[0], torch.tensor([0.5, 0.25]))


def test_lung_features_empty_mask_is_zero_area():
    vectors, area = graph.lung_features(torch.randn(2, 3, 2, 2), torch.zeros(2, 8, 8, dtype=torch.uint8))
    assert area.eq(0).all() and torch.isfinite(vectors).all()


def test_hash_dissimilarities():
    hashes = torch.zeros(2, 2, 64, dtype=torch.bool)
    hashes[0, 1, :16] = True  # image 0: right vs left differ in 16 bits
    hashes[1, 0, :32] = True  # image 1: right lung differs from image 0's right in 32 bits
    torch.testing.assert_close(graph.hash_intra_dissimilarity(hashes), torch.tensor([0.25, 0.5]))
    inter = graph.hash_inter_dissimilarity(hashes)
    # (H(l0, l1) + H(r0, r1)) / 128 = (16 + 32) / 128
    torch.testing.assert_close(inter, torch.tensor([[0.0, 48 / 128], [48 / 128, 0.0]]))


def test_cosine_dissimilarities_are_detached_and_bounded():
    vectors = torch.nn.functional.normalize(torch.randn(3, 2, 5), dim=-1).requires_grad_()
    intra = graph.cosine_intra_dissimilarity(vectors)
    inter = graph.cosine_inter_dissimilarity(vectors)
    assert not intra.requires_grad and not inter.requires_grad
    assert intra.min() >= 0 and intra.max() <= 1 and inter.diagonal().abs().max() < 1e-6
    cos = (vectors[0, 0] * vectors[0, 1]).sum()
    assert intra[0].item() == pytest.approx((1 - cos.item()) / 2, abs=1e-6)


@pytest.mark.parametrize("form", ["pull", "paper"])
def test_zero_for_identical_features(form):
    lungs = torch.nn.functional.normalize(torch.ones(3, 1, 4), dim=-1).repeat(1, 2, 1).requires_grad_()
    e = torch.tensor([0.2, 0.5, 0.9])
    intra = graph.IntraImageRegularizer(form)(lungs, e, torch.ones(3, dtype=torch.bool))
    vectors = lungs[:, 0]
    inter = graph.InterImageRegularizer(form)(vectors, torch.full((3, 3), 0.3), torch.ones(3, dtype=torch.bool))
    assert abs(intra.item()) < 1e-5 and abs(inter.item()) < 1e-5
    (intra + inter).backward()
    assert torch.isfinite(lungs.grad).all()


def test_intra_forms_hand_computed():
    lungs = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[1.0, 0.0], [1.0, 0.0]]])  # d = sqrt(2), 0
    e = torch.tensor([0.25, 0.5])
    valid = torch.tensor([True, True])
    r2 = math.sqrt(2)
    pull = graph.IntraImageRegularizer("pull")(lungs, e, valid)
    paper = graph.IntraImageRegularizer("paper")(lungs, e, valid)
    contrastive = graph.IntraImageRegularizer("contrastive", margin=2.0)(lungs, e, valid)
    assert pull.item() == pytest.approx((0.75 * r2 + 0.5 * 0) / 2, abs=1e-5)
    assert paper.item() == pytest.approx((-0.25 * r2 - 0.5 * 0) / 2, abs=1e-5)
    assert contrastive.item() == pytest.approx((0.75 * r2 + 0.25 * (2 - r2) + 0.5 * 0 + 0.5 * 2) / 2, abs=1e-5)
    only_first = graph.IntraImageRegularizer("pull")(lungs, e, torch.tensor([True, False]))
    assert only_first.item() == pytest.approx(0.75 * r2, abs=1e-5)


def test_inter_forms_hand_computed_and_fallback_excluded():
    vectors = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    e = torch.tensor([[0.0, 0.25, 0.5], [0.25, 0.0, 0.75], [0.5, 0.75, 0.0]])
    r2 = math.sqrt(2)
    all_valid = torch.tensor([True, True, True])
    # pairs (0,1): d=sqrt2, e=.25; (0,2): d=0, e=.5; (1,2): d=sqrt2, e=.75
    pull = graph.InterImageRegularizer("pull")(vectors, e, all_valid)
    assert pull.item() == pytest.approx((0.75 * r2 + 0 + 0.25 * r2) / 3, abs=1e-5)
    paper = graph.InterImageRegularizer("paper")(vectors, e, all_valid)
    assert paper.item() == pytest.approx(-(0.25 * r2 + 0.75 * r2) / 3, abs=1e-5)
    contrastive = graph.InterImageRegularizer("contrastive", margin=1.0)(vectors, e, all_valid)
    assert contrastive.item() == pytest.approx((0.75 * r2 + (0.5 * 0 + 0.5 * 1.0) + 0.25 * r2) / 3, abs=1e-5)
    # image 2 fell back to the lung prior: only pair (0, 1) is left
    one_pair = graph.InterImageRegularizer("pull")(vectors, e, torch.tensor([True, True, False]))
    assert one_pair.item() == pytest.approx(0.75 * r2, abs=1e-5)
    nothing = graph.InterImageRegularizer("pull")(vectors, e, torch.tensor([True, False, False]))
    assert nothing.item() == 0.0


def test_unknown_form_is_rejected():
    with pytest.raises(ValueError, match="graph.form"):
        graph.IntraImageRegularizer("push")


def test_rank_scale_maps_kept_entries_to_mean_ranks():
    values = torch.tensor([0.30, 0.10, 0.30, 0.90, 0.50])
    keep = torch.tensor([True, True, True, False, True])
    out = graph.rank_scale(values, keep)
    # kept: 0.1 (rank 0), 0.3 and 0.3 (ranks 1, 2 -> 1.5), 0.5 (rank 3); divided by n - 1 = 3
    torch.testing.assert_close(out, torch.tensor([0.5, 0.0, 0.5, 0.90, 1.0]))
    assert graph.rank_scale(torch.tensor([0.4]), torch.tensor([True])).item() == 0.5
    tied = graph.rank_scale(torch.full((4,), 0.37), torch.ones(4, dtype=torch.bool))
    torch.testing.assert_close(tied, torch.full((4,), 0.5))


def test_rank_edge_scale_spreads_concentrated_hash_distances():
    """Distances all near 24/64 give nearly uniform raw weights; ranked, the closest pair is pulled hardest."""
    torch.manual_seed(0)
    vectors = torch.nn.functional.normalize(torch.randn(4, 6), dim=-1)
    e = torch.full((4, 4), 24 / 64)
    e[0, 1] = e[1, 0] = 22 / 64  # the most similar pair
    e[2, 3] = e[3, 2] = 26 / 64  # the least similar pair
    valid = torch.ones(4, dtype=torch.bool)
    raw = graph.InterImageRegularizer("pull", edge_scale="raw")
    ranked = graph.InterImageRegularizer("pull", edge_scale="rank")
    grads = {}
    for name, reg in (("raw", raw), ("rank", ranked)):
        x = vectors.clone().requires_grad_()
        reg(x, e, valid).backward()
        grads[name] = x.grad
    # ranked, the least similar pair has e = 1: weight 1 - e = 0 (raw: 1 - 26/64 = 0.59), the most similar 1
    ranks = graph.rank_scale(e, torch.ones(4, 4, dtype=torch.bool).triu(1))
    assert ranks[2, 3].item() == 1.0 and ranks[0, 1].item() == 0.0
    assert not torch.allclose(grads["raw"], grads["rank"])
    with pytest.raises(ValueError, match="edge_scale"):
        graph.IntraImageRegularizer("pull", edge_scale="zscore")


def test_gren_reads_edge_scale_from_the_config():
    from gren.methods.registry import build_method
    from gren.train.config import resolve_config

    config = resolve_config(None, ["model.backbone=resnet18", "graph.edge_scale=rank"])
    method = build_method("gren", config)
    assert method.intra_regularizer.edge_scale == "rank" and method.inter_regularizer.edge_scale == "rank"
    assert resolve_config(None, [])["graph"]["edge_scale"] == "raw"
