"""Hash-signal study: do lung pHashes carry the signal GREN's graphs assume?

On the real NIH sample (``$GREN_SHARED_DATA/nih``: 2,220 images, labels from Data_Entry_2017_v2020.csv.gz):

(a) intra-image: ROC AUC of the Hamming distance between the two lungs' hashes (mirrored and not,
    crop fill "keep" and "mean") for telling images with findings from "No Finding" images;
(b) inter-image: Hamming distance between images (lung hashes: mean of right-right and left-left
    distances) vs shared labels -- mean distance of pairs sharing a label vs not and the AUC of
    (minus) distance for "shares at least one label" among pairs of abnormal images; the mean distance
    of No Finding / No Finding pairs, No Finding / abnormal pairs and abnormal / abnormal pairs;
(c) the same inter-image figures with whole-image hashes.

Lung masks: ``gren.lungs.segment.segment_lungs(..., "classical")`` when that module exists, else the
fixed anatomical prior boxes (recorded in the output). Writes benchmarks/results/hash_signal.json and
hash_signal.md. Run: ``nice -n 10 python benchmarks/hash_signal.py [--limit N]`` (~5 min on 2 cores).
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import platform
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image
from sklearn.metrics import roc_auc_score
from tqdm import tqdm

from gren.core.paths import shared_data_dir
from gren.hashing import hamming, hamming_pairs, phash
from gren.lungs.regions import PRIOR_BOXES, lung_hashes

log = logging.getLogger("hash_signal")
RESULTS = Path(__file__).resolve().parent / "results"
NO_FINDING = "No Finding"


def load_sample(nih: Path, limit: int | None) -> tuple[pd.DataFrame, np.ndarray]:
    """Records (image_id, labels set) of the sample's images and their pixels uint8 (N, H, W)."""
    table = pd.read_csv(nih / "Data_Entry_2017_v2020.csv.gz", usecols=["Image Index", "Finding Labels"])
    table["image_id"] = table["Image Index"].str.rsplit(".", n=1).str[0]
    files = {p.stem: p for p in (nih / "images").iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg")}
    table = table[table["image_id"].isin(files)].sort_values("image_id").reset_index(drop=True)
    if limit:
        table = table.iloc[:limit]
    table["labels"] = table["Finding Labels"].map(lambda s: frozenset(x.strip() for x in s.split("|")))
    table["normal"] = table["labels"].map(lambda s: s == frozenset({NO_FINDING}))
    images = []
    for image_id in tqdm(table["image_id"], desc="decode", leave=False):
        with Image.open(files[image_id]) as im:
            images.append(np.asarray(im.convert("L")))
    shapes = {im.shape for im in images}
    if len(shapes) != 1:
        raise SystemExit(f"expected one image size in {nih / 'images'}, got {sorted(shapes)}")
    return table, np.stack(images)


def lung_masks(images: np.ndarray) -> tuple[np.ndarray, str, int]:
    """uint8 (N, H, W) masks, which masks were used, number of segmentation fallbacks."""
    try:
        from gren.lungs.segment import segment_lungs
    except ImportError:
        segment_lungs = None
    if segment_lungs is None:
        n, height, width = images.shape
        masks = np.zeros(images.shape, dtype=np.uint8)
        for label, (fx0, fy0, fx1, fy1) in PRIOR_BOXES.items():
            masks[:, int(fy0 * height) : int(fy1 * height), int(fx0 * width) : int(fx1 * width)] = label
        return masks, "prior boxes (gren.lungs.segment not available)", n
    masks = np.empty(images.shape, dtype=np.uint8)
    fallbacks = 0
    step = 64
    for start in tqdm(range(0, len(images), step), desc="segment", leave=False):
        masks[start : start + step], fallback = segment_lungs(images[start : start + step], "classical")
        fallbacks += int(np.asarray(fallback).sum())
    return masks, "gren.lungs.segment.segment_lungs(classical)", fallbacks


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    return float(roc_auc_score(labels, scores)) if 0 < labels.sum() < len(labels) else float("nan")


def bootstrap_auc(labels: np.ndarray, scores: np.ndarray, rounds: int = 300, seed: int = 0) -> list[float]:
    """95% bootstrap interval of the AUC over images."""
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(rounds):
        pick = rng.integers(0, len(labels), len(labels))
        if 0 < labels[pick].sum() < len(pick):
            values.append(roc_auc_score(labels[pick], scores[pick]))
    return [float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))]


def intra_study(hashes: torch.Tensor, normal: np.ndarray) -> dict:
    distance = hamming_pairs(hashes[:, 0], hashes[:, 1]).numpy().astype(float)
    abnormal = ~normal
    return {
        "mean_distance_no_finding": float(distance[normal].mean()),
        "mean_distance_with_findings": float(distance[abnormal].mean()),
        "auc_findings_vs_no_finding": auc(abnormal.astype(int), distance),
        "auc_95ci": bootstrap_auc(abnormal.astype(int), distance),
    }


