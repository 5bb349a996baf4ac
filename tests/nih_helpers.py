"""Helpers for the data-layer tests: tiny NIH-layout folders written into tmp dirs."""

from __future__ import annotations

import functools
import gzip
from pathlib import Path

import numpy as np
from PIL import Image

HEADER_2017 = (
    "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
    "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y],"
)
HEADER_2020 = (
    "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
    "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]"
)
BBOX_HEADER = "Image Index,Finding Label,Bbox [x,y,w,h],,,"


def entry_line(image: str, labels: str, patient, view: str = "PA", variant: str = "2020") -> str:
    """One Data_Entry row; the 2017 variant ends with an empty column, like NIH's file."""
    row = f"{image},{labels},0,{patient},45,M,{view},2500,2048,0.143,0.143"
    return row + ("," if variant == "2017" else "")


def write_text(path: Path, lines: list[str], gz: bool = False) -> Path:
    text = "\n".join(lines) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    if gz:
        with gzip.open(path, "wt") as handle:
            handle.write(text)
    else:
        path.write_text(text)
    return path


def write_image(path: Path, size=(64, 64), mode: str = "L", seed: int = 0) -> Path:
    """A small random image; ``size`` is (width, height)."""
    rng = np.random.default_rng(seed)
    width, height = size
    path.parent.mkdir(parents=True, exist_ok=True)
    if mode == "RGB":
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB").save(path)
    else:
        Image.fromarray(rng.integers(0, 256, (height, width), dtype=np.uint8), "L").save(path)
    return path


def make_nih_folder(
    root: Path,
    entries: list[tuple[str, str, object]],
    boxes: list[str] | None = None,
    images: dict[str, tuple[str, tuple[int, int]]] | None = None,
    variant: str = "2020",
    gz: bool = False,
) -> Path:
    """Write a Data_Entry CSV (``entries``: (image index, labels, patient id)), an optional BBox list
    (raw lines after the header) and images (stem -> (relative path, (width, height)))."""
    header = HEADER_2017 if variant == "2017" else HEADER_2020
    name = "Data_Entry_2017.csv" if variant == "2017" else "Data_Entry_2017_v2020.csv"
    lines = [header] + [entry_line(i, labels, p, variant=variant) for i, labels, p in entries]
    write_text(root / (name + (".gz" if gz else "")), lines, gz=gz)
    if boxes is not None:
        write_text(root / "BBox_List_2017.csv", [BBOX_HEADER, *boxes])
    for k, (_stem, (rel, size)) in enumerate((images or {}).items()):
        write_image(root / rel, size=size, seed=k)
    return root


@functools.lru_cache(maxsize=2)
def cached_index(data_dir: str):
    """``load_index(data_dir)`` once per test session (the real Data_Entry has 112,120 rows).
    Callers must not modify the returned index."""
    from gren.data.nih import load_index

    return load_index(data_dir)
