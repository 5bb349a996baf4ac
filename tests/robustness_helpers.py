"""Fixtures for the robustness tests: small NIH-layout folders with masks, snapshots, a tiny tmpfs."""

from __future__ import annotations

import contextlib
import os
import subprocess
import uuid
from pathlib import Path

import numpy as np
from PIL import Image

from nih_helpers import BBOX_HEADER, HEADER_2020, entry_line, write_text


def lung_mask(size: int) -> np.ndarray:
    """uint8 (S, S): 1 in the image-left lung field, 2 in the image-right one."""
    mask = np.zeros((size, size), dtype=np.uint8)
    top, bottom = size // 6, size - size // 6
    mask[top:bottom, size // 8:size // 2 - size // 16] = 1
    mask[top:bottom, size // 2 + size // 16:size - size // 8] = 2
    return mask


def make_dataset(root: Path, n: int = 12, size: int = 48, boxed: int | None = None, images_dir: str = "images",
                 masks: bool = True, seed: int = 0) -> Path:
    """An NIH-layout folder: ``n`` PNG films ``img_XXX.png`` of ``size`` px, one patient per two images,
    every third image with an Effusion box (``boxed`` to choose how many), dataset masks (no segmentation)."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    entries, boxes = [], []
    boxed = (n + 2) // 3 if boxed is None else boxed
    box_ids = set(range(0, n, max(1, n // max(boxed, 1))))
    box_ids = set(sorted(box_ids)[:boxed])
    for i in range(n):
        stem = f"img_{i:03d}"
        labels = "Effusion" if i in box_ids else ("Nodule" if i % 2 else "No Finding")
        entries.append(entry_line(f"{stem}.png", labels, 100 + i // 2))
        if i in box_ids:
            boxes.append(f"{stem}.png,Effusion,200,300,250,260")
        pixels = rng.integers(0, 256, (size, size), dtype=np.uint8)
        path = root / images_dir / f"{stem}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels, "L").save(path)
        if masks:
            (root / "masks").mkdir(exist_ok=True)
            Image.fromarray(lung_mask(size), "L").save(root / "masks" / f"{stem}.png")
    write_text(root / "Data_Entry_2017_v2020.csv", [HEADER_2020, *entries])
    write_text(root / "BBox_List_2017.csv", [BBOX_HEADER, *boxes])
    return root


def truncate(path: Path, keep: float = 0.5) -> Path:
    """Cut a file to ``keep`` of its bytes (a PNG keeps a valid header: only decoding fails)."""
    data = path.read_bytes()
    path.write_bytes(data[: max(64, int(len(data) * keep))])
    return path


def snapshot(root: Path, skip: tuple[str, ...] = (".gren_cache",)) -> dict[bytes, tuple]:
    """Every entry below ``root`` (not following links): relative bytes path -> (kind, size, mtime_ns, link)."""
    out: dict[bytes, tuple] = {}
    root_b = os.fsencode(root)
    for current, dirs, files in os.walk(root_b):
        dirs[:] = [d for d in dirs if os.fsdecode(d) not in skip]
        for name in dirs + files:
            path = os.path.join(current, name)
            info = os.lstat(path)
            link = os.readlink(path) if os.path.islink(path) else None
            out[os.path.relpath(path, root_b)] = (info.st_mode >> 12, info.st_size, info.st_mtime_ns, link)
    return out


@contextlib.contextmanager
def tiny_tmpfs(base: Path, size: str = "2m"):
    """A ``size`` tmpfs mounted at a fresh folder under ``base``; yields it, or ``None`` when mounting is
    impossible (not root, no mount privilege). Always unmounted afterwards."""
    mount_point = base / f"tmpfs-{uuid.uuid4().hex[:8]}"
    mount_point.mkdir(parents=True)
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount_point)],
                              capture_output=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        done = None
    if done is None or done.returncode != 0:
        mount_point.rmdir()
        yield None
        return
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], capture_output=True, timeout=20)
        with contextlib.suppress(OSError):
            mount_point.rmdir()
