"""The NIH ChestX-ray14 layout: CSV readers and :class:`DatasetIndex`.

A data folder holds, at its top level,

* ``Data_Entry_2017.csv`` or ``Data_Entry_2017_v2020.csv`` (plain or ``.gz``): one row per image,
  ``Image Index, Finding Labels, Follow-up #, Patient ID, Patient Age, Patient Gender, View Position,
  OriginalImage[Width, Height], OriginalImagePixelSpacing[x, y]`` (the 2017 file ends every line with an
  extra empty column; both split ``[Width,Height]`` over two columns under a two-name header);
* ``BBox_List_2017.csv`` (optional, plain or ``.gz``): ``Image Index, Finding Label, Bbox [x,y,w,h],,,``
  -- a broken header (the four numbers sit in four columns, followed by empty ones); the boxes are in
  the 1024 x 1024 pixel space of NIH's PNGs;
* image files anywhere below it (``images/``, ``images_001/images/`` ...), found by stem with
  ``.png``/``.jpg``/``.jpeg`` in any case, and optional lung masks ``masks/<stem>.png`` (0/1/2).

Columns are taken by their (normalised) header names, so column order and the two header variants do
not matter; width/height are the two columns starting at ``OriginalImage[Width``.

:func:`load_index` reads it all into a :class:`DatasetIndex`. Bad rows never stop the load: each is a
:class:`Problem` (file, line, message) and is left out or repaired as the message says; with
``strict=True`` any problem raises :class:`gren.core.errors.DataError` listing them.
"""

from __future__ import annotations

import errno
import gzip
import logging
import os
import stat
import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from gren.core.errors import DataError, ImageReadError
from gren.core.imageio import IMAGE_EXTENSIONS, image_size, is_image_file, read_gray
from gren.core.labels import BOX_CLASSES, LABEL_INDEX, LABELS, NO_FINDING, canonical_label
from gren.core.progress import progress

log = logging.getLogger(__name__)

BOX_SPACE = 1024.0
"""Side in pixels of the image space BBox_List_2017's coordinates are given in."""

_BOX_TOLERANCE = 0.5  # pixels (1024 space) a box may overhang the image before it is reported
_MAX_COLUMNS = 32  # wider rows are malformed
_STRICT_LISTED = 20  # problems quoted in a strict-mode error message
_LOGGED_SKIPS = 10  # skipped entries (bad links, odd names) named one by one in the log
MIN_FILM_SIDE = 32
"""Pixels: an image with a side shorter than this is not a plausible chest film (kept, reported)."""
# Errors a damaged (e.g. truncated .gz) CSV can raise while it is read.
_CSV_READ_ERRORS = (UnicodeDecodeError, OSError, EOFError, zlib.error, gzip.BadGzipFile)

DATA_ENTRY_NAMES = (
    "Data_Entry_2017_v2020.csv",
    "Data_Entry_2017_v2020.csv.gz",
    "Data_Entry_2017.csv",
    "Data_Entry_2017.csv.gz",
)
"""Preference order when several label lists are present (the 2020 revision first)."""

BBOX_NAMES = ("BBox_List_2017.csv", "BBox_List_2017.csv.gz")


@dataclass(frozen=True)
class Problem:
    """One problem found in the input: ``file``, 1-based ``line`` (``None`` for a whole file or an image
    file), ``message``, ``severity`` (``"warning"``: repaired or left out; ``"error"``: fatal) and
    ``kind`` (``"row"`` for CSV rows, ``"unreadable"``: an image left out, ``"skipped"``: a bad link
    or file name skipped by the folder scan, ``"tiny"``: an implausibly small image, kept)."""

    file: str
    line: int | None
    message: str
    severity: str = "warning"
    kind: str = "row"

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line is not None else self.file
        return f"{where}: {self.message}"

    def as_dict(self) -> dict:
        return {"file": self.file, "line": self.line, "severity": self.severity, "message": self.message,
                "kind": self.kind}


def _norm_header(name: str) -> str:
    return "".join(ch for ch in str(name).lower() if ch.isalnum())


def _find_one(data_dir: Path, names: tuple[str, ...]) -> tuple[Path | None, list[Path]]:
    """The first of ``names`` present in ``data_dir`` (case-insensitive), and all those present."""
    present = {}
    try:
        entries = list(os.scandir(data_dir))
    except OSError as err:
        raise DataError(f"{data_dir}: cannot list the data folder ({err})") from err
    by_lower = {e.name.lower(): Path(e.path) for e in entries if _utf8(e.name) and _is_file(e)}
    for name in names:
        if name.lower() in by_lower:
            present[name] = by_lower[name.lower()]
    found = [present[n] for n in names if n in present]
    return (found[0] if found else None), found


