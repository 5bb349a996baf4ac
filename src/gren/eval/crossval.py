"""``gren crossval``: train and evaluate every (method, fold), then the Table I style comparison.

Layout of ``OUT``::

    OUT/crossval.json             what was asked (data, methods, protocol, folds, config, overrides)
    OUT/<method>/fold_<k>/        a run directory (gren train) + eval.json / eval.md (gren evaluate)
    OUT/table.md, OUT/table.csv   the comparison (gren.eval.table)

Resumable: a pair whose ``eval.json`` exists is skipped; a pair with a ``config.yaml`` or checkpoint
but no ``eval.json`` is resumed (``train(..., resume=True)`` continues after its last completed epoch,
or does nothing when training finished) and then evaluated.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from gren.core.atomic import write_text_atomic
from gren.core.errors import GrenError
from gren.eval.evaluate import EVAL_JSON, evaluate_run, read_eval
from gren.eval.table import csv_table, markdown_table

log = logging.getLogger(__name__)

MANIFEST = "crossval.json"
TABLE_MD = "table.md"
TABLE_CSV = "table.csv"
_FOLD_DIR = re.compile(r"^fold_(\d+)$")


def pair_dir(out: str | os.PathLike, method: str, fold: int) -> Path:
    """``OUT/<method>/fold_<k>``."""
    return Path(out) / method / f"fold_{fold}"


def _default_train(data, method, out, *, protocol, fold, config_file, overrides, resume):
    from gren.train.engine import train

    return train(data, method, out, protocol=protocol, fold=fold, config_file=config_file, overrides=overrides,
                 resume=resume, foreign="drop")


def _default_evaluate(run_dir, data, batch_size, progress):
    return evaluate_run(run_dir, data=data, batch_size=batch_size, progress=progress)


def parse_methods(text: str | Sequence[str]) -> list[str]:
    """``"baseline,gren"`` -> ``["baseline", "gren"]`` (order kept, duplicates dropped)."""
    items = text.split(",") if isinstance(text, str) else list(text)
    methods: list[str] = []
    for item in (i.strip() for i in items):
        if item and item not in methods:
            methods.append(item)
    if not methods:
        raise GrenError("--methods: expected a comma-separated list of method names, e.g. baseline,gren")
    return methods


def run_crossval(
    data: str | os.PathLike,
    methods: str | Sequence[str],
    out: str | os.PathLike,
    protocol: str = "0.5_0.8",
    folds: int = 5,
    config_file: str | os.PathLike | None = None,
    overrides: Iterable[str] = (),
    only_folds: Sequence[int] | None = None,
    batch_size: int = 16,
    progress: bool = True,
    train_fn: Callable | None = None,
    evaluate_fn: Callable | None = None,
) -> dict:
    """Train + evaluate each (method, fold) into ``OUT/<method>/fold_<k>`` and write the tables.

    Args:
        data: dataset folder or prepared cache (the same for every pair).
        methods: registered method names, a list or ``"a,b,c"``.
        protocol: participation ``X_Y`` (``0.5_0.8``, ``1.0_0.0``, ``1.0_0.4``).
        folds: number of folds K; ``only_folds`` restricts the work to some of them (the table uses
            whatever folds have results).
        config_file, overrides: passed to the training engine (``--config``, ``key=value``).
        train_fn, evaluate_fn: replace the engine / evaluator (tests).

    Returns:
        ``{"trained": [(method, fold)], "skipped": [...], "results": {method: [eval dicts]}}``.
    """
    methods = parse_methods(methods)
    folds = int(folds)
    if folds < 1:
        raise GrenError(f"--folds {folds}: expected at least 1")
    fold_list = list(range(folds)) if only_folds is None else [int(f) for f in only_folds]
    bad = [f for f in fold_list if not 0 <= f < folds]
    if bad:
        raise GrenError(f"folds {bad} out of range 0..{folds - 1}")
    overrides = list(overrides)
    if not Path(data).exists():
        raise GrenError(f"--data {data}: not found")
    _check_settings(methods, protocol, config_file, overrides)
    out = Path(out)
    _output_folder(out).prepare([MANIFEST, TABLE_MD, TABLE_CSV], recognise=_recognise)
    manifest = {"data": str(Path(data).resolve()), "methods": methods, "protocol": protocol, "folds": folds,
                "config": None if config_file is None else str(config_file), "overrides": overrides}
    previous = _read_manifest(out)
    if previous:
        changed = [k for k in ("protocol", "folds", "config", "overrides")
                   if previous.get(k) is not None and previous.get(k) != manifest[k]]
        if changed:
            raise GrenError(f"{out} holds a cross-validation with other settings ({', '.join(changed)}: "
                            f"{', '.join(f'{previous[k]!r}' for k in changed)}); use another --out")
        manifest["methods"] = list(dict.fromkeys([*previous.get("methods", []), *methods]))
    write_text_atomic(out / MANIFEST, json.dumps(manifest, indent=2) + "\n")

    train_fn = train_fn or _default_train
    evaluate_fn = evaluate_fn or _default_evaluate
    trained, skipped = [], []
    fold_overrides = [o for o in overrides if not o.startswith(("data.folds=", "data.fold=", "data.protocol="))]
    fold_overrides.append(f"data.folds={folds}")
    for method in methods:
        for fold in fold_list:
            run_dir = pair_dir(out, method, fold)
            if (run_dir / EVAL_JSON).is_file():
                log.info("%s fold %d: already evaluated, skipped", method, fold)
                skipped.append((method, fold))
                continue
            resume = (run_dir / "config.yaml").is_file() or (run_dir / "checkpoints" / "last.pt").is_file()
            log.info("%s fold %d: %s training in %s", method, fold, "resuming" if resume else "starting", run_dir)
            train_fn(data, method, run_dir, protocol=protocol, fold=fold, config_file=config_file,
                     overrides=fold_overrides, resume=resume)
            evaluate_fn(run_dir, data, batch_size, progress)
            trained.append((method, fold))
    results = write_tables(out, methods=manifest["methods"])
    return {"trained": trained, "skipped": skipped, "results": results}


def _output_folder(out: Path):
    from gren.core.outputs import OutputFolder

    return OutputFolder(out, "gren crossval")


def _recognise(path: Path) -> bool:
    """A crossval.json, table.md or table.csv that gren crossval wrote (before output manifests existed)."""
    text = path.read_text(encoding="utf-8")
    if path.name == MANIFEST:
        data = json.loads(text)
        return isinstance(data, dict) and {"methods", "protocol", "folds"} <= set(data)
    if path.name == TABLE_MD:
        return text.startswith("# Cross-validation")
    return text.startswith("block,T,method,n_folds")


def _check_settings(methods: list[str], protocol: str, config_file, overrides: list[str]) -> None:
    """Refuse unknown methods, a malformed protocol and bad config overrides before any work starts
    (not when their turn comes, after hours of training the others)."""
    from gren.data.splits import parse_protocol
    from gren.methods import METHODS
    from gren.train.config import resolve_config

    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise GrenError(f"unknown method(s) {', '.join(map(repr, unknown))}; registered: {', '.join(sorted(METHODS))}")
    if parse_protocol(protocol).annotated >= 1.0:
        raise GrenError(f"protocol {protocol} trains on every annotated image and leaves none to test; "
                        "cross-validation needs test folds (train a final model with gren train instead)")
    resolve_config(config_file, overrides)  # every key must belong to some method
    for method in methods:  # and each method's values must be valid for it
        resolve_config(config_file, overrides, method=method, foreign="drop")


def _read_manifest(out: Path) -> dict | None:
    path = out / MANIFEST
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise GrenError(f"{path}: not valid JSON ({err}); delete it or use another --out") from None


def collect_results(out: str | os.PathLike, methods: Sequence[str] | None = None) -> dict[str, list[dict]]:
    """``{method: [eval.json of each evaluated fold, by fold number]}`` from ``OUT/<method>/fold_<k>/``.

    ``methods`` fixes the row order (default: the manifest's, then any other method folder, sorted).
    Methods without any evaluated fold are left out.
    """
    out = Path(out)
    if methods is None:
        manifest = _read_manifest(out) or {}
        methods = list(manifest.get("methods", []))
        if out.is_dir():
            extra = sorted(p.name for p in out.iterdir() if p.is_dir() and any(_FOLD_DIR.match(c.name) for c in p.iterdir()))
            methods += [m for m in extra if m not in methods]
    results: dict[str, list[dict]] = {}
    for method in methods:
        method_dir = out / method
        if not method_dir.is_dir():
            continue
        fold_dirs = sorted((int(m.group(1)), p) for p in method_dir.iterdir()
                           if (m := _FOLD_DIR.match(p.name)) and (p / EVAL_JSON).is_file())
        if fold_dirs:
            results[method] = [read_eval(p) for _, p in fold_dirs]
    return results


def write_tables(out: str | os.PathLike, methods: Sequence[str] | None = None) -> dict[str, list[dict]]:
    """Rebuild ``OUT/table.md`` and ``OUT/table.csv`` from the evaluated runs; returns the results."""
    out = Path(out)
    results = collect_results(out, methods)
    if not results:
        raise GrenError(f"{out}: no evaluated runs (OUT/<method>/fold_<k>/eval.json) to tabulate")
    manifest = _read_manifest(out) or {}
    title = "Cross-validation"
    if manifest.get("protocol"):
        title += f": protocol {manifest['protocol']}, {manifest.get('folds', '?')} folds"
    _output_folder(out).prepare([TABLE_MD, TABLE_CSV], recognise=_recognise)
    write_text_atomic(out / TABLE_MD, markdown_table(results, title=title))
    write_text_atomic(out / TABLE_CSV, csv_table(results))
    log.info("wrote %s and %s", out / TABLE_MD, out / TABLE_CSV)
    return results
