"""Hash signal in a prepared cache: do the stored lung pHashes track the labels? (any dataset)

    python benchmarks/hash_signal_cache.py [--cache gren-demo/cache] [--name hash_signal_synthetic]

The lung hashes GREN trains with are the ones ``gren prepare`` stored (``lung_hashes``, one 64-bit
pHash per lung). From them:

* intra-image: ROC AUC of the Hamming distance right vs left lung for "any finding" vs "No Finding";
  computed by hash_signal.py's own ``intra_study`` / ``inter_study`` (the real-sample study);
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
import pandas as pd
import torch

from crossval_results import RESULTS, machine
from gren.data.cache import PreparedCache
from hash_signal import inter_study, intra_study, lung_inter_distance

log = logging.getLogger("hash_signal_cache")


def hash_signal(cache: PreparedCache) -> dict:
    """The figures of :func:`hash_signal.intra_study` / :func:`hash_signal.inter_study` (the real-sample
    study's own functions) on a cache's stored lung hashes; prior-fallback images left out."""
    valid = ~np.array(cache.lung_fallback, dtype=bool)
    hashes = torch.from_numpy(np.array(cache.lung_hashes, dtype=bool)[valid])  # (N, 2, 64)
    labels = np.array(cache.labels, dtype=bool)[valid]  # (N, 14)
    normal = ~labels.any(axis=1)
    table = pd.DataFrame({"normal": normal, "labels": [frozenset(np.flatnonzero(row)) for row in labels]})
    intra = intra_study(hashes, normal)
    inter = inter_study(lung_inter_distance(hashes), table)
    return {
        "images": int(len(table)), "no_finding": int(normal.sum()), "with_findings": int((~normal).sum()),
        "fallback_left_out": int((~valid).sum()),
        "intra_mean_no_finding": intra["mean_distance_no_finding"],
        "intra_mean_findings": intra["mean_distance_with_findings"],
        "intra_auc": intra["auc_findings_vs_no_finding"], "intra_auc_95ci": intra["auc_95ci"],
        "inter_auc_share_label": inter["auc_share_label"],
        "inter_auc_same_normality": inter["auc_same_normality"],
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
             f"| intra: AUC findings vs No Finding (95% bootstrap CI) | {f['intra_auc']:.3f} "
             f"({f['intra_auc_95ci'][0]:.3f}-{f['intra_auc_95ci'][1]:.3f}) |",
             f"| inter: AUC shares a label (pairs of abnormal images) | {f['inter_auc_share_label']:.3f} |",
             f"| inter: AUC same normality (all pairs) | {f['inter_auc_same_normality']:.3f} |"]
    (RESULTS / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    log.info("wrote %s: %s", RESULTS / f"{args.name}.md", figures)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
