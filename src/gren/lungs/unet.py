"""A compact U-Net for left/right lung segmentation: model, training, checkpoints, inference.

The network sees a square ``size x size`` image (per-image percentile-stretched intensities) and
predicts 3-class logits (0 background, 1 patient's right lung = image left, 2 patient's left lung =
image right). Training: random affine (rotation, scale, shift, shear; no horizontal flips, which would
swap the sides), random gamma/contrast/brightness and noise, Adam with cosine decay, cross-entropy +
soft Dice on the two lungs, seeded. Checkpoints hold tensors and plain data only
(``torch.load(..., weights_only=True)``) and are written atomically.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from gren.core.atomic import atomic_path
from gren.core.errors import GrenError
from gren.lungs.binary import largest_component
from gren.lungs.classical import prior_mask
from gren.lungs.quality import check_mask

log = logging.getLogger(__name__)

CHECKPOINT_KIND = "gren-lung-unet"
CHECKPOINT_VERSION = 1


# ---- model ------------------------------------------------------------------------------------
def _conv_block(in_channels: int, out_channels: int) -> nn.Sequential:
    groups = max(1, min(8, out_channels // 4))
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.GroupNorm(groups, out_channels),
        nn.ReLU(inplace=True),
        nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
        nn.GroupNorm(groups, out_channels),
        nn.ReLU(inplace=True),
    )


class LungUNet(nn.Module):
    """U-Net with ``levels`` resolutions (widths base, 2 base, ...), GroupNorm, 3-class logits.

    forward: float32 (B, 1, S, S) with S divisible by 2 ** (levels - 1) -> logits (B, 3, S, S).
    """

    def __init__(self, base_width: int = 16, levels: int = 4, num_classes: int = 3):
        super().__init__()
        widths = [base_width * 2**i for i in range(levels)]
        self.encoders = nn.ModuleList()
        in_channels = 1
        for width in widths:
            self.encoders.append(_conv_block(in_channels, width))
            in_channels = width
        self.upsamplers = nn.ModuleList()
        self.decoders = nn.ModuleList()
        for width in reversed(widths[:-1]):
            self.upsamplers.append(nn.ConvTranspose2d(in_channels, width, 2, stride=2))
            self.decoders.append(_conv_block(2 * width, width))
            in_channels = width
        self.head = nn.Conv2d(in_channels, num_classes, 1)
        self.divisor = 2 ** (levels - 1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        skips = []
        x = images
        for i, encoder in enumerate(self.encoders):
            if i > 0:
                x = F.max_pool2d(x, 2)
            x = encoder(x)
            skips.append(x)
        for upsample, decoder, skip in zip(self.upsamplers, self.decoders, reversed(skips[:-1])):
            x = decoder(torch.cat([upsample(x), skip], dim=1))
        return self.head(x)


# ---- intensities and resizing -----------------------------------------------------------------
def normalize_images(images: torch.Tensor) -> torch.Tensor:
    """uint8 or float (B, 1, H, W) -> float32 per-image percentile (1st-99th) stretch, centred: (x - 0.5) / 0.25."""
    x = images.float()
    flat = x.flatten(1)
    lo = torch.quantile(flat, 0.01, dim=1).view(-1, 1, 1, 1)
    hi = torch.quantile(flat, 0.99, dim=1).view(-1, 1, 1, 1)
    x = ((x - lo) / (hi - lo).clamp_min(1.0)).clamp(0.0, 1.0)
    return (x - 0.5) / 0.25


def resize_images(images: list[np.ndarray] | np.ndarray, size: int) -> torch.Tensor:
    """uint8 (H, W) images of any sizes -> float32 (B, 1, size, size) in 0..255 (bilinear, antialiased)."""
    out = []
    for image in images:
        t = torch.from_numpy(np.ascontiguousarray(image)).float()[None, None]
        if t.shape[-2:] != (size, size):
            t = F.interpolate(t, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        out.append(t)
    return torch.cat(out)


def resize_masks(masks: list[np.ndarray] | np.ndarray, size: int) -> torch.Tensor:
    """uint8 (H, W) masks -> int64 (B, size, size) (nearest)."""
    out = []
    for mask in masks:
        t = torch.from_numpy(np.ascontiguousarray(mask)).float()[None, None]
        if t.shape[-2:] != (size, size):
            t = F.interpolate(t, size=(size, size), mode="nearest")
        out.append(t[:, 0].long())
    return torch.cat(out)


# ---- augmentation -----------------------------------------------------------------------------
def augment(images: torch.Tensor, masks: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random affine + intensity on a batch: images float (B, 1, S, S) in 0..255, masks int64 (B, S, S).

    No horizontal flips (they would put the patient's right lung on the image right).
    """
    b = images.shape[0]

    def uniform(lo: float, hi: float) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(b, generator=generator)

    angle = uniform(-10, 10) * math.pi / 180
    scale = uniform(0.85, 1.15)
    aspect = uniform(0.92, 1.08)
    shear = uniform(-0.06, 0.06)
    tx, ty = uniform(-0.08, 0.08), uniform(-0.08, 0.08)
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0] = cos / (scale * aspect)
    theta[:, 0, 1] = -sin / scale + shear
    theta[:, 1, 0] = sin / scale
    theta[:, 1, 1] = cos * aspect / scale
    theta[:, 0, 2] = tx
    theta[:, 1, 2] = ty
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    warped = F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)
    warped_masks = F.grid_sample(masks[:, None].float(), grid, mode="nearest", padding_mode="zeros",
                                 align_corners=False)[:, 0].long()
    # Intensity: gamma, contrast, brightness on [0, 1], then Gaussian noise.
    x = (warped / 255.0).clamp(0, 1)
    gamma = torch.exp(uniform(-0.35, 0.35)).view(-1, 1, 1, 1)
    x = x.clamp_min(1e-4) ** gamma
    contrast = uniform(0.75, 1.25).view(-1, 1, 1, 1)
    brightness = uniform(-0.1, 0.1).view(-1, 1, 1, 1)
    x = (x - 0.5) * contrast + 0.5 + brightness
    noise = torch.randn(x.shape, generator=generator) * uniform(0, 0.03).view(-1, 1, 1, 1)
    x = (x + noise).clamp(0, 1)
    return x * 255.0, warped_masks