def find_data_entry_csv(data_dir: str | os.PathLike) -> Path:
    """The Data_Entry CSV of ``data_dir``; with several present, the first of :data:`DATA_ENTRY_NAMES`
    (v2020 before 2017, plain before .gz), logged. Raises :class:`DataError` when there is none."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataError(f"{data_dir}: data folder not found")
    chosen, found = _find_one(data_dir, DATA_ENTRY_NAMES)
    if chosen is None:
        raise DataError(
            f"{data_dir}: no Data_Entry CSV (expected one of {', '.join(DATA_ENTRY_NAMES)} at the top of the folder)"
        )
    if len(found) > 1:
        others = ", ".join(p.name for p in found[1:])
        log.info("several label lists in %s: using %s (ignoring %s)", data_dir, chosen.name, others)
    return chosen


def find_bbox_csv(data_dir: str | os.PathLike) -> Path | None:
    """``BBox_List_2017.csv`` (or ``.gz``) in ``data_dir``, or ``None``."""
    chosen, _ = _find_one(Path(data_dir), BBOX_NAMES)
    return chosen


def _read_table(path: Path) -> tuple[list[str], pd.DataFrame]:
    """Header fields and the rows (python strings, ``""`` for empty) of a comma-separated file.

    The frame has integer column names 0.. (:data:`_MAX_COLUMNS` of them; wider lines are a
    :class:`DataError` naming the line) and a ``line`` column (1-based line in the file); blank lines
    are dropped.
    """
    try:
        header = pd.read_csv(path, header=None, nrows=1, dtype=object, na_filter=False)
    except pd.errors.EmptyDataError as err:
        raise DataError(f"{path}: empty file (expected a header line)") from err
    except pd.errors.ParserError as err:
        raise DataError(f"{path}: cannot read as CSV ({err})") from err
    except _CSV_READ_ERRORS as err:
        raise DataError(f"{path}: cannot read as CSV ({_describe_read_error(path, err)})") from err
    header_fields = [str(v) for v in header.iloc[0].tolist()]
    try:
        rows = pd.read_csv(
            path,
            header=None,
            skiprows=1,
            names=list(range(_MAX_COLUMNS)),
            dtype=object,
            na_filter=False,
            skip_blank_lines=False,
            engine="c",
        )
    except pd.errors.EmptyDataError:
        rows = pd.DataFrame({c: pd.Series([], dtype=object) for c in range(_MAX_COLUMNS)})
    except pd.errors.ParserError as err:
        raise DataError(f"{path}: malformed CSV ({err})") from err
    except _CSV_READ_ERRORS as err:
        raise DataError(f"{path}: cannot read as CSV ({_describe_read_error(path, err)})") from err
    rows["line"] = np.arange(len(rows), dtype=np.int64) + 2
    first_empty = np.flatnonzero(rows[0].to_numpy() == "")
    if len(first_empty):
        values = rows.iloc[first_empty, :_MAX_COLUMNS].to_numpy()
        blank = first_empty[~values.astype(bool).any(axis=1)]
        rows = rows.drop(index=rows.index[blank]).reset_index(drop=True)
    return header_fields, rows


def _describe_read_error(path: Path, err: BaseException) -> str:
    """What went wrong reading a CSV: a damaged gzip stream is named as such."""
    if isinstance(err, zlib.error | gzip.BadGzipFile | EOFError) or str(path).lower().endswith(".gz") and \
            isinstance(err, OSError) and not isinstance(err, FileNotFoundError | PermissionError):
        return f"damaged or truncated gzip data: {type(err).__name__}: {err}; expected a complete .csv.gz file"
    if isinstance(err, UnicodeDecodeError):
        return f"not UTF-8 text ({err}); expected a comma-separated text file"
    return f"{type(err).__name__}: {err}"


def _strip(values: pd.Series) -> list[str]:
    return [str(v).strip() for v in values.to_numpy()]


def _stem(image_index: pd.Series) -> pd.Series:
    """``00000001_000.png`` -> ``00000001_000`` (only a known image suffix is removed)."""
    stems = [
        name.rpartition(".")[0] if name.lower().endswith(IMAGE_EXTENSIONS) else name
        for name in _strip(image_index)
    ]
    return pd.Series(stems, index=image_index.index, dtype=object)


def normalize_patient_id(values: pd.Series) -> pd.Series:
    """Patient ids as string keys: surrounding spaces removed, all-digit ids without leading zeros
    (``"00000001"`` and ``1`` both become ``"1"``)."""
    ids = [(text.lstrip("0") or "0") if text.isdigit() else text for text in _strip(values)]
    return pd.Series(ids, index=values.index, dtype=object)


def _column(header: list[str], wanted: str) -> int | None:
    key = _norm_header(wanted)
    for i, name in enumerate(header):
        if _norm_header(name) == key:
            return i
    return None


def _parse_label_field(text: str) -> tuple[str, list[str]]:
    """``"Effusion|Infiltrate"`` -> (``"Effusion|Infiltration"``, unknown names); empty -> No Finding."""
    names = [n.strip() for n in text.split("|") if n.strip()]
    canonical: list[str] = []
    unknown: list[str] = []
    for name in names:
        label = canonical_label(name)
        if label is None:
            unknown.append(name)
        elif label not in canonical:
            canonical.append(label)
    findings = [LABELS[i] for i in sorted(LABEL_INDEX[c] for c in canonical if c != NO_FINDING)]
    return ("|".join(findings) if findings else NO_FINDING), unknown


def read_data_entry(path: str | os.PathLike, problems: list[Problem]) -> pd.DataFrame:
    """Read a Data_Entry CSV (2017 or v2020 layout, plain or .gz).

    Returns one row per distinct image, in file order: ``image_id`` (stem), ``patient_id`` (str),
    ``view`` (str, ``""`` when absent), ``labels`` (canonical ``|``-joined, LABELS order, or
    ``No Finding``), ``original_width``, ``original_height`` (int, 0 when absent), ``line``.
    Bad rows are appended to ``problems``; raises :class:`DataError` when a required column is missing.
    """
    path = Path(path)
    header, rows = _read_table(path)
    where = {
        name: _column(header, name)
        for name in ("Image Index", "Finding Labels", "Patient ID", "View Position")
    }
    missing = [name for name in ("Image Index", "Finding Labels", "Patient ID") if where[name] is None]
    if missing:
        raise DataError(
            f"{path}:1: header lacks column(s) {', '.join(missing)} (header: {','.join(header)}); "
            "expected a Data_Entry_2017 file"
        )
    name = str(path)
    size_col = next(
        (i for i, h in enumerate(header) if _norm_header(h).startswith("originalimagewidth")), None
    )

    out = pd.DataFrame(
        {
            "image_id": _stem(rows[where["Image Index"]]),
            "patient_id": normalize_patient_id(rows[where["Patient ID"]]),
            "view": _strip(rows[where["View Position"]]) if where["View Position"] is not None else "",
            "line": rows["line"].to_numpy(),
        }
    )
    for key, offset in (("original_width", 0), ("original_height", 1)):
        if size_col is None:
            out[key] = 0
        else:
            values = pd.to_numeric(pd.Series(_strip(rows[size_col + offset])), errors="coerce")
            out[key] = values.fillna(0).astype(np.int64)

    # Labels: parse each distinct field once (112,120 rows have ~800 distinct fields).
    raw_labels = _strip(rows[where["Finding Labels"]])
    parsed = {text: _parse_label_field(text) for text in set(raw_labels)}
    out["labels"] = [parsed[text][0] for text in raw_labels]
    lines = out["line"].to_numpy()
    for text in sorted(parsed):
        canonical, unknown = parsed[text]
        if unknown:
            message = f"unknown label(s) {', '.join(map(repr, unknown))} ignored"
        elif not text:
            message = "empty Finding Labels, taken as No Finding"
        elif canonical != NO_FINDING and NO_FINDING.lower() in text.lower():
            message = "'No Finding' together with findings; the findings are kept"
        else:
            continue
        for i in (i for i, t in enumerate(raw_labels) if t == text):
            problems.append(Problem(name, int(lines[i]), message))

    keep = np.ones(len(out), dtype=bool)
    empty_id = (out["image_id"] == "").to_numpy()
    for i in np.flatnonzero(empty_id):
        problems.append(Problem(name, int(out["line"].iat[i]), "empty Image Index; row left out"))
    keep &= ~empty_id

    empty_patient = (out["patient_id"] == "").to_numpy() & keep
    for i in np.flatnonzero(empty_patient):
        fallback = out["image_id"].iat[i].split("_")[0]
        problems.append(
            Problem(
                name, int(out["line"].iat[i]), f"empty Patient ID; using {fallback!r} from the image name"
            )
        )
        out.iat[i, out.columns.get_loc("patient_id")] = fallback

    duplicated = out["image_id"].duplicated(keep="first").to_numpy() & keep
    if duplicated.any():
        first_line = out[keep & ~duplicated].drop_duplicates("image_id").set_index("image_id")["line"]
        for i in np.flatnonzero(duplicated):
            image_id = out["image_id"].iat[i]
            problems.append(
                Problem(
                    name,
                    int(out["line"].iat[i]),
                    f"duplicate Image Index {image_id!r} (first on line {int(first_line[image_id])}); row left out",
                )
            )
    keep &= ~duplicated
    extra = _extra_values(rows, len(header))
    for i in np.flatnonzero(extra & keep):
        problems.append(
            Problem(name, int(out["line"].iat[i]), "more values than the header has columns; extra ignored")
        )
    return out[keep].reset_index(drop=True)


def _extra_values(rows: pd.DataFrame, width: int) -> np.ndarray:
    """Rows with non-empty values in columns ``width`` and beyond."""
    extra_cols = [c for c in range(width, _MAX_COLUMNS) if c in rows.columns]
    if not extra_cols:
        return np.zeros(len(rows), dtype=bool)
    return rows[extra_cols].to_numpy().astype(bool).any(axis=1)


def read_bbox_list(
    path: str | os.PathLike, listed: pd.DataFrame | None, problems: list[Problem]
) -> tuple[pd.DataFrame, int]:
    """Read BBox_List_2017.csv (its broken header included) and validate every row.

    ``listed``: the Data_Entry frame (``image_id``, ``labels``) to check boxes against, or ``None``.
    Returns the valid boxes, in file order: ``image_id``, ``label`` (canonical), ``x``, ``y``, ``w``,
    ``h`` (float, 1024 space; partly off-image boxes clipped), ``line``; and the number of data rows. Left out, each with a
    :class:`Problem`: unknown label, malformed or non-finite number, non-positive size, box wholly off
    the 1024 x 1024 image, duplicate row, image not in Data_Entry.
    """
    path = Path(path)
    name = str(path)
    header, rows = _read_table(path)
    if (
        len(header) < 2
        or _norm_header(header[0]) != "imageindex"
        or not _norm_header(header[1]).startswith("findinglabel")
    ):
        raise DataError(
            f"{path}:1: unexpected header {','.join(header)!r}; expected 'Image Index,Finding Label,Bbox [x,y,w,h]'"
        )
    frame = pd.DataFrame(
        {
            "image_id": _stem(rows[0]),
            "raw_label": _strip(rows[1]),
            "line": rows["line"].to_numpy(),
        }
    )
    numbers = pd.DataFrame(
        {c: pd.to_numeric(pd.Series(_strip(rows[c])), errors="coerce") for c in (2, 3, 4, 5)}
    )
    frame[["x", "y", "w", "h"]] = numbers.to_numpy(dtype=np.float64)
    keep = np.ones(len(frame), dtype=bool)

    def report(mask: np.ndarray, message) -> None:
        nonlocal keep
        mask = mask & keep
        for i in np.flatnonzero(mask):
            problems.append(Problem(name, int(frame["line"].iat[i]), message(i)))
        keep &= ~mask

    report((frame["image_id"] == "").to_numpy(), lambda i: "empty Image Index; box left out")
    canonical = {raw: canonical_label(raw) for raw in frame["raw_label"].unique()}
    frame["label"] = frame["raw_label"].map(canonical)
    unknown = frame["label"].isna().to_numpy() | (frame["label"] == NO_FINDING).to_numpy()
    report(unknown, lambda i: f"unknown box label {frame['raw_label'].iat[i]!r}; box left out")
    coords = frame[["x", "y", "w", "h"]].to_numpy()
    malformed = ~np.isfinite(coords).all(axis=1)
    raw_numbers = rows[[2, 3, 4, 5]].to_numpy()
    report(
        malformed,
        lambda i: (
            "malformed box numbers "
            + repr(",".join(map(str, raw_numbers[i])))
            + " (expected x,y,w,h); box left out"
        ),
    )
    x, y, w, h = (frame[c].to_numpy() for c in ("x", "y", "w", "h"))
    report((w <= 0) | (h <= 0), lambda i: f"non-positive box size w={w[i]:g}, h={h[i]:g}; box left out")
    outside = (x >= BOX_SPACE) | (y >= BOX_SPACE) | (x + w <= 0) | (y + h <= 0)
    report(
        outside,
        lambda i: f"box ({x[i]:g}, {y[i]:g}, {w[i]:g}, {h[i]:g}) lies off the 1024 x 1024 image; left out",
    )
    tol = _BOX_TOLERANCE
    overhang = keep & ((x < -tol) | (y < -tol) | (x + w > BOX_SPACE + tol) | (y + h > BOX_SPACE + tol))
    for i in np.flatnonzero(overhang):
        problems.append(
            Problem(
                name,
                int(frame["line"].iat[i]),
                f"box ({x[i]:g}, {y[i]:g}, {w[i]:g}, {h[i]:g}) overhangs the 1024 x 1024 image; clipped",
            )
        )
    x1, y1 = np.clip(x, 0, BOX_SPACE), np.clip(y, 0, BOX_SPACE)
    x2, y2 = np.clip(x + w, 0, BOX_SPACE), np.clip(y + h, 0, BOX_SPACE)
    frame["x"], frame["y"], frame["w"], frame["h"] = x1, y1, x2 - x1, y2 - y1

    dup_key = frame[["image_id", "label"]].assign(**{c: frame[c].round(3) for c in ("x", "y", "w", "h")})
    dup_key = dup_key.where(pd.Series(keep, index=frame.index), other=None)  # left-out rows never match
    dup_key["row"] = np.arange(len(frame))
    key_cols = ["image_id", "label", "x", "y", "w", "h"]
    first_row = dup_key[keep].groupby(key_cols, sort=False)["row"].transform("first")
    duplicated = np.zeros(len(frame), dtype=bool)
    first_of = np.arange(len(frame))
    first_of[np.flatnonzero(keep)] = first_row.to_numpy()
    duplicated[np.flatnonzero(keep)] = first_row.to_numpy() != np.flatnonzero(keep)
    line = frame["line"].to_numpy()
    report(duplicated, lambda i: f"duplicate box row (same as line {line[first_of[i]]}); left out")
    extra = _extra_values(rows, 6) & keep
    for i in np.flatnonzero(extra):
        problems.append(Problem(name, int(line[i]), "values after Bbox [x,y,w,h]; ignored"))
    if listed is not None:
        listed_labels = listed.set_index("image_id")["labels"]
        not_listed = ~frame["image_id"].isin(listed_labels.index).to_numpy()
        report(
            not_listed,
            lambda i: f"box for image {frame['image_id'].iat[i]!r}, which Data_Entry does not list; left out",
        )
        valid = frame[keep]
        findings = valid["image_id"].map(listed_labels).fillna("")
        label_missing = [
            label not in str(text).split("|") for label, text in zip(valid["label"], findings, strict=True)
        ]
        for line, image_id, label in valid.loc[label_missing, ["line", "image_id", "label"]].itertuples(
            index=False
        ):
            problems.append(
                Problem(
                    name,
                    int(line),
                    f"box label {label!r} is not among the Finding Labels of {image_id!r}; kept",
                )
            )
    not_box_class = keep & ~frame["label"].isin(BOX_CLASSES).to_numpy()
    for i in np.flatnonzero(not_box_class):
        problems.append(
            Problem(
                name,
                int(frame["line"].iat[i]),
                f"{frame['label'].iat[i]!r} is not one of the 8 box classes; kept",
            )
        )
    return frame.loc[keep, ["image_id", "label", "x", "y", "w", "h", "line"]].reset_index(drop=True), len(
        frame
    )


def _rank(path: Path, root: Path) -> tuple:
    """Preference among files with the same stem: inside a folder named ``images``, then shallower,
    then PNG before JPEG, then by path."""
    rel = path.relative_to(root)
    return (path.parent.name.lower() != "images", len(rel.parts), path.suffix.lower() != ".png", str(rel))


def display_path(path: str | os.PathLike) -> str:
    """A path as printable text: bytes that are not UTF-8 shown as ``\\xNN`` escapes."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def _utf8(name: str) -> bool:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _special_kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "FIFO"), (stat.S_ISSOCK, "socket"), (stat.S_ISCHR, "character device"),
                       (stat.S_ISBLK, "block device")):
        if test(mode):
            return name
    return "special file"


