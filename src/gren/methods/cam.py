"""``cam``: Wang et al. 2017 (ChestX-ray8, CVPR): a classifier whose class activation maps localize.

Network (notes/peers.md section 1): the backbone without its pooling and FC layers, a transition layer
to ``D`` channels, log-sum-exp pooling over the ``h x w`` grid (``r = 10``, their best), a linear layer
``D -> 14`` and a sigmoid. Trained on image labels only (boxes are ignored, as published) with the
weighted cross-entropy ``beta_P sum_{y=1} -ln f + beta_N sum_{y=0} -ln(1 - f)``, ``beta_P = (|P| + |N|) /
|P|``, ``beta_N = (|P| + |N|) / |N|`` counted over the batch's label matrix.

Readings where the sources are silent (config ``cam``):

* transition layer: ``conv`` (default) a 1 x 1 convolution to ``cam.channels`` plus batch norm -- the
  "transition layer" of the paper, to a uniform width whatever the backbone; ``identity`` keeps the
  backbone's channels;
* loss scale: the weighted sum divided by the number of label entries ``B x 14``, so that the learning
  rate does not depend on the batch size (the paper writes the plain sum); a batch without positives
  (or without negatives) drops that term;
* maps: CAMs ``sum_d w_kd T_d`` of the transition activations ``T`` without the bias, min-max normalised
  per image and class to [0, 1]; a cell is positive above ``cam.threshold`` (Wang's 180 / 255 by default;
  60 / 255 is their other setting). Maps are drawn for every class (evaluation uses the ground-truth
  class's, as for every method);
* image scores: the classifier's sigmoid outputs (AUC and ``gren predict``'s probabilities).

Evaluation reports our union-of-cells rule and Wang's own box rule (a box around each connected
component of the positive cells; ``eval_rules``). ``model.predict_upsample`` upsamples the transition
map bilinearly before the CAM projection at test time (the projection is linear, so this equals
upsampling the CAM).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gren.core.errors import GrenError
from gren.core.schema import Rule
from gren.methods.maps import class_activation_maps, lse_pool, minmax_normalize
from gren.methods.protocol import Localization, Method
from gren.methods.registry import register_method
from gren.models.backbone import backbone_from_config

TRANSITIONS = ("conv", "identity")


def weighted_bce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Wang et al.'s per-batch weighted cross-entropy over ``(B, K)`` logits and 0/1 labels, / (B K)."""
    logits, labels = logits.float(), labels.to(torch.float32)
    positives = labels.sum()
    entries = float(labels.numel())
    negatives = entries - positives
    beta_p = torch.where(positives > 0, entries / positives.clamp_min(1.0), torch.zeros_like(positives))
    beta_n = torch.where(negatives > 0, entries / negatives.clamp_min(1.0), torch.zeros_like(negatives))
    weights = labels * beta_p + (1.0 - labels) * beta_n
    return F.binary_cross_entropy_with_logits(logits, labels, weight=weights, reduction="sum") / entries


@register_method("cam")
class WangCAM(Method):
    """Wang et al. 2017 (ChestX-ray8): classifier with LSE pooling, labels only; CAM maps (module docstring)."""

    needs = frozenset({"image", "labels"})
    eval_rules = ("wang",)
    defaults = {"cam": {
        "transition": "conv",  # conv: 1x1 conv + BN to cam.channels | identity: the backbone's channels
        "channels": 512,  # D, the transition layer's width (conv)
        "lse_r": 10.0,  # log-sum-exp pooling sharpness r (Wang's best; 0.1 ~ average, 12 ~ max)
        "threshold": 0.70588,  # 180/255: a cell is positive above this fraction of the normalised CAM (60/255 = 0.23529)
    }}
    schema = {"cam.transition": Rule(choices=TRANSITIONS), "cam.channels": Rule(ge=1), "cam.lse_r": Rule(gt=0),
              "cam.threshold": Rule(ge=0, le=1)}

    def __init__(self, config: dict):
        super().__init__(config)
        model_cfg, cam_cfg = config["model"], config["cam"]
        if cam_cfg["transition"] not in TRANSITIONS:
            raise GrenError(f"cam.transition must be one of {', '.join(TRANSITIONS)}, got {cam_cfg['transition']!r}")
        if not 0.0 <= float(cam_cfg["threshold"]) < 1.0:
            raise GrenError(f"cam.threshold must be in [0, 1), got {cam_cfg['threshold']}")
        self.backbone = backbone_from_config(model_cfg)
        channels = self.backbone.out_channels
        if cam_cfg["transition"] == "conv":
            width = int(cam_cfg["channels"])
            self.transition: nn.Module = nn.Sequential(nn.Conv2d(channels, width, 1, bias=False), nn.BatchNorm2d(width))
            channels = width
        else:
            self.transition = nn.Identity()
        self.classifier = nn.Linear(channels, int(model_cfg["num_classes"]))
        self.lse_r = float(cam_cfg["lse_r"])
        self.threshold = float(cam_cfg["threshold"])

    def activations(self, images: torch.Tensor) -> torch.Tensor:
        """``images (B, 1, S, S)`` -> transition activations ``(B, D, h, w)``."""
        return self.transition(self.backbone(images))

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        logits = self.classifier(lse_pool(self.activations(batch["image"]).float(), self.lse_r))
        loss = weighted_bce(logits, batch["labels"])
        return {"total": loss, "bce": loss}

    def localize(self, images: torch.Tensor) -> Localization:
        activations = self.activations(images).float()
        scores = torch.sigmoid(self.classifier(lse_pool(activations, self.lse_r)))
        if self.predict_upsample > 1:
            activations = F.interpolate(activations, scale_factor=self.predict_upsample, mode="bilinear",
                                        align_corners=False)
        maps = minmax_normalize(class_activation_maps(activations, self.classifier.weight))
        return Localization(maps, scores, self.threshold)
