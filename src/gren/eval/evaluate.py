"""``gren evaluate``: a trained run over its test split -> ``RUN/eval.json`` and ``RUN/eval.md``, or over data
it never saw (``--data OTHER``: every annotated image of OTHER) -> ``RUN/eval-<OTHER>.json`` / ``.md``.

The test images are the run's fold (``RUN/split.csv``): the rows with ``role == "test"`` that are
annotated (have at least one box). Localization accuracy and IoBB are computed over their boxes
(:mod:`gren.metrics`), in the ``S x S`` pixels of the prepared cache (IoU is invariant under the
resize from the original file, which scales image and box together). AUC is computed over the same
annotated test images by default; ``auc_images="heldout"`` adds every image of the fold not used for
training (``role`` ``test`` or ``unused``), which gives AUC many more negatives.

**Data the run never saw** (``--data OTHER`` where OTHER is not the run's training data, told apart by
the source fingerprint the run marker records, else by path: :func:`is_run_data`): every annotated image
of OTHER is scored (no split), AUC over every image of OTHER, into ``RUN/eval-<name of OTHER>.json`` /
``.md`` (or ``--out FILE.json``), never ``RUN/eval.json``. A run trained on every annotated image
(protocol ``all`` / ``X_1.0``) has no test split; evaluating it without ``--data`` says so. Nothing to
evaluate is an error, never an empty eval.json.

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
import re
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



def method_predictor(method, device: torch.device) -> PredictFn:
    """``batch -> Localization`` with ``method.predict`` on ``device`` (returned on the CPU)."""

    def predict(batch: dict) -> Localization:
        return method.predict(batch["image"].to(device)).detach_cpu()

    return predict


def is_run_data(run_dir: str | os.PathLike, config: dict, data: str | os.PathLike, cache) -> bool:
    """True when ``data`` (opened as ``cache``) is the data the run was trained on.

    The same data: the same source fingerprint (the SHA-256 over the CSVs and the image files' names, sizes
    and times that ``gren prepare`` records, compared with the one ``gren train`` wrote into the run marker:
    a moved folder or a copy made with its times kept is recognised), or, for runs from before run markers
    and for a folder changed since, the same resolved path (the folder given, the cache, or the cache's
    source folder on either side).
    """
    from gren.core.outputs import read_run_marker

    try:
        record = (read_run_marker(run_dir) or {}).get("data") or {}
    except GrenError:
        record = {}
    meta = getattr(cache, "meta", None) or {}
    sha = (meta.get("params") or {}).get("source_sha256")
    if sha and record.get("source_sha256") == sha:
        return True

    def resolved(value) -> Path | None:
        return Path(value).expanduser().resolve() if value else None

    run_side = {resolved(v) for v in (run_data_path(config), record.get("cache"), record.get("source_dir"))} - {None}
    other_side = {resolved(v) for v in (data, getattr(cache, "path", None), meta.get("data_dir"))} - {None}
    return bool(run_side & other_side)


SUBSETS = ("auto", "test", "all")


def data_name(data: str | os.PathLike) -> str:
    """A file-name-safe name of a dataset path (a cache in ``DIR/.gren_cache/`` is named after ``DIR``)."""
    path = Path(data).expanduser().resolve()
    if path.parent.name == ".gren_cache":
        path = path.parent.parent
    return re.sub(r"[^A-Za-z0-9._-]+", "-", path.name).strip("-.") or "data"


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
    subset: str = "auto",
    out: str | os.PathLike | None = None,
    predict_upsample: int | None = None,
) -> dict:
    """Evaluate a run on its test split, or on data it never saw, and (by default) write the results.

    Which images (``subset``):

    * ``"auto"`` (default): when ``data`` is ``None`` or the run's own training data (:func:`is_run_data`),
      the run's test split (``RUN/split.csv``: ``role == test``, annotated); otherwise every image of
      ``data``: localization over all its annotated images, AUC over all its images (each has labels);
    * ``"test"``: the run's test split, read from ``data`` (e.g. the run's dataset moved and changed);
    * ``"all"``: every image of ``data``; refused on the run's own data (that would score the model on
      its training images).

    Where: the test split goes to ``RUN/eval.json`` and ``RUN/eval.md``; other data to
    ``RUN/eval-<name of data>.json`` / ``.md`` (never ``RUN/eval.json``); ``out`` (a ``.json`` path, the
    markdown beside it) chooses another file. An existing file there that is not an evaluation written by
    gren is refused, as is a symbolic link.

    Args:
        run_dir: the ``gren train --out`` directory.
        data: dataset folder or cache (default: the one recorded in the run's config).
        checkpoint: a checkpoint name in ``RUN/checkpoints`` (``epoch_003``, ``last.pt``) or a path.
        auc_images: test split only: ``"test"`` (the annotated test images) or ``"heldout"`` (every image of
            the fold not used for training).
        rules: box rules (``"cells,wang"``); default ``cells`` plus the method's ``eval_rules``.
        predict_upsample: test-time upsampling of the backbone map (``model.predict_upsample``) for this
            evaluation only, e.g. 8 for the published CIA / CCG / GREN protocol; ``None``: the run's own.
            A factor other than the run's writes ``eval-upsample<N>.json`` (with ``data``:
            ``eval-<name>-upsample<N>.json``) unless ``out`` is given, so both settings are kept.

    Returns:
        The eval.json dict (also with ``method``, ``fold``, ``protocol``, ``checkpoint``, ``auc_images``,
        ``data``, ``images``: ``"test split"`` or ``"all annotated"``, ``output``: the JSON path written).

    Raises:
        GrenError: no images to evaluate (a run trained on every annotated image has no test split:
            evaluate it with ``data``), bad arguments, unreadable run, a clobbering output.
    """
    from gren.data.cache import CacheDataset
    from gren.methods import load_run

    if auc_images not in AUC_IMAGE_CHOICES:
        raise GrenError(f"auc_images must be one of {', '.join(AUC_IMAGE_CHOICES)}, got {auc_images!r}")
    if subset not in SUBSETS:
        raise GrenError(f"subset must be one of {', '.join(SUBSETS)}, got {subset!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise GrenError(f"--batch-size must be a whole number >= 1, got {batch_size!r}")
    run_dir = Path(run_dir)
    config = read_run_config(run_dir)
    from gren.core.outputs import RunLock

    if RunLock(run_dir).is_held_elsewhere():
        log.warning("%s is being trained by another process (PID %s); evaluating its latest checkpoint", run_dir,
                    RunLock(run_dir).holder())
    split = read_split(run_dir)
    test = split[(split["role"] == "test") & split["annotated"]]
    protocol = config.get("data", {}).get("protocol")
    no_test = (f"{run_dir} has no test images (protocol {protocol}: "
               + ("it was trained on every annotated image" if not (split["role"] == "test").any()
                  else "no annotated image among its test images")
               + "); evaluate it on data it never saw with --data OTHER")
    if data is None and subset != "all" and test.empty:
        raise GrenError(no_test)
    checkpoint_path = resolve_checkpoint(run_dir, checkpoint)
    cache = open_run_data(config, data, run_dir)
    own = data is None or is_run_data(run_dir, config, data, cache)
    mode = subset if subset != "auto" else ("test" if own else "all")
    present = set(cache.image_ids)
    if mode == "all":
        if own:
            n_train = int((split["role"] == "train").sum())
            raise GrenError(f"{cache.path} is the data {run_dir} was trained on: scoring all of its images would "
                            f"include the {n_train} training images; use the test split (default) or --data OTHER")
        records = cache.records
        loc_ids = set(records.loc[records["annotated"].astype(bool), "image_id"].astype(str))
        eval_ids = list(cache.image_ids)
        if auc_images != "test":
            log.info("--auc-images %s applies to the test split; on other data AUC uses all its images", auc_images)
        log.info("%s is not the data %s was trained on: evaluating all its %d annotated images (AUC over its %d "
                 "images)", cache.path, run_dir, len(loc_ids), len(eval_ids))
        namesakes = present & set(split.loc[split["role"] == "train", "image_id"])
        if namesakes:  # names only: generated datasets reuse NIH-style names; a superset of the data does too
            log.warning("%d of %s's images have the names of images %s was trained on (e.g. %s); if they are the "
                        "same films the scores are inflated", len(namesakes), cache.path, run_dir,
                        ", ".join(sorted(namesakes)[:3]))
    else:
        if test.empty:
            raise GrenError(no_test)
        loc_ids = set(test["image_id"])
        if auc_images == "heldout":
            eval_ids = split.loc[split["role"] != "train", "image_id"].tolist()
        else:
            eval_ids = test["image_id"].tolist()
        absent = [i for i in eval_ids if i not in present]
        if absent:
            log.warning("%d of the run's %d evaluation images are not in %s and are skipped (e.g. %s)",
                        len(absent), len(eval_ids), cache.path, ", ".join(absent[:3]))
            eval_ids = [i for i in eval_ids if i in present]
    if not loc_ids & set(eval_ids):
        where = "the run's test images" if mode == "test" else "annotated images (images with a box)"
        raise GrenError(f"nothing to evaluate: {cache.path} holds none of {where}"
                        + (f" ({len(loc_ids)} in {run_dir}/split.csv); is it the data the run was trained on? "
                           "For other data use --subset all" if mode == "test" else "")
                        + "; no evaluation was written")
    run_upsample = int(config.get("model", {}).get("predict_upsample", 1) or 1)
    if predict_upsample is not None and (isinstance(predict_upsample, bool) or int(predict_upsample) < 1):
        raise GrenError(f"--predict-upsample must be a whole number >= 1, got {predict_upsample!r}")
    json_path, md_path = _eval_paths(run_dir, mode, data, out)
    if predict_upsample is not None and int(predict_upsample) != run_upsample and out is None:
        stem = json_path.stem + f"-upsample{int(predict_upsample)}"
        json_path, md_path = json_path.with_name(stem + ".json"), json_path.with_name(stem + ".md")
    if write:
        _check_eval_targets(json_path, md_path)
    method, run_config = load_run(checkpoint_path, map_location="cpu")
    torch_device = select_device(str(config.get("device", {}).get("device", "auto")) if device == "auto" else device)
    method.to(torch_device)
    if predict_upsample is not None:
        method.predict_upsample = int(predict_upsample)
    dataset = CacheDataset(cache, eval_ids)
    log.info("evaluating %s on %d annotated images (%d for AUC) from %s", run_dir, len(loc_ids & present),
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
        "auc_images": auc_images if mode == "test" else "all",
        "data": str(cache.path),
        "images": "test split" if mode == "test" else "all annotated",
        "predict_upsample": int(getattr(method, "predict_upsample", 1)),
    })
    if write:
        result["output"] = str(json_path)
        if json_path.is_file():
            previous = read_eval(json_path)
            if previous.get("data") not in (None, result["data"]) or previous.get("images", "test split") != result["images"]:
                log.warning("%s: replacing an evaluation of %s (%s) with one of %s (%s)", json_path,
                            previous.get("data"), previous.get("images", "test split"), result["data"], result["images"])
        write_eval_files(json_path, md_path, result, title=str(result.get("method") or run_dir.name))
    return result


def _eval_paths(run_dir: Path, mode: str, data, out) -> tuple[Path, Path]:
    if out is not None:
        json_path = Path(out).expanduser()
        if json_path.suffix.lower() != ".json":
            raise GrenError(f"--out {out}: expected a .json file name (the markdown goes beside it as .md)")
        return json_path, json_path.with_suffix(".md")
    if mode == "test":
        return run_dir / EVAL_JSON, run_dir / EVAL_MD
    name = data_name(data)
    return run_dir / f"eval-{name}.json", run_dir / f"eval-{name}.md"


def _is_eval_json(path: Path) -> bool:
    try:
        read_eval(path)
    except GrenError:
        return False
    return True


def _is_eval_md(path: Path) -> bool:
    try:
        with open(path, encoding="utf-8") as handle:
            return handle.read(64).startswith("# Evaluation")
    except (OSError, UnicodeDecodeError):
        return False


def _check_eval_targets(json_path: Path, md_path: Path) -> None:
    """Refuse to replace anything but an earlier evaluation (or to write through a symbolic link)."""
    for path, ours in ((json_path, _is_eval_json), (md_path, _is_eval_md)):
        if path.is_symlink():
            raise GrenError(f"{path}: is a symbolic link; gren never writes through links; remove it or choose "
                            "another --out")
        if path.is_dir():
            raise GrenError(f"{path}: is a folder; choose a file name with --out")
        if path.exists() and not ours(path):
            raise GrenError(f"{path}: exists and is not an evaluation written by gren; move it away or choose "
                            "another --out")


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
    write_eval_files(run_dir / EVAL_JSON, run_dir / EVAL_MD, result,
                     title=str(result.get("method") or run_dir.name))


def write_eval_files(json_path: str | os.PathLike, md_path: str | os.PathLike, result: dict,
                     title: str = "model") -> None:
    """Write ``result`` as JSON and its markdown report, each atomically (a link at a target is replaced,
    never followed)."""
    write_text_atomic(json_path, json.dumps(_json_safe(result), indent=2) + "\n")
    write_text_atomic(md_path, eval_markdown(result, title=title))
    log.info("wrote %s and %s", json_path, md_path)


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