# ---- loss -------------------------------------------------------------------------------------
def segmentation_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy + (1 - soft Dice of labels 1 and 2). logits (B, 3, S, S), targets int64 (B, S, S)."""
    ce = F.cross_entropy(logits, targets)
    probs = logits.softmax(dim=1)[:, 1:]
    one_hot = F.one_hot(targets, 3).permute(0, 3, 1, 2)[:, 1:].float()
    overlap = (probs * one_hot).sum(dim=(0, 2, 3))
    total = probs.sum(dim=(0, 2, 3)) + one_hot.sum(dim=(0, 2, 3))
    dice = (2 * overlap + 1) / (total + 1)
    return ce + (1 - dice).mean()


# ---- training ---------------------------------------------------------------------------------
def train_unet(images: list[np.ndarray], masks: list[np.ndarray], *, size: int = 256, epochs: int = 40,
               batch_size: int = 8, lr: float = 2e-3, base_width: int = 16, levels: int = 4, seed: int = 0,
               progress: bool = True) -> tuple[LungUNet, dict]:
    """Train a :class:`LungUNet` on uint8 images/masks (any sizes; resized to ``size``).

    Returns the model (eval mode) and its config dict (plain data: what a checkpoint stores, plus
    ``loss_history``, the mean loss per epoch).
    """
    if len(images) == 0:
        raise GrenError("no training images with masks")
    if size % 2 ** (levels - 1):
        raise GrenError(f"--size {size} must be divisible by {2 ** (levels - 1)}")
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    image_tensor = resize_images(images, size)
    mask_tensor = resize_masks(masks, size)
    model = LungUNet(base_width=base_width, levels=levels)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    steps_per_epoch = max(1, math.ceil(len(images) / batch_size))
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=epochs * steps_per_epoch,
                                                    pct_start=0.1)
    history = []
    started = time.perf_counter()
    model.train()
    bar = tqdm(range(epochs), desc="lung U-Net", unit="epoch", disable=not progress or None)
    for _epoch in bar:
        order = torch.randperm(len(images), generator=generator)
        losses = []
        for start in range(0, len(order), batch_size):
            index = order[start:start + batch_size]
            batch_images, batch_masks = augment(image_tensor[index], mask_tensor[index], generator)
            logits = model(normalize_images(batch_images))
            loss = segmentation_loss(logits, batch_masks)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            losses.append(float(loss.detach()))
        history.append(float(np.mean(losses)))
        bar.set_postfix(loss=f"{history[-1]:.4f}")
    model.eval()
    config = {
        "kind": CHECKPOINT_KIND, "version": CHECKPOINT_VERSION, "size": int(size), "base_width": int(base_width),
        "levels": int(levels), "epochs": int(epochs), "batch_size": int(batch_size), "lr": float(lr),
        "seed": int(seed), "train_images": len(images), "loss_history": history,
        "train_seconds": round(time.perf_counter() - started, 1),
    }
    return model, config


# ---- checkpoints ------------------------------------------------------------------------------
def save_checkpoint(path: str | Path, model: LungUNet, config: dict) -> Path:
    """Write ``{"config": dict, "state_dict": tensors}`` atomically (temporary file + os.replace)."""
    path = Path(path)
    payload = {"config": dict(config), "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()}}
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return path


def load_checkpoint(path: str | Path) -> tuple[LungUNet, dict]:
    """Load a checkpoint written by :func:`save_checkpoint` -> (model in eval mode, config).

    Raises:
        GrenError: missing file, not a torch file, or not a lung U-Net checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise GrenError(f"{path}: lung U-Net checkpoint not found (write one with `gren lungs train`)")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure means "not our checkpoint"
        raise GrenError(f"{path}: not a readable lung U-Net checkpoint ({err})") from err
    config = payload.get("config") if isinstance(payload, dict) else None
    if not isinstance(config, dict) or config.get("kind") != CHECKPOINT_KIND or "state_dict" not in payload:
        raise GrenError(f"{path}: not a lung U-Net checkpoint (expected one written by `gren lungs train`)")
    model = LungUNet(base_width=int(config["base_width"]), levels=int(config["levels"]))
    try:
        model.load_state_dict(payload["state_dict"])
    except RuntimeError as err:
        raise GrenError(f"{path}: weights do not match the U-Net in its config ({err})") from err
    model.eval()
    return model, config


