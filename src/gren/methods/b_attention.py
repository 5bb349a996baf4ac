"""``b-attention``: GREN's "B + Attention" ablation (Qi et al. 2021, Table IV).

All the paper says: "the attention mechanism integrated into the baseline to learn the difference of lung
regions". The reading implemented here (no other source exists):

* **difference of lung regions** = the difference between the feature map and its mirror image about the
  film's vertical midline, ``|F - flip(F)|``: at each cell, how the features there differ from those of the
  symmetric cell of the other lung (the bilateral comparison GREN's intra-image graph also relies on).
  The midline mirror needs no lung masks, so the model is the same at training and at test time, where
  ``localize`` only has the images.
* **attention** = a spatial map computed from that difference by a small 1 x 1 conv block
  (``C -> attention.hidden -> 1``, ReLU between), ``a = 2 sigmoid(z)`` in (0, 2), multiplying the
  features before the grid head: ``F' = a * F`` (one weight per cell, shared by the channels). The last
  conv starts at zero, so ``a = 1`` and the model starts as the baseline exactly.
* Everything else is the baseline (Li et al.'s box + MIL loss, the grid head, test-time maps).

Shapes: ``F`` ``(B, C, h, w)``; ``a`` ``(B, 1, h, w)``. Config: ``attention.hidden`` (default 64).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gren.methods.grid_mil import GridMILMethod
from gren.methods.protocol import Localization
from gren.methods.registry import register_method
from gren.metrics import image_scores


class MirrorDifferenceAttention(nn.Module):
    """``(B, C, h, w)`` features -> ``(B, 1, h, w)`` weights ``2 sigmoid(conv(|F - flip_w(F)|))`` in (0, 2)."""

    def __init__(self, channels: int, hidden: int = 64):
        super().__init__()
        self.reduce = nn.Conv2d(channels, hidden, kernel_size=1)
        self.score = nn.Conv2d(hidden, 1, kernel_size=1)
        nn.init.zeros_(self.score.weight)
        nn.init.zeros_(self.score.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        difference = (features - torch.flip(features, dims=(-1,))).abs()
        return 2.0 * torch.sigmoid(self.score(F.relu(self.reduce(difference))))


@register_method("b-attention")
class BAttention(GridMILMethod):
    """B + Attention (GREN Table IV): baseline with a left/right-difference spatial attention.

    The attention, from the difference between the features and their mirror image, weights the features
    before the head. See the module docstring for the reading."""

    defaults = {"attention": {"hidden": 64}}

    def __init__(self, config: dict):
        super().__init__(config)
        self.attention = MirrorDifferenceAttention(int(self.backbone.out_channels), int(config["attention"]["hidden"]))

    def attended(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``images (B, 1, S, S)`` -> the weighted features ``(B, C, h, w)`` and the attention ``(B, 1, h, w)``."""
        features = self.backbone(images)
        weights = self.attention(features)
        return features * weights.to(features.dtype), weights

    def grid_outputs(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        features, weights = self.attended(images)
        return {"logits": self.head(features), "features": features, "attention": weights}

    def localize(self, images: torch.Tensor) -> Localization:
        features, _ = self.attended(images)
        if self.predict_upsample > 1:
            features = F.interpolate(features, scale_factor=self.predict_upsample, mode="bilinear",
                                     align_corners=False)
        probs = torch.sigmoid(self.head(features)).float()
        evidence = image_scores(probs, "noisy_or")
        return Localization(probs, -torch.expm1(-evidence).float(), self.cell_threshold, evidence=evidence)
