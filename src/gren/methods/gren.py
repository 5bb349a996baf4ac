"""GREN (Qi et al. 2021) and its ablations: the baseline plus graph regularizers.

* ``gren``: intra-image + inter-image terms, edge weights from the lungs' perceptual hashes;
* ``gren-intra`` / ``gren-inter``: one of the two terms;
* ``gren-cosine`` (the paper's B+Cosine, eq. 9-11): both terms, edge weights from the cosine
  distance of the (detached) CNN lung features instead of the hashes.

``Q = L + lambda_intra D_intra + lambda_inter D_inter`` (eq. 8); see :mod:`gren.methods.graph` for
the terms, their forms and the lung-fallback rule. Config keys: ``graph.form, margin,
edge_scale, lambda_intra, lambda_inter, inter_features, inter_scope``.

``graph.inter_scope``: ``rank`` builds the inter-image graph from each process's own batch (the
paper's graph of ``batch_size`` images); ``global`` all-gathers the image vectors (with gradient),
hashes and validity flags of every rank first, so the graph spans the global batch.
"""

from __future__ import annotations

import torch

from gren.core import dist
from gren.core.errors import GrenError
from gren.core.schema import Rule
from gren.methods import graph
from gren.methods.grid_mil import GridMILMethod
from gren.methods.registry import register_method


class GrenMethod(GridMILMethod):
    """GREN (Qi et al. 2021): the baseline plus the intra- and inter-image graphs with lung-hash edge weights.

    Class attributes (one subclass per registered variant): ``use_intra``, ``use_inter`` (which terms),
    ``edge_weights`` (``hash``: GREN; ``cosine``: B+Cosine). Config: the ``graph`` section (``defaults``).
    """

    needs = GridMILMethod.needs | {"lung_masks", "lung_hashes"}
    defaults = {"graph": {
        "form": "pull",  # pull: (1-e) d | paper: -e d (eq. 5, 7 literally) | contrastive: (1-e) d + e max(0, margin-d)
        "margin": 1.0,  # for contrastive; distances are in [0, 2]
        "edge_scale": "raw",  # raw: e = Hamming / 64 (the paper) | rank: e = its rank among the batch's edges
        "lambda_intra": 0.11,  # lambda1
        "lambda_inter": 0.15,  # lambda2
        "inter_features": "map",  # inter-image node feature: map (whole feature map) | lungs (both lung vectors)
        "inter_scope": "rank",  # under DDP: rank (graph per process batch) | global (all-gathered across ranks)
    }}
    schema = {"graph.form": Rule(choices=("pull", "paper", "contrastive")), "graph.margin": Rule(ge=0),
              "graph.edge_scale": Rule(choices=("raw", "rank")), "graph.lambda_intra": Rule(ge=0),
              "graph.lambda_inter": Rule(ge=0), "graph.inter_features": Rule(choices=("map", "lungs")),
              "graph.inter_scope": Rule(choices=("rank", "global"))}
    use_intra: bool = True
    use_inter: bool = True
    edge_weights: str = "hash"

    def __init__(self, config: dict):
        super().__init__(config)
        graph_cfg = config["graph"]
        if self.edge_weights not in ("hash", "cosine"):
            raise ValueError(f"edge_weights must be 'hash' or 'cosine', got {self.edge_weights!r}")
        if graph_cfg["inter_scope"] not in ("rank", "global"):
            raise GrenError(f"graph.inter_scope must be 'rank' or 'global', got {graph_cfg['inter_scope']!r}")
        self.lambda_intra = float(graph_cfg["lambda_intra"])
        self.lambda_inter = float(graph_cfg["lambda_inter"])
        self.inter_features = graph_cfg["inter_features"]
        self.inter_scope = graph_cfg["inter_scope"]
        edge_scale = graph_cfg.get("edge_scale", "raw")
        self.intra_regularizer = graph.IntraImageRegularizer(graph_cfg["form"], graph_cfg["margin"], edge_scale)
        self.inter_regularizer = graph.InterImageRegularizer(graph_cfg["form"], graph_cfg["margin"], edge_scale)

    def loss_weights(self) -> dict[str, str]:
        weights = super().loss_weights()
        if self.use_intra:
            weights["intra"] = "graph.lambda_intra"
        if self.use_inter:
            weights["inter"] = "graph.lambda_inter"
        return weights

    def extra_losses(self, outputs: dict[str, torch.Tensor], batch: dict) -> dict[str, torch.Tensor]:
        features = outputs["features"].float()
        device = features.device
        lung_vectors, lung_area = graph.lung_features(features, batch["lung_masks"].to(device))
        fallback = batch.get("lung_fallback")
        fallback = torch.zeros(features.shape[0], dtype=torch.bool, device=device) if fallback is None \
            else torch.as_tensor(fallback, device=device).bool()
        valid = (lung_area > 0).all(dim=1) & ~fallback
        hashes = None
        if self.edge_weights == "hash":
            hashes = batch.get("lung_hashes")
            if hashes is None:
                raise GrenError(f"method {self.name or 'gren'} needs lung hashes in the batch: train from a "
                                "prepared cache (gren prepare), not a raw folder dataset")
            hashes = hashes.to(device).bool()
        parts: dict[str, torch.Tensor] = {}
        if self.use_intra:
            e_intra = graph.hash_intra_dissimilarity(hashes) if hashes is not None \
                else graph.cosine_intra_dissimilarity(lung_vectors)
            parts["intra"] = self.lambda_intra * self.intra_regularizer(lung_vectors, e_intra, valid)
        if self.use_inter:
            vectors = graph.image_vectors(features, lung_vectors, self.inter_features)
            if self.inter_scope == "global":
                vectors = dist.all_gather_with_grad(vectors)
                valid = dist.all_gather_no_grad(valid)
                if hashes is not None:
                    hashes = dist.all_gather_no_grad(hashes)
                else:
                    lung_vectors = dist.all_gather_no_grad(lung_vectors)
            e_inter = graph.hash_inter_dissimilarity(hashes) if hashes is not None \
                else graph.cosine_inter_dissimilarity(lung_vectors)
            parts["inter"] = self.lambda_inter * self.inter_regularizer(vectors, e_inter, valid)
        return parts


register_method("gren")(GrenMethod)


@register_method("gren-intra")
class GrenIntra(GrenMethod):
    """B+Intra: the intra-image graph alone."""

    use_inter = False


@register_method("gren-inter")
class GrenInter(GrenMethod):
    """B+Inter: the inter-image graph alone."""

    use_intra = False


@register_method("gren-cosine")
class GrenCosine(GrenMethod):
    """B+Cosine: both graphs, edge weights from the cosine distance of the (detached) CNN lung features."""

    needs = GridMILMethod.needs | {"lung_masks"}
    edge_weights = "cosine"
