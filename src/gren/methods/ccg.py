"""CCG, the cross-chest graph (Zhao et al., ACM MM 2021; papers/ccg-paper.txt): ``ccg`` and ``ccg-kr``.

The grid-MIL base (:class:`~gren.methods.grid_mil.GridMILMethod`, CCG's eq. 1-3) plus graph terms over the
images of a batch (eq. 11): ``L = w1 L_base + w2 L_IR + w3 L_IK + w4 L_KR``, every ``w = 0.25`` as
published (so the base loss is a quarter of Li's; ``box`` and ``mil`` are returned already multiplied by
``w1``), batch size 2 as published (``train.batch_size=4`` is GREN's choice and an option). Under DDP the
graphs are built from each process's own batch.

* ``ccg``: IR + IK, CCG's "Ours" in two of its three settings (0.5_0.8 and 1.0_0.0);
* ``ccg-kr``: IR + IK + KR, its "Ours" in 1.0_0.4.

Notation: ``n`` images in the batch, ``F_u`` the backbone map of image ``u`` (``(C, h, w)``, after C5),
``D(F_u, F_v)`` their distance, ``M = 16`` superpixel slots (:mod:`gren.methods.superpixels`).

IR (eq. 4): ``L_IR = sum_{u,v} G(u, v) D(F_u, F_v) / n^2`` with ``G`` a learnable ``n x n`` matrix
    initialised to ``1/n``.
IK (eq. 5-7): ``L_IK = sum_{u,v} G_k(u, v) D(F_u, F_v) / n^2``, ``G_k(u, v) = W_l(G_l(u, v))`` with
    ``G_l(l, p)`` the Hamming distance between the pHash of superpixel ``l`` of ``u`` and ``p`` of ``v``.
KR (eq. 8-10; ``ccg-kr`` only, training only: it needs a partner image): ``P = F_u^T W_P F_v``
    (``hw x hw``), ``F'_u = F_u softmax(P)`` (columns), ``F'_v = F_v softmax(P^T)``,
    ``L_KR = sum_{u != v} G'_k(u, v) D(F'_u, F'_v) / n^2``, ``G'_k = W'_l(G'_l)``, ``G'_l(l, p)`` the
    Hamming distance between binarised feature patches of ``F'_v`` and ``F'_u``.

Readings where the paper is silent or cannot be taken literally (config section ``ccg``):

* **The learnable weights.** Unconstrained, ``G`` and ``W_l`` minimise ``sum G D`` by going to -infinity.
  ``ccg.ir_weights: learned`` (default): ``G`` is a row-softmax of learnable logits over the *other* images
  of the row, times ``(n - 1) / n``: each row keeps the mass that the paper's initialisation ``1/n`` puts
  off the diagonal, and at initialisation (logits 0) ``G = 1/n`` exactly. The diagonal is left out because
  ``D(F_u, F_u) = 0`` would otherwise soak up the mass and switch the term off. Learning moves each row's
  mass towards the images nearest in feature space (at the published batch of 2 each row has one other
  image, so ``learned`` and ``fixed`` coincide there). The logits are ``n x n`` for ``n = train.batch_size``;
  a larger batch (tests) uses logit 0, the initial value, beyond that block. ``fixed``: ``G = 1/n``.
* ``ccg.ik_weights: fixed`` (default): ``G_k(u, v)`` is the mean over the superpixel pairs of the hash
  similarity ``1 - G_l(l, p) / 64`` (``G'_k`` likewise with ``1 - G'_l / C``), no parameters. ``learned``:
  ``G_k = sigmoid(W_l(1 - G_l / 64))``, ``W_l`` a linear layer on the ``M x M`` similarity matrix
  (padding slots 0), initialised to 0 (``G_k = 1/2``). The sigmoid keeps ``G_k`` in (0, 1), but the loss
  still drives every ``G_k`` towards 0 (the same drift, bounded: the term fades over training instead of
  diverging), which is why ``fixed`` is the default. The similarity ``1 - H / 64`` is the paper's Hamming
  graph re-expressed so that padding (0) reads as "no evidence", not as "identical".
* ``D``: the Euclidean distance of the flattened maps, L2-normalised first (``ccg.distance: unit``,
  default; bounded in [0, 2], as our GREN's); ``raw``: of the maps as they are (the paper's literal
  Euclidean distance; its size then depends on the backbone).
* Superpixels: scikit-image SLIC, about 10 a film, their pHashes (the ``superpixel_hashes`` cache field)
  and label maps (``superpixels``, KR only) computed once by ``gren prepare``; see
  :mod:`gren.methods.superpixels`.
* KR's ``W_P`` is ``C x C``, initialised to ``I / sqrt(C)`` (scaled dot-product attention). ``F'_u``'s
  columns are indexed by the positions of ``F_v`` (and ``F'_v``'s by those of ``F_u``), so each enhanced map
  is cut into patches by the superpixels of the grid it lives on: patch ``l`` of ``F'_v`` by the
  superpixels of ``u``, patch ``p`` of ``F'_u`` by those of ``v`` (``l`` over ``u``'s and ``p`` over ``v``'s,
  as eq. 10's ranges). A patch is the area-weighted mean of the map over the superpixel's cells,
  binarised as ``x_c > mean_c x`` (its channels above their mean); ``G'_l`` is the Hamming distance of those
  ``C``-bit codes. The weights are data: no gradient flows through ``G'_l``. KR runs over ordered pairs
  ``u != v`` (``u = v`` is not "two images").
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from gren.core.errors import GrenError
from gren.methods.graph import pairwise_euclidean_unit
from gren.methods.grid_mil import GridMILMethod
from gren.methods.protocol import total_of
from gren.methods.registry import register_method
from gren.methods.superpixels import HASH_BITS, MAX_SUPERPIXELS, padded_hashes, superpixel_cell_weights

WEIGHT_MODES = ("learned", "fixed")
DISTANCES = ("unit", "raw")


def pairwise_distance(features: torch.Tensor, kind: str = "unit") -> torch.Tensor:
    """``(N, ...)`` maps -> ``(N, N)`` Euclidean distances of the flattened maps (``unit``: L2-normalised
    first), exactly 0 on the diagonal."""
    flat = features.flatten(1)
    if kind == "unit":
        distance = pairwise_euclidean_unit(F.normalize(flat, dim=-1))
    elif kind == "raw":
        distance = torch.cdist(flat, flat)
    else:
        raise GrenError(f"ccg.distance must be one of {', '.join(DISTANCES)}, got {kind!r}")
    return distance.masked_fill(torch.eye(len(flat), dtype=torch.bool, device=flat.device), 0.0)


def paired_distance(a: torch.Tensor, b: torch.Tensor, kind: str = "unit", eps: float = 1e-12) -> torch.Tensor:
    """``D(a_i, b_i)`` over the flattened trailing axes: ``(..., C, L)`` twice -> ``(...)``."""
    a, b = a.flatten(-2), b.flatten(-2)
    if kind == "unit":
        a, b = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
    return ((a - b) ** 2).sum(-1).clamp_min(eps).sqrt()


def hash_similarity(hashes: torch.Tensor, valid: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Patch-pair similarities between every two films.

    Args:
        hashes: ``(N, M, bits)`` bool codes of each film's ``M`` patch slots.
        valid: ``(N, M)`` bool, the slots that hold a patch.
        bits: code length (the similarity is ``1 - Hamming / bits``).

    Returns:
        ``similarity (N, N, M, M)`` float, ``1 - H(code_ul, code_vp) / bits`` for valid pairs, 0 elsewhere,
        and ``pair_valid (N, N, M, M)`` bool.
    """
    codes = hashes.float()
    differ = torch.einsum("ulk,vpk->uvlp", codes, 1.0 - codes) + torch.einsum("ulk,vpk->uvlp", 1.0 - codes, codes)
    pair_valid = valid[:, None, :, None] & valid[None, :, None, :]
    similarity = (1.0 - differ / bits) * pair_valid
    return similarity, pair_valid


