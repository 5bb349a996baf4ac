"""Backbones: torchvision ResNets with a one-channel (grayscale) stem, and any timm feature extractor.

``build_backbone(name, weights, output_stride, normalization="auto")`` returns an ``nn.Module`` mapping
images ``(B, 1, S, S)`` on GREN's scale (:func:`gren.data.dataset.normalize_uint8`, values in [-2, 2])
to features ``(B, C, S / stride, S / stride)``, with attributes ``out_channels`` (C), ``stride`` and
``input_normalization`` (:class:`~gren.models.normalization.InputNormalization`, applied first in
``forward``). Names:

* ``resnet18``, ``resnet34``, ``resnet50``: :class:`ResNetBackbone` (below), ``C = 512`` / ``2048``;
* ``timm:NAME``: :class:`~gren.models.timm_backbone.TimmBackbone`, any timm model with
  ``features_only`` support at the requested stride (see :mod:`gren.models.timm_backbone`).

The ResNets: the torchvision ResNet without its global pool and fc. Grayscale is handled once, in
the stem: the pretrained ``conv1`` weights ``(64, 3, 7, 7)`` are summed over the RGB axis into a
``(64, 1, 7, 7)`` convolution. That is exactly what the RGB network computes on a gray image copied
into three channels, at a third of the stem's cost and without copying the input. Their input
normalisation defaults to ``gren`` (identity): they train on GREN's scale as they always have
(ImageNet's per-channel means/stds are not reproduced; fine-tuning absorbs the difference);
``model.normalization=imagenet`` gives ImageNet's statistics instead (docs/backbones.md).

Weights (config ``model.weights``), ResNets:

* ``none``: random initialisation (default; logged plainly),
* ``imagenet``: the torchvision ``IMAGENET1K_V1`` weights (needs them in the torch hub cache or
  internet; offline a :class:`~gren.core.errors.GrenError` says what to do instead),
* a file path: a ``state_dict`` saved with ``torch.save`` (a full torchvision ResNet's, with an RGB
  or one-channel ``conv1``, ``fc.*`` ignored; or one of this backbone's own keys).

``output_stride`` 32 is the paper's cut (512 px -> 16 x 16 cells). 16 keeps a useful grid at small
CPU sizes (128 px -> 8 x 8): ``layer4`` runs at stride 1, dilated (rate 2) for Bottleneck ResNets
(torchvision's ``replace_stride_with_dilation``) and undilated for BasicBlock ResNets
(torchvision's BasicBlock does not support dilation). 8 (HAM's cut, 512 px -> 64 x 64) runs ``layer3``
and ``layer4`` at stride 1 the same way (dilation 2 and 4 for Bottleneck ResNets,
``replace_stride_with_dilation=[False, True, True]``). timm backbones also take 8 where the model
dilates.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from torch import nn

from gren.core.errors import GrenError
from gren.models.normalization import GREN, InputNormalization, named_normalization
from gren.models.tv import import_torchvision
from gren.models.weights import log_random_init, mismatch_report, read_state_dict

torchvision = import_torchvision()

log = logging.getLogger(__name__)

_RESNETS = {
    "resnet18": (torchvision.models.resnet18, torchvision.models.ResNet18_Weights, 512),
    "resnet34": (torchvision.models.resnet34, torchvision.models.ResNet34_Weights, 512),
    "resnet50": (torchvision.models.resnet50, torchvision.models.ResNet50_Weights, 2048),
}
BACKBONES: tuple[str, ...] = tuple(_RESNETS)
"""The torchvision names; any ``timm:NAME`` is accepted as well."""
TIMM_PREFIX = "timm:"


class ResNetBackbone(nn.Module):
    """A ResNet trunk: ``(B, 1, S, S)`` images -> ``(B, out_channels, S / stride, S / stride)`` features.

    Attributes: ``out_channels`` (C), ``stride`` (input pixels per feature cell, 32, 16 or 8),
    ``input_normalization`` (applied first in :meth:`forward`; identity by default).
    """

    def __init__(self, resnet: torchvision.models.ResNet, out_channels: int, stride: int,
                 normalization: InputNormalization = GREN):
        super().__init__()
        self.conv1 = resnet.conv1
        self.bn1 = resnet.bn1
        self.relu = resnet.relu
        self.maxpool = resnet.maxpool
        self.layer1 = resnet.layer1
        self.layer2 = resnet.layer2
        self.layer3 = resnet.layer3
        self.layer4 = resnet.layer4
        self.out_channels = out_channels
        self.stride = stride
        self.input_normalization = normalization

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """``images (B, 1, S, S)`` on GREN's scale -> features ``(B, C, ceil(S / stride), ceil(S / stride))``."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(self.input_normalization(images)))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


