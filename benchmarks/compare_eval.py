"""Compare the eval.json of two demo (or crossval) folders, method by method: the protocol-port check.

    python benchmarks/compare_eval.py OLD_DIR NEW_DIR [--name protocol_port] [--tolerance 1e-6]

Issue 11 ported ``baseline`` and the GREN variants to the method protocol and asked that, on the same
machine and thread count, the demo's ``eval.json`` of both methods be identical before and after. How it
was checked (2026-12-01): ``gren demo --out OLD`` with the code before the port (commit 6b232ba, in a git
worktree), then ``gren demo --out NEW`` with the port (commit 5f0303d: protocol, core layout, cache fields), the same
``OMP_NUM_THREADS=2`` on the same machine, NEW reusing OLD's synthetic ``data/`` (the cache re-prepared);
this script then compares every metric of ``OLD/ablation/<method>/fold_0/eval.json`` with NEW's (the
accuracy and IoBB per class and T, the AUC per label, the box and image counts). Keys the port added
(``rules``, ``cell_threshold``, ``wang``) are listed, not compared. Writes
``benchmarks/results/<name>.md`` / ``.json``.
"""

from __future__ import annotations

import argparse
import json
import math
from datetime import datetime, timezone
from pathlib import Path

from crossval_results import machine

RESULTS = Path(__file__).resolve().parent / "results"
COMPARED = ("accuracy", "iobb", "auc", "n_boxes", "n_images", "n_images_auc")


def flatten(value, prefix: str = "") -> dict[str, object]:
    if isinstance(value, dict):
        out: dict[str, object] = {}
        for key, item in value.items():
            out.update(flatten(item, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): value}


def compare(old: dict, new: dict, tolerance: float) -> tuple[int, list[str]]:
    """(number of values compared, differences beyond ``tolerance``)."""
    a = flatten({k: old.get(k) for k in COMPARED})
    b = flatten({k: new.get(k) for k in COMPARED})
    differences = []
    for key in sorted(set(a) | set(b)):
        x, y = a.get(key), b.get(key)
        if isinstance(x, float) and isinstance(y, float):
            if not (math.isclose(x, y, rel_tol=0, abs_tol=tolerance) or (math.isnan(x) and math.isnan(y))):
                differences.append(f"{key}: {x!r} -> {y!r}")
        elif x != y:
            differences.append(f"{key}: {x!r} -> {y!r}")
    return len(set(a) | set(b)), differences


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("old", type=Path)
    parser.add_argument("new", type=Path)
    parser.add_argument("--name", default="protocol_port")
    parser.add_argument("--tolerance", type=float, default=0.0, help="absolute tolerance (0: identical)")
    args = parser.parse_args()
    rows, report = [], {}
    for old_eval in sorted(args.old.glob("ablation/*/fold_*/eval.json")):
        rel = old_eval.relative_to(args.old)
        new_eval = args.new / rel
        old, new = json.loads(old_eval.read_text()), json.loads(new_eval.read_text())
        n, differences = compare(old, new, args.tolerance)
        added = sorted(set(new) - set(old))
        report[str(rel)] = {"compared": n, "differences": differences, "added_keys": added}
        rows.append(f"| {rel.parts[1]} | {n} | {len(differences)} | {', '.join(added) or '-'} |")
    identical = all(not r["differences"] for r in report.values()) and bool(report)
    lines = [f"# Protocol port check: {args.old} vs {args.new}", "",
             f"Machine: {machine()}; {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC. Tolerance {args.tolerance}.",
             "", "| method | values compared | differences | keys added by the port |", "| --- | --- | --- | --- |",
             *rows, "", "Identical." if identical else "NOT identical: see the .json for each difference.", ""]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(report, indent=2) + "\n")
    (RESULTS / f"{args.name}.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0 if identical else 1


if __name__ == "__main__":
    raise SystemExit(main())
