"""The method protocol: what every localization method provides and what the engine, evaluate, crossval,
predict, report and the demo rely on -- and nothing else.

A method is an ``nn.Module`` subclass of :class:`Method`, registered under a name with
:func:`gren.methods.registry.register_method`. It provides two things:

* ``forward(batch) -> dict[str, Tensor]``: the whole training step's losses, ``total`` plus named,
  already weighted parts (``box``, ``mil``, ``intra`` ...) with ``total == sum(parts)``. ``batch`` is the
  collated dict of docs/architecture.md ("Dataset items") already on the training device: ``image``
  float32 ``(B, 1, S, S)`` on the :func:`gren.data.dataset.normalize_uint8` scale, ``labels`` ``(B, 14)``,
  ``boxes`` a list of ``(n_i, 4)`` in input pixels, ... The engine calls it inside DDP and autocast, so a
  method's regularizers, teachers and pairings all run in one place.
* ``localize(images (B, 1, S, S)) -> Localization``: the test-time output, see :class:`Localization`.
  :meth:`Method.predict` is ``localize`` in eval mode, without gradients unless the class sets
  ``localize_needs_grad``.

Optional hooks, with defaults here (override what a method needs):

* ``needs``: the batch keys ``forward`` reads. The engine checks them against what the training data
  provides before step 1 and names what is missing (and how to get it).
* ``defaults``: the method's own config sections (``{"graph": {...}}``) or overrides of shared keys
  (``{"optim": {"lr": 2e-5}}``), merged over ``configs/default.yaml`` and under the user's config. The
  merge follows the class hierarchy, so a subclass adds to its parent's defaults. Unknown keys in the
  user's config or overrides are still errors.
* ``schema``: rules for the method's config keys beyond the types their defaults give
  (``{"graph.form": Rule(choices=("pull", "paper", "contrastive"))}``, :class:`gren.core.schema.Rule`),
  merged over the class hierarchy; checked when the config is resolved, before any data is read.
* ``stages(config)``: the training stages, each with its epochs and optimizer overrides; one stage
  ``train`` of ``train.epochs`` by default. Resume continues at the right stage and epoch.
* ``param_groups(optim_cfg)``: the optimizer's parameter groups (default: every trainable parameter).
* ``batch_sampler(data, config, seed=..., rank=..., world_size=...)``: a sampler of index lists with
  ``set_epoch``, or ``None`` for the engine's mixed annotated / label-only sampler.
* ``item_transform(config)``: a per-item callable ``item dict -> item dict`` applied in the data loader
  (erasure, augmentation), or ``None``.
* ``on_stage_start(stage, context)``, ``on_step_end(context)``: called by the engine (teachers, EMA,
  weight constraints).
* ``extra_state()`` / ``load_extra_state(state)``: tensors and plain data saved in the checkpoint beside
  the weights (``method_state``) and restored on resume and by :func:`~gren.methods.registry.load_run`.
* ``loss_weights()``: ``{part: "section.key"}``, the config key that scales each weighted part; the
  registry tests check that setting it to 0 removes exactly that part from ``total``.
* ``eval_rules``: which box rules evaluation reports for this method besides the default union of cells
  (``"wang"``: Wang et al.'s box around each connected component); ``eval.rules`` in the config adds
  rules for any method.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from gren.core.labels import LABELS


@dataclass
class Localization:
    """What a method returns at test time, for a batch of ``B`` images of ``S x S`` pixels.

    Attributes:
        maps: ``(B, K, h, w)`` float maps, each covering the whole ``S x S`` input (``S / w`` pixels per
            cell; cells or pixels, whatever the method draws).
        scores: ``(B, K)`` image-level probabilities in [0, 1] (AUC, ``gren predict``'s "probability").
        threshold: a cell is positive when ``maps > threshold``: a scalar, or ``(B, K)`` per image and class.
        labels: the ``K`` class names, in channel order.
        evidence: optional ``(B, K)`` scores strictly increasing with ``scores`` that do not saturate
            (e.g. the MIL log-space sum, whose probability rounds to 1.0 in floating point when many cells
            are confident); evaluation ranks by it for AUC when present, so ties from rounding cannot
            change the AUC.
    """

    maps: torch.Tensor
    scores: torch.Tensor
    threshold: float | torch.Tensor = 0.5
    labels: tuple[str, ...] = LABELS
    evidence: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.maps.dim() != 4:
            raise ValueError(f"Localization.maps must be (B, K, h, w), got {tuple(self.maps.shape)}")
        batch, classes = self.maps.shape[:2]
        if tuple(self.scores.shape) != (batch, classes):
            raise ValueError(f"Localization.scores must be (B, K) = ({batch}, {classes}), got {tuple(self.scores.shape)}")
        if classes != len(self.labels):
            raise ValueError(f"Localization has {classes} maps but {len(self.labels)} label names")
        if isinstance(self.threshold, torch.Tensor) and self.threshold.dim() > 0 \
                and tuple(self.threshold.shape) != (batch, classes):
            raise ValueError(f"Localization.threshold must be a scalar or (B, K), got {tuple(self.threshold.shape)}")

    def thresholds(self) -> torch.Tensor:
        """The threshold as a float32 ``(B, K)`` tensor on the maps' device."""
        batch, classes = self.maps.shape[:2]
        value = torch.as_tensor(self.threshold, dtype=torch.float32, device=self.maps.device)
        return value.expand(batch, classes) if value.dim() == 0 else value.to(torch.float32)

    def positive(self) -> torch.Tensor:
        """``(B, K, h, w)`` bool: the cells above the threshold."""
        return self.maps > self.thresholds()[..., None, None].to(self.maps.dtype)

    def with_threshold(self, threshold: float | torch.Tensor) -> Localization:
        """A copy with another threshold (``gren predict --threshold``)."""
        return Localization(self.maps, self.scores, threshold, self.labels, self.evidence)

    def detach_cpu(self) -> Localization:
        """Everything detached, float32 (``evidence`` float64) on the CPU."""
        threshold = self.threshold.detach().float().cpu() if isinstance(self.threshold, torch.Tensor) \
            else float(self.threshold)
        evidence = None if self.evidence is None else self.evidence.detach().to("cpu", torch.float64)
        return Localization(self.maps.detach().float().cpu(), self.scores.detach().float().cpu(), threshold,
                            tuple(self.labels), evidence)


@dataclass(frozen=True)
class Stage:
    """One training stage: ``epochs`` epochs with the ``optim`` section updated by ``optim`` (may be empty)."""

    name: str
    epochs: int
    optim: dict = field(default_factory=dict)


@dataclass
class TrainContext:
    """What the engine tells a method's hooks: where training is, and with what."""

    config: dict
    device: torch.device
    stage: Stage
    stage_index: int
    epoch: int = 0  # completed epochs within the stage
    step: int = 0  # steps within the epoch
    global_step: int = 0
    data: Any = None  # the engine's TrainingData
    optimizer: torch.optim.Optimizer | None = None
    losses: dict | None = None  # the step's parts (detached), in on_step_end


def merged_defaults(cls: type) -> dict:
    """``defaults`` of ``cls`` and its bases merged, the most derived last (nested sections merge)."""
    merged: dict = {}
    for klass in reversed(cls.__mro__):
        own = klass.__dict__.get("defaults")
        if own:
            merged = deep_update(merged, own)
    return merged


def deep_update(base: dict, update: dict) -> dict:
    """A copy of ``base`` with ``update`` merged in recursively."""
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_update(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


class Method(nn.Module):
    """Base class of every localization method; see the module docstring for the contract."""

    name: str = ""
    needs: ClassVar[frozenset[str]] = frozenset({"image", "labels"})
    defaults: ClassVar[dict] = {}
    schema: ClassVar[dict] = {}  # {"section.key": gren.core.schema.Rule}
    localize_needs_grad: ClassVar[bool] = False
    eval_rules: ClassVar[tuple[str, ...]] = ()

    def __init__(self, config: dict):
        super().__init__()
        self.config = config
        model_cfg = config.get("model", {})
        self.predict_upsample = int(model_cfg.get("predict_upsample", 1) or 1)
        if self.predict_upsample < 1:
            raise ValueError(f"model.predict_upsample must be a positive integer, got {self.predict_upsample}")

    # -- required ---------------------------------------------------------------------------------------
    def forward(self, batch: dict) -> dict[str, torch.Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    def localize(self, images: torch.Tensor) -> Localization:  # pragma: no cover - abstract
        raise NotImplementedError

    # -- test time --------------------------------------------------------------------------------------
    def predict(self, images: torch.Tensor) -> Localization:
        """:meth:`localize` in eval mode (the previous mode restored), under ``no_grad`` unless the class
        sets ``localize_needs_grad``."""
        was_training = self.training
        self.eval()
        try:
            with torch.set_grad_enabled(self.localize_needs_grad):
                return self.localize(images)
        finally:
            self.train(was_training)

    # -- optional hooks ---------------------------------------------------------------------------------
    def stages(self, config: dict) -> list[Stage]:
        return [Stage("train", int(config["train"]["epochs"]))]

    def param_groups(self, optim_cfg: dict) -> Iterable:
        return [p for p in self.parameters() if p.requires_grad]

    def batch_sampler(self, data, config: dict, *, seed: int, rank: int, world_size: int):
        return None

    def item_transform(self, config: dict) -> Callable[[dict], dict] | None:
        return None

    def on_stage_start(self, stage: Stage, context: TrainContext) -> None:
        pass

    def on_step_end(self, context: TrainContext) -> None:
        pass

    def loss_weights(self) -> dict[str, str]:
        return {}

    def extra_state(self) -> dict:
        return {}

    def load_extra_state(self, state: dict) -> None:
        pass


def total_of(parts: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``parts`` plus ``total``, their sum (parts added in their insertion order)."""
    if not parts:
        raise ValueError("a method's forward must return at least one loss part")
    total = None
    for value in parts.values():
        total = value if total is None else total + value
    return {"total": total, **parts}
