"""The method interface and the shared grid model every method builds on.

A method is an ``nn.Module`` with:

* ``forward(images (B, 1, S, S)) -> dict``: ``logits (B, K, h, w)``, ``probs (B, K, h, w)`` (sigmoid),
  ``features (B, C, h0, w0)`` (the backbone map the regularizers see; ``h = h0 * model.upsample``);
* ``losses(outputs, batch) -> dict[str, Tensor]``: ``total`` and each part (``box``, ``mil``, ...);
* ``predict(images) -> probs (B, K, h, w)``: the test-time map, without gradients.

:class:`GridMILMethod` is Li et al.'s baseline (backbone + grid head, box + MIL loss); other methods
subclass it and add loss terms in :meth:`GridMILMethod.extra_losses`, or replace ``forward``.
"""

from __future__ import annotations

import torch
from torch import nn

from gren.methods.losses import LocalizationLoss, box_targets
from gren.models.backbone import build_backbone
from gren.models.grid import GridHead


class LocalizationMethod(nn.Module):
    """Base class: see the module docstring for the contract. ``name`` is the registry name."""

    name: str = ""

    def losses(self, outputs: dict[str, torch.Tensor], batch: dict) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """``images (B, 1, S, S)`` -> ``probs (B, K, h, w)`` in eval mode (restores the previous mode)."""
        was_training = self.training
        self.eval()
        try:
            return self(images)["probs"].float()
        finally:
            self.train(was_training)


class GridMILMethod(LocalizationMethod):
    """Backbone + :class:`~gren.models.grid.GridHead`, trained with :class:`LocalizationLoss`.

    Config keys used: ``model.backbone, weights, output_stride, head_hidden, upsample, prior,
    num_classes``; ``loss.beta, mil_rescale``.
    """

    def __init__(self, config: dict):
        super().__init__()
        model_cfg, loss_cfg = config["model"], config["loss"]
        self.backbone = build_backbone(model_cfg["backbone"], model_cfg["weights"], int(model_cfg["output_stride"]))
        self.head = GridHead(self.backbone.out_channels, int(model_cfg["num_classes"]), int(model_cfg["head_hidden"]),
                             int(model_cfg["upsample"]), float(model_cfg["prior"]))
        self.num_classes = int(model_cfg["num_classes"])
        self.localization_loss = LocalizationLoss(float(loss_cfg["beta"]), float(loss_cfg["mil_rescale"] or 0.0))

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.backbone(images)
        logits = self.head(features)
        return {"logits": logits, "probs": torch.sigmoid(logits), "features": features}

    def losses(self, outputs: dict[str, torch.Tensor], batch: dict) -> dict[str, torch.Tensor]:
        logits = outputs["logits"]
        targets, has_box = box_targets(batch["boxes"], batch["box_labels"], tuple(logits.shape[-2:]),
                                       tuple(batch["image"].shape[-2:]), self.num_classes)
        parts = self.localization_loss(logits, batch["labels"].to(logits.device), targets.to(logits.device),
                                       has_box.to(logits.device))
        for key, value in self.extra_losses(outputs, batch).items():
            parts[key] = value
            parts["total"] = parts["total"] + value
        return parts

    def extra_losses(self, outputs: dict[str, torch.Tensor], batch: dict) -> dict[str, torch.Tensor]:
        """Additional weighted loss terms (already multiplied by their lambda); none for the baseline."""
        return {}