def inter_study(distance: np.ndarray, table: pd.DataFrame) -> dict:
    """``distance``: float (N, N) Hamming distances between images."""
    normal = table["normal"].to_numpy()
    labels = list(table["labels"])
    upper = np.triu_indices(len(table), k=1)
    d = distance[upper]
    ni, nj = normal[upper[0]], normal[upper[1]]
    out = {
        "mean_distance_no_finding_pairs": float(d[ni & nj].mean()),
        "mean_distance_mixed_pairs": float(d[ni ^ nj].mean()),
        "mean_distance_abnormal_pairs": float(d[~ni & ~nj].mean()),
    }
    # same-normality AUC: small distance predicts "both No Finding or both abnormal"
    same = (ni == nj).astype(int)
    out["auc_same_normality"] = auc(same, -d)
    abnormal_idx = np.flatnonzero(~normal)
    if len(abnormal_idx) > 1:
        ai, aj = np.triu_indices(len(abnormal_idx), k=1)
        gi, gj = abnormal_idx[ai], abnormal_idx[aj]
        share = np.array([bool(labels[a] & labels[b]) for a, b in zip(gi, gj)])
        da = distance[gi, gj]
        out.update(
            {
                "abnormal_pairs": int(len(da)),
                "abnormal_pairs_sharing_a_label": int(share.sum()),
                "mean_distance_sharing": float(da[share].mean()),
                "mean_distance_not_sharing": float(da[~share].mean()),
                "auc_share_label": auc(share.astype(int), -da),
            }
        )
    return out


def lung_inter_distance(hashes: torch.Tensor) -> np.ndarray:
    """Mean of right-right and left-left Hamming distances: float (N, N)."""
    right = hamming(hashes[:, 0], hashes[:, 0]).numpy()
    left = hamming(hashes[:, 1], hashes[:, 1]).numpy()
    return (right + left) / 2.0


def write_markdown(result: dict, path: Path) -> None:
    lines = [
        "# Hash-signal study (real NIH sample)",
        "",
        f"{result['n_images']} images ({result['n_no_finding']} No Finding, {result['n_with_findings']} with "
        f"findings); masks: {result['masks']} (fallbacks: {result['mask_fallbacks']}); {result['date']}.",
        "",
        "## (a) Intra-image: Hamming distance right vs left lung, findings vs No Finding",
        "",
        "| variant | mean d (No Finding) | mean d (findings) | AUC | 95% CI |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, row in result["intra"].items():
        lines.append(
            f"| {name} | {row['mean_distance_no_finding']:.2f} | {row['mean_distance_with_findings']:.2f} | "
            f"{row['auc_findings_vs_no_finding']:.3f} | {row['auc_95ci'][0]:.3f}-{row['auc_95ci'][1]:.3f} |"
        )
    lines += [
        "",
        "## (b, c) Inter-image: Hamming distance between images vs labels",
        "",
        "| hashes | NF-NF | NF-abn | abn-abn | AUC same normality | abn pairs: sharing | not sharing | AUC share |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, row in result["inter"].items():
        lines.append(
            f"| {name} | {row['mean_distance_no_finding_pairs']:.2f} | {row['mean_distance_mixed_pairs']:.2f} | "
            f"{row['mean_distance_abnormal_pairs']:.2f} | {row['auc_same_normality']:.3f} | "
            f"{row['mean_distance_sharing']:.2f} | {row['mean_distance_not_sharing']:.2f} | "
            f"{row['auc_share_label']:.3f} |"
        )
    lines += ["", "Pair AUCs use all pairs (not independent samples): read them as effect sizes.", ""]
    path.write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=None, help="use the first N images only")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    nih = shared_data_dir() / "nih"
    if not nih.is_dir():
        log.error("real data not found at %s (set GREN_SHARED_DATA)", nih)
        return 1
    table, images = load_sample(nih, args.limit)
    normal = table["normal"].to_numpy()
    log.info("%d images, %d No Finding", len(table), int(normal.sum()))
    masks, mask_source, mask_fallbacks = lung_masks(images)
    log.info("masks: %s, %d fallbacks", mask_source, mask_fallbacks)

    intra, inter = {}, {}
    for fill in ("keep", "mean"):
        for mirror in (True, False):
            name = f"lungs fill={fill} mirror_left={mirror}"
            hashes = lung_hashes(images, masks, mirror_left=mirror, fill=fill)
            intra[name] = intra_study(hashes, normal)
            if mirror:  # right-right / left-left distances do not depend on mirroring the left crop
                inter[f"lungs fill={fill}"] = inter_study(lung_inter_distance(hashes), table)
            log.info("%s: intra AUC %.3f", name, intra[name]["auc_findings_vs_no_finding"])
    whole = phash(torch.from_numpy(images))
    inter["whole image"] = inter_study(hamming(whole, whole).numpy().astype(float), table)

    result = {
        "n_images": int(len(table)),
        "n_no_finding": int(normal.sum()),
        "n_with_findings": int((~normal).sum()),
        "masks": mask_source,
        "mask_fallbacks": mask_fallbacks,
        "intra": intra,
        "inter": inter,
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": f"{platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)",
        "python": sys.version.split()[0],
        "torch": torch.__version__,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "hash_signal.json").write_text(json.dumps(result, indent=2))
    write_markdown(result, args.out / "hash_signal.md")
    log.info("wrote %s", args.out / "hash_signal.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