def scan_files(
    root: str | os.PathLike,
    prune: Callable[[Path, str], bool] | None = None,
    problems: list[Problem] | None = None,
) -> list[Path]:
    """Every regular file below ``root`` (sorted walk; symlinked folders and files followed).

    ``prune(parent, name)``: True to skip the sub-folder ``name`` of ``parent``. Skipped, each logged
    as a warning naming it and appended to ``problems`` (``line=None``): a dangling symbolic link, a
    symbolic link loop (a link to itself or to a folder above it), a file or folder whose name is not
    valid UTF-8, a FIFO, socket or device (reading one could block forever), and a folder that cannot
    be listed. A folder reached twice through links is walked once.
    """
    root = Path(root)
    found: list[Path] = []
    skipped: list[Problem] = []

    def skip(path: str, message: str) -> None:
        skipped.append(Problem(display_path(path), None, message, kind="skipped"))

    root_real = os.path.realpath(root)
    seen = {root_real}
    stack: list[tuple[Path, tuple[str, ...]]] = [(root, (root_real,))]
    while stack:
        folder, ancestors = stack.pop()
        try:
            with os.scandir(folder) as listing:
                entries = sorted(listing, key=lambda e: os.fsencode(e.name))
        except OSError as err:
            skip(str(folder), f"folder cannot be listed ({err.strerror or err}); skipped")
            continue
        subfolders: list[tuple[Path, tuple[str, ...]]] = []
        for entry in entries:
            name = entry.name
            if not _utf8(name):
                skip(entry.path, "name is not valid UTF-8 text; skipped (rename it to read it)")
                continue
            try:
                if entry.is_symlink():
                    try:
                        mode = os.stat(entry.path).st_mode
                    except FileNotFoundError:
                        skip(entry.path, f"dangling symbolic link (to {display_path(os.readlink(entry.path))}, "
                                         "which does not exist); skipped")
                        continue
                    except OSError as err:
                        if err.errno == errno.ELOOP:
                            skip(entry.path, "symbolic link loop; skipped")
                        else:
                            skip(entry.path, f"symbolic link cannot be followed ({err.strerror or err}); skipped")
                        continue
                    is_dir, is_file = stat.S_ISDIR(mode), stat.S_ISREG(mode)
                else:
                    is_dir, is_file = entry.is_dir(follow_symlinks=False), entry.is_file(follow_symlinks=False)
                    mode = 0 if is_dir or is_file else entry.stat(follow_symlinks=False).st_mode
            except OSError as err:
                skip(entry.path, f"cannot be read ({err.strerror or err}); skipped")
                continue
            if is_dir:
                if prune is not None and prune(folder, name):
                    continue
                real = os.path.realpath(entry.path)
                if real in ancestors:
                    skip(entry.path, f"symbolic link loop (points to {display_path(real)}, a folder above it); "
                                     "skipped")
                    continue
                if real in seen:
                    log.debug("%s: folder already scanned through another path; skipped", entry.path)
                    continue
                seen.add(real)
                subfolders.append((Path(entry.path), (*ancestors, real)))
            elif is_file:
                found.append(Path(entry.path))
            else:
                skip(entry.path, f"not a regular file or folder (a {_special_kind(mode)}); skipped")
        stack.extend(reversed(subfolders))
    if skipped:
        for problem in skipped[:_LOGGED_SKIPS]:
            log.warning("%s", problem)
        if len(skipped) > _LOGGED_SKIPS:
            log.warning("... and %d more entries under %s skipped (bad links or names)",
                        len(skipped) - _LOGGED_SKIPS, root)
        if problems is not None:
            problems.extend(skipped)
    return found


