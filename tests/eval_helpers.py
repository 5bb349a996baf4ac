"""Helpers for the evaluation tests: a tiny NIH-layout folder and a tiny trained run (cached per session)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from gren.core.labels import BOX_CLASSES

_RUNS: dict[str, Path] = {}


def make_tiny_dataset(root: Path, n: int = 32, size: int = 96, seed: int = 0) -> Path:
    """``n`` noisy ``size x size`` PNGs in the NIH layout: half annotated (one bright box each), a
    quarter label-only, a quarter No Finding; one patient per two images. Boxes in the 1024 space; lung masks in ``masks/``."""
    rng = np.random.default_rng(seed)
    images, masks = root / "images", root / "masks"
    images.mkdir(parents=True, exist_ok=True)
    masks.mkdir(parents=True, exist_ok=True)
    lung_mask = np.zeros((size, size), dtype=np.uint8)
    lung_mask[size // 5 : size * 4 // 5, size // 8 : size * 7 // 16] = 1  # patient's right lung (image left)
    lung_mask[size // 5 : size * 4 // 5, size * 9 // 16 : size * 7 // 8] = 2
    entries = ["Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
               "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]"]
    boxes = ["Image Index,Finding Label,Bbox [x,y,w,h],,,"]
    for i in range(n):
        name = f"{i // 2:08d}_{i % 2:03d}.png"
        pixels = rng.normal(90, 20, (size, size))
        if i % 4 in (0, 1):
            cls = BOX_CLASSES[i % len(BOX_CLASSES)]
            x, y = rng.uniform(100, 600, 2)
            w, h = rng.uniform(150, 350, 2)
            s = size / 1024
            pixels[int(y * s) : int((y + h) * s), int(x * s) : int((x + w) * s)] += 90
            boxes.append(f"{name},{cls},{x:.1f},{y:.1f},{w:.1f},{h:.1f},,,")
            labels = cls
        elif i % 4 == 2:
            labels = "Effusion|Mass"
        else:
            labels = "No Finding"
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(images / name)
        Image.fromarray(lung_mask).save(masks / name)
        entries.append(f"{name},{labels},0,{i // 2},50,M,PA,{size},{size},0.14,0.14")
    (root / "Data_Entry_2017.csv").write_text("\n".join(entries) + "\n")
    (root / "BBox_List_2017.csv").write_text("\n".join(boxes) + "\n")
    return root


TINY_OVERRIDES = [
    "model.backbone=resnet18", "model.output_stride=16", "model.head_hidden=16", "data.size=64", "data.lungs=masks",
    "data.workers=0", "train.epochs=1", "train.batch_size=4", "train.max_steps_per_epoch=2",
    "device.device=cpu", "optim.lr=0.01",
]


def tiny_run(root: Path, method: str = "baseline") -> tuple[Path, Path]:
    """``(data_dir, run_dir)`` of a one-epoch run at 64 px, trained once per session."""
    if method not in _RUNS:
        from gren.train.engine import train

        data = make_tiny_dataset(root / "data")
        run = root / f"run_{method}"
        train(data, method, run, protocol="0.5_0.8", fold=0, overrides=TINY_OVERRIDES)
        _RUNS[method] = run
    return _RUNS[method].parent / "data", _RUNS[method]
