"""``gren report``: figures for one or several runs (matplotlib, Agg backend, no display).

* ``training_curves.png``: each loss part from ``RUN/metrics.jsonl`` against the epoch, one line per run,
  and, for runs trained with a validation split, its mean AUC and mean localization accuracy (one line
  style per IoU threshold T);
* ``hash_similarity.png`` (the paper's Fig. 5 analogue): for ~10 annotated test images, the
  inter-image lung-hash similarity matrix (``1 - Hamming / 64``, averaged over the right-right and
  left-left lung pairs) and each image's intra-image similarity (its right vs its left lung), with
  the images' labels;
* ``localization.png`` (Fig. 6/7 analogue): the same test images under each run, side by side: per
  ground-truth box, the continuous map of the box's class as a heat map over the image (upsampled to at
  least :data:`PANEL_MIN_SIDE` px per panel), the cells above the method's threshold
  (``Localization.thresholds()``) outlined, the box in green, the class probability and the IoU in the title.

The images come from the first run's test split (``role == "test"``, annotated) in its prepared data.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from gren.core.errors import GrenError
from gren.core.labels import LABELS, NO_FINDING
from gren.metrics import grid_box_iou

log = logging.getLogger(__name__)

LOSS_ORDER = ("total", "box", "mil", "intra", "inter")
PANEL_MIN_SIDE = 384  # localization.png: each panel's image is upsampled to at least this many pixels
OUTLINE = (255, 230, 0)  # localization.png: the outline of the cells above the threshold (yellow)
T_STYLES = {"0.1": "-", "0.3": "--", "0.5": ":", "0.7": "-."}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def run_label(run_dir: Path, config: dict | None = None) -> str:
    """The method name, with the folder name when it differs: ``"gren"``, ``"gren (fold_0)"``."""
    method = (config or {}).get("method")
    name = run_dir.resolve().name
    if not method:
        return name
    return method if name == method else f"{method} ({name})"


def read_metrics(run_dir: str | os.PathLike) -> list[dict]:
    """The epoch lines of ``RUN/metrics.jsonl`` (bad lines are logged and skipped)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    lines = []
    for number, text in enumerate(path.read_text().splitlines(), start=1):
        if not text.strip():
            continue
        try:
            lines.append(json.loads(text))
        except json.JSONDecodeError:
            log.warning("%s:%d: not a JSON line, skipped", path, number)
    return lines