def gray_stem(conv1_rgb: torch.Tensor) -> torch.Tensor:
    """Sum RGB stem weights ``(O, 3, k, k)`` into one channel ``(O, 1, k, k)``; one-channel weights pass."""
    if conv1_rgb.shape[1] == 1:
        return conv1_rgb
    return conv1_rgb.sum(dim=1, keepdim=True)


def _imagenet_state_dict(name: str) -> dict[str, torch.Tensor]:
    weights_enum = _RESNETS[name][1].IMAGENET1K_V1
    try:
        return weights_enum.get_state_dict(progress=False, check_hash=False)
    except Exception as err:  # URLError, socket errors, HTTP errors: all mean "not available here"
        cache = Path(torch.hub.get_dir()) / "checkpoints"
        raise GrenError(
            f"cannot get the ImageNet weights for {name} ({type(err).__name__}: {err}). They are downloaded "
            f"from {weights_enum.url} into {cache}; offline, copy that file there, or pass a local "
            f"state_dict file with model.weights=PATH, or train from scratch with model.weights=none"
        ) from None


def build_backbone(name: str = "resnet50", weights: str | os.PathLike | None = "none", output_stride: int = 32,
                   normalization: str = "auto") -> nn.Module:
    """A grayscale backbone: ``(B, 1, S, S)`` -> ``(B, out_channels, S / stride, S / stride)``.

    Args:
        name: ``resnet18``, ``resnet34``, ``resnet50`` or ``timm:NAME``.
        weights: ``none`` / ``None`` (random init), ``imagenet``, or a path to a state_dict file.
        output_stride: 32 (the paper), 16 (``layer4`` at stride 1) or 8 (``layer3`` and ``layer4`` at stride 1;
            HAM's cut); timm models take 8 where they dilate.
        normalization: ``model.normalization``: ``auto`` (the backbone's own: ``gren`` for the ResNets,
            ``timm`` for timm models), ``gren``, ``imagenet``, ``timm`` or ``xrv``
            (:mod:`gren.models.normalization`).

    Raises:
        GrenError: unknown name or stride, unreadable weights file, ImageNet weights unavailable offline.
    """
    if str(name).startswith(TIMM_PREFIX):
        from gren.models.timm_backbone import build_timm_backbone

        return build_timm_backbone(str(name)[len(TIMM_PREFIX):], weights, output_stride, normalization)
    if name not in _RESNETS:
        raise GrenError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)} or timm:NAME")
    if output_stride not in (8, 16, 32):
        raise GrenError(f"model.output_stride must be 32, 16 or 8 for {name}, got {output_stride!r}")
    norm = named_normalization(normalization, GREN)
    factory, _, channels = _RESNETS[name]
    bottleneck = name == "resnet50"
    dilate = [False, output_stride == 8, output_stride <= 16]
    resnet = factory(weights=None, replace_stride_with_dilation=dilate if bottleneck else [False, False, False])
    resnet.conv1 = nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
    if not bottleneck:
        for layer, undo in zip((resnet.layer3, resnet.layer4), dilate[1:]):
            if undo:
                _undo_first_stride(layer)

    spec = "none" if weights is None else str(weights)
    if spec.lower() == "none":
        log_random_init(log, name)
    else:
        state = _imagenet_state_dict(name) if spec.lower() == "imagenet" else read_state_dict(spec)
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
        if "conv1.weight" in state:
            state["conv1.weight"] = gray_stem(state["conv1.weight"])
        expected = {k: v for k, v in resnet.state_dict().items() if not k.startswith("fc.")}
        missing = [k for k in expected if k not in state]
        unexpected = [k for k in state if k not in expected]
        wrong_shape = [f"{k} {tuple(v.shape)} != {tuple(expected[k].shape)}"
                       for k, v in state.items() if k in expected and v.shape != expected[k].shape]
        if missing or unexpected or wrong_shape:
            raise GrenError(mismatch_report(spec, name, missing, unexpected, wrong_shape))
        resnet.load_state_dict(state, strict=False)  # strict but for fc.*, checked above
        log.info("backbone %s: weights from %s (RGB stem summed to one channel)", name, spec)
    if not norm.is_identity:
        log.info("backbone %s: input normalisation %s", name, norm.describe())
    return ResNetBackbone(resnet, channels, output_stride, norm)


def _undo_first_stride(layer: nn.Sequential) -> None:
    """Make a BasicBlock ResNet stage (``layer3``, ``layer4``) keep its input resolution (stride 1, no dilation)."""
    block = layer[0]
    block.conv1.stride = (1, 1)
    if block.downsample is not None:
        block.downsample[0].stride = (1, 1)


def backbone_from_config(model_cfg: dict) -> nn.Module:
    """:func:`build_backbone` from a resolved config's ``model`` section (``backbone, weights, output_stride,
    normalization``): the one way every method builds its backbone."""
    return build_backbone(model_cfg["backbone"], model_cfg["weights"], int(model_cfg["output_stride"]),
                          normalization=str(model_cfg.get("normalization", "auto")))
