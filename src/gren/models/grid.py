"""The grid head: features -> K per-cell logits (Li et al. 2018; GREN section III-A).

``GridHead`` maps backbone features ``(B, C, h, w)`` to logits ``(B, K, h * u, w * u)`` where ``u``
is the optional bilinear upsampling factor applied before the two 1 x 1 convolutions (the paper's
test setting upsamples the feature map before the last layers for finer localization). Each output
cell covers ``S / (h * u)`` input pixels.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class GridHead(nn.Module):
    """``(B, C, h, w)`` features -> ``(B, K, h * upsample, w * upsample)`` logits.

    ``conv1x1(C -> hidden) -> BatchNorm -> ReLU -> conv1x1(hidden -> K)``. The last bias starts at
    ``logit(prior)`` so that every cell begins nearly negative: with ``h * w`` cells the image-level
    MIL probability ``1 - (1 - p)^(h w)`` then starts well below 1 instead of saturating.
    """

    def __init__(self, in_channels: int, num_classes: int = 14, hidden: int = 512, upsample: int = 1,
                 prior: float = 0.01):
        super().__init__()
        if upsample < 1 or int(upsample) != upsample:
            raise ValueError(f"upsample must be a positive integer, got {upsample!r}")
        if not 0.0 < prior < 1.0:
            raise ValueError(f"prior must be in (0, 1), got {prior!r}")
        self.upsample = int(upsample)
        self.reduce = nn.Conv2d(in_channels, hidden, kernel_size=1, bias=False)
        self.bn = nn.BatchNorm2d(hidden)
        self.relu = nn.ReLU(inplace=True)
        self.classify = nn.Conv2d(hidden, num_classes, kernel_size=1)
        nn.init.normal_(self.classify.weight, std=0.01)
        nn.init.constant_(self.classify.bias, math.log(prior / (1.0 - prior)))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if self.upsample > 1:
            features = F.interpolate(features, scale_factor=self.upsample, mode="bilinear", align_corners=False)
        return self.classify(self.relu(self.bn(self.reduce(features))))