def plot_training_curves(runs: dict[str, list[dict]], path: Path) -> Path:
    """One panel per loss part (``total``, ``box``, ``mil``, ``intra``, ``inter``, ...), a line per run."""
    plt = _pyplot()
    parts: list[str] = []
    for history in runs.values():
        for line in history:
            for key in line.get("loss", {}):
                if key not in parts:
                    parts.append(key)
    parts.sort(key=lambda k: (LOSS_ORDER.index(k) if k in LOSS_ORDER else len(LOSS_ORDER), k))
    if not parts:
        raise GrenError("no loss values in any metrics.jsonl; nothing to plot")
    validated = any("validation" in line for history in runs.values() for line in history)
    panels = len(parts) + (2 if validated else 0)
    cols = min(3, panels)
    rows = (panels + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    colours = {label: f"C{i % 10}" for i, label in enumerate(runs)}  # one colour per run in every panel
    for ax, part in zip(axes.flat, parts):
        for label, history in runs.items():
            points = [(line["epoch"], line["loss"][part]) for line in history if part in line.get("loss", {})]
            if points:
                epochs, values = zip(*points)
                ax.plot(epochs, values, marker="o", label=label, color=colours[label])
        ax.set_title(f"loss: {part}")
        ax.set_xlabel("epoch")
        ax.ticklabel_format(axis="y", useOffset=False)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
    if validated:
        _plot_validation(list(axes.flat)[len(parts)], list(axes.flat)[len(parts) + 1], runs, colours)
    for ax in list(axes.flat)[panels:]:
        ax.axis("off")
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=colours[label], marker="o") for label in runs]
    labels = list(runs)
    fig.legend(handles, labels, loc="lower center", ncol=min(4, len(labels)), frameon=False)
    fig.tight_layout(rect=(0, 0.06 + 0.02 * ((len(labels) - 1) // 4), 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _plot_validation(ax_auc, ax_accuracy, runs: dict[str, list[dict]], colours: dict[str, str]) -> None:
    """The validation panels: mean AUC, and mean localization accuracy with one line style per IoU T."""
    from matplotlib.lines import Line2D

    for label, history in runs.items():
        lines = [line for line in history if isinstance(line.get("validation"), dict)]
        points = [(line["epoch"], line["validation"].get("auc_mean")) for line in lines]
        points = [(e, v) for e, v in points if v is not None]
        if points:
            ax_auc.plot(*zip(*points), marker="o", color=colours[label])
        for t, style in T_STYLES.items():
            points = [(line["epoch"], line["validation"].get("accuracy_mean", {}).get(t)) for line in lines]
            points = [(e, v) for e, v in points if v is not None]
            if points:
                ax_accuracy.plot(*zip(*points), marker="o", linestyle=style, color=colours[label])
    ax_auc.set_title("validation: mean AUC")
    ax_accuracy.set_title("validation: mean localization accuracy")
    ax_accuracy.legend([Line2D([], [], color="black", linestyle=style) for style in T_STYLES.values()],
                       [f"IoU >= {t}" for t in T_STYLES], fontsize=7, loc="best")
    for ax in (ax_auc, ax_accuracy):
        ax.set_xlabel("epoch")
        ax.set_ylim(-0.02, 1.02)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)


def short_labels(label_row: np.ndarray) -> str:
    """``"Effusion, Mass"`` from a (14,) 0/1 row, ``No Finding`` when empty."""
    names = [LABELS[k].replace("_", " ") for k in np.flatnonzero(label_row)]
    return ", ".join(names) if names else NO_FINDING


def hash_similarities(hashes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``hashes`` bool (N, 2, 64) -> (inter (N, N), intra (N,)), similarities ``1 - Hamming / 64``.

    Inter: the mean of the right-right and left-left lung similarities of two images; intra: an
    image's right lung vs its left lung.
    """
    h = np.asarray(hashes, dtype=bool)
    same_side = (h[:, None, :, :] != h[None, :, :, :]).sum(-1)  # (N, N, 2) Hamming per side
    inter = 1.0 - same_side.mean(-1) / 64.0
    intra = 1.0 - (h[:, 0] != h[:, 1]).sum(-1) / 64.0
    return inter, intra


def plot_hash_similarity(hashes: np.ndarray, names: Sequence[str], labels: Sequence[str], path: Path) -> Path:
    """Inter-image matrix (left) and intra-image bars (right) for ``N`` images."""
    plt = _pyplot()
    inter, intra = hash_similarities(hashes)
    n = len(names)
    ticks = [f"{i + 1}: {lab}" for i, lab in enumerate(labels)]
    fig, (ax_inter, ax_intra) = plt.subplots(1, 2, figsize=(13, 0.5 * n + 3.5),
                                             gridspec_kw={"width_ratios": [1.25, 1]})
    im = ax_inter.imshow(inter, vmin=0.3, vmax=1.0, cmap="viridis")
    for i in range(n):
        for j in range(n):
            ax_inter.text(j, i, f"{inter[i, j]:.2f}", ha="center", va="center", fontsize=7,
                          color="black" if inter[i, j] > 0.7 else "white")
    ax_inter.set_xticks(range(n), [str(i + 1) for i in range(n)])
    ax_inter.set_yticks(range(n), ticks, fontsize=8)
    ax_inter.set_title("inter-image lung-hash similarity\n1 - Hamming/64, mean of right-right and left-left")
    fig.colorbar(im, ax=ax_inter, fraction=0.046, pad=0.04)
    ax_intra.barh(range(n), intra, color="tab:orange")
    for i, value in enumerate(intra):
        ax_intra.text(value + 0.01, i, f"{value:.2f}", va="center", fontsize=8)
    ax_intra.set_yticks(range(n), [f"{i + 1}: {name}" for i, name in enumerate(names)], fontsize=8)
    ax_intra.invert_yaxis()
    ax_intra.set_xlim(0, 1.1)
    ax_intra.set_xlabel("similarity")
    ax_intra.set_title("intra-image: right lung vs left lung")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_localization(images: np.ndarray, boxes: list[tuple[np.ndarray, np.ndarray]], names: Sequence[str],
                      maps_per_run: dict[str, tuple[np.ndarray, ...]], path: Path,
                      min_side: int = PANEL_MIN_SIDE) -> Path:
    """Rows: one per (image, its first ground-truth box); columns: the image, then each run.

    ``images`` uint8 (N, S, S); ``boxes[i]`` = (float (n, 4) xyxy in S pixels, int (n,) LABELS index);
    ``maps_per_run[label]`` = (maps float (N, K, h, w), thresholds float (N, K)[, scores float (N, K)]): the
    run's :class:`~gren.methods.protocol.Localization`. Each panel shows the image upsampled (bilinear) to
    at least ``min_side`` px with the map of the box's class as a heat map (:func:`gren.eval.predict.heat_overlay`:
    opacity proportional to the value, full colour at the map's maximum, written in the title), its cells
    above the method's threshold outlined in yellow, the box in green.
    """
    from matplotlib.patches import Rectangle
    from PIL import Image

    from gren.eval.predict import heat_overlay, heat_tops

    plt = _pyplot()
    n = len(images)
    size = images.shape[-1]
    factor = max(1, -(-int(min_side) // size))  # ceil
    side = size * factor
    runs = list(maps_per_run)
    inches = side / 100 + 0.1  # saved at dpi 100: each panel's image at >= side pixels
    fig, axes = plt.subplots(n, len(runs) + 1, figsize=(inches * (len(runs) + 1), (inches + 0.55) * n + 0.4),
                             squeeze=False)
    line = max(3, round(side / 110))
    for i in range(n):
        box_xyxy, box_labels = boxes[i]
        k = int(box_labels[0])
        x1, y1, x2, y2 = (float(v) for v in box_xyxy[0])
        film = np.asarray(Image.fromarray(np.asarray(images[i], dtype=np.uint8), mode="L").resize(
            (side, side), Image.Resampling.BILINEAR))
        for c in range(len(runs) + 1):
            ax = axes[i, c]
            ax.set_xticks([])
            ax.set_yticks([])
            title = f"{names[i]}\nGT: {LABELS[k]}"
            if c == 0:
                ax.imshow(film, cmap="gray", vmin=0, vmax=255, extent=(0, size, size, 0), interpolation="none")
            else:
                maps, limits, *rest = maps_per_run[runs[c - 1]]
                prob, threshold = maps[i, k], float(limits[i, k])
                thresholds = np.full(maps.shape[1], threshold)
                tops = heat_tops(maps[i], [k], "class")
                ax.imshow(heat_overlay(film, maps[i], [k], thresholds, tops, line, OUTLINE), extent=(0, size, size, 0),
                          interpolation="none")
                iou = grid_box_iou(prob, (x1, y1, x2, y2), (size, size), threshold)
                score = f"p {float(rest[0][i, k]):.2f}, " if rest else ""
                title = (f"{runs[c - 1]}: {LABELS[k]} {score}IoU {iou:.2f}\n"
                         f"map max {prob.max():.2f} (full colour), outline > {threshold:.2f}")
            ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor="lime", linewidth=2))
            ax.set_title(title, fontsize=9)
            ax.set_xlim(0, size)
            ax.set_ylim(size, 0)
    fig.suptitle("map of the box's class (opacity proportional to the value), cells above the method's threshold "
                 "outlined in yellow, ground-truth box green", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.4 / ((inches + 0.55) * n + 0.4)))
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def select_test_images(split, cache, n: int) -> list[int]:
    """Cache rows of up to ``n`` annotated test images, spreading over box classes (first box's class)."""
    test = split[(split["role"] == "test") & split["annotated"]]
    present = set(cache.image_ids)
    rows = [cache.row_of(i) for i in test["image_id"] if i in present]
    by_class: dict[int, list[int]] = {}
    for row in rows:
        _, labels = cache.boxes(row)
        if len(labels):
            by_class.setdefault(int(labels[0]), []).append(row)
    chosen: list[int] = []
    while len(chosen) < n and any(by_class.values()):
        for k in sorted(by_class):
            if by_class[k] and len(chosen) < n:
                chosen.append(by_class[k].pop(0))
    return chosen


def make_report(runs: Sequence[str | os.PathLike], out: str | os.PathLike, data: str | os.PathLike | None = None,
                n_images: int = 8, device: str = "auto") -> list[Path]:
    """Write the figures for ``runs`` into ``out``; returns their paths.

    ``data`` overrides the dataset recorded in the first run's config (needed when the config does
    not record it). Runs without checkpoints contribute curves only.
    """
    from gren.core.device import select_device
    from gren.data.dataset import normalize_uint8
    from gren.eval.evaluate import open_run_data, read_run_config, read_split
    from gren.methods import load_run

    run_dirs = [Path(r) for r in runs]
    if not run_dirs:
        raise GrenError("--runs: give at least one run directory")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    configs = {r: read_run_config(r) for r in run_dirs}
    labels = {r: run_label(r, configs[r]) for r in run_dirs}
    if len(set(labels.values())) < len(labels):
        labels = {r: f"{labels[r]} #{i + 1}" for i, r in enumerate(run_dirs)}
    written: list[Path] = []

    histories = {labels[r]: read_metrics(r) for r in run_dirs}
    if any(histories.values()):
        written.append(plot_training_curves(histories, out / "training_curves.png"))
    else:
        log.warning("no metrics.jsonl in the runs; training_curves.png not written")

    first = run_dirs[0]
    cache = open_run_data(configs[first], data, first)
    split = read_split(first)
    rows = select_test_images(split, cache, n_images)
    if not rows:
        log.warning("%s: no annotated test images in the prepared data; image figures not written", first)
        return written
    names = [cache.image_ids[r] for r in rows]
    label_rows = np.asarray(cache.labels)[rows]
    written.append(plot_hash_similarity(np.asarray(cache.lung_hashes)[rows], names,
                                        [short_labels(row) for row in label_rows], out / "hash_similarity.png"))

    images = np.stack([np.asarray(cache.images[r]) for r in rows])
    torch_device = select_device(device)
    maps_per_run: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
    for run_dir in run_dirs:
        if not (run_dir / "checkpoints" / "last.pt").is_file():
            log.warning("%s: no checkpoint, left out of localization.png", run_dir)
            continue
        method, config = load_run(run_dir)
        if int(config["data"]["size"]) != cache.size:
            log.warning("%s: trained at %s px but the data is %d px; left out of localization.png", run_dir,
                        config["data"]["size"], cache.size)
            continue
        method.to(torch_device)
        batch = normalize_uint8(torch.from_numpy(images)[:, None]).to(torch_device)
        loc = method.predict(batch).detach_cpu()
        maps_per_run[labels[run_dir]] = (loc.maps.numpy(), loc.thresholds().numpy(), loc.scores.numpy())
    if maps_per_run:
        written.append(plot_localization(images, [cache.boxes(r) for r in rows], names, maps_per_run,
                                         out / "localization.png"))
    for path in written:
        log.info("wrote %s", path)
    return written
