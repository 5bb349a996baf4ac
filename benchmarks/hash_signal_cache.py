"""Hash signal in a prepared cache: do the stored lung pHashes track the labels? (any dataset)

    python benchmarks/hash_signal_cache.py [--cache gren-demo/cache] [--name hash_signal_synthetic]

The lung hashes GREN trains with are the ones ``gren prepare`` stored (``lung_hashes``, one 64-bit
pHash per lung). From them:

* intra-image: ROC AUC of the Hamming distance right vs left lung for "any finding" vs "No Finding";
* inter-image: ROC AUC of minus the mean lung-to-lung Hamming distance for "the two images share a
  label" among pairs of abnormal images, and for "same normality" over all pairs.

0.5 = no signal. Pair AUCs use all pairs (not independent samples): read them as effect sizes.
Default: the demo's cache (``gren demo`` first). Writes benchmarks/results/<name>.json and .md.
"""

from __future__ import annotations

import argparse
import json
import logging
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from crossval_results import RESULTS, machine
from gren.data.cache import PreparedCache
from gren.hashing import hamming, hamming_pairs

log = logging.getLogger("hash_signal_cache")


def hash_signal(cache: PreparedCache) -> dict:
    hashes = torch.from_numpy(np.array(cache.lung_hashes, dtype=bool))  # (N, 2, 64)
    labels = np.array(cache.labels, dtype=bool)  # (N, 14)
    valid = ~np.array(cache.lung_fallback, dtype=bool)
    hashes, labels = hashes[torch.from_numpy(valid)], labels[valid]
    abnormal = labels.any(axis=1)
    intra = hamming_pairs(hashes[:, 0], hashes[:, 1]).numpy()
    inter = ((hamming(hashes[:, 0], hashes[:, 0]) + hamming(hashes[:, 1], hashes[:, 1])).numpy() / 2.0)
    upper = np.triu_indices(len(hashes), 1)
    pair_distance = inter[upper]
    shares = (labels[:, None, :] & labels[None, :, :]).any(-1)[upper]
    both_abnormal = (abnormal[:, None] & abnormal[None, :])[upper]
    same_normality = (abnormal[:, None] == abnormal[None, :])[upper]
    return {
        "images": int(len(hashes)), "no_finding": int((~abnormal).sum()), "with_findings": int(abnormal.sum()),
        "fallback_left_out": int((~valid).sum()),
        "intra_mean_no_finding": float(intra[~abnormal].mean()), "intra_mean_findings": float(intra[abnormal].mean()),
        "intra_auc": float(roc_auc_score(abnormal, intra)),
        "inter_auc_share_label": float(roc_auc_score(shares[both_abnormal], -pair_distance[both_abnormal])),
        "inter_auc_same_normality": float(roc_auc_score(same_normality, -pair_distance)),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", default="gren-demo/cache")
    parser.add_argument("--name", default="hash_signal_synthetic")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    cache = PreparedCache(args.cache)
    figures = hash_signal(cache)
    payload = {"name": args.name, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
               "machine": machine(), "cache": str(Path(args.cache).resolve()), "lungs": cache.lungs,
               "figures": figures}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(payload, indent=1) + "\n")
    f = figures
    lines = [f"## Hash signal in a prepared cache ({args.cache})", "",
             f"{f['images']} images ({f['no_finding']} No Finding, {f['with_findings']} with findings; "
             f"{f['fallback_left_out']} with prior-fallback masks left out); lungs `{cache.lungs}`; the stored lung "
             "pHashes GREN trains with. 0.5 = no signal. Rerun: `python benchmarks/hash_signal_cache.py --cache CACHE`.",
             "", "| figure | value |", "| --- | --- |",
             f"| intra: mean right-left Hamming, No Finding / findings | {f['intra_mean_no_finding']:.1f} / "
             f"{f['intra_mean_findings']:.1f} |",
             f"| intra: AUC findings vs No Finding | {f['intra_auc']:.3f} |",
             f"| inter: AUC shares a label (pairs of abnormal images) | {f['inter_auc_share_label']:.3f} |",
             f"| inter: AUC same normality (all pairs) | {f['inter_auc_same_normality']:.3f} |"]
    (RESULTS / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    log.info("wrote %s: %s", RESULTS / f"{args.name}.md", figures)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