def find_image_files(
    data_dir: str | os.PathLike, exclude_top: tuple[str, ...] = ("masks",), problems: list[Problem] | None = None
) -> tuple[dict[str, Path], int]:
    """Map image stem -> file for every image file under ``data_dir`` (symlinked folders followed,
    hidden folders and the top-level ``masks/`` skipped).

    When a stem occurs in several files one is chosen deterministically (see :func:`_rank`); returns
    the map and the number of such duplicate stems. Dangling or looping links and names that are not
    UTF-8 are skipped with a warning and appended to ``problems`` (see :func:`scan_files`).
    """
    root = Path(data_dir)

    def prune(parent: Path, name: str) -> bool:
        return name.startswith(".") or (parent == root and name.lower() in exclude_top)

    candidates: dict[str, list[Path]] = {}
    for path in scan_files(root, prune, problems):
        if is_image_file(path.name):
            candidates.setdefault(os.path.splitext(path.name)[0], []).append(path)
    chosen: dict[str, Path] = {}
    duplicates = 0
    for stem, paths in candidates.items():
        if len(paths) > 1:
            duplicates += 1
            paths = sorted(paths, key=lambda p: _rank(p, root))
            log.debug("image %s found %d times; using %s", stem, len(paths), paths[0])
        chosen[stem] = paths[0]
    return chosen, duplicates


