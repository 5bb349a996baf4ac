"""The grid-MIL model every grid method builds on: Li et al. 2018's baseline ("B" in GREN's tables).

:class:`GridMILMethod`: backbone + :class:`~gren.models.grid.GridHead` (``K x h x w`` per-cell logits),
trained with :class:`~gren.methods.losses.LocalizationLoss` (box BCE where a class has a box, MIL
``P(c) = 1 - prod_j (1 - p_j)`` elsewhere). Subclasses add weighted loss terms in :meth:`extra_losses`
(GREN's graphs, CCG's relations), which see :meth:`GridMILMethod.grid_outputs`.

Test time (:meth:`localize`): the cell probabilities ``sigmoid(logits)`` as maps, positive above
``0.5`` (the authors' test code), and the MIL noisy-or of the cells as the image probability (with the
log-space sum ``-sum_j log(1 - p_j)`` as ``evidence``, see :class:`~gren.methods.protocol.Localization`).
``model.predict_upsample`` (default 1): the backbone map is upsampled bilinearly by this factor before
the head at test time only -- the protocol of the published CIA / CCG / GREN rows (16 x 16 x8).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gren.core.schema import Rule
from gren.methods.losses import LocalizationLoss, box_targets
from gren.methods.protocol import Localization, Method, total_of
from gren.metrics import image_scores
from gren.models.backbone import backbone_from_config
from gren.models.grid import GridHead


class GridMILMethod(Method):
    """Backbone + grid head + box/MIL loss.

    Config keys: ``model.backbone, weights, output_stride, head_hidden, upsample, predict_upsample, prior,
    num_classes``; ``loss.beta, mil_rescale`` (this class's own section, see ``defaults``).
    """

    needs = frozenset({"image", "labels", "boxes", "box_labels"})
    defaults = {"loss": {
        "beta": 4.0,  # weight of the box loss (eq. 3)
        "mil_rescale": 0.0,  # Li et al.'s p -> r + (1 - r) p in the MIL loss; 0 = off, 0.98 = theirs
    }}
    schema = {"loss.beta": Rule(ge=0), "loss.mil_rescale": Rule(ge=0, lt=1)}
    cell_threshold: float = 0.5

    def __init__(self, config: dict):
        super().__init__(config)
        model_cfg, loss_cfg = config["model"], config["loss"]
        self.backbone = backbone_from_config(model_cfg)
        self.head = GridHead(self.backbone.out_channels, int(model_cfg["num_classes"]), int(model_cfg["head_hidden"]),
                             int(model_cfg["upsample"]), float(model_cfg["prior"]))
        self.num_classes = int(model_cfg["num_classes"])
        self.localization_loss = LocalizationLoss(float(loss_cfg["beta"]), float(loss_cfg["mil_rescale"] or 0.0))

    def grid_outputs(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """``images (B, 1, S, S)`` -> ``logits (B, K, h, w)``, ``features (B, C, h0, w0)`` (the backbone map;
        ``h = h0 * model.upsample``)."""
        features = self.backbone(images)
        return {"logits": self.head(features), "features": features}

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        outputs = self.grid_outputs(batch["image"])
        logits = outputs["logits"]
        targets, has_box = box_targets(batch["boxes"], batch["box_labels"], tuple(logits.shape[-2:]),
                                       tuple(batch["image"].shape[-2:]), self.num_classes)
        parts = self.localization_loss(logits, batch["labels"].to(logits.device), targets.to(logits.device),
                                       has_box.to(logits.device))
        parts.pop("total")
        parts.update(self.extra_losses(outputs, batch))
        return total_of(parts)

    def loss_weights(self) -> dict[str, str]:
        return {"box": "loss.beta"}

    def extra_losses(self, outputs: dict[str, torch.Tensor], batch: dict) -> dict[str, torch.Tensor]:
        """Additional weighted loss terms (already multiplied by their lambda); none for the baseline."""
        return {}

    def localize(self, images: torch.Tensor) -> Localization:
        features = self.backbone(images)
        if self.predict_upsample > 1:
            features = F.interpolate(features, scale_factor=self.predict_upsample, mode="bilinear",
                                     align_corners=False)
        probs = torch.sigmoid(self.head(features)).float()
        evidence = image_scores(probs, "noisy_or")  # float64 (B, K), -sum_j log(1 - p_j)
        return Localization(probs, -torch.expm1(-evidence).float(), self.cell_threshold, evidence=evidence)
