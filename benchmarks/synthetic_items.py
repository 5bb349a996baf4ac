"""One synthetic item maker for the step-time benchmarks (bench_train_step, bench_method_steps, bench_ham_iam).

Items like CacheDataset's: noise on the normalize_uint8 scale, two rectangular lungs (mask 1 on the image
left, 2 on the right), a bright Effusion lesion on every film with its box on even items, random lung
hashes; ``fields`` adds registered per-image cache fields (gren.core.fields: CCG's superpixels), computed
by their own ``compute`` on the film's uint8 pixels, as ``gren prepare`` would.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch

from gren.core.fields import FIELDS
from gren.data.dataset import collate


def make_item(i: int, size: int, g: torch.Generator, fields: Iterable[str] = ()) -> dict:
    image = (torch.randn(1, size, size, generator=g) * 0.3).clamp(-2, 2)
    masks = torch.zeros(size, size, dtype=torch.uint8)
    masks[size // 8: size - size // 8, size // 8: size // 2 - 4] = 1
    masks[size // 8: size - size // 8, size // 2 + 4: size - size // 8] = 2
    side = size // 6
    x0, y0 = (int(torch.randint(0, size - side, (1,), generator=g)) for _ in range(2))
    image[:, y0:y0 + side, x0:x0 + side] += 1.0
    labels = torch.zeros(14)
    labels[2] = 1
    annotated = i % 2 == 0
    item = {
        "image": image, "labels": labels,
        "boxes": torch.tensor([[x0, y0, x0 + side, y0 + side]], dtype=torch.float32) if annotated
        else torch.zeros(0, 4),
        "box_labels": torch.tensor([2]) if annotated else torch.zeros(0, dtype=torch.int64),
        "lung_masks": masks, "lung_hashes": torch.rand(2, 64, generator=g) > 0.5,
        "lung_fallback": torch.tensor(False), "image_id": f"bench_{i}", "index": i,
    }
    pixels = ((image[0] * 0.25 + 0.5) * 255).round().clamp(0, 255).to(torch.uint8).numpy()[None]
    for name in fields:
        item[name] = torch.from_numpy(np.asarray(FIELDS[name].compute(pixels, masks.numpy()[None])[0]))
    return item


def synthetic_batch(batch: int, size: int, seed: int = 0, fields: Iterable[str] = ()) -> dict:
    """A collated batch of :func:`make_item` items."""
    g = torch.Generator().manual_seed(seed)
    return collate([make_item(i, size, g, tuple(fields)) for i in range(batch)])