def _find_masks(data_dir: Path) -> dict[str, Path]:
    masks_dir = data_dir / "masks"
    if not masks_dir.is_dir():
        return {}
    masks = {}
    for entry in os.scandir(masks_dir):
        # Bad links and names were reported by the scan of the folder; here they are just left out.
        if _utf8(entry.name) and entry.name.lower().endswith(".png") and _is_file(entry):
            masks[os.path.splitext(entry.name)[0]] = Path(entry.path)
    return masks


def _is_file(entry: os.DirEntry) -> bool:
    try:
        return entry.is_file()
    except OSError:
        return False


@dataclass
class DatasetIndex:
    """Everything known about a data folder (see docs/architecture.md, "Data index").

    * ``records``: one row per listed image found on disk: ``image_id``, ``path``, ``patient_id``,
      ``view``, ``width``, ``height`` (real file size, pixels), ``labels`` (``|``-joined canonical names
      or ``No Finding``), ``annotated`` (has a usable box), ``mask_path`` (``""`` when none);
    * ``boxes``: usable boxes: ``image_id``, ``label``, ``x1, y1, x2, y2`` (float, pixels of the real file);
    * ``missing``: listed image ids with no file; ``problems``: every :class:`Problem` found;
    * ``stats``: counts from the load that :meth:`summary` reports.
    """

    data_dir: Path
    records: pd.DataFrame
    boxes: pd.DataFrame
    missing: list[str] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    stats: dict = field(default_factory=dict)
    _label_matrix: np.ndarray | None = field(default=None, repr=False)
    _boxes_by_image: dict | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.records)

    @property
    def image_ids(self) -> list[str]:
        return self.records["image_id"].tolist()

    def label_matrix(self) -> np.ndarray:
        """uint8 (N, 14): image-level labels in ``LABELS`` order, aligned with ``records``."""
        if self._label_matrix is None:
            self._label_matrix = labels_to_matrix(self.records["labels"])
        return self._label_matrix

    def boxes_for(self, image_id: str) -> tuple[np.ndarray, np.ndarray]:
        """Boxes of one image: float32 (n, 4) x1, y1, x2, y2 in pixels of the real file, and
        int64 (n,) ``LABELS`` indices. Empty arrays when the image has none."""
        if self._boxes_by_image is None:
            grouped = {}
            if len(self.boxes):
                coords = self.boxes[["x1", "y1", "x2", "y2"]].to_numpy(dtype=np.float32)
                labels = self.boxes["label"].map(LABEL_INDEX).to_numpy(dtype=np.int64)
                for key, rows in self.boxes.groupby("image_id", sort=False).indices.items():
                    grouped[key] = (coords[rows], labels[rows])
            self._boxes_by_image = grouped
        found = self._boxes_by_image.get(image_id)
        if found is None:
            return np.zeros((0, 4), dtype=np.float32), np.zeros((0,), dtype=np.int64)
        return found

    def subset(self, image_ids) -> DatasetIndex:
        """A new index restricted to ``image_ids`` (in that order); ``stats``/``problems`` are kept."""
        wanted = list(image_ids)
        by_id = self.records.set_index("image_id", drop=False)
        unknown = [i for i in wanted if i not in by_id.index]
        if unknown:
            raise DataError(
                f"{self.data_dir}: {len(unknown)} image id(s) not in the index, e.g. {', '.join(unknown[:5])}"
            )
        records = by_id.loc[wanted].reset_index(drop=True)
        boxes = self.boxes[self.boxes["image_id"].isin(set(wanted))].reset_index(drop=True)
        return DatasetIndex(
            self.data_dir, records, boxes, list(self.missing), list(self.problems), dict(self.stats)
        )

    def summary(self) -> dict:
        """Counts and problems as plain data (what ``gren data check --json`` prints)."""
        records = self.records
        stats = self.stats
        label_counts = _label_counts(records["labels"])
        boxes_per_class = {}
        for cls in sorted(set(BOX_CLASSES) | set(stats.get("box_rows_per_class", {}))):
            listed = stats.get("box_rows_per_class", {}).get(cls, 0)
            usable = int((self.boxes["label"] == cls).sum())
            boxes_per_class[cls] = {
                "listed": listed,
                "usable": usable,
                "missing_image": stats.get("boxes_missing_image_per_class", {}).get(cls, 0),
            }
        return {
            "data_dir": str(self.data_dir),
            "data_entry_csv": stats.get("data_entry_csv"),
            "bbox_csv": stats.get("bbox_csv"),
            "images": {
                "listed": stats.get("listed", len(records)),
                "found": len(records),
                "missing": len(self.missing),
                "unreadable": stats.get("unreadable", 0),
                "unlisted_files": stats.get("unlisted_files", 0),
                "duplicate_files": stats.get("duplicate_files", 0),
                "skipped_entries": sum(p.kind == "skipped" for p in self.problems),
                "tiny": sum(p.kind == "tiny" for p in self.problems),
                "with_mask": int((records["mask_path"] != "").sum()),
            },
            "patients": int(records["patient_id"].nunique()),
            "views": {str(k): int(v) for k, v in records["view"].value_counts().sort_index().items()},
            "labels": label_counts,
            "labels_listed": stats.get("labels_listed", {}),
            "box_images": {
                "listed": stats.get("box_images_listed", 0),
                "found": int(records["annotated"].sum()),
                "missing": len(stats.get("missing_box_images", [])),
            },
            "boxes": {
                "rows": stats.get("box_rows", 0),
                "invalid": stats.get("box_rows_invalid", 0),
                "valid": stats.get("box_rows_valid", 0),
                "usable": len(self.boxes),
                "missing_image": stats.get("boxes_missing_image", 0),
                "classes": int(self.boxes["label"].nunique()),
                "per_class": boxes_per_class,
            },
            "problems": [p.as_dict() for p in self.problems],
            "usable": len(records) > 0,
        }


