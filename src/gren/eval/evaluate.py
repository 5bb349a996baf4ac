"""``gren evaluate``: a trained run over its test split -> ``RUN/eval.json`` and ``RUN/eval.md``.

The test images are the run's fold (``RUN/split.csv``): the rows with ``role == "test"`` that are
annotated (have at least one box). Localization accuracy and IoBB are computed over their boxes
(:mod:`gren.metrics`), in the ``S x S`` pixels of the prepared cache (IoU is invariant under the
resize from the original file, which scales image and box together). AUC is computed over the same
annotated test images by default; ``auc_images="heldout"`` adds every image of the fold not used for
training (``role`` ``test`` or ``unused``), which gives AUC many more negatives.

Everything comes from the method's :class:`~gren.methods.protocol.Localization`: cells are positive
where ``maps > threshold`` (the method's threshold: 0.5 for the grid-MIL methods, 180/255 of the
normalised map for CAM), and AUC ranks the images by ``scores`` (by ``evidence`` when the method gives
it: the grid-MIL methods' non-saturating log-space noisy-or). ``rules``: ``cells`` (always; the union
of the positive cells against each box, DESIGN.md section 4) and ``wang`` (Wang et al.'s box around
each connected component; in ``eval.json`` under ``"wang": {"accuracy", "iobb"}``), by default the
method's ``eval_rules``. Non-finite maps or scores are refused with a clear error.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import yaml

from gren.core.atomic import write_text_atomic
from gren.core.device import select_device
from gren.core.errors import GrenError
from gren.core.labels import BOX_CLASSES, LABELS
from gren.methods.protocol import Localization
from gren.metrics import IOU_THRESHOLDS, threshold_key

# The scoring core lives in gren.train.scoring so that validation during training uses the same code
# (train/ may not import eval/); re-exported here, where callers have always found it.
from gren.train.scoring import RULES, PredictFn, as_localization, evaluate_predictions, parse_rules  # noqa: F401

log = logging.getLogger(__name__)

EVAL_JSON = "eval.json"
EVAL_MD = "eval.md"
AUC_IMAGE_CHOICES = ("test", "heldout")

def read_run_config(run_dir: str | os.PathLike) -> dict:
    """``RUN/config.yaml`` as a dict; a clear error when the run directory or file is missing."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise GrenError(f"{run_dir}: not a training run (no config.yaml); train one with `gren train ... --out RUN`")
    try:
        config = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise GrenError(f"{path}: invalid YAML ({err})") from None
    if not isinstance(config, dict):
        raise GrenError(f"{path}: expected a mapping")
    return config


def run_data_path(config: dict) -> str | None:
    """The dataset (raw folder or cache) a run was trained on: ``data.path`` of its config, or None."""
    data = config.get("data") if isinstance(config.get("data"), dict) else {}
    value = data.get("path")
    return value if isinstance(value, str) and value else None


def read_split(run_dir: str | os.PathLike) -> pd.DataFrame:
    """``RUN/split.csv`` (columns ``image_id``, ``role``, ``annotated``, ...)."""
    path = Path(run_dir) / "split.csv"
    if not path.is_file():
        raise GrenError(f"{path}: missing; the run has no recorded split (was it made by `gren train`?)")
    try:
        from gren.data.splits import read_fold_csv

        split = read_fold_csv(path)
    except ImportError:  # pragma: no cover - splits module always present in a full install
        split = pd.read_csv(path, dtype={"image_id": str, "patient_id": str})
    missing = {"image_id", "role", "annotated"} - set(split.columns)
    if missing:
        raise GrenError(f"{path}: expected columns image_id, role, annotated; missing {', '.join(sorted(missing))}")
    split = split.copy()
    split["image_id"] = split["image_id"].astype(str)
    if split["annotated"].dtype != bool:
        split["annotated"] = split["annotated"].astype(str).str.lower().isin(("true", "1", "yes"))
    return split


