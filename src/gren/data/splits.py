"""Participation protocols ``X_Y`` and K-fold splits over the annotated images.

Protocol ``X_Y`` (Li et al. 2018; GREN): train on a fraction ``X`` of the *unannotated* images (image
labels only) and a fraction ``Y`` of the *annotated* (box) images; test on the other ``1 - Y`` of the
annotated images. The paper's settings are ``0.5_0.8``, ``1.0_0.0`` and ``1.0_0.4``.

How :func:`make_folds` builds the K folds, deterministically from ``seed``:

* *units* are patients (``split_by="patient"``, the default) or images (``split_by="image"``);
* the annotated units (units with at least one annotated image) are shuffled and dealt into K groups,
  each unit to the group with the fewest annotated images so far, so the groups hold nearly equal
  numbers of annotated images;
* fold ``k`` trains on ``m = round(Y * K)`` consecutive groups starting at group ``k`` (``k, k+1, ...``
  mod K) and tests on the other ``K - m``. So every annotated image is tested in exactly ``K - m`` of
  the K folds: once for ``0.8`` with K = 5 (5-fold cross-validation), three times for ``0.4`` with
  K = 5. When ``Y * K`` is not a whole number the realised fraction is ``m / K`` (logged);
* ``Y = 0`` (e.g. ``1.0_0.0``) tests on all annotated images, so all K folds are identical; they are
  still written (``--fold F`` works for every F) and a warning says so. ``Y = 1`` (``1.0_1.0``, also
  written ``all``) trains on every annotated image and tests on none: a final model for use elsewhere
  (``gren evaluate --data OTHER`` scores it on other data); all K folds are identical and hold no
  ``test`` row. With ``K = 1`` there is one hold-out split: the shuffled units are taken
  into training until the annotated image count is closest to ``Y`` of them;
* the unannotated pool (the images without a usable box) is sampled once, the same in every fold:
  its units are shuffled and the shortest prefix whose image count is closest to ``X`` of the pool is
  taken. With ``split_by="patient"`` a sampled image whose patient is tested in a fold is dropped from
  that fold's training (role ``unused``) and counted, so no patient is on both sides.

Each fold is a frame with one row per record: ``image_id``, ``patient_id``, ``role`` (``train``,
``test`` or ``unused``) and ``annotated`` (bool). :func:`write_fold_csv` / :func:`read_fold_csv`
store it as ``image_id,patient_id,role,annotated`` with ``annotated`` as ``yes``/``no``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from gren.core.atomic import atomic_path, write_text_atomic
from gren.core.errors import DataError, GrenError

log = logging.getLogger(__name__)

ROLES = ("train", "test", "unused")
SPLIT_BY = ("patient", "image")
PAPER_PROTOCOLS = ("0.5_0.8", "1.0_0.0", "1.0_0.4")
FOLD_COLUMNS = ("image_id", "patient_id", "role", "annotated")

_PROTOCOL_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)_(\d+(?:\.\d*)?|\.\d+)\s*$")


@dataclass(frozen=True)
class Protocol:
    """A participation protocol: ``unannotated`` = X, ``annotated`` = Y, both in [0, 1]."""

    unannotated: float
    annotated: float

    def __str__(self) -> str:
        def fmt(value: float) -> str:
            return f"{value:.1f}" if math.isclose(value * 10, round(value * 10)) else f"{value:g}"

        return f"{fmt(self.unannotated)}_{fmt(self.annotated)}"


ALL_PROTOCOL = "all"  # every image in training: 1.0_1.0


def parse_protocol(text: str) -> Protocol:
    """``"0.5_0.8"`` -> ``Protocol(0.5, 0.8)``; ``"all"`` -> ``Protocol(1.0, 1.0)`` (nothing to test); raises
    :class:`GrenError` with the expected form."""
    if str(text).strip().lower() == ALL_PROTOCOL:
        return Protocol(1.0, 1.0)
    match = _PROTOCOL_RE.match(str(text))
    if not match:
        raise GrenError(
            f"protocol {text!r} is not of the form X_Y with X and Y fractions in [0, 1] "
            f"(e.g. {', '.join(PAPER_PROTOCOLS)}), or {ALL_PROTOCOL} (train on every image, test on none)"
        )
    x, y = float(match.group(1)), float(match.group(2))
    for name, value in (("X (unannotated fraction)", x), ("Y (annotated fraction)", y)):
        if not 0.0 <= value <= 1.0:
            raise GrenError(f"protocol {text!r}: {name} = {value:g} is not in [0, 1]")
    if x == 0.0 and y == 0.0:
        raise GrenError(f"protocol {text!r}: X = Y = 0 leaves nothing to train on")
    return Protocol(x, y)


def _round_half_up(value: float) -> int:
    return int(math.floor(value + 0.5 + 1e-9))


def _closest_prefix(counts: np.ndarray, target: float) -> int:
    """Number of leading units whose summed ``counts`` is closest to ``target`` (ties: fewer units)."""
    cumulative = np.concatenate([[0], np.cumsum(counts)])
    return int(np.argmin(np.abs(cumulative - target)))


def _units(records: pd.DataFrame, split_by: str) -> pd.Series:
    return records["patient_id"].astype(str) if split_by == "patient" else records["image_id"].astype(str)


def _check_records(records: pd.DataFrame) -> None:
    missing = [c for c in ("image_id", "patient_id", "annotated") if c not in records.columns]
    if missing:
        raise DataError(f"records lack column(s) {', '.join(missing)} needed for a split")
    if records["image_id"].duplicated().any():
        dup = records.loc[records["image_id"].duplicated(), "image_id"].iloc[0]
        raise DataError(f"records list image {dup!r} more than once")


def make_folds(
    records: pd.DataFrame,
    protocol: str | Protocol = "0.5_0.8",
    folds: int = 5,
    seed: int = 0,
    split_by: str = "patient",
) -> list[pd.DataFrame]:
    """K folds of protocol ``X_Y`` over ``records`` (see the module docstring for the rules).

    ``records`` needs ``image_id``, ``patient_id`` (str) and ``annotated`` (bool). Returns ``folds``
    frames, each with one row per record (same order): ``image_id``, ``patient_id``, ``role``,
    ``annotated``. Deterministic from ``seed``.
    """
    proto = protocol if isinstance(protocol, Protocol) else parse_protocol(protocol)
    if split_by not in SPLIT_BY:
        raise GrenError(f"split_by must be one of {', '.join(SPLIT_BY)}, not {split_by!r}")
    if int(folds) < 1:
        raise GrenError(f"folds must be at least 1, not {folds}")
    folds = int(folds)
    _check_records(records)
    annotated = records["annotated"].astype(bool).to_numpy()
    units = _units(records, split_by).to_numpy()
    rng = np.random.default_rng(seed)

    # Annotated units, shuffled, dealt into K groups balanced by annotated image count.
    annotated_counts = pd.Series(units[annotated]).value_counts(sort=False)
    unit_names = np.array(sorted(annotated_counts.index), dtype=object)
    if len(unit_names) == 0 and proto.annotated < 1.0:
        raise DataError("no annotated images (images with a usable box): nothing to test on")
    unit_names = unit_names[rng.permutation(len(unit_names))]
    unit_counts = annotated_counts.loc[unit_names].to_numpy()

    train_groups_per_fold: list[set[int]]
    if proto.annotated >= 1.0:  # every annotated image in training; nothing to test (a final model)
        group_of = {u: 0 for u in unit_names}
        train_groups_per_fold = [{0}] * folds
        log.warning("protocol %s trains on every annotated image: no test images (evaluate the model on other "
                    "data with gren evaluate --data OTHER)", proto)
    elif folds == 1:
        n_train = _closest_prefix(unit_counts, proto.annotated * unit_counts.sum())
        if n_train >= len(unit_names):
            raise GrenError(f"protocol {proto} with 1 fold leaves no annotated image to test")
        group_of = {u: (0 if i < n_train else 1) for i, u in enumerate(unit_names)}
        train_groups_per_fold = [{0}]
    else:
        if len(unit_names) < folds:
            raise DataError(
                f"only {len(unit_names)} annotated {split_by}s for {folds} folds; use fewer folds"
            )
        totals = np.zeros(folds, dtype=np.int64)
        group_of = {}
        for unit, count in zip(unit_names, unit_counts):
            group = int(np.argmin(totals))  # first of the lightest groups
            group_of[unit] = group
            totals[group] += count
        m = _round_half_up(proto.annotated * folds)
        if m >= folds:
            raise GrenError(
                f"protocol {proto}: round(Y * K) = {m} of {folds} folds leaves no group to test; use more folds"
            )
        if not math.isclose(m / folds, proto.annotated):
            log.warning(
                "protocol %s with %d folds: trains on %d of %d groups, i.e. Y = %.3g of the annotated images",
                proto,
                folds,
                m,
                folds,
                m / folds,
            )
        if m == 0 and folds > 1:
            log.warning(
                "protocol %s tests on every annotated image: the %d folds are identical", proto, folds
            )
        train_groups_per_fold = [{(k + j) % folds for j in range(m)} for k in range(folds)]

    # The unannotated pool: units of the images without boxes, sampled once for all folds.
    pool = ~annotated
    pool_counts = pd.Series(units[pool]).value_counts(sort=False)
    pool_units = np.array(sorted(pool_counts.index), dtype=object)
    pool_units = pool_units[np.random.default_rng([seed, 1]).permutation(len(pool_units))]
    n_pool_units = _closest_prefix(pool_counts.loc[pool_units].to_numpy(), proto.unannotated * pool.sum())
    sampled_units = set(pool_units[:n_pool_units])
    sampled = pool & np.isin(units, list(sampled_units))

    unit_group = np.array([group_of.get(u, -1) for u in units], dtype=np.int64)
    out = []
    for train_groups in train_groups_per_fold:
        in_train_group = np.isin(unit_group, list(train_groups))
        test_unit = (unit_group >= 0) & ~in_train_group
        role = np.full(len(records), "unused", dtype=object)
        role[annotated & in_train_group] = "train"
        role[annotated & test_unit] = "test"
        # Sampled unannotated images go to training unless their unit (patient) is tested.
        role[sampled & ~test_unit] = "train"
        fold = pd.DataFrame(
            {
                "image_id": records["image_id"].astype(str).to_numpy(),
                "patient_id": records["patient_id"].astype(str).to_numpy(),
                "role": role,
                "annotated": annotated,
            }
        )
        fold.attrs["dropped_test_patient"] = int((sampled & test_unit).sum())
        out.append(fold)
    dropped = [f.attrs["dropped_test_patient"] for f in out]
    if any(dropped):
        log.info(
            "sampled unannotated images left out of training because their patient is tested: %s per fold",
            ", ".join(map(str, dropped)),
        )
    return out


def fold_stats(fold: pd.DataFrame) -> dict:
    """Counts of one fold: train (annotated / unannotated), test, unused."""
    annotated = fold["annotated"].to_numpy(dtype=bool)
    role = fold["role"].to_numpy()
    return {
        "train_annotated": int(((role == "train") & annotated).sum()),
        "train_unannotated": int(((role == "train") & ~annotated).sum()),
        "test": int((role == "test").sum()),
        "unused_annotated": int(((role == "unused") & annotated).sum()),
        "unused_unannotated": int(((role == "unused") & ~annotated).sum()),
        "train_patients": int(fold.loc[role == "train", "patient_id"].nunique()),
        "test_patients": int(fold.loc[role == "test", "patient_id"].nunique()),
        "dropped_test_patient": int(fold.attrs.get("dropped_test_patient", 0)),
    }


def split_summary(
    folds: list[pd.DataFrame], protocol: str | Protocol, seed: int, split_by: str, data_dir: str | None = None
) -> dict:
    """The JSON summary written beside the fold CSVs."""
    proto = protocol if isinstance(protocol, Protocol) else parse_protocol(protocol)
    first = folds[0]
    annotated = first["annotated"].to_numpy(dtype=bool)
    per_fold = []
    for k, fold in enumerate(folds):
        stats = fold_stats(fold)
        stats["fold"] = k
        stats["train_annotated_fraction"] = stats["train_annotated"] / max(1, int(annotated.sum()))
        stats["train_unannotated_fraction"] = stats["train_unannotated"] / max(1, int((~annotated).sum()))
        per_fold.append(stats)
    tested = np.zeros(len(first), dtype=np.int64)
    for fold in folds:
        tested += (fold["role"] == "test").to_numpy()
    return {
        "protocol": str(proto),
        "unannotated_fraction": proto.unannotated,
        "annotated_fraction": proto.annotated,
        "folds": len(folds),
        "seed": int(seed),
        "split_by": split_by,
        "data_dir": data_dir,
        "images": len(first),
        "annotated_images": int(annotated.sum()),
        "unannotated_images": int((~annotated).sum()),
        "times_tested": {str(k): int(v) for k, v in zip(*np.unique(tested[annotated], return_counts=True))},
        "per_fold": per_fold,
    }


def fold_path(out_dir: str | os.PathLike, k: int) -> Path:
    return Path(out_dir) / f"fold_{k}.csv"


def write_fold_csv(fold: pd.DataFrame, path: str | os.PathLike) -> None:
    """Write one fold as ``image_id,patient_id,role,annotated`` (``annotated`` as ``yes``/``no``)."""
    frame = fold.loc[:, list(FOLD_COLUMNS)].copy()
    frame["annotated"] = np.where(frame["annotated"].astype(bool), "yes", "no")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as partial:  # atomic: a reader never sees half a file
        frame.to_csv(partial, index=False)


def read_fold_csv(path: str | os.PathLike) -> pd.DataFrame:
    """Read a fold CSV written by :func:`write_fold_csv` (or ``gren data split``).

    Returns ``image_id``, ``patient_id`` (str), ``role`` (train/test/unused), ``annotated`` (bool).
    Raises :class:`DataError` naming the file (and line) for a missing column, an unknown role or
    ``annotated`` value, or a duplicate image.
    """
    path = Path(path)
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except FileNotFoundError as err:
        raise DataError(f"{path}: fold file not found") from err
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: cannot read as a fold CSV ({err})") from err
    missing = [c for c in FOLD_COLUMNS if c not in frame.columns]
    if missing:
        raise DataError(
            f"{path}:1: missing column(s) {', '.join(missing)}; expected {','.join(FOLD_COLUMNS)}"
        )
    frame = frame.loc[:, list(FOLD_COLUMNS)]
    for column in FOLD_COLUMNS:
        frame[column] = frame[column].str.strip()
    bad_role = ~frame["role"].isin(ROLES)
    if bad_role.any():
        i = int(np.flatnonzero(bad_role.to_numpy())[0])
        raise DataError(f"{path}:{i + 2}: role {frame['role'].iat[i]!r} is not one of {', '.join(ROLES)}")
    flags = frame["annotated"].str.lower()
    bad_flag = ~flags.isin(("yes", "no", "true", "false", "1", "0"))
    if bad_flag.any():
        i = int(np.flatnonzero(bad_flag.to_numpy())[0])
        raise DataError(f"{path}:{i + 2}: annotated {frame['annotated'].iat[i]!r} is not yes/no")
    duplicated = frame["image_id"].duplicated()
    if duplicated.any():
        i = int(np.flatnonzero(duplicated.to_numpy())[0])
        raise DataError(f"{path}:{i + 2}: image {frame['image_id'].iat[i]!r} listed twice")
    frame["annotated"] = flags.isin(("yes", "true", "1")).to_numpy()
    return frame.reset_index(drop=True)


SPLIT_JSON = "split.json"
_FOLD_FILE = re.compile(r"^fold_(\d+)\.csv$")


def _is_split_json(path: Path) -> bool:
    summary = json.loads(path.read_text())
    return isinstance(summary, dict) and {"protocol", "folds", "per_fold"} <= set(summary)


def _is_fold_csv(path: Path) -> bool:
    read_fold_csv(path)
    return True


def _recognise_split_file(path: Path) -> bool:
    """True for a ``split.json`` or ``fold_<k>.csv`` that ``gren data split`` wrote (before manifests existed)."""
    return _is_split_json(path) if path.name == SPLIT_JSON else _is_fold_csv(path)


def write_split(folds: list[pd.DataFrame], out_dir: str | os.PathLike, summary: dict) -> list[Path]:
    """Write ``fold_<k>.csv`` for k = 0..K-1 and ``split.json`` into ``out_dir``; returns the CSV paths.

    Nothing is lost (:class:`gren.core.outputs.OutputFolder`): an existing file of those names that gren
    did not write is refused before anything is written, as is a symbolic link; an earlier split is
    replaced with a warning naming what changes; ``fold_<k>.csv`` files of an earlier split with more folds
    are removed (they would not match ``split.json``).
    """
    from gren.core.outputs import OutputFolder

    out_dir = Path(out_dir)
    paths = []
    names = [fold_path(out_dir, k).name for k in range(len(folds))] + [SPLIT_JSON]
    try:
        if out_dir.exists() and not out_dir.is_dir():
            raise GrenError(f"--out {out_dir}: exists and is not a folder")
        folder = OutputFolder(out_dir, "gren data split")
        replaced = folder.prepare(names, recognise=_recognise_split_file)
        if SPLIT_JSON in replaced:
            _warn_replaced_split(out_dir / SPLIT_JSON, summary)
        manifest = folder.manifest()
        stale = [p for p in sorted(out_dir.iterdir()) if (m := _FOLD_FILE.match(p.name)) and int(m.group(1)) >= len(folds)
                 and not p.is_symlink() and p.is_file() and (p.name in manifest or _safe(_is_fold_csv, p))]
        for path in stale:
            log.warning("%s: removed, left by an earlier split with more folds", path)
            path.unlink()
        for k, fold in enumerate(folds):
            path = fold_path(out_dir, k)
            write_fold_csv(fold, path)
            paths.append(path)
        write_text_atomic(out_dir / SPLIT_JSON, json.dumps(summary, indent=2) + "\n")
    except OSError as err:
        raise GrenError(f"{err.filename or out_dir}: cannot write the split ({err.strerror or err})") from err
    return paths


def _safe(check, path: Path) -> bool:
    try:
        return bool(check(path))
    except Exception:
        return False


def _warn_replaced_split(path: Path, summary: dict) -> None:
    try:
        old = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return
    changed = [f"{key} {old.get(key)!r} -> {summary.get(key)!r}" for key in ("protocol", "folds", "seed", "split_by",
                                                                           "data_dir", "images")
               if key in summary and old.get(key) != summary.get(key)]
    if changed:
        log.warning("%s: replacing an earlier split (%s)", path.parent, "; ".join(changed))