def labels_to_matrix(labels: pd.Series) -> np.ndarray:
    """uint8 (N, 14) from ``|``-joined canonical label strings (``No Finding`` -> all zeros)."""
    matrix = np.zeros((len(labels), len(LABELS)), dtype=np.uint8)
    codes, uniques = pd.factorize(labels)
    for u, text in enumerate(uniques):
        rows = codes == u
        for name in str(text).split("|"):
            if name in LABEL_INDEX:
                matrix[rows, LABEL_INDEX[name]] = 1
    return matrix


def _label_counts(labels: pd.Series) -> dict[str, int]:
    counts = Counter()
    for text, n in labels.value_counts().items():
        for name in str(text).split("|"):
            counts[name] += int(n)
    return {name: counts.get(name, 0) for name in (*LABELS, NO_FINDING)}


def _report(problems: list[Problem], strict: bool) -> None:
    if not problems:
        return
    by_file = Counter(p.file for p in problems)
    for p in problems:
        log.debug("%s", p)
    for file_name, count in by_file.items():
        first = [str(p) for p in problems if p.file == file_name][:3]
        log.warning("%d problem(s) in %s, e.g. %s", count, file_name, "; ".join(first))
    if strict:
        listed = "\n".join(f"  {p}" for p in problems[:_STRICT_LISTED])
        more = f"\n  ... and {len(problems) - _STRICT_LISTED} more" if len(problems) > _STRICT_LISTED else ""
        raise DataError(f"{len(problems)} problem(s) in the data (strict mode):\n{listed}{more}")


