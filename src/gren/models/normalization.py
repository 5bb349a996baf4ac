"""Input normalisation as a property of the backbone: a fixed affine map from GREN's scale to the backbone's.

The data pipeline feeds every model the same thing (:func:`gren.data.dataset.normalize_uint8`): an
8-bit gray value ``v`` (0..255) becomes ``x = (v / 255 - 0.5) / 0.25``, so ``x`` spans [-2, 2]. A
backbone whose weights were trained on another scale converts ``x`` inside its ``forward`` with
``x * scale + shift`` (two Python floats: no buffers, nothing in the state dict; the scale is
rebuilt from the config, ``model.normalization``).

For a scale defined as ``(u - mean) / std`` on ``u = v / 255`` in [0, 1]: ``u = 0.25 x + 0.5``, hence
``scale = 0.25 / std`` and ``shift = (0.5 - mean) / std``.

Named normalisations (``model.normalization``; docs/backbones.md):

* ``auto``: the backbone's own: ``gren`` for the torchvision ResNets, ``timm`` for ``timm:NAME``;
* ``gren``: identity (the torchvision ResNets train on GREN's scale, as before this option existed);
* ``imagenet``: ImageNet's mean/std (0.485, 0.456, 0.406) / (0.229, 0.224, 0.225) made gray;
* ``timm``: the timm model's pretrained config mean/std made gray (``timm:NAME`` only);
* ``xrv``: torchxrayvision's scale, ``(2 u - 1) * 1024`` in [-1024, 1024] (``scale = 512``, ``shift = 0``),
  for users who bring weights trained with it.

Gray from RGB statistics: the mean of the three channel means and the mean of the three stds. The
one-channel stem is the sum of the RGB stem weights, i.e. the RGB network applied to the gray image
copied into all three channels; every channel then sees the same value, so no channel's statistics
deserve more weight than another's (a luma weighting would describe the gray version of a colour
image, which is not what the network is given). Where the three means and stds are equal
(``tf_efficientnet_lite0``, ViTs: 0.5 / 0.5) the one-channel network is exactly the RGB network on the
replicated gray image; with ImageNet's statistics each channel's mean differs from the gray one by at
most 0.043 (0.19 std), which fine-tuning absorbs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from gren.core.errors import GrenError

GREN_MEAN = 0.5
"""Mean subtracted from ``v / 255`` by the data pipeline (``gren.data.dataset.NORM_MEAN``; a test checks they agree)."""
GREN_STD = 0.25
"""Divisor of the data pipeline (``gren.data.dataset.NORM_STD``)."""

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

NORMALIZATIONS: tuple[str, ...] = ("auto", "gren", "imagenet", "timm", "xrv")


@dataclass(frozen=True)
class InputNormalization:
    """``images * scale + shift``: GREN's scale (values in [-2, 2]) -> the backbone's input scale.

    ``name`` says where it came from (``gren``, ``imagenet``, ``timm``, ``xrv``); ``mean`` / ``std`` are
    the gray statistics on ``v / 255`` it implements (``None`` for ``xrv``, which is not of that form).
    """

    name: str
    scale: float
    shift: float
    mean: float | None = None
    std: float | None = None

    @classmethod
    def from_mean_std(cls, name: str, mean: float, std: float) -> InputNormalization:
        """The map to ``(v / 255 - mean) / std`` from GREN's ``(v / 255 - 0.5) / 0.25``."""
        if not std > 0:
            raise GrenError(f"input normalisation {name}: std must be positive, got {std!r}")
        return cls(name, GREN_STD / std, (GREN_MEAN - mean) / std, float(mean), float(std))

    @classmethod
    def from_rgb(cls, name: str, mean: Sequence[float], std: Sequence[float]) -> InputNormalization:
        """Gray statistics from per-channel ones: the mean of the means and the mean of the stds."""
        mean, std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        return cls.from_mean_std(name, sum(mean) / len(mean), sum(std) / len(std))

    @property
    def is_identity(self) -> bool:
        return self.scale == 1.0 and self.shift == 0.0

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """``images`` (B, 1, H, W) on GREN's scale -> the same shape on the backbone's scale."""
        if self.is_identity:
            return images
        if self.shift == 0.0:
            return images * self.scale
        return images * self.scale + self.shift

    def describe(self) -> str:
        stats = f", mean {self.mean:.4g} std {self.std:.4g} on v/255" if self.mean is not None else ""
        return f"{self.name} (x * {self.scale:.6g} + {self.shift:.6g}{stats})"


GREN = InputNormalization("gren", 1.0, 0.0, GREN_MEAN, GREN_STD)
XRV = InputNormalization("xrv", 2048.0 * GREN_STD, 2048.0 * GREN_MEAN - 1024.0)


def named_normalization(spec: str, backbone_default: InputNormalization,
                        timm_stats: tuple[Sequence[float], Sequence[float]] | None = None) -> InputNormalization:
    """Resolve ``model.normalization`` for one backbone.

    Args:
        spec: one of :data:`NORMALIZATIONS` (case-insensitive).
        backbone_default: what ``auto`` means for this backbone.
        timm_stats: ``(mean, std)`` per RGB channel from a timm pretrained config, or ``None`` when the
            backbone is not a timm model (then ``timm`` is an error).
    """
    key = str(spec or "auto").strip().lower()
    if key == "auto":
        return backbone_default
    if key == "gren":
        return GREN
    if key == "xrv":
        return XRV
    if key == "imagenet":
        return InputNormalization.from_rgb("imagenet", IMAGENET_MEAN, IMAGENET_STD)
    if key == "timm":
        if timm_stats is None:
            raise GrenError("model.normalization=timm needs a timm backbone (model.backbone=timm:NAME)")
        return InputNormalization.from_rgb("timm", *timm_stats)
    raise GrenError(f"unknown model.normalization {spec!r}; choose one of {', '.join(NORMALIZATIONS)}")