class PairWeights(nn.Module):
    """``G_k(u, v)`` from the ``(N, N, M, M)`` patch similarities: ``fixed`` (their mean over valid pairs) or
    ``learned`` (``sigmoid(W_l(similarity))``, ``W_l`` linear ``M^2 -> 1`` initialised to 0)."""

    def __init__(self, mode: str, slots: int = MAX_SUPERPIXELS):
        super().__init__()
        if mode not in WEIGHT_MODES:
            raise GrenError(f"ccg.ik_weights must be one of {', '.join(WEIGHT_MODES)}, got {mode!r}")
        self.mode = mode
        self.layer = None
        if mode == "learned":
            self.layer = nn.Linear(slots * slots, 1)
            nn.init.zeros_(self.layer.weight)
            nn.init.zeros_(self.layer.bias)

    def forward(self, similarity: torch.Tensor, pair_valid: torch.Tensor) -> torch.Tensor:
        if self.layer is None:
            return similarity.sum((-2, -1)) / pair_valid.sum((-2, -1)).clamp_min(1)
        return torch.sigmoid(self.layer(similarity.flatten(2)).squeeze(-1))


class CCGMethod(GridMILMethod):
    """CCG (Zhao et al. 2021), IR + IK: grid-MIL base plus superpixel-hash graphs over the batch.

    The inter-image relation (IR), intra-image knowledge (IK) and, with ``use_kr``, knowledge-reasoning (KR)
    terms; see the module docstring for the readings.

    Config: ``ccg.w_base, w_ir, w_ik[, w_kr]`` (eq. 11), ``ccg.ir_weights``, ``ccg.ik_weights``,
    ``ccg.distance``; ``train.batch_size`` defaults to 2.
    """

    needs = GridMILMethod.needs | {"superpixel_hashes"}
    defaults = {
        "train": {"batch_size": 2},  # as published (GREN uses 4)
        "ccg": {
            "w_base": 0.25,  # w1 (eq. 11): scales box and mil
            "w_ir": 0.25,  # w2
            "w_ik": 0.25,  # w3
            "ir_weights": "learned",  # learned: row-softmax of learnable logits (init 1/n) | fixed: G = 1/n
            "ik_weights": "fixed",  # fixed: mean hash similarity | learned: sigmoid(W_l(similarity))
            "distance": "unit",  # unit: Euclidean of L2-normalised maps | raw: of the maps as they are
        },
    }
    use_kr: bool = False

    def __init__(self, config: dict):
        super().__init__(config)
        ccg = config["ccg"]
        self.w_base, self.w_ir, self.w_ik = float(ccg["w_base"]), float(ccg["w_ir"]), float(ccg["w_ik"])
        self.distance = ccg["distance"]
        if self.distance not in DISTANCES:
            raise GrenError(f"ccg.distance must be one of {', '.join(DISTANCES)}, got {self.distance!r}")
        self.ir_mode = ccg["ir_weights"]
        if self.ir_mode not in WEIGHT_MODES:
            raise GrenError(f"ccg.ir_weights must be one of {', '.join(WEIGHT_MODES)}, got {self.ir_mode!r}")
        if self.ir_mode == "learned":
            size = max(1, int(config["train"]["batch_size"]))
            self.ir_logits = nn.Parameter(torch.zeros(size, size))
        self.ik_weights = PairWeights(ccg["ik_weights"])

    # -- the graphs ----------------------------------------------------------------------------------------
    def ir_graph(self, n: int, device: torch.device) -> torch.Tensor:
        """``G`` for a batch of ``n``: ``(n, n)``, zero diagonal, each row summing to ``(n - 1) / n``."""
        off_diagonal = ~torch.eye(n, dtype=torch.bool, device=device)
        if self.ir_mode == "fixed" or n < 2:
            return torch.full((n, n), 1.0 / n, device=device) * off_diagonal
        logits = self.ir_logits
        size = logits.shape[0]
        if n <= size:
            logits = logits[:n, :n]
        else:
            logits = F.pad(logits, (0, n - size, 0, n - size))
        weights = torch.softmax(logits.masked_fill(~off_diagonal, float("-inf")), dim=1)
        return weights * ((n - 1) / n)

    def ik_graph(self, batch: dict, n: int, device: torch.device) -> torch.Tensor:
        """``G_k (n, n)`` from the superpixel hashes of the batch."""
        rows = batch.get("superpixel_hashes")
        if rows is None:
            raise GrenError(f"method {self.name or 'ccg'} needs superpixel_hashes in the batch: train from a "
                            "prepared cache (gren prepare --methods ccg)")
        hashes, valid = padded_hashes([torch.as_tensor(r) for r in rows])
        similarity, pair_valid = hash_similarity(hashes.to(device), valid.to(device), HASH_BITS)
        return self.ik_weights(similarity, pair_valid)

    # -- the step --------------------------------------------------------------------------------------------
    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        parts = super().forward(batch)
        parts.pop("total")
        parts["box"] = self.w_base * parts["box"]
        parts["mil"] = self.w_base * parts["mil"]
        return total_of(parts)

    def loss_weights(self) -> dict[str, str]:
        # ccg.w_base scales two parts (box and mil) at once, so it is not one part's key here.
        weights = super().loss_weights()
        weights.update({"ir": "ccg.w_ir", "ik": "ccg.w_ik"})
        return weights

    def extra_losses(self, outputs: dict[str, torch.Tensor], batch: dict) -> dict[str, torch.Tensor]:
        features = outputs["features"].float()
        n = features.shape[0]
        distance = pairwise_distance(features, self.distance)  # (n, n)
        parts = {"ir": self.w_ir * (self.ir_graph(n, features.device) * distance).sum() / n ** 2,
                 "ik": self.w_ik * (self.ik_graph(batch, n, features.device) * distance).sum() / n ** 2}
        return parts