def open_run_data(config: dict, data: str | os.PathLike | None, run_dir: str | os.PathLike):
    """The :class:`~gren.data.cache.PreparedCache` for a run: ``data`` when given, else the one recorded in
    its config (``data.path``, written by the training engine)."""
    from gren.data.source import open_prepared

    path = data if data is not None else run_data_path(config)
    if path is None:
        raise GrenError(f"{run_dir}/config.yaml does not record the training data; pass --data DIR|CACHE")
    if not Path(path).exists():
        raise GrenError(f"data {path} not found (from {'--data' if data is not None else f'{run_dir}/config.yaml'}); "
                        "pass --data DIR|CACHE")
    data_cfg = config.get("data", {})
    return open_prepared(path, size=int(data_cfg.get("size", 512)), lungs=str(data_cfg.get("lungs", "classical")))


def resolve_checkpoint(run_dir: str | os.PathLike, checkpoint: str | None) -> Path:
    """``RUN`` itself (its last checkpoint) or ``RUN/checkpoints/NAME[.pt]`` / a checkpoint path."""
    if checkpoint is None:
        return Path(run_dir)
    for candidate in (Path(checkpoint), Path(run_dir) / "checkpoints" / checkpoint,
                      Path(run_dir) / "checkpoints" / f"{checkpoint}.pt"):
        if candidate.is_file():
            return candidate
    available = sorted(p.name for p in (Path(run_dir) / "checkpoints").glob("*.pt"))
    raise GrenError(f"checkpoint {checkpoint!r} not found in {run_dir}/checkpoints "
                    f"(available: {', '.join(available) or 'none'})")


def pick_device(name: str = "auto") -> torch.device:
    """:func:`gren.core.device.select_device` (kept under this name for callers of the evaluator)."""
    return select_device(name)


def method_predictor(method, device: torch.device) -> PredictFn:
    """``batch -> Localization`` with ``method.predict`` on ``device`` (returned on the CPU)."""

    def predict(batch: dict) -> Localization:
        return method.predict(batch["image"].to(device)).detach_cpu()

    return predict


def evaluate_run(
    run_dir: str | os.PathLike,
    data: str | os.PathLike | None = None,
    checkpoint: str | None = None,
    batch_size: int = 16,
    device: str = "auto",
    auc_images: str = "test",
    progress: bool = True,
    write: bool = True,
    rules: str | Sequence[str] | None = None,
) -> dict:
    """Evaluate a run on its test split and (by default) write ``RUN/eval.json`` and ``RUN/eval.md``.

    Args:
        run_dir: the ``gren train --out`` directory.
        data: dataset folder or cache overriding the one recorded in the run's config.
        checkpoint: a checkpoint name in ``RUN/checkpoints`` (``epoch_003``, ``last.pt``) or a path.
        auc_images: ``"test"`` (the annotated test images) or ``"heldout"`` (every image of the fold
            not used for training).
        rules: box rules (``"cells,wang"``); default ``cells`` plus the method's ``eval_rules``.

    Returns:
        The eval.json dict (also with ``method``, ``fold``, ``protocol``, ``checkpoint``, ``auc_images``).
    """
    from gren.data.cache import CacheDataset
    from gren.methods import load_run

    if auc_images not in AUC_IMAGE_CHOICES:
        raise GrenError(f"auc_images must be one of {', '.join(AUC_IMAGE_CHOICES)}, got {auc_images!r}")
    run_dir = Path(run_dir)
    config = read_run_config(run_dir)
    split = read_split(run_dir)
    test = split[(split["role"] == "test") & split["annotated"]]
    if test.empty:
        raise GrenError(f"{run_dir}/split.csv has no annotated test images (protocol {config.get('data', {}).get('protocol')})")
    cache = open_run_data(config, data, run_dir)
    loc_ids = set(test["image_id"])
    if auc_images == "heldout":
        eval_ids = split.loc[split["role"] != "train", "image_id"].tolist()
    else:
        eval_ids = test["image_id"].tolist()
    present = set(cache.image_ids)
    absent = [i for i in eval_ids if i not in present]
    if absent:
        log.warning("%d of the run's %d evaluation images are not in %s and are skipped (e.g. %s)",
                    len(absent), len(eval_ids), cache.path, ", ".join(absent[:3]))
        eval_ids = [i for i in eval_ids if i in present]
    checkpoint_path = resolve_checkpoint(run_dir, checkpoint)
    method, run_config = load_run(checkpoint_path, map_location="cpu")
    torch_device = pick_device(str(config.get("device", {}).get("device", "auto")) if device == "auto" else device)
    method.to(torch_device)
    dataset = CacheDataset(cache, eval_ids)
    log.info("evaluating %s on %d annotated test images (%d for AUC) from %s", run_dir, len(loc_ids & present),
             len(eval_ids), cache.path)
    chosen_rules = parse_rules(rules, default=getattr(method, "eval_rules", ()))
    result = evaluate_predictions(method_predictor(method, torch_device), dataset, loc_ids=loc_ids,
                                  batch_size=batch_size, progress=progress, rules=chosen_rules)
    data_cfg = run_config.get("data", {})
    result.update({
        "method": run_config.get("method"),
        "protocol": data_cfg.get("protocol"),
        "fold": data_cfg.get("fold"),
        "checkpoint": str(checkpoint_path if checkpoint else "last"),
        "auc_images": auc_images,
        "data": str(cache.path),
    })
    if write:
        write_eval(run_dir, result)
    return result