def load_index(
    data_dir: str | os.PathLike, *, strict: bool = False, on_bad_image: str = "error", verify: bool = False
) -> DatasetIndex:
    """Read a data folder in the NIH layout into a :class:`DatasetIndex`.

    ``strict``: any problem (bad row, unreadable image skipped) raises :class:`DataError` listing them.
    ``on_bad_image``: ``"error"`` raises :class:`gren.core.errors.ImageReadError` naming the first image
    whose header (or, with ``verify``, whose pixels) cannot be read; ``"skip"`` leaves such images out,
    each reported as a :class:`Problem` and counted in ``stats["unreadable"]``.
    ``verify``: decode every found image fully (slow; catches truncated files) instead of reading
    only the header.
    Images listed but absent are left out and reported in one warning with their count.
    """
    if on_bad_image not in ("error", "skip"):
        raise ValueError(f"on_bad_image must be 'error' or 'skip', not {on_bad_image!r}")
    data_dir = Path(data_dir)
    problems: list[Problem] = []
    entry_path = find_data_entry_csv(data_dir)
    listed = read_data_entry(entry_path, problems)
    bbox_path = find_bbox_csv(data_dir)
    if bbox_path is None:
        log.warning("%s: no BBox_List_2017.csv; the index has no boxes", data_dir)
        raw_boxes = pd.DataFrame(columns=["image_id", "label", "x", "y", "w", "h", "line"])
        box_rows = 0
    else:
        raw_boxes, box_rows = read_bbox_list(bbox_path, listed, problems)

    files, duplicate_files = find_image_files(data_dir, problems=problems)
    if (data_dir / "masks").is_dir():  # find_image_files skips masks/; its bad entries are reported here
        scan_files(data_dir / "masks", lambda parent, name: True, problems)
    masks = _find_masks(data_dir)
    on_disk = listed["image_id"].map(files)
    found_mask = on_disk.notna().to_numpy()
    missing = listed.loc[~found_mask, "image_id"].tolist()
    found = listed[found_mask].copy()
    found["path"] = on_disk[found_mask].map(str).to_numpy()

    widths, heights, readable = _read_sizes(found["path"].tolist(), on_bad_image, verify, problems)
    found["width"], found["height"] = widths, heights
    unreadable = int((~readable).sum())
    found = found[readable]
    tiny = (found["width"] < MIN_FILM_SIDE) | (found["height"] < MIN_FILM_SIDE)
    for path, width, height in found.loc[tiny, ["path", "width", "height"]].itertuples(index=False):
        problems.append(Problem(str(path), None, f"image of only {width} x {height} pixels (a chest film is expected "
                                                 f"to be at least {MIN_FILM_SIDE} px on each side); kept",
                                kind="tiny"))
    if tiny.any():
        log.warning("%d image(s) smaller than %d px on a side (kept; see the problems list)", int(tiny.sum()),
                    MIN_FILM_SIDE)

    box_images = set(raw_boxes["image_id"])
    found_ids = set(found["image_id"])
    missing_box_images = sorted(box_images - found_ids)
    boxes_usable = raw_boxes[raw_boxes["image_id"].isin(found_ids)]
    size = found.set_index("image_id")[["width", "height"]]
    sx = boxes_usable["image_id"].map(size["width"]).to_numpy(dtype=np.float64) / BOX_SPACE
    sy = boxes_usable["image_id"].map(size["height"]).to_numpy(dtype=np.float64) / BOX_SPACE
    x, y = boxes_usable["x"].to_numpy(), boxes_usable["y"].to_numpy()
    w, h = boxes_usable["w"].to_numpy(), boxes_usable["h"].to_numpy()
    boxes = pd.DataFrame(
        {
            "image_id": boxes_usable["image_id"].to_numpy(),
            "label": boxes_usable["label"].to_numpy(),
            "x1": x * sx,
            "y1": y * sy,
            "x2": (x + w) * sx,
            "y2": (y + h) * sy,
        }
    )

    found["annotated"] = found["image_id"].isin(set(boxes["image_id"]))
    found["mask_path"] = found["image_id"].map(lambda i: str(masks[i]) if i in masks else "")
    records = found[
        ["image_id", "path", "patient_id", "view", "width", "height", "labels", "annotated", "mask_path"]
    ].reset_index(drop=True)
    records["width"] = records["width"].astype(np.int64)
    records["height"] = records["height"].astype(np.int64)

    if missing:
        log.warning(
            "%d of %d images listed in %s are not under %s and are left out (%d of them have boxes)",
            len(missing),
            len(listed),
            entry_path.name,
            data_dir,
            len(missing_box_images),
        )
    unlisted = len(set(files) - set(listed["image_id"]))
    if unlisted:
        log.info(
            "%d image files under %s are not listed in %s (ignored)", unlisted, data_dir, entry_path.name
        )
    if duplicate_files:
        log.info(
            "%d image stems occur in several files under %s; one file chosen for each",
            duplicate_files,
            data_dir,
        )

    missing_box = raw_boxes[~raw_boxes["image_id"].isin(found_ids)]
    stats = {
        "data_entry_csv": str(entry_path),
        "bbox_csv": str(bbox_path) if bbox_path else None,
        "listed": len(listed),
        "labels_listed": _label_counts(listed["labels"]),
        "unreadable": unreadable,
        "unlisted_files": unlisted,
        "duplicate_files": duplicate_files,
        "box_rows": box_rows,
        "box_rows_valid": len(raw_boxes),
        "box_rows_invalid": box_rows - len(raw_boxes),
        "box_rows_per_class": {k: int(v) for k, v in raw_boxes["label"].value_counts().sort_index().items()},
        "box_images_listed": len(box_images),
        "missing_box_images": missing_box_images,
        "boxes_missing_image": len(missing_box),
        "boxes_missing_image_per_class": {
            k: int(v) for k, v in missing_box["label"].value_counts().sort_index().items()
        },
    }
    _report(problems, strict)
    log.info(
        "%s: %d images (%d annotated, %d boxes), %d patients",
        data_dir,
        len(records),
        int(records["annotated"].sum()),
        len(boxes),
        records["patient_id"].nunique(),
    )
    return DatasetIndex(data_dir, records, boxes, missing, problems, stats)


def _read_sizes(
    paths: list[str], on_bad_image: str, verify: bool, problems: list[Problem]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(width, height, readable) per path; unreadable ones raise or are reported by ``on_bad_image``."""
    widths = np.zeros(len(paths), dtype=np.int64)
    heights = np.zeros(len(paths), dtype=np.int64)
    readable = np.ones(len(paths), dtype=bool)
    iterator = paths
    if len(paths) > (200 if verify else 20_000):
        iterator = progress(paths, desc="verifying images" if verify else "reading image sizes", unit="img")
    for i, path in enumerate(iterator):
        try:
            if verify:
                gray = read_gray(path)
                heights[i], widths[i] = gray.shape
            else:
                widths[i], heights[i] = image_size(path)
        except ImageReadError as err:
            if on_bad_image == "error":
                raise
            readable[i] = False
            problems.append(Problem(path, None, f"unreadable image, left out ({err.__cause__ or err})",
                                    kind="unreadable"))
    if not readable.all():
        log.warning("%d unreadable image(s) left out", int((~readable).sum()))
    return widths, heights, readable
