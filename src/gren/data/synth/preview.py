"""Contact sheet of a synthetic dataset: films with the lung masks and the boxes drawn on top."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw

RIGHT_LUNG_RGB = (255, 80, 60)  # mask 1, patient's right lung, image left
LEFT_LUNG_RGB = (60, 170, 255)  # mask 2, patient's left lung, image right
BOX_RGB = (255, 230, 0)


def _edges(region: np.ndarray) -> np.ndarray:
    inner = region.copy()
    inner[1:-1, 1:-1] = region[:-2, 1:-1] & region[2:, 1:-1] & region[1:-1, :-2] & region[1:-1, 2:]
    return region & ~inner


def overlay(image: np.ndarray, lung_mask: np.ndarray, boxes, tile: int) -> Image.Image:
    """One tile: ``image`` uint8 (S, S), ``lung_mask`` uint8 (S, S), ``boxes`` [(label, x, y, w, h)] in
    1024-space pixels; returns an RGB tile of ``tile x tile`` pixels."""
    rgb = np.repeat(image[..., None], 3, axis=2).astype(np.float32)
    for value, colour in ((1, RIGHT_LUNG_RGB), (2, LEFT_LUNG_RGB)):
        region = lung_mask == value
        rgb[region] = 0.82 * rgb[region] + 0.18 * np.array(colour)
        rgb[_edges(region)] = colour
    picture = Image.fromarray(rgb.clip(0, 255).astype(np.uint8)).resize((tile, tile), Image.BILINEAR)
    draw = ImageDraw.Draw(picture)
    scale = tile / 1024.0
    for label, x, y, w, h in boxes:
        draw.rectangle([x * scale, y * scale, (x + w) * scale, (y + h) * scale], outline=BOX_RGB, width=2)
        draw.text((x * scale + 3, max(y * scale - 11, 1)), label, fill=BOX_RGB)
    return picture


def write_preview(data_dir: Path, path: Path, columns: int = 4, rows: int = 4, tile: int = 256) -> Path:
    """A ``columns x rows`` sheet of the dataset in ``data_dir``: mostly films with boxes, a few
    label-only and No Finding films (their labels written at the bottom)."""
    data_dir = Path(data_dir)
    entries = pd.read_csv(data_dir / "Data_Entry_2017_v2020.csv")
    bbox = pd.read_csv(data_dir / "BBox_List_2017.csv").iloc[:, :6]
    bbox.columns = ["image", "label", "x", "y", "w", "h"]
    boxed_ids = list(dict.fromkeys(bbox["image"]))
    others = entries[~entries["Image Index"].isin(boxed_ids)]
    count = columns * rows
    n_boxed = min(len(boxed_ids), count - min(len(others), count // 4))
    chosen = boxed_ids[:n_boxed] + list(others["Image Index"][: count - n_boxed])
    labels = dict(zip(entries["Image Index"], entries["Finding Labels"]))
    sheet = Image.new("RGB", (columns * tile, rows * tile))
    for k, name in enumerate(chosen):
        stem = Path(name).stem
        image = np.asarray(Image.open(data_dir / "images" / f"{stem}.png").convert("L"))
        mask = np.asarray(Image.open(data_dir / "masks" / f"{stem}.png"))
        boxes = bbox[bbox["image"] == name][["label", "x", "y", "w", "h"]].itertuples(index=False)
        picture = overlay(image, mask, list(boxes), tile)
        ImageDraw.Draw(picture).text((4, tile - 13), f"{stem}: {labels.get(name, '')}", fill=(120, 255, 120))
        sheet.paste(picture, ((k % columns) * tile, (k // columns) * tile))
    sheet.save(path)
    return path
