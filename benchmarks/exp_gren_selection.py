"""Choosing GREN's regularizer settings on a separate synthetic dataset (never on the folds we report).

    python benchmarks/exp_gren_selection.py [--out runs/gren-selection] [--folds 0,1] [--variants a,b]
    python benchmarks/exp_gren_selection.py --round2     # round 2: ROUND2's variants on folds 0-4

Variant names are separated by ";" in ``--variants``.

Why: at the paper's lambdas (0.11, 0.15) the graph terms are about 0.03 while box + MIL is about 25
(box and MIL sum over cells and classes; a graph term is a mean over edges of a distance in [0, 2]),
so GREN trains almost exactly like the baseline. This script trains the baseline and GREN variants
(lambda scaled x10 and x100, the contrastive form, lung vectors as inter-image features) with the
demo's training setting on a synthetic dataset of its own (seed 7, the seed the demo's setting was
chosen on; the demo and the 5-fold ablation use seed 0), on ``--folds`` of protocol 0.5_0.8.

Selection rule, fixed before any run: the variant with the highest localization accuracy averaged
over T = 0.1, 0.3, 0.5 and the selection folds; it is adopted only if it beats the baseline on that
average by more than the spread of the baseline over the selection folds. An adopted variant is
then trained on the folds we report, as an extra row next to the paper's settings.

Writes benchmarks/results/gren_selection.json and .md. Resumable (finished runs are skipped).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import time
from dataclasses import asdict, replace
from datetime import datetime, timezone
from pathlib import Path

from crossval_results import RESULTS, folds_above, format_paired, machine, paired_difference, selection_score
from gren.data.prepare import prepare_cache
from gren.data.synth import synthesize
from gren.eval.crossval import pair_dir, run_crossval
from gren.eval.demo import DemoSettings
from gren.eval.report import read_metrics
from gren.train.config import default_config

log = logging.getLogger("exp_gren_selection")

SELECTION_SEED = 7

# name -> (method, overrides on top of the demo's setting); pre-declared, in this order.
VARIANTS: dict[str, tuple[str, list[str]]] = {
    "baseline": ("baseline", []),
    "gren (paper lambda 0.11/0.15)": ("gren", []),
    "gren lambda x10": ("gren", ["graph.lambda_intra=1.1", "graph.lambda_inter=1.5"]),
    "gren lambda x100": ("gren", ["graph.lambda_intra=11", "graph.lambda_inter=15"]),
    "gren contrastive, lambda x10": ("gren", ["graph.form=contrastive", "graph.lambda_intra=1.1",
                                              "graph.lambda_inter=1.5"]),
    "gren lung-vector inter, lambda x10": ("gren", ["graph.inter_features=lungs", "graph.lambda_intra=1.1",
                                                    "graph.lambda_inter=1.5"]),
    # added while the first sweep ran (after the first three rows): batch-relative edge weights
    "gren rank edges, lambda x10": ("gren", ["graph.edge_scale=rank", "graph.lambda_intra=1.1",
                                             "graph.lambda_inter=1.5"]),
    # round 2, declared after round 1: the intra-image graph alone (the only graph whose hash distance
    # separates findings from normal films on the synthetic set, AUC 0.66-0.68 in hash_signal_cache.py), and
    # the paper's literal form (-sum (H/64) d), never trained in round 1
    "gren-intra lambda x10": ("gren-intra", ["graph.lambda_intra=1.1"]),
    "gren-intra lambda x30": ("gren-intra", ["graph.lambda_intra=3.3"]),
    "gren paper form, lambda x10": ("gren", ["graph.form=paper", "graph.lambda_intra=1.1", "graph.lambda_inter=1.5"]),
}
# Round 1 (folds 0, 1; the default run): the variants declared before round 2.
ROUND1 = ("baseline", "gren (paper lambda 0.11/0.15)", "gren lambda x10", "gren lambda x100",
          "gren contrastive, lambda x10", "gren lung-vector inter, lambda x10", "gren rank edges, lambda x10")
# Round 2 (five folds): the baseline, the paper's setting, round 1's two best variants and the new rows.
ROUND2 = ("baseline", "gren (paper lambda 0.11/0.15)", "gren lambda x10", "gren lung-vector inter, lambda x10",
          "gren-intra lambda x10", "gren-intra lambda x30", "gren paper form, lambda x10")


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name).strip("-").replace("--", "-")


def _unweighted(row: dict, term: str) -> str:
    """The last epoch's graph term divided by its lambda, as text ("-" for the baseline)."""
    value = row.get("final_loss_mean", {}).get(term)
    if value is None:
        return "-"
    lam = float(default_config()["graph"][f"lambda_{term}"])
    for override in row["overrides"]:
        if override.startswith(f"graph.lambda_{term}="):
            lam = float(override.split("=", 1)[1])
    return f"{value / lam:.3f}"