register_method("ccg")(CCGMethod)


@register_method("ccg-kr")
class CCGKnowledgeReasoning(CCGMethod):
    """CCG, IR + IK + KR: plus the cross-image attention ``P = F_u^T W_P F_v`` (training only)."""

    needs = CCGMethod.needs | {"superpixels"}
    defaults = {"ccg": {"w_kr": 0.25}}  # w4
    use_kr = True

    def __init__(self, config: dict):
        super().__init__(config)
        self.w_kr = float(config["ccg"]["w_kr"])
        channels = int(self.backbone.out_channels)
        self.kr_affinity = nn.Parameter(torch.eye(channels) / math.sqrt(channels))  # W_P
        self.kr_weights = PairWeights(config["ccg"]["ik_weights"])

    def loss_weights(self) -> dict[str, str]:
        weights = super().loss_weights()
        weights["kr"] = "ccg.w_kr"
        return weights

    def cross_attention(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The enhanced maps of every ordered pair.

        Args:
            features: ``(n, C, h, w)``.

        Returns:
            ``enhanced_u (n, n, C, hw)``: ``[u, v] = F_u softmax(P_uv)`` (softmax over ``u``'s positions, one
            column per position of ``v``), and ``enhanced_v (n, n, C, hw)``: ``[u, v] = F_v softmax(P_uv^T)``
            (one column per position of ``u``), with ``P_uv = F_u^T W_P F_v`` ``(hw, hw)``.
        """
        flat = features.flatten(2)  # (n, C, hw)
        projected = torch.einsum("cd,bdm->bcm", self.kr_affinity.float(), flat)  # W_P F_v
        affinity = torch.einsum("ucp,vcq->uvpq", flat, projected)  # P_uv (n, n, hw_u, hw_v)
        enhanced_u = torch.einsum("ucp,uvpq->uvcq", flat, torch.softmax(affinity, dim=2))
        enhanced_v = torch.einsum("vcq,uvpq->uvcp", flat, torch.softmax(affinity, dim=3))
        return enhanced_u, enhanced_v

    @torch.no_grad()
    def kr_graph(self, enhanced_u: torch.Tensor, enhanced_v: torch.Tensor, superpixels: torch.Tensor,
                 grid_hw: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """``G'_l`` as similarities: ``(n, n, M, M)`` ``1 - H / C`` between patch ``l`` of ``F'_v`` (by ``u``'s
        superpixels) and patch ``p`` of ``F'_u`` (by ``v``'s), 0 for empty slots, and the ``pair_valid`` mask."""
        channels = enhanced_u.shape[2]
        cells = superpixel_cell_weights(superpixels, grid_hw).flatten(2)  # (n, M, hw)
        area = cells.sum(-1)  # (n, M)
        share = cells / area.clamp_min(1e-6)[..., None]
        patches_v = torch.einsum("uvcp,ukp->uvkc", enhanced_v, share)  # F'_v cut by u's superpixels
        patches_u = torch.einsum("uvcq,vkq->uvkc", enhanced_u, share)  # F'_u cut by v's superpixels
        codes_v = patches_v > patches_v.mean(-1, keepdim=True)
        codes_u = patches_u > patches_u.mean(-1, keepdim=True)
        valid = area > 0
        differ = torch.einsum("uvlc,uvpc->uvlp", codes_v.float(), 1.0 - codes_u.float()) + \
            torch.einsum("uvlc,uvpc->uvlp", 1.0 - codes_v.float(), codes_u.float())
        pair_valid = valid[:, None, :, None] & valid[None, :, None, :]
        similarity = (1.0 - differ / channels) * pair_valid
        return similarity, pair_valid

    def extra_losses(self, outputs: dict[str, torch.Tensor], batch: dict) -> dict[str, torch.Tensor]:
        parts = super().extra_losses(outputs, batch)
        features = outputs["features"].float()
        n = features.shape[0]
        superpixels = batch.get("superpixels")
        if superpixels is None:
            raise GrenError(f"method {self.name or 'ccg-kr'} needs superpixels in the batch: train from a "
                            "prepared cache (gren prepare --methods ccg-kr)")
        enhanced_u, enhanced_v = self.cross_attention(features)
        distance = paired_distance(enhanced_u, enhanced_v, self.distance)  # (n, n)
        similarity, pair_valid = self.kr_graph(enhanced_u.detach(), enhanced_v.detach(),
                                               torch.as_tensor(superpixels).to(features.device),
                                               tuple(features.shape[-2:]))
        graph = self.kr_weights(similarity, pair_valid)
        off_diagonal = ~torch.eye(n, dtype=torch.bool, device=features.device)
        parts["kr"] = self.w_kr * (graph * distance * off_diagonal).sum() / n ** 2
        return parts
