"""``ham``: hierarchical attention mining (Ouyang et al., IEEE TMI 2021; code ``oyxhust/HAM``).

A classifier whose class activation maps are trained to localize, with an "abnormal" head above the 14
disease heads and ordinal constraints between their maps (notes/peers.md section 4; what the paper's
abstract leaves out was read from the authors' public code and re-implemented here, not copied).

Network, on images ``(B, 1, S, S)``:

* backbone ``C5 (B, C, S/8, S/8)``: ResNet-50 at output stride 8 (``layer3`` and ``layer4`` dilated) by
  default (``model.backbone``, ``model.output_stride``: any backbone works; ``--config cpu-small`` gives the
  documented small variant resnet18 at stride 16);
* foreground attention (:class:`ForegroundAttention`): 3 x 3 conv ``C -> C/4`` + BN, the attention block,
  3 x 3 conv + BN. The block: a softmax over the positions of a 1 x 1 conv gives a global context vector,
  a bias-free MLP (reduction 8) and a sigmoid give a channel gate on a 1 x 1 conv of the input; a 1 x 1
  conv of the gated map to one channel is gated by ``sigmoid(BN(conv3x3(.)))`` and added to the input
  as ``gamma * position + x`` (``gamma`` starts at 0; the one-channel term is broadcast over the channels,
  as the authors compute it);
* head: 3 x 3 conv on ``concat(C5, attention)`` -> ``ham.head_channels`` (512), BN, ReLU, channel dropout
  (``ham.dropout`` = 0.1, a Dropout2d whose masks are drawn from ``(seed, step, rank)`` so that a step is a
  function of the weights and the batch: resume and the registry's paired tests stay exact);
* LSE pooling (``r = 6``) and two bias-free linear heads: "abnormal" (1) and the 14 classes.

Maps: CAMs ``relu(sum_d w_kd A_d)`` from the linear weights **detached** (the map losses train the
features, not the classifier); refined maps ``sigmoid(100 (minmax(upsample_to_S(cam)) - 0.4))``
(:func:`gren.methods.maps.refine_maps`).

Loss (the published weights, ``ham.w_*``): ``0.01 BCE_abnormal + 1 BCE_classes + 0.5 L_box + 0.001 L_bound +
0.001 L_union``, parts ``abnormal, classes, box, bound, union``:

* BCE: mean over images (abnormal: "any of the 14 labels") and over images x classes;
* ``L_box`` (each class with a box in the batch): ``sum_i,px (refined - mask)^2 / sum_i,px (refined + mask)``
  over the batch's images with a box of that class, mask = the union of its boxes in input pixels
  (a pixel counts when a box covers it partly); the mean over those classes;
* ``L_bound`` (disease inside abnormality, each positive (image, class)): ``1 - sum min(cam_c, cam_a)
  sigmoid(100 (cam_c - 0.75)) / sum cam_c`` on the raw CAMs of the feature grid; mean over the class's
  positive images, then over the classes with positives;
* ``L_union`` (abnormality inside the union of diseases, abnormal images): ``1 - sum min(max_c cam_c,
  cam_a) sigmoid(100 (cam_a - 0.75)) / sum cam_a`` (``cam_c`` zeroed for negative classes); mean over the
  abnormal images.

Training (``defaults``): Adam, lr 2e-5, weight decay 1e-4 (L2, as the authors' Adam), lr x 0.1 every 10
epochs, 30 epochs; the last epoch's weights are used (the authors' script selects on the test fold; we
never do). The batch sampler is the shared one (``data.annotated_fraction``), not the authors' natural
mix, so that every method of a table sees the same batches. Augmentation (:class:`HamAugment`, the
method's ``item_transform``, ``ham.augment``): resize by ``1 + k/100``, ``k`` uniform in 0..12, random
crop back to ``S``, horizontal flip with probability 0.5. A flip puts the patient's right lung on the
image right, so the lung masks are relabelled (1 <-> 2: 1 stays "the image-left lung") and
``lung_hashes`` swapped; the hashes are those of the unflipped crops.

Test: ``Localization(maps=refined (B, 14, S, S), scores=sigmoid(class logits), threshold=0.999)`` --
``refined >= 0.999`` means a normalised CAM above 0.469; ``evidence`` = the class logits (AUC ranking).
``model.predict_upsample = f`` draws the refined map at ``f S x f S``. Grad-CAM of this head is
proportional to its CAM, so no backward pass is needed at test. The paper's "mining" step does not appear
in the authors' code and is not implemented. Cost: 9.3x the baseline's forward FLOPs at output stride 8
(counted at any input size); the measured CPU step ratio is lower at small inputs (benchmarks/results/ham_iam.md).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from gren.core import dist
from gren.core.errors import GrenError
from gren.methods.losses import box_targets
from gren.methods.maps import class_activation_maps, lse_pool, refine_maps
from gren.methods.protocol import Localization, Method, total_of
from gren.methods.registry import register_method
from gren.models.backbone import backbone_from_config

PARTS = ("abnormal", "classes", "box", "bound", "union")


def _conv_bn(in_channels: int, out_channels: int, kernel: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, kernel, padding=kernel // 2, bias=False),
                         nn.BatchNorm2d(out_channels))


class AttentionBlock(nn.Module):
    """Channel gate from a softmax-pooled context, then a one-channel position gate: ``(B, C, h, w)`` -> same."""

    def __init__(self, channels: int, reduction: int = 8):
        super().__init__()
        self.context = nn.Conv2d(channels, 1, 1, bias=False)
        hidden = max(1, channels // reduction)
        self.channel_mlp = nn.Sequential(nn.Linear(channels, hidden, bias=False), nn.ReLU(inplace=True),
                                         nn.Linear(hidden, channels, bias=False))
        self.value = nn.Conv2d(channels, channels, 1, bias=False)
        self.position = nn.Conv2d(channels, 1, 1, bias=False)
        self.position_gate = _conv_bn(1, 1, 3)
        self.gamma = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights = torch.softmax(self.context(x).flatten(2), dim=-1)  # (B, 1, hw), sums to 1 over positions
        context = torch.einsum("bcn,bn->bc", x.flatten(2), weights[:, 0])  # (B, C)
        gated = self.value(x) * torch.sigmoid(self.channel_mlp(context))[:, :, None, None]
        position = self.position(gated)  # (B, 1, h, w)
        position = position * torch.sigmoid(self.position_gate(position))
        return self.gamma * position + x


class ForegroundAttention(nn.Module):
    """``(B, C, h, w)`` -> ``(B, width, h, w)``: 3x3 conv + BN, :class:`AttentionBlock`, 3x3 conv + BN."""

    def __init__(self, in_channels: int, width: int, reduction: int = 8):
        super().__init__()
        self.reduce = _conv_bn(in_channels, width, 3)
        self.block = AttentionBlock(width, reduction)
        self.expand = _conv_bn(width, width, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.expand(self.block(self.reduce(x)))


class HamAugment:
    """HAM's training augmentation on one item dict (``image (1, S, S)``, ``boxes (n, 4)``, ``lung_masks (S, S)``).

    Resize to ``s = int((1 + k / 100) S)``, ``k`` uniform in ``0..max_percent`` (bilinear for the image,
    nearest for the lung masks), crop ``S x S`` at a uniform offset, flip horizontally with probability
    ``flip``. Boxes are scaled, shifted and clipped (a box left with no area is dropped with its label);
    a flip mirrors them and relabels the lung masks (1 <-> 2) and swaps ``lung_hashes[0]`` and ``[1]``, so
    mask 1 stays the image-left lung. Random numbers come from torch's global generator (the DataLoader
    seeds it per worker and epoch).
    """

    def __init__(self, max_percent: int = 12, flip: float = 0.5):
        if max_percent < 0 or not 0.0 <= flip <= 1.0:
            raise GrenError(f"ham augmentation: resize percent must be >= 0 and flip in [0, 1], got "
                            f"{max_percent}, {flip}")
        self.max_percent, self.flip = int(max_percent), float(flip)

    def __call__(self, item: dict) -> dict:
        item = dict(item)
        image = item["image"]
        size_h, size_w = image.shape[-2:]
        percent = int(torch.randint(0, self.max_percent + 1, ()))
        new_h, new_w = int((1 + percent / 100) * size_h), int((1 + percent / 100) * size_w)
        top = int(torch.randint(0, new_h - size_h + 1, ()))
        left = int(torch.randint(0, new_w - size_w + 1, ()))
        flip = bool(torch.rand(()) < self.flip)
        if (new_h, new_w) != (size_h, size_w):
            image = F.interpolate(image[None], size=(new_h, new_w), mode="bilinear", align_corners=False)[0]
        image = image[:, top:top + size_h, left:left + size_w]
        masks = item.get("lung_masks")
        if masks is not None and masks.numel():
            if (new_h, new_w) != (size_h, size_w):
                masks = F.interpolate(masks[None, None].float(), size=(new_h, new_w), mode="nearest")[0, 0]
                masks = masks.to(item["lung_masks"].dtype)
            masks = masks[top:top + size_h, left:left + size_w]
        boxes = item.get("boxes")
        if boxes is not None and boxes.numel():
            scaled = boxes.to(torch.float32) * torch.tensor([new_w / size_w, new_h / size_h] * 2)
            scaled = scaled - torch.tensor([left, top, left, top], dtype=torch.float32)
            scaled[:, 0::2] = scaled[:, 0::2].clamp(0, size_w)
            scaled[:, 1::2] = scaled[:, 1::2].clamp(0, size_h)
            keep = (scaled[:, 2] > scaled[:, 0]) & (scaled[:, 3] > scaled[:, 1])
            boxes = scaled[keep]
            item["box_labels"] = item["box_labels"][keep]
        if flip:
            image = image.flip(-1)
            if boxes is not None and boxes.numel():
                boxes = torch.stack([size_w - boxes[:, 2], boxes[:, 1], size_w - boxes[:, 0], boxes[:, 3]], dim=1)
            if masks is not None and masks.numel():
                masks = masks.flip(-1)
                masks = torch.where(masks == 1, 2, torch.where(masks == 2, 1, masks)).to(masks.dtype)
            if "lung_hashes" in item:
                item["lung_hashes"] = item["lung_hashes"].flip(0)
        item["image"] = image.contiguous()
        if masks is not None:
            item["lung_masks"] = masks.contiguous()
        if boxes is not None:
            item["boxes"] = boxes.contiguous()
        return item


@register_method("ham")
class HAM(Method):
    """Ouyang et al. 2021 (HAM): attention classifier, abnormal + 14 heads, CAM box/ordinal losses (module docstring)."""

    needs = frozenset({"image", "labels", "boxes", "box_labels"})
    defaults = {
        "ham": {
            "head_channels": 512,  # width of the 3x3 head conv (the pooled feature D)
            "reduction": 8,  # channel-MLP reduction of the attention block
            "dropout": 0.1,  # channel dropout after the head
            "lse_r": 6.0,  # LSE pooling sharpness
            "sigma": 0.4,  # refined map: sigmoid(sharpness (minmax(cam) - sigma))
            "sharpness": 100.0,
            "loss_sigma": 0.75,  # soft masks of L_bound / L_union on the raw CAMs
            "w_abnormal": 0.01,
            "w_classes": 1.0,
            "w_box": 0.5,
            "w_bound": 0.001,
            "w_union": 0.001,
            "threshold": 0.999,  # test: positive where refined >= this
            "augment": True,  # resize x1.00-1.12, random crop, horizontal flip (training only)
            "resize_percent": 12,
            "flip": 0.5,
        },
        "model": {"output_stride": 8},  # with default.yaml's resnet50: the authors' cut (512 px -> 64 x 64)
        "optim": {"name": "adam", "lr": 2e-5, "weight_decay": 1e-4, "step_epochs": 10, "gamma": 0.1},
        "train": {"epochs": 30},
    }

    def __init__(self, config: dict):
        super().__init__(config)
        model_cfg, cfg = config["model"], config["ham"]
        if not 0.0 < float(cfg["threshold"]) < 1.0:
            raise GrenError(f"ham.threshold must be in (0, 1), got {cfg['threshold']}")
        if not 0.0 <= float(cfg["dropout"]) < 1.0:
            raise GrenError(f"ham.dropout must be in [0, 1), got {cfg['dropout']}")
        self.backbone = backbone_from_config(model_cfg)
        channels = self.backbone.out_channels
        width = max(1, channels // 4)
        self.attention = ForegroundAttention(channels, width, int(cfg["reduction"]))
        head = int(cfg["head_channels"])
        self.head = nn.Sequential(nn.Conv2d(channels + width, head, 3, padding=1, bias=False), nn.BatchNorm2d(head),
                                  nn.ReLU())
        self.abnormal_fc = nn.Linear(head, 1, bias=False)
        self.classes_fc = nn.Linear(head, int(model_cfg["num_classes"]), bias=False)
        self._init_weights()
        self.dropout = float(cfg["dropout"])
        self.lse_r = float(cfg["lse_r"])
        self.sigma, self.sharpness = float(cfg["sigma"]), float(cfg["sharpness"])
        self.loss_sigma = float(cfg["loss_sigma"])
        self.weights = {part: float(cfg[f"w_{part}"]) for part in PARTS}
        self.threshold = float(cfg["threshold"])
        self.seed = int(config.get("seed", 0))
        self.dropout_steps = 0  # training forwards so far (extra_state): the dropout masks' stream position

    def _init_weights(self) -> None:
        for module in [self.attention, self.head]:
            for m in module.modules():
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        bound = 1.0 / math.sqrt(self.classes_fc.in_features)
        nn.init.uniform_(self.abnormal_fc.weight, -bound, bound)
        nn.init.uniform_(self.classes_fc.weight, -bound, bound)

    # -- network -------------------------------------------------------------------------------------------
    def features(self, images: torch.Tensor) -> torch.Tensor:
        """``images (B, 1, S, S)`` -> head features ``(B, D, S / stride, S / stride)`` (dropout in training)."""
        c5 = self.backbone(images)
        x = self.head(torch.cat([c5, self.attention(c5)], dim=1))
        if self.training and self.dropout > 0:
            x = x * self._dropout_mask(x)
        return x

    def _dropout_mask(self, x: torch.Tensor) -> torch.Tensor:
        """Dropout2d's ``(B, D, 1, 1)`` keep / (1 - p) mask from the stream ``(seed, step, rank)``."""
        generator = torch.Generator().manual_seed((self.seed * 1_000_003 + self.dropout_steps) * 64 + dist.get_rank())
        self.dropout_steps += 1
        keep = torch.rand(x.shape[0], x.shape[1], 1, 1, generator=generator) >= self.dropout
        return (keep.to(dtype=x.dtype) / (1.0 - self.dropout)).to(x.device)

    def heads(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``features (B, D, h, w)`` -> ``(abnormal logit (B,), class logits (B, K), cam_a (B, h, w), cams (B, K, h, w))``.

        CAMs are ``relu`` of the projection on the detached linear weights. All in float32, outside autocast:
        the refined maps' steep sigmoid needs more than bf16's 8 bits.
        """
        with torch.autocast(device_type=features.device.type, enabled=False):
            features = features.float()
            pooled = lse_pool(features, self.lse_r)
            abnormal = self.abnormal_fc(pooled)[:, 0]
            classes = self.classes_fc(pooled)
            cam_a = F.relu(class_activation_maps(features, self.abnormal_fc.weight.detach()))[:, 0]
            cams = F.relu(class_activation_maps(features, self.classes_fc.weight.detach()))
        return abnormal, classes, cam_a, cams

    # -- training -------------------------------------------------------------------------------------------
    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        images = batch["image"]
        labels = batch["labels"].float()
        abnormal_logit, class_logits, cam_a, cams = self.heads(self.features(images))
        with torch.autocast(device_type=images.device.type, enabled=False):
            return self._losses(batch, labels, abnormal_logit, class_logits, cam_a, cams)

    def _losses(self, batch, labels, abnormal_logit, class_logits, cam_a, cams) -> dict[str, torch.Tensor]:
        images = batch["image"]
        abnormal_label = labels.amax(dim=1)
        terms = {
            "abnormal": F.binary_cross_entropy_with_logits(abnormal_logit, abnormal_label),
            "classes": F.binary_cross_entropy_with_logits(class_logits, labels),
            "box": self.box_loss(cams, batch["boxes"], batch["box_labels"], tuple(images.shape[-2:])),
            "bound": bound_loss(cams, cam_a, labels, self.loss_sigma, self.sharpness),
            "union": union_loss(cams, cam_a, labels, self.loss_sigma, self.sharpness),
        }
        return total_of({part: self.weights[part] * value for part, value in terms.items()})

    def box_loss(self, cams: torch.Tensor, boxes, box_labels, image_hw: tuple[int, int]) -> torch.Tensor:
        """``L_box`` from raw CAMs ``(B, K, h, w)`` and per-image boxes in input pixels (module docstring)."""
        masks, has_box = box_targets(boxes, box_labels, image_hw, image_hw, cams.shape[1])  # (B, K, H, W) pixels
        if not bool(has_box.any()):
            return cams.sum() * 0.0
        image_index, class_index = has_box.nonzero(as_tuple=True)
        refined = refine_maps(cams[image_index, class_index][:, None], image_hw, self.sigma, self.sharpness)[:, 0]
        target = masks[image_index, class_index]
        return box_term(refined, target, class_index, cams.shape[1])

    # -- test time -----------------------------------------------------------------------------------------
    def localize(self, images: torch.Tensor) -> Localization:
        features = self.features(images).float()
        _, class_logits, _, cams = self.heads(features)
        size = tuple(images.shape[-2:])
        if self.predict_upsample > 1:
            size = (size[0] * self.predict_upsample, size[1] * self.predict_upsample)
        maps = refine_maps(cams, size, self.sigma, self.sharpness)
        return Localization(maps, torch.sigmoid(class_logits), self.threshold, evidence=class_logits.double())

    def item_transform(self, config: dict):
        cfg = config["ham"]
        return HamAugment(int(cfg["resize_percent"]), float(cfg["flip"])) if cfg["augment"] else None

    def loss_weights(self) -> dict[str, str]:
        return {part: f"ham.w_{part}" for part in PARTS}

    def extra_state(self) -> dict:
        return {"dropout_steps": self.dropout_steps}

    def load_extra_state(self, state: dict) -> None:
        self.dropout_steps = int(state.get("dropout_steps", 0))


def box_term(refined: torch.Tensor, target: torch.Tensor, class_index: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``mean_c [sum_{i in c} sum_px (r - m)^2 / sum_{i in c} sum_px (r + m)]`` over the classes present.

    ``refined, target (n, H, W)``: the refined map and union-of-boxes mask of ``n`` (image, class) pairs,
    ``class_index (n,)`` their classes.
    """
    squared = (refined - target).pow(2).flatten(1).sum(1)
    mass = (refined + target).flatten(1).sum(1)
    numerator = torch.zeros(num_classes, device=refined.device).index_add(0, class_index, squared)
    denominator = torch.zeros(num_classes, device=refined.device).index_add(0, class_index, mass)
    present = torch.zeros(num_classes, dtype=torch.bool, device=refined.device)
    present[class_index] = True
    return (numerator[present] / denominator[present].clamp_min(1e-5)).mean()


def _soft_inclusion(inner: torch.Tensor, outer: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """``1 - sum min(inner, outer) gate / sum inner`` over the last two axes (0 where ``inner`` is all 0)."""
    mass = inner.flatten(-2).sum(-1)
    covered = (torch.minimum(inner, outer) * gate).flatten(-2).sum(-1)
    return (mass - covered) / mass.clamp_min(1e-5)


def bound_loss(cams: torch.Tensor, cam_a: torch.Tensor, labels: torch.Tensor, sigma: float = 0.75,
               sharpness: float = 100.0) -> torch.Tensor:
    """``L_bound``: each positive class's CAM ``(B, K, h, w)`` inside the abnormal CAM ``(B, h, w)`` (raw CAMs).

    Per positive (image, class): ``1 - sum min(cam_c, cam_a) sigmoid(sharpness (cam_c - sigma)) / sum cam_c``;
    averaged over the class's positive images, then over the classes with a positive image (0 if none).
    ``cam_a`` counts only on abnormal images (it is zeroed elsewhere, as every positive image is abnormal).
    """
    labels = labels.to(cams.dtype)
    positive_cams = cams * labels[:, :, None, None]
    abnormal = cam_a * labels.amax(dim=1)[:, None, None]
    gate = torch.sigmoid(sharpness * (positive_cams - sigma))
    per_pair = _soft_inclusion(positive_cams, abnormal[:, None], gate) * labels  # (B, K)
    count = labels.sum(0)
    present = count > 0
    if not bool(present.any()):
        return cams.sum() * 0.0
    return (per_pair.sum(0)[present] / count[present]).mean()


def union_loss(cams: torch.Tensor, cam_a: torch.Tensor, labels: torch.Tensor, sigma: float = 0.75,
               sharpness: float = 100.0) -> torch.Tensor:
    """``L_union``: the abnormal CAM ``(B, h, w)`` inside the union (max) of the positive classes' CAMs.

    Per abnormal image: ``1 - sum min(max_c cam_c, cam_a) sigmoid(sharpness (cam_a - sigma)) / sum cam_a``; the
    mean over the abnormal images (0 if none).
    """
    labels = labels.to(cams.dtype)
    abnormal_label = labels.amax(dim=1)
    abnormal = cam_a * abnormal_label[:, None, None]
    union = (cams * labels[:, :, None, None]).amax(dim=1)
    gate = torch.sigmoid(sharpness * (abnormal - sigma))
    per_image = _soft_inclusion(abnormal, union, gate) * abnormal_label
    count = abnormal_label.sum()
    if not bool(count > 0):
        return cams.sum() * 0.0
    return per_image.sum() / count
