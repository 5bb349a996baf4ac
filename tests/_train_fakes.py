"""Small in-memory datasets yielding the documented item dicts (docs/architecture.md, "Dataset items").

Used by the model / method / training tests so they do not depend on prepared caches: each image
is noise with two rectangular "lungs" (mask 1 on the image left, 2 on the right) and, for lesion
images, a bright square of class ``lesion_class`` with its box.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from torch.utils.data import Dataset

from gren.core.labels import LABELS


def make_item(index: int, size: int = 64, lesion: bool = True, lesion_class: int = 2, annotated: bool = True,
              fallback: bool = False, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed * 100_003 + index)
    image = torch.randn(1, size, size, generator=g) * 0.3
    lung_masks = torch.zeros(size, size, dtype=torch.uint8)
    top, bottom = size // 8, size - size // 8
    lung_masks[top:bottom, size // 8: size // 2 - 2] = 1
    lung_masks[top:bottom, size // 2 + 2: size - size // 8] = 2
    labels = torch.zeros(len(LABELS))
    boxes = torch.zeros(0, 4)
    box_labels = torch.zeros(0, dtype=torch.int64)
    if lesion:
        side = size // 4
        x0 = int(torch.randint(0, size - side, (1,), generator=g))
        y0 = int(torch.randint(0, size - side, (1,), generator=g))
        image[:, y0:y0 + side, x0:x0 + side] += 1.5
        labels[lesion_class] = 1.0
        if annotated:
            boxes = torch.tensor([[x0, y0, x0 + side, y0 + side]], dtype=torch.float32)
            box_labels = torch.tensor([lesion_class])
    image = image.clamp(-2.0, 2.0).float()  # the normalize_uint8 range
    return {
        "image": image,
        "labels": labels,
        "boxes": boxes,
        "box_labels": box_labels,
        "lung_masks": lung_masks,
        "lung_hashes": torch.rand(2, 64, generator=g) > 0.5,
        "lung_fallback": torch.tensor(fallback),
        "image_id": f"fake_{index:05d}",
        "index": index,
        **method_fields(image, lung_masks),
    }


@functools.cache
def _needed_fields() -> tuple:
    """The registered per-image cache fields that some registered method needs (``gren.core.fields``)."""
    from gren.core.fields import FIELDS
    from gren.data.fields import fields_needed_by
    from gren.methods import METHODS

    return tuple(FIELDS[name] for name in fields_needed_by(sorted(METHODS)))


def method_fields(image: torch.Tensor, lung_masks: torch.Tensor) -> dict:
    """Each method-declared cache field of one item, computed by its own ``compute`` as ``gren prepare`` would
    (from the film as uint8 ``(S, S)`` and its lung masks), so the fakes provide what every method needs."""
    pixels = ((image[0] * 0.25 + 0.5) * 255.0).round().clamp(0, 255).to(torch.uint8).numpy()[None]
    masks = lung_masks.numpy()[None]
    return {field.name: torch.from_numpy(np.asarray(field.compute(pixels, masks)[0], dtype=field.dtype))
            for field in _needed_fields()}


class FakeLesionDataset(Dataset):
    """``n`` images of side ``size``; the first ``n_annotated`` carry boxes, every other image a lesion label."""

    def __init__(self, n: int = 16, size: int = 64, n_annotated: int = 8, seed: int = 0):
        self.items = [make_item(i, size, lesion=(i < n_annotated or i % 2 == 0), annotated=i < n_annotated,
                                fallback=(i % 5 == 4), seed=seed) for i in range(n)]
        self.annotated = list(range(n_annotated))
        self.unannotated = list(range(n_annotated, n))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        return self.items[index]


def small_config(**sections) -> dict:
    """The resolved default config shrunk for CPU tests (resnet18, stride 16, 64 px), updated by ``sections``."""
    from gren.train.config import resolve_config

    overrides = ["model.backbone=resnet18", "model.output_stride=16", "model.head_hidden=32", "data.size=64",
                 "data.workers=0", "device.device=cpu", "train.log_every=1"]
    for section, values in sections.items():
        overrides += [f"{section}.{k}={'null' if v is None else v}" for k, v in values.items()]
    return resolve_config(None, overrides)