def _folds_above(row: dict, baseline: dict | None) -> str:
    """"k of n; +d [low, high]": on how many shared folds the variant scored above the baseline, and the mean
    paired difference with its 95 % t-interval (:func:`crossval_results.paired_difference`; "-" for the baseline)."""
    if baseline is None or row is baseline:
        return "-"
    base = dict(zip(baseline["folds"], baseline["score_per_fold"]))
    scores = dict(zip(row["folds"], row["score_per_fold"]))
    return f"{folds_above(scores, base)}; {format_paired(*paired_difference(scores, base)[:3])}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/gren-selection")
    parser.add_argument("--folds", default="0,1")
    parser.add_argument("--variants", default="", help="';'-separated subset of the names (default: round 1's)")
    parser.add_argument("--name", default=None, help="results/NAME.json and .md (gren_selection, with --round2 "
                        "gren_selection_round2)")
    parser.add_argument("--round2", action="store_true", help="round 2: ROUND2's variants (unless --variants) "
                        "on folds 0,1,2,3,4, results in gren_selection_round2")
    args = parser.parse_args()
    if args.round2:
        args.variants = args.variants or ";".join(ROUND2)
        args.folds = "0,1,2,3,4" if args.folds == "0,1" else args.folds
    args.name = args.name or ("gren_selection_round2" if args.round2 else "gren_selection")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    settings = replace(DemoSettings(), seed=SELECTION_SEED)
    out = Path(args.out)
    folds = [int(f) for f in args.folds.split(",") if f.strip()]
    wanted = [v.strip() for v in args.variants.split(";") if v.strip()] or list(ROUND1)
    unknown = [v for v in wanted if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s) {unknown}; known: {list(VARIANTS)}")
    start = time.perf_counter()
    data = out / "data"
    if not (data / "synth.json").is_file():
        synthesize(data, n=settings.n, size=settings.synth_size, seed=settings.seed,
                   workers=min(2, os.cpu_count() or 1), progress=False)
    cache = out / "cache"
    prepare_cache(data, cache, size=settings.size, lungs="masks", workers=min(2, os.cpu_count() or 1))

    rows = []
    for name in wanted:
        method, extra = VARIANTS[name]
        summary = run_crossval(cache, [method], out / "variants" / slug(name), protocol=settings.protocol,
                               folds=settings.folds, config_file="cpu-small",
                               overrides=[*settings.overrides(), *extra], only_folds=folds, batch_size=32,
                               progress=False)
        results = [r for r in summary["results"][method] if r["fold"] in folds]
        final_losses = []  # the last epoch's logged loss parts of each fold (graph terms already times lambda)
        for fold in folds:
            epochs = read_metrics(pair_dir(out / "variants" / slug(name), method, fold))
            if epochs:
                final_losses.append(epochs[-1]["loss"])
        scores = [selection_score(r) for r in results]
        rows.append({
            "variant": name, "method": method, "overrides": extra, "folds": [r["fold"] for r in results],
            "score": statistics.fmean(scores), "score_per_fold": scores,
            "accuracy_mean": {t: statistics.fmean(r["accuracy"]["mean"][t] for r in results)
                              for t in ("0.1", "0.3", "0.5", "0.7")},
            "auc_mean": statistics.fmean(r["auc"]["mean"] for r in results),
            "final_loss_mean": {k: statistics.fmean(f[k] for f in final_losses) for k in final_losses[0]}
            if final_losses else {},
        })
        log.info("%s: score %.3f (per fold %s)", name, rows[-1]["score"], ", ".join(f"{s:.3f}" for s in scores))

    by_name = {row["variant"]: row for row in rows}
    baseline = by_name.get("baseline")
    candidates = [row for row in rows if row["method"] != "baseline"]
    best = max(candidates, key=lambda row: row["score"]) if candidates else None
    margin = (max(baseline["score_per_fold"]) - min(baseline["score_per_fold"])) if baseline else None
    adopt = bool(best and baseline and best["score"] - baseline["score"] > margin)
    payload = {
        "name": args.name, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(), "settings": {**asdict(settings), "folds": folds},
        "seconds_this_call": round(time.perf_counter() - start, 1), "rows": rows,
        "best": best["variant"] if best else None, "baseline_spread": margin, "adopted": adopt,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(payload, indent=1) + "\n")
    round2 = args.name != "gren_selection"
    lines = [
        "## GREN settings chosen on a separate synthetic dataset" + (f" ({args.name})" if round2 else ""),
        "",
        f"{settings.n} synthetic films, seed {settings.seed} (not the demo's seed 0), cached at {settings.size} px;",
        f"the demo's training setting; protocol {settings.protocol}, folds {', '.join(map(str, folds))}.",
        "Score: mean localization accuracy over T = 0.1, 0.3, 0.5, averaged over the folds (rule fixed",
        "before the runs; see the script).",
        *(["Round 2: declared after round 1 (the intra-image graph alone, the paper's literal form) and scored",
           "over five folds, since two folds of about 70 boxes were too noisy to choose on."] if round2 else
          ["The rank-edge row was added to the list after the first three rows had been seen."]),
        "Rerun: `python benchmarks/exp_gren_selection.py" + (" --round2`." if round2 else "`."),
        "",
        "The paired difference (mean over folds of variant - baseline, 95 % t-interval) is shown for reading;",
        "the adoption rule is the one declared above.",
        "",
        "D_intra, D_inter: the unweighted graph terms in the last epoch (mean edge penalty; lung-feature",
        "distances are in [0, 2]); small values mean the features were pulled together. The paper form's",
        "terms, -(H/64) d, are negative by definition.",
        "",
        "| variant | score | per fold | above the baseline; paired difference [95 % CI] | acc T=0.1 | T=0.3 | T=0.5 | T=0.7 | mean AUC | D_intra "
        "| D_inter |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        acc = row["accuracy_mean"]
        lines.append(f"| {row['variant']} | {row['score']:.3f} | {' / '.join(f'{s:.3f}' for s in row['score_per_fold'])} "
                     f"| {_folds_above(row, baseline)} "
                     f"| {acc['0.1']:.2f} | {acc['0.3']:.2f} | {acc['0.5']:.2f} | {acc['0.7']:.2f} | {row['auc_mean']:.3f} "
                     f"| {_unweighted(row, 'intra')} | {_unweighted(row, 'inter')} |")
    if best and baseline:
        if round2:
            verdict = ("beats the baseline by more than its spread over the folds" if adopt
                       else "within the baseline's spread over the folds")
        else:
            verdict = ("adopted: the experiments on the reported folds (exp_synthetic_crossval.py, exp_nih_sample.py) "
                       "add it as a row" if adopt else "not adopted: within the baseline's spread over the folds")
        lines += ["", f"Best GREN variant: **{best['variant']}** ({best['score']:.3f} vs baseline {baseline['score']:.3f}, "
                  f"baseline spread {margin:.3f}): {verdict}."]
    (RESULTS / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    log.info("wrote %s", RESULTS / f"{args.name}.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
