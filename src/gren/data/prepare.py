"""``gren prepare``: decode, resize, segment and hash every image once into a prepared cache.

:func:`prepare_cache` writes the format described in :mod:`gren.data.cache_format`:

* each image is decoded and resized once to ``S x S`` uint8 (:func:`gren.core.imageio.read_gray_resized`,
  the same antialiased resize that :class:`gren.data.dataset.RawDataset` applies per item);
* its lung masks at ``S x S``: the dataset's own ``masks/<stem>.png`` (NEAREST-resized) when the lungs
  spec allows it and the file is there, else a segmenter (the shipped ``unet``, ``classical`` or
  ``unet:PATH``);
* the two 64-bit lung hashes, computed on the cached ``S x S`` image and masks (cheap, and exactly what
  the cache holds, so anyone can recompute them from the cache);
* labels, boxes (scaled from real-image pixels to ``S`` pixels) and the records table.

Guarantees:

* parallel: a ``multiprocessing`` pool over chunks of ``chunk_size`` images (``workers``);
* resumable: every chunk fills rows of preallocated memory-mapped arrays under ``work/`` and then writes
  a completion marker; a rerun skips chunks that have one;
* atomic: ``meta.json`` says ``"complete": true`` only after everything else is in place (tmp +
  ``os.replace``); :class:`gren.data.cache.PreparedCache` refuses anything else;
* bound to its parameters: size, lungs spec and a stamp of the source folder (CSV contents, image
  paths and byte sizes) are stored; preparing into the same folder with other ones is an error
  unless ``force=True``;
* unreadable images are skipped, logged, counted and listed in the summary; they never stop the run.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import multiprocessing
import os
import re
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd

import gren
from gren.core.atomic import atomic_path
from gren.core.errors import DataError, GrenError
from gren.core.imageio import is_image_file, read_gray_resized, read_mask
from gren.core.labels import LABEL_INDEX, LABELS
from gren.core.progress import progress as progress_bar
from gren.data import cache_format as fmt

log = logging.getLogger(__name__)

DEFAULT_CHUNK_SIZE = 64
STALL_AFTER_CHUNKS_ENV = "GREN_TEST_PREPARE_STALL_AFTER_CHUNKS"
"""Test-only hook: after this many chunks are written in one run, prepare sleeps (so a test can kill it)."""

_UNET_RE = re.compile(r"^unet:(.+)$")
_MAX_LOGGED_FAILURES = 20


@dataclass(frozen=True)
class LungsSpec:
    """A parsed ``--lungs`` value.

    ``spec``: what the cache records and is keyed on: ``auto+<segmenter>`` / ``masks+<segmenter>``
    (``auto`` and ``masks`` resolved to the segmenter they use for images without a dataset mask),
    ``classical``, ``unet@<sha256[:16]>`` (the shipped U-Net) or ``unet:<absolute PATH>``. The shipped
    U-Net is recorded by its file's SHA-256, so a cache made by another segmenter (e.g. by the old
    ``auto`` = classical) or another shipped model is never silently reused. ``use_dataset_masks``:
    take ``masks/<stem>.png`` when present; ``segmenter``: the
    :func:`gren.lungs.segment.load_segmenter` spec for images without a usable dataset mask.

    ``auto`` (and ``masks``) segment with the shipped U-Net (``unet``); in an install without its
    weights file they use ``classical`` and say so in the log. A recorded spec (``auto+unet@HASH``, as in
    a cache's ``meta.json``) parses back to itself while the shipped model is the same.
    """

    spec: str
    use_dataset_masks: bool
    segmenter: str

    @classmethod
    def parse(cls, spec: str) -> LungsSpec:
        from gren.lungs.segment import SHIPPED_WEIGHTS, shipped_sha256

        spec = str(spec).strip()
        mode, plus, recorded = spec.partition("+")
        if mode in ("auto", "masks"):
            if plus and recorded == "classical":
                return cls(spec, True, "classical")
            if not SHIPPED_WEIGHTS.is_file() and not plus:
                log.warning("--lungs %s: the shipped lung U-Net %s is missing; images without a dataset mask "
                            "get the classical segmenter", mode, SHIPPED_WEIGHTS)
                return cls(f"{mode}+classical", True, "classical")
            inner = cls.parse(recorded) if plus else cls.parse("unet")
            if not inner.spec.startswith("unet@"):
                raise GrenError(f"--lungs {spec!r}: expected auto, masks, classical, unet or unet:PATH")
            return cls(f"{mode}+{inner.spec}", True, "unet")
        if spec == "unet" or spec.startswith("unet@"):
            current = f"unet@{shipped_sha256()[:16]}"
            if spec != "unet" and spec != current:
                raise GrenError(f"--lungs {spec}: recorded with another shipped lung U-Net than this gren's "
                                f"({current}); prepare again with --force to use this one")
            return cls(current, False, "unet")
        if spec == "classical":
            return cls(spec, False, "classical")
        match = _UNET_RE.match(spec)
        if match:
            weights = Path(match.group(1)).expanduser()
            if not weights.is_file():
                raise GrenError(f"--lungs {spec}: U-Net weights file {weights} not found")
            return cls(f"unet:{weights.resolve()}", False, f"unet:{weights.resolve()}")
        raise GrenError(f"--lungs {spec!r}: expected auto, masks, classical, unet or unet:PATH")

    @property
    def mode(self) -> str:
        """The spec as a user names it: ``auto``, ``masks``, ``classical``, ``unet`` or ``unet:PATH``."""
        if self.spec.startswith("unet@"):
            return "unet"
        return self.spec.partition("+")[0] if not self.spec.startswith("unet:") else self.spec

    @property
    def segmenter_name(self) -> str:
        return self.segmenter.split(":", 1)[0]


def source_stamp(data_dir: str | os.PathLike, exclude: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A fingerprint of what ``prepare`` reads from ``data_dir``.

    SHA-256 over the contents of the top-level CSV files and the relative path, byte size and
    modification time (ns) of every image file below ``data_dir``, symlinked folders and files
    followed (so an image replaced behind a symlinked ``images/`` changes it); ``.gren_cache`` and the
    ``exclude`` folders are skipped, and so are dangling or looping links and names that are not
    UTF-8 (warned about, see :func:`gren.data.nih.scan_files`). A moved folder, or one copied with
    its times kept (``cp -a``, ``rsync -a``), keeps its stamp; an added, removed, replaced or touched
    image or an edited CSV changes it.
    Returns ``{"sha256": hex, "n_image_files": int, "csv_files": [names]}``.
    """
    from gren.data.nih import scan_files

    root = Path(data_dir).resolve()
    excluded = {os.path.realpath(p) for p in exclude}
    digest = hashlib.sha256()
    csv_files = []
    for entry in sorted(os.scandir(root), key=lambda e: os.fsencode(e.name)):
        name = entry.name.lower()
        if name.endswith((".csv", ".csv.gz")) and _entry_is_file(entry):
            csv_files.append(entry.name)
    for name in csv_files:
        digest.update(b"csv\0" + os.fsencode(name) + b"\0")
        try:
            with open(root / name, "rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
        except OSError as err:
            raise DataError(f"{root / name}: cannot read ({err.strerror or err})") from err

    def prune(parent: Path, name: str) -> bool:
        return name == ".gren_cache" or os.path.realpath(parent / name) in excluded

    n_images = 0
    for path in scan_files(root, prune):
        if not is_image_file(path.name):
            continue
        try:
            info = path.stat()
        except OSError:  # vanished since the scan
            continue
        rel = path.relative_to(root).as_posix()
        digest.update(f"img\0{rel}\0{info.st_size}\0{info.st_mtime_ns}\n".encode())
        n_images += 1
    return {"sha256": digest.hexdigest(), "n_image_files": n_images, "csv_files": csv_files}


def _entry_is_file(entry: os.DirEntry) -> bool:
    try:
        return entry.is_file()
    except OSError:
        return False


# --- disk space -------------------------------------------------------------------------------------

_SPACE_MARGIN = 1.05  # reserve 5 % more than the arrays need (metadata, records.csv, markers)
_SPACE_SLACK = 4 << 20  # bytes, plus this


def no_space_message(path: Path, err: BaseException | None = None) -> str:
    """``PATH: no space left on device (N MB free in FOLDER)``, as the user sees it."""
    folder = path if path.is_dir() else path.parent
    try:
        free = f"{shutil.disk_usage(folder).free / 1e6:.1f} MB free in {folder}"
    except OSError:
        free = f"free space in {folder} unknown"
    return f"{path}: no space left on device ({free}); free some space or choose another --out"


def is_no_space(err: BaseException) -> bool:
    """True for an ENOSPC / EDQUOT ``OSError`` (also when re-raised through a worker pool)."""
    return isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT)


def _cache_bytes_needed(n: int, size: int) -> int:
    """Bytes the work arrays and the final arrays of ``n`` rows need (worst case: one copy when rows fail)."""
    per_row = sum(dtype.itemsize * int(np.prod(fmt.row_shape(name, size), dtype=np.int64))
                  for name, (dtype, _) in fmt.ROW_ARRAYS.items())
    per_row += len(LABELS) + 8  # labels, box offsets
    return int(n * per_row)


def check_free_space(out_dir: Path, needed: int) -> None:
    """Raise :class:`GrenError` when ``out_dir``'s file system has less than ``needed`` bytes free (plus margin)."""
    try:
        free = shutil.disk_usage(out_dir).free
    except OSError:
        return
    want = int(needed * _SPACE_MARGIN) + _SPACE_SLACK
    if free < want:
        raise GrenError(f"{out_dir}: not enough free space for the cache: about {want / 1e6:.1f} MB needed, "
                        f"{free / 1e6:.1f} MB free; free some space, or choose another --out (or a smaller --size)")


def reserve_file(path: Path) -> None:
    """Allocate the blocks of ``path`` now (``posix_fallocate``), so that writing into its memory map
    later cannot hit a full disk (which kills the process with SIGBUS). Raises :class:`GrenError`
    naming the file when the space is not there."""
    fallocate = getattr(os, "posix_fallocate", None)
    if fallocate is None:  # macOS, Windows: fall back to the free-space check done before
        return
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError as err:
        raise GrenError(f"{path}: cannot open for writing ({err.strerror or err})") from err
    try:
        length = os.fstat(fd).st_size
        if length:
            fallocate(fd, 0, length)
    except OSError as err:
        if is_no_space(err):
            raise GrenError(no_space_message(path)) from err
        if err.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            raise GrenError(f"{path}: cannot reserve {length / 1e6:.1f} MB ({err.strerror or err})") from err
    finally:
        os.close(fd)


def _open_reserved_memmap(path: Path, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
    """A new ``.npy`` memory map at ``path`` whose blocks are reserved on disk (see :func:`reserve_file`)."""
    array = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)
    array.flush()
    del array
    reserve_file(path)
    return np.load(path, mmap_mode="r+")


class _ChunkTask(NamedTuple):
    chunk: int
    start: int
    stop: int
    image_ids: tuple[str, ...]
    paths: tuple[str, ...]
    mask_paths: tuple[str, ...]


class _ChunkWriter:
    """Processes chunks: decode + resize, masks, hashes; fills the work arrays and writes the marker.

    One per process (the pool initializer builds it); the segmenter and the memory-mapped work arrays
    are opened on first use.
    """

    def __init__(self, work_dir: Path, size: int, lungs: LungsSpec):
        self.work_dir = Path(work_dir)
        self.size = size
        self.lungs = lungs
        self._segmenter = None
        self._arrays: dict[str, np.ndarray] = {}

    def _array(self, name: str) -> np.ndarray:
        if name not in self._arrays:
            self._arrays[name] = np.load(self.work_dir / f"{name}.npy", mmap_mode="r+")
        return self._arrays[name]

    def _segment(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self._segmenter is None:
            from gren.lungs.segment import load_segmenter

            self._segmenter = load_segmenter(self.lungs.segmenter)
        masks, fallback = self._segmenter.segment(images)
        return _as_numpy(masks, np.uint8), _as_numpy(fallback, np.bool_).reshape(-1)

    def process(self, task: _ChunkTask) -> dict[str, Any]:
        """Fill rows ``task.start:task.stop`` of the work arrays; returns the chunk's marker dict."""
        size = self.size
        n = task.stop - task.start
        images = np.zeros((n, size, size), dtype=np.uint8)
        masks = np.zeros((n, size, size), dtype=np.uint8)
        decoded = np.zeros(n, dtype=bool)
        mask_source = [""] * n
        failed: list[dict[str, Any]] = []
        bad_masks: list[dict[str, Any]] = []
        for j in range(n):
            try:
                images[j] = read_gray_resized(task.paths[j], size)
            except Exception as err:  # noqa: BLE001 - any undecodable file is skipped and reported, never fatal
                failed.append({"row": task.start + j, "image_id": task.image_ids[j], "path": task.paths[j],
                               "error": str(err)})
                continue
            decoded[j] = True
            mask_path = task.mask_paths[j]
            if self.lungs.use_dataset_masks and mask_path:
                try:
                    mask = read_mask(mask_path, size)
                except Exception as err:  # noqa: BLE001 - a bad mask falls back to segmentation
                    bad_masks.append({"image_id": task.image_ids[j], "path": mask_path, "error": str(err)})
                    continue
                if int(mask.max(initial=0)) > 2:
                    bad_masks.append({"image_id": task.image_ids[j], "path": mask_path,
                                      "error": f"values up to {int(mask.max())}, expected 0/1/2"})
                    continue
                masks[j] = mask
                mask_source[j] = "dataset"
        fallback = np.zeros(n, dtype=bool)
        to_segment = np.flatnonzero(decoded & np.array([s == "" for s in mask_source], dtype=bool))
        if to_segment.size:
            seg_masks, seg_fallback = self._segment(images[to_segment])
            masks[to_segment] = seg_masks
            fallback[to_segment] = seg_fallback
            for j in to_segment:
                mask_source[j] = self.lungs.segmenter_name
        hashes = np.zeros((n, 2, 64), dtype=bool)
        ok = np.flatnonzero(decoded)
        if ok.size:
            ok_hashes, hash_fallback = _lung_hashes(images[ok], masks[ok])
            hashes[ok] = ok_hashes
            fallback[ok] |= hash_fallback
        rows = slice(task.start, task.stop)
        for name, values in (("images", images), ("lung_masks", masks), ("lung_hashes", hashes),
                             ("lung_fallback", fallback)):
            target = self._array(name)
            target[rows] = values
            target.flush()
        marker = {"chunk": task.chunk, "start": task.start, "stop": task.stop, "failed": failed,
                  "bad_masks": bad_masks, "mask_source": mask_source, "decoded": int(n)}
        fmt.write_json_atomic(_marker_path(self.work_dir, task.chunk), marker)
        return marker


def _lung_hashes(images: np.ndarray, masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """:func:`gren.lungs.regions.lung_hashes` of uint8 (B, S, S) images and masks -> (bool (B, 2, 64),
    bool (B,): a lung of the image was empty or tiny in its mask and got the prior box)."""
    from gren.lungs.regions import lung_hashes

    hashes, fallback = lung_hashes(images, masks, return_fallback=True)
    fallback = _as_numpy(fallback, np.bool_).reshape(len(images), -1).any(axis=1)
    return _as_numpy(hashes, np.bool_).reshape(len(images), 2, 64), fallback


def _as_numpy(values: Any, dtype: Any) -> np.ndarray:
    if hasattr(values, "detach"):
        values = values.detach().cpu().numpy()
    return np.asarray(values).astype(dtype, copy=False)


def _marker_path(work_dir: Path, chunk: int) -> Path:
    return work_dir / fmt.CHUNKS_DIR / f"{chunk:06d}.json"


_POOL_WRITER: _ChunkWriter | None = None


def _pool_init(work_dir: Path, size: int, lungs: LungsSpec) -> None:
    global _POOL_WRITER
    import torch

    torch.set_num_threads(1)
    _POOL_WRITER = _ChunkWriter(work_dir, size, lungs)


def _pool_process(task: _ChunkTask) -> dict[str, Any]:
    assert _POOL_WRITER is not None, "pool initializer did not run"
    return _POOL_WRITER.process(task)


def _params(size: int, lungs: LungsSpec, stamp: dict[str, Any]) -> dict[str, Any]:
    return {"size": int(size), "lungs": lungs.spec, "source_sha256": stamp["sha256"], "version": fmt.FORMAT_VERSION}


def _describe_difference(old: dict[str, Any], new: dict[str, Any]) -> str:
    names = {"size": "size", "lungs": "lungs spec", "source_sha256": "source folder contents", "version": "format version"}
    return ", ".join(f"{names[k]} {old.get(k)!r} -> {new[k]!r}" if k != "source_sha256" else names[k]
                     for k in new if old.get(k) != new[k])


def _clear_cache_files(out_dir: Path) -> None:
    """Remove what a cache consists of (and nothing else) from ``out_dir``."""
    for name in fmt.CACHE_FILES:
        (out_dir / name).unlink(missing_ok=True)
    shutil.rmtree(out_dir / fmt.WORK_DIR, ignore_errors=True)


def _bind_output(out_dir: Path, params: dict[str, Any], force: bool) -> dict[str, Any] | None:
    """Check ``out_dir`` against ``params``; returns its meta when it is a complete cache of them.

    Raises :class:`GrenError` when ``out_dir`` holds something else (another cache without ``force``,
    or files that are not a cache at all).
    """
    meta = fmt.read_meta(out_dir) if out_dir.is_dir() else None
    if meta is None:
        if out_dir.is_dir() and any(p.name != fmt.LOCK_FILE for p in out_dir.iterdir()):
            raise GrenError(f"{out_dir} is not empty and is not a gren cache; choose an empty or new folder for --out")
        return None
    old = meta.get("params", {})
    if old != params:
        if not force:
            raise GrenError(
                f"{out_dir} holds a cache prepared with other parameters ({_describe_difference(old, params)}); "
                "use another --out folder, or --force to replace it")
        log.warning("%s: replacing a cache prepared with other parameters (%s)", out_dir,
                    _describe_difference(old, params))
        _clear_cache_files(out_dir)
        return None
    if meta.get("complete"):
        return meta
    return None


def _chunks(records: pd.DataFrame, chunk_size: int) -> list[_ChunkTask]:
    ids = records["image_id"].astype(str).tolist()
    paths = records["path"].astype(str).tolist()
    masks = records["mask_path"].fillna("").astype(str).tolist() if "mask_path" in records else [""] * len(ids)
    tasks = []
    for chunk, start in enumerate(range(0, len(ids), chunk_size)):
        stop = min(start + chunk_size, len(ids))
        tasks.append(_ChunkTask(chunk, start, stop, tuple(ids[start:stop]), tuple(paths[start:stop]),
                                tuple(masks[start:stop])))
    return tasks


def _setup_work(out_dir: Path, image_ids: list[str], size: int) -> Path:
    """Create (or validate, when resuming) ``out_dir/work``: preallocated row arrays and the id list."""
    work = out_dir / fmt.WORK_DIR
    ids_path = work / fmt.WORK_IDS_FILE
    if ids_path.is_file():
        with open(ids_path, encoding="utf-8") as handle:
            previous = json.load(handle).get("image_ids")
        # An interrupted finalisation may already have moved some arrays up into out_dir.
        if previous == image_ids and all((work / f"{name}.npy").is_file() or (out_dir / f"{name}.npy").is_file()
                                         for name in fmt.ROW_ARRAYS):
            return work
        log.warning("%s: unfinished work from another image listing; starting over", out_dir)
        shutil.rmtree(work)
    (work / fmt.CHUNKS_DIR).mkdir(parents=True, exist_ok=True)
    n = len(image_ids)
    check_free_space(out_dir, 2 * _cache_bytes_needed(n, size))  # work arrays, and a copy if rows fail
    for name, (dtype, _) in fmt.ROW_ARRAYS.items():
        array = _open_reserved_memmap(work / f"{name}.npy", dtype, (n, *fmt.row_shape(name, size)))
        del array
    fmt.write_json_atomic(ids_path, {"image_ids": image_ids})
    return work


def _run_chunks(tasks: list[_ChunkTask], work: Path, size: int, lungs: LungsSpec, workers: int,
                progress: bool) -> list[dict[str, Any]]:
    """Process ``tasks`` (in-process when ``workers <= 1``); returns their markers."""
    stall_after = int(os.environ.get(STALL_AFTER_CHUNKS_ENV, "0") or 0)
    results = []
    total_images = sum(t.stop - t.start for t in tasks)
    bar = progress_bar(total=total_images, unit="img", desc="prepare: decode, segment, hash",
                       disable=not progress, logger=log)
    try:
        if workers <= 1:
            writer = _ChunkWriter(work, size, lungs)
            iterator = (writer.process(task) for task in tasks)
            pool = None
        else:
            pool = multiprocessing.get_context("fork").Pool(workers, initializer=_pool_init,
                                                            initargs=(work, size, lungs))
            iterator = pool.imap_unordered(_pool_process, tasks)
        try:
            for marker in iterator:
                results.append(marker)
                bar.update(marker["stop"] - marker["start"])
                log.debug("chunk %d (rows %d-%d) done, %d unreadable", marker["chunk"], marker["start"],
                          marker["stop"], len(marker["failed"]))
                if stall_after and len(results) == stall_after:
                    log.warning("%s=%d: stalling after %d chunks (test hook)", STALL_AFTER_CHUNKS_ENV,
                                stall_after, len(results))
                    time.sleep(3600)
        finally:
            if pool is not None:
                pool.terminate()
                pool.join()
    finally:
        bar.close()
    return results


def _scaled_boxes(index_boxes: pd.DataFrame, records: pd.DataFrame, size: int
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Boxes of ``records`` (in order) in S pixels: (float32 (M, 4), int64 (M,), int64 offsets (N + 1,))."""
    by_image: dict[str, list[tuple[float, float, float, float, int]]] = {}
    if index_boxes is not None and len(index_boxes):
        for row in index_boxes.itertuples(index=False):
            label = LABEL_INDEX.get(str(row.label))
            if label is None:
                continue
            by_image.setdefault(str(row.image_id), []).append(
                (float(row.x1), float(row.y1), float(row.x2), float(row.y2), label))
    boxes: list[tuple[float, float, float, float]] = []
    labels: list[int] = []
    offsets = np.zeros(len(records) + 1, dtype=np.int64)
    for i, row in enumerate(records.itertuples(index=False)):
        sx, sy = size / float(row.width), size / float(row.height)
        for x1, y1, x2, y2, label in by_image.get(str(row.image_id), []):
            boxes.append((x1 * sx, y1 * sy, x2 * sx, y2 * sy))
            labels.append(label)
        offsets[i + 1] = len(boxes)
    box_array = np.clip(np.asarray(boxes, dtype=np.float32).reshape(-1, 4), 0.0, float(size))
    return box_array, np.asarray(labels, dtype=np.int64), offsets


def _save_npy_atomic(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        np.save(handle, array)


def _finalise(out_dir: Path, work: Path, index: Any, records: pd.DataFrame, markers: list[dict[str, Any]],
              size: int, progress: bool = True) -> dict[str, Any]:
    """Turn the filled work arrays into the final cache (everything but ``meta.json``); returns counts."""
    failed = sorted((f for m in markers for f in m["failed"]), key=lambda f: f["row"])
    failed_rows = {f["row"] for f in failed}
    mask_source = [""] * len(records)
    for marker in markers:
        mask_source[marker["start"]:marker["stop"]] = marker["mask_source"]
    keep = np.array([i for i in range(len(records)) if i not in failed_rows], dtype=np.int64)
    for name in fmt.ROW_ARRAYS:
        source, target = work / f"{name}.npy", out_dir / f"{name}.npy"
        if not source.is_file():  # moved by an earlier, interrupted finalisation
            continue
        if not failed_rows:
            os.replace(source, target)
            continue
        full = np.load(source, mmap_mode="r")
        tmp = target.with_name(f".{target.name}.tmp")
        kept = _open_reserved_memmap(tmp, full.dtype, (len(keep), *full.shape[1:]))
        for start in progress_bar(range(0, len(keep), 1024), desc=f"prepare: compact {name}", unit="block",
                                  disable=not progress or len(keep) < 20_000, logger=log):
            kept[start:start + 1024] = full[keep[start:start + 1024]]
        kept.flush()
        del kept, full
        os.replace(tmp, target)
    kept_records = records.iloc[keep].reset_index(drop=True).copy()
    fallback = np.load(out_dir / "lung_fallback.npy", mmap_mode="r")
    kept_records["lung_fallback"] = np.asarray(fallback, dtype=bool)
    kept_records["mask_source"] = [mask_source[i] for i in keep]
    labels = np.asarray(index.label_matrix(), dtype=np.uint8).reshape(len(records), len(LABELS))[keep]
    boxes, box_labels, offsets = _scaled_boxes(getattr(index, "boxes", None), kept_records, size)
    for name, array in (("labels", labels), ("boxes", boxes), ("box_labels", box_labels), ("box_offsets", offsets)):
        _save_npy_atomic(out_dir / f"{name}.npy", array)
    dtypes = fmt.write_records(kept_records, out_dir / fmt.RECORDS_FILE)
    sources = pd.Series(kept_records["mask_source"]).value_counts().to_dict()
    return {
        "n_images": int(len(keep)),
        "n_failed": len(failed),
        "failures": failed,
        "bad_masks": [b for m in markers for b in m.get("bad_masks", [])],
        "mask_sources": {str(k): int(v) for k, v in sources.items()},
        "n_fallback": int(kept_records["lung_fallback"].sum()),
        "n_boxes": int(len(boxes)),
        "records_dtypes": dtypes,
    }


def _read_markers(work: Path) -> dict[int, dict[str, Any]]:
    markers = {}
    for path in sorted((work / fmt.CHUNKS_DIR).glob("*.json")):
        try:
            with open(path, encoding="utf-8") as handle:
                marker = json.load(handle)
            markers[int(marker["chunk"])] = marker
        except (OSError, ValueError, KeyError) as err:
            log.warning("%s: unreadable chunk marker (%s); the chunk is redone", path, err)
    return markers


def _index_failures(index: Any) -> list[dict[str, Any]]:
    """Images the index left out because their header could not be read, as failure dicts."""
    failures = []
    for problem in getattr(index, "problems", []):
        if getattr(problem, "kind", "") == "unreadable":
            failures.append({"row": -1, "image_id": Path(problem.file).stem, "path": str(problem.file),
                             "error": f"{problem.file}: {problem.message}"})
    return failures


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.iterdir() if p.is_file())


def prepare_cache(
    data_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    size: int = 256,
    lungs: str = "auto",
    workers: int | None = None,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    force: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Prepare the NIH-layout folder ``data_dir`` into the cache directory ``out_dir``.

    ``size``: side S in pixels of the cached images and masks. ``lungs``: ``auto`` (the dataset's
    ``masks/<stem>.png`` where present, else the shipped lung U-Net), ``masks`` (as auto, but the
    folder must have a ``masks/`` directory), ``classical``, ``unet`` (the shipped U-Net) or
    ``unet:PATH`` (segment every image); see :class:`LungsSpec`.
    ``workers``: processes (default: CPU count; ``<= 1`` runs in this process). ``chunk_size``: images
    per unit of work and of resumption. ``force``: replace a cache of other parameters in ``out_dir``.

    Returns a summary dict: ``cache``, ``size``, ``lungs``, ``n_listed``, ``n_images``, ``n_failed``,
    ``failures`` (``image_id``, ``path``, ``error`` each), ``n_missing``, ``mask_sources``, ``n_fallback``,
    ``n_boxes``, ``chunks_total``, ``chunks_processed``, ``chunks_skipped``, ``images_decoded``,
    ``seconds``, ``images_per_s``, ``bytes``, ``bytes_per_image``, ``reused`` (an already complete cache).
    Raises :class:`GrenError` / :class:`DataError` with a message for the user on bad input.
    """
    started = time.perf_counter()
    data_dir, out_dir = Path(data_dir).expanduser().resolve(), Path(out_dir).expanduser().resolve()
    size = int(size)
    if size < 8:
        raise GrenError(f"--size {size}: expected at least 8 pixels")
    if chunk_size < 1:
        raise GrenError(f"chunk_size {chunk_size}: expected at least 1")
    lungs_spec = LungsSpec.parse(lungs)
    if not data_dir.is_dir():
        raise DataError(f"{data_dir}: data folder not found")
    if out_dir.exists() and not out_dir.is_dir():
        raise GrenError(f"--out {out_dir}: exists and is not a folder; expected a new, empty or cache folder")
    if lungs_spec.mode == "masks" and not (data_dir / "masks").is_dir():
        raise DataError(f"{data_dir}: --lungs masks needs a masks/ folder with <stem>.png lung masks")
    workers = (os.cpu_count() or 1) if workers is None else int(workers)

    log.info("prepare: scanning %s", data_dir)
    stamp = source_stamp(data_dir, exclude=(out_dir,))
    params = _params(size, lungs_spec, stamp)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        with _exclusive(out_dir):
            return _prepare_locked(data_dir, out_dir, size, lungs_spec, workers, chunk_size, force, progress,
                                   stamp, params, started)
    except OSError as err:
        if is_no_space(err):
            raise GrenError(no_space_message(Path(err.filename) if err.filename else out_dir) +
                            "; the partial cache is kept and a rerun resumes it") from err
        raise GrenError(f"{err.filename or out_dir}: {err.strerror or err} (while preparing the cache "
                        f"{out_dir})") from err


@contextlib.contextmanager
def _exclusive(out_dir: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``out_dir`` (several processes, e.g. DDP ranks, preparing the same cache:
    the first prepares, the others wait and then find it complete). No-op where ``fcntl`` is missing."""
    try:
        import fcntl
    except ImportError:  # Windows
        yield
        return
    with open(out_dir / fmt.LOCK_FILE, "a+") as handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            log.info("%s: another process is preparing this cache; waiting for it", out_dir)
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _prepare_locked(data_dir: Path, out_dir: Path, size: int, lungs_spec: LungsSpec, workers: int,
                    chunk_size: int, force: bool, progress: bool, stamp: dict[str, Any], params: dict[str, Any],
                    started: float) -> dict[str, Any]:
    """The body of :func:`prepare_cache`, run under the output folder's lock."""
    complete = _bind_output(out_dir, params, force)
    if complete is not None:
        summary = dict(complete["summary"])
        summary.update(cache=str(out_dir), reused=True, chunks_processed=0, chunks_skipped=summary["chunks_total"],
                       images_decoded=0, seconds=round(time.perf_counter() - started, 3))
        log.info("%s: cache already complete (%d images); nothing to do", out_dir, summary["n_images"])
        return summary

    from gren.data.nih import load_index

    index = load_index(data_dir, on_bad_image="skip")
    records = index.records.reset_index(drop=True)
    if not len(records):
        raise DataError(f"{data_dir}: no listed image was found on disk; nothing to prepare")
    image_ids = records["image_id"].astype(str).tolist()
    missing = list(getattr(index, "missing", []))  # load_index has logged them

    meta = fmt.read_meta(out_dir)
    if meta is None or "chunk_size" not in meta:
        meta = {"format": fmt.FORMAT, "params": params, "complete": False, "chunk_size": int(chunk_size),
                "data_dir": str(data_dir), "gren_version": gren.__version__}
        fmt.write_json_atomic(out_dir / fmt.META_FILE, meta)
    elif meta["chunk_size"] != chunk_size:
        log.info("resuming with the interrupted run's chunk size %d", meta["chunk_size"])
    chunk_size = int(meta["chunk_size"])
    work = _setup_work(out_dir, image_ids, size)

    tasks = _chunks(records, chunk_size)
    done = {k: m for k, m in _read_markers(work).items() if k < len(tasks)}
    pending = [t for t in tasks if t.chunk not in done]
    if done:
        log.info("%s: resuming; %d of %d chunks already done", out_dir, len(done), len(tasks))
    log.info("preparing %d images from %s into %s (size %d, lungs %s, %d workers)",
             sum(t.stop - t.start for t in pending), data_dir, out_dir, size, lungs_spec.spec, workers)
    new_markers = _run_chunks(pending, work, size, lungs_spec, min(workers, max(len(pending), 1)), progress)
    for marker in new_markers:
        done[marker["chunk"]] = marker
    markers = [done[k] for k in sorted(done)]

    log.info("prepare: writing the cache arrays into %s", out_dir)
    counts = _finalise(out_dir, work, index, records, markers, size, progress)
    counts["failures"] = _index_failures(index) + counts["failures"]
    counts["n_failed"] = len(counts["failures"])
    if counts["n_images"] == 0:
        raise DataError(f"{data_dir}: none of the {len(records)} images could be decoded (e.g. "
                        f"{counts['failures'][0]['error']}); nothing to train on")
    for failure in counts["failures"][:_MAX_LOGGED_FAILURES]:
        log.warning("skipped unreadable image %s", failure["error"])
    if counts["n_failed"] > _MAX_LOGGED_FAILURES:
        log.warning("... and %d more unreadable images", counts["n_failed"] - _MAX_LOGGED_FAILURES)
    if counts["bad_masks"]:
        log.warning("%d dataset masks were unusable and were replaced by segmentation (e.g. %s)",
                    len(counts["bad_masks"]), counts["bad_masks"][0]["error"])
    seconds = time.perf_counter() - started
    decoded = sum(m["decoded"] for m in new_markers)
    summary = {
        "cache": str(out_dir),
        "data_dir": str(data_dir),
        "size": size,
        "lungs": lungs_spec.spec,
        "hash_source": f"{size}x{size} cached image and masks",
        "n_listed": len(records) + len(missing),
        "n_missing": len(missing),
        "n_images": counts["n_images"],
        "n_failed": counts["n_failed"],
        "failures": [{k: f[k] for k in ("image_id", "path", "error")} for f in counts["failures"]],
        "n_bad_masks": len(counts["bad_masks"]),
        "mask_sources": counts["mask_sources"],
        "n_fallback": counts["n_fallback"],
        "n_boxes": counts["n_boxes"],
        "chunks_total": len(tasks),
        "chunks_processed": len(new_markers),
        "chunks_skipped": len(tasks) - len(new_markers),
        "images_decoded": decoded,
        "seconds": round(seconds, 3),
        "images_per_s": round(decoded / seconds, 2) if seconds > 0 else None,
        "reused": False,
    }
    summary["bytes"] = _dir_bytes(out_dir)
    summary["bytes_per_image"] = round(summary["bytes"] / max(counts["n_images"], 1), 1)
    meta.update(complete=True, n_images=counts["n_images"], records_dtypes=counts["records_dtypes"],
                summary=summary, stamp=stamp)
    fmt.write_json_atomic(out_dir / fmt.META_FILE, meta)
    shutil.rmtree(work, ignore_errors=True)
    log.info("prepared %d images into %s (%d unreadable skipped, %.1f s)", counts["n_images"], out_dir,
             counts["n_failed"], seconds)
    return summary