# ---- inference --------------------------------------------------------------------------------
class UNetSegmenter:
    """Segmenter over a trained :class:`LungUNet` (see :func:`gren.lungs.segment.load_segmenter`).

    ``segment`` resizes each batch to the network size, upsamples the logits bilinearly to the input
    size, takes the arg-max, keeps the largest component per lung (holes filled). An image where a lung
    is missing or tiny (< 2 % of the image), or (``check``, the default) that a gross-failure flag of
    :func:`gren.lungs.quality.check_mask` fires on, gets the anatomical prior and ``fallback=True``.
    """

    name = "unet"

    def __init__(self, model: LungUNet, config: dict, batch_size: int = 16, min_area: float = 0.02,
                 check: bool = True):
        self.model = model.eval()
        self.check = check
        self.config = config
        self.size = int(config["size"])
        self.batch_size = batch_size
        self.min_area = min_area

    @classmethod
    def from_checkpoint(cls, path: str | Path) -> UNetSegmenter:
        model, config = load_checkpoint(path)
        return cls(model, config)

    @torch.inference_mode()
    def probabilities(self, images: np.ndarray) -> torch.Tensor:
        """uint8 (B, H, W) -> float32 (B, 3, H, W) softmax probabilities at the input size."""
        height, width = images.shape[-2:]
        out = []
        for start in range(0, len(images), self.batch_size):
            batch = resize_images(images[start:start + self.batch_size], self.size)
            logits = self.model(normalize_images(batch))
            if (height, width) != (self.size, self.size):
                logits = F.interpolate(logits, size=(height, width), mode="bilinear", align_corners=False)
            out.append(logits.softmax(dim=1))
        return torch.cat(out)

    def segment(self, images: np.ndarray, return_reasons: bool = False):
        """images uint8 (B, H, W) -> (masks uint8 (B, H, W) in {0,1,2}, fallback bool (B,)), plus with
        ``return_reasons`` a list of B texts: '' or why image i fell back (a gross-failure flag of
        :mod:`gren.lungs.quality` starts with ``quality.FLAG_PREFIX``)."""
        images = np.asarray(images)
        if images.ndim == 2:
            images = images[None]
        labels = self.probabilities(images).argmax(dim=1).to(torch.uint8).numpy()
        masks = np.zeros(images.shape, np.uint8)
        fallback = np.zeros(len(images), bool)
        reasons = [""] * len(images)
        area = images.shape[1] * images.shape[2]
        for i, predicted in enumerate(labels):
            for lung in (1, 2):
                region = predicted == lung
                if region.any():
                    masks[i][largest_component(region) & (masks[i] == 0)] = lung
            smaller = min((masks[i] == 1).sum(), (masks[i] == 2).sum())
            if smaller < self.min_area * area:
                reasons[i] = f"a lung covers {smaller / area:.3f} of the image, under {self.min_area}"
            elif self.check:
                reasons[i] = check_mask(images[i], masks[i])
            if reasons[i]:
                log.debug("U-Net lung segmentation fell back to the prior: %s", reasons[i])
                masks[i] = prior_mask(*images.shape[1:])
                fallback[i] = True
        return (masks, fallback, reasons) if return_reasons else (masks, fallback)