def _json_safe(value):
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, (np.floating, float)):
        return None if not np.isfinite(value) else float(value)
    if isinstance(value, np.integer):
        return int(value)
    return value


def write_eval(run_dir: str | os.PathLike, result: dict) -> None:
    """Write ``eval.json`` (atomically) and ``eval.md`` into ``run_dir``."""
    run_dir = Path(run_dir)
    write_text_atomic(run_dir / EVAL_JSON, json.dumps(_json_safe(result), indent=2) + "\n")
    write_text_atomic(run_dir / EVAL_MD, eval_markdown(result, title=str(result.get("method") or run_dir.name)))
    log.info("wrote %s and %s", run_dir / EVAL_JSON, run_dir / EVAL_MD)


def read_eval(path: str | os.PathLike) -> dict:
    """Load an eval.json (a run directory or the file), checking its top-level keys."""
    path = Path(path)
    if path.is_dir():
        path = path / EVAL_JSON
    try:
        result = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise GrenError(f"{path}: cannot read evaluation results ({err})") from None
    missing = {"accuracy", "iobb", "auc", "n_boxes"} - set(result)
    if missing:
        raise GrenError(f"{path}: not an eval.json (missing {', '.join(sorted(missing))})")
    return result


def fmt_value(value, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def eval_markdown(result: dict, title: str = "model") -> str:
    """A markdown report of one eval.json: one accuracy row per T (the paper's Table I rows), IoBB, AUC."""
    thresholds = [threshold_key(t) for t in IOU_THRESHOLDS]
    header = "| T(IoU) | " + " | ".join(BOX_CLASSES) + " | Mean |"
    rule = "| --- " * (len(BOX_CLASSES) + 2) + "|"
    lines = [f"# Evaluation: {title}", ""]
    extra = {k: result.get(k) for k in ("method", "protocol", "fold", "checkpoint", "n_images", "cell_threshold")
             if result.get(k) is not None}
    if extra:
        lines += [", ".join(f"{k} {v}" for k, v in extra.items()), ""]
    blocks = [(result, "accuracy", "Localization accuracy (IoU >= T)"), (result, "iobb", "IoBB accuracy (IoBB >= T)")]
    if isinstance(result.get("wang"), dict):
        blocks += [(result["wang"], "accuracy", "Wang et al.'s box rule: accuracy (IoU >= T)"),
                   (result["wang"], "iobb", "Wang et al.'s box rule: IoBB accuracy (IoBB >= T)")]
    for source, block, name in blocks:
        lines += [f"## {name}", "", header, rule]
        for t in thresholds:
            cells = [fmt_value(source[block][c][t]) for c in BOX_CLASSES] + [fmt_value(source[block]["mean"][t])]
            lines.append(f"| {t} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["Boxes per class: " + ", ".join(f"{c} {result['n_boxes'].get(c, 0)}" for c in BOX_CLASSES), ""]
    lines += ["## AUC", "", "| " + " | ".join(LABELS) + " | Mean |", "| --- " * (len(LABELS) + 1) + "|",
              "| " + " | ".join(fmt_value(result["auc"].get(lab), 3) for lab in [*LABELS, "mean"]) + " |", ""]
    return "\n".join(lines)
