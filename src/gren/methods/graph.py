"""GREN's graph regularizers (paper section III-B, eq. 4-7 and 9-10).

Nodes and their features
    * intra-image: the two lungs of each image. ``f_i^r``, ``f_i^l`` are the feature map masked by
      each lung mask brought to the feature grid by area averaging, pooled by a masked mean and
      L2-normalised: :func:`lung_features` -> ``(B, 2, C)``, index 0 the patient's right lung (mask
      value 1), 1 the left (mask 2), the order of ``batch["lung_hashes"]``.
    * inter-image: the images of the batch. ``f_u`` is, as the paper writes ("the feature maps of
      image x_u"), the whole feature map flattened and L2-normalised (``graph.inter_features: map``);
      ``lungs`` uses the concatenation of the two lung vectors instead.

Distance ``d``: Euclidean distance of L2-normalised vectors, in ``[0, 2]``.

Edge dissimilarity ``e`` in ``[0, 1]`` (0 = identical):
    * hashes (GREN): intra ``e_i = H(h_i^r, h_i^l) / 64`` (eq. 4); inter
      ``e_uv = (H(h_u^l, h_v^l) + H(h_u^r, h_v^r)) / 128`` (eq. 6);
    * cosine (B+Cosine, eq. 9): the same with the cosine distance ``(1 - cos) / 2`` of the lung
      feature vectors, detached (the weights are data, not a path for gradients).

Form (config ``graph.form``), per edge:
    * ``pull`` (default; the paper's text and the authors' code): ``(1 - e) d`` -- similar pairs closer;
    * ``paper`` (eq. 5 and 7 literally): ``-e d`` -- pushes dissimilar pairs apart, unbounded only
      because ``d`` is bounded by the normalisation;
    * ``contrastive``: ``(1 - e) d + e max(0, margin - d)`` -- both.

Edge scale (config ``graph.edge_scale``):
    * ``raw`` (default, the paper): ``e`` as above;
    * ``rank``: each term's ``e`` replaced by its rank among the edges that count in the batch, in
      [0, 1] (ties share their mean rank). Hamming distances concentrate around their mean (on the
      real NIH sample lung-hash distances sit near 24 of 64 bits), so raw weights ``1 - e`` are nearly
      the same for every edge; ranks spread them over [0, 1] and make the graph pull the batch's most
      similar pairs hardest.

Normalisation: the mean over the edges that count (images for intra, unordered pairs ``u < v``
for inter), so ``lambda`` does not depend on the batch size. An image whose lung mask fell back to
the anatomical prior (``batch["lung_fallback"]``) or has an empty lung mask has hashes and lung
features that describe the prior, not the patient: it is left out of the intra term and of every
inter pair. With no edge left a term is 0 (still attached to the graph).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gren.hashing import hamming, hamming_pairs

HASH_BITS = 64
FORMS = ("pull", "paper", "contrastive")
EDGE_SCALES = ("raw", "rank")


@torch.no_grad()
def lung_cell_weights(lung_masks: torch.Tensor, grid_hw: tuple[int, int]) -> torch.Tensor:
    """Area fraction of each cell of an ``h x w`` grid covered by each lung: ``(B, H, W)`` uint8 -> ``(B, 2, h, w)``.

    Area averaging (``adaptive_avg_pool2d`` of the one-hot masks); when the cells tile the image
    exactly, a reshape-and-count does the same without materialising float masks.
    """
    batch, height, width = lung_masks.shape
    grid_h, grid_w = grid_hw
    if height % grid_h == 0 and width % grid_w == 0:
        cells = lung_masks.reshape(batch, grid_h, height // grid_h, grid_w, width // grid_w)
        per_cell = (height // grid_h) * (width // grid_w)
        right = (cells == 1).sum(dim=(2, 4), dtype=torch.float32)
        left = (cells == 2).sum(dim=(2, 4), dtype=torch.float32)
        return torch.stack([right, left], dim=1) / per_cell
    one_hot = torch.stack([lung_masks == 1, lung_masks == 2], dim=1).float()
    return F.adaptive_avg_pool2d(one_hot, grid_hw)


def lung_features(features: torch.Tensor, lung_masks: torch.Tensor, eps: float = 1e-6
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-lung feature vectors.

    Args:
        features: ``(B, C, h, w)`` feature map.
        lung_masks: ``(B, H, W)`` uint8 in input pixels, 0 background, 1 right lung, 2 left lung.

    Returns:
        ``lung_vectors (B, 2, C)``, L2-normalised masked means (zeros for an empty lung), and
        ``lung_area (B, 2)``, the fraction of the feature grid each lung covers.
    """
    weights = lung_cell_weights(lung_masks, tuple(features.shape[-2:])).to(features.dtype)  # (B, 2, h, w)
    area = weights.sum(dim=(-2, -1))  # (B, 2) in cells
    pooled = torch.einsum("bkhw,bchw->bkc", weights, features) / area.clamp_min(eps)[..., None]
    cells = features.shape[-2] * features.shape[-1]
    return F.normalize(pooled, dim=-1, eps=eps), area / cells


def image_vectors(features: torch.Tensor, lung_vectors: torch.Tensor, kind: str = "map") -> torch.Tensor:
    """The inter-image node features ``(B, D)``, unit norm: the flattened map (``map``) or both lungs (``lungs``)."""
    if kind == "map":
        return F.normalize(features.flatten(1), dim=-1)
    if kind == "lungs":
        return lung_vectors.flatten(1) / (2.0 ** 0.5)
    raise ValueError(f"graph.inter_features must be 'map' or 'lungs', got {kind!r}")


def euclidean(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """``||a - b||`` over the last axis; 0-safe (no NaN gradient at identical vectors)."""
    return ((a - b) ** 2).sum(dim=-1).clamp_min(eps).sqrt()


def pairwise_euclidean_unit(x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """``(N, N)`` distances between unit vectors ``x (N, D)`` from the Gram matrix (cheap for large D)."""
    gram = x @ x.t()
    return (2.0 - 2.0 * gram).clamp_min(eps).sqrt()


def hash_intra_dissimilarity(lung_hashes: torch.Tensor) -> torch.Tensor:
    """``(B, 2, 64)`` bool -> ``(B,)`` float: ``H(right, left) / 64`` (eq. 4)."""
    return hamming_pairs(lung_hashes[:, 0], lung_hashes[:, 1]).float() / HASH_BITS


def hash_inter_dissimilarity(lung_hashes: torch.Tensor) -> torch.Tensor:
    """``(N, 2, 64)`` bool -> ``(N, N)`` float: ``(H(l_u, l_v) + H(r_u, r_v)) / 128`` (eq. 6)."""
    right = hamming(lung_hashes[:, 0], lung_hashes[:, 0])  # (N, N)
    left = hamming(lung_hashes[:, 1], lung_hashes[:, 1])
    return (right + left).float() / (2 * HASH_BITS)


def cosine_intra_dissimilarity(lung_vectors: torch.Tensor) -> torch.Tensor:
    """``(B, 2, C)`` unit vectors -> ``(B,)`` cosine distance ``(1 - cos) / 2`` of the two lungs, detached."""
    v = lung_vectors.detach()
    return (1.0 - (v[:, 0] * v[:, 1]).sum(-1)).clamp(0.0, 2.0) / 2.0


def cosine_inter_dissimilarity(lung_vectors: torch.Tensor) -> torch.Tensor:
    """``(N, 2, C)`` unit vectors -> ``(N, N)``: the mean over lungs of ``(1 - cos) / 2`` (eq. 9), detached."""
    v = lung_vectors.detach()
    cos = torch.einsum("ukc,vkc->uvk", v, v)
    return ((1.0 - cos).clamp(0.0, 2.0) / 2.0).mean(dim=-1)


def edge_penalty(dissimilarity: torch.Tensor, distance: torch.Tensor, form: str = "pull",
                 margin: float = 1.0) -> torch.Tensor:
    """Per-edge penalty for edge dissimilarity ``e`` in [0, 1] and feature distance ``d`` (same shape)."""
    similarity = 1.0 - dissimilarity
    if form == "pull":
        return similarity * distance
    if form == "paper":
        return -dissimilarity * distance
    if form == "contrastive":
        return similarity * distance + dissimilarity * F.relu(margin - distance)
    raise ValueError(f"graph.form must be one of {', '.join(FORMS)}, got {form!r}")


def _masked_mean(values: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    keep = keep.to(values.dtype)
    return (values * keep).sum() / keep.sum().clamp_min(1.0)


def rank_scale(values: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``values`` (any shape) with the ``keep`` entries replaced by their mean rank among them, in [0, 1].

    The smallest kept value maps to 0 and the largest to 1; tied values share their mean rank; a
    single kept value (or all tied) maps to 0.5. Entries outside ``keep`` are returned unchanged.
    """
    flat, kept = values.reshape(-1), keep.reshape(-1).bool()
    chosen = flat[kept]
    n = chosen.numel()
    if n == 0:
        return values
    less = (chosen[None, :] < chosen[:, None]).sum(dim=1).to(values.dtype)  # (n,)
    equal = (chosen[None, :] == chosen[:, None]).sum(dim=1).to(values.dtype)
    ranks = (less + (equal - 1) / 2) / max(n - 1, 1) if n > 1 else torch.full_like(chosen, 0.5)
    out = flat.clone()
    out[kept] = ranks
    return out.reshape(values.shape)


def _check(form: str, edge_scale: str) -> None:
    if form not in FORMS:
        raise ValueError(f"graph.form must be one of {', '.join(FORMS)}, got {form!r}")
    if edge_scale not in EDGE_SCALES:
        raise ValueError(f"graph.edge_scale must be one of {', '.join(EDGE_SCALES)}, got {edge_scale!r}")


class IntraImageRegularizer(nn.Module):
    """``D_intra = mean_i penalty(e_i, d(f_i^r, f_i^l))`` over the images with ``valid``.

    ``forward(lung_vectors (B, 2, C), dissimilarity (B,), valid (B,) bool) -> scalar``.
    """

    def __init__(self, form: str = "pull", margin: float = 1.0, edge_scale: str = "raw"):
        super().__init__()
        _check(form, edge_scale)
        self.form, self.margin, self.edge_scale = form, float(margin), edge_scale

    def forward(self, lung_vectors: torch.Tensor, dissimilarity: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        distance = euclidean(lung_vectors[:, 0], lung_vectors[:, 1])
        dissimilarity = dissimilarity.to(distance)
        if self.edge_scale == "rank":
            dissimilarity = rank_scale(dissimilarity, valid)
        penalty = edge_penalty(dissimilarity, distance, self.form, self.margin)
        return _masked_mean(penalty, valid)


class InterImageRegularizer(nn.Module):
    """``D_inter = mean_{u<v} penalty(e_uv, d(f_u, f_v))`` over pairs of ``valid`` images.

    ``forward(image_vectors (N, D) unit norm, dissimilarity (N, N), valid (N,) bool) -> scalar``.
    """

    def __init__(self, form: str = "pull", margin: float = 1.0, edge_scale: str = "raw"):
        super().__init__()
        _check(form, edge_scale)
        self.form, self.margin, self.edge_scale = form, float(margin), edge_scale

    def forward(self, image_vectors: torch.Tensor, dissimilarity: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        n = image_vectors.shape[0]
        distance = pairwise_euclidean_unit(image_vectors)
        upper = torch.ones(n, n, dtype=torch.bool, device=image_vectors.device).triu(diagonal=1)
        keep = upper & valid[:, None] & valid[None, :]
        dissimilarity = dissimilarity.to(distance)
        if self.edge_scale == "rank":
            dissimilarity = rank_scale(dissimilarity, keep)
        penalty = edge_penalty(dissimilarity, distance, self.form, self.margin)
        return _masked_mean(penalty, keep)
