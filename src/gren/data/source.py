"""Open what the user points at as a :class:`PreparedCache`: a cache folder as is, a raw folder prepared on first use.

``gren train --data DIR|CACHE`` and ``gren evaluate`` call :func:`open_prepared`; a raw NIH-layout folder
is prepared once into ``DIR/.gren_cache/s<S>_<lungs>`` (or, when ``DIR`` is not writable, into
``$XDG_CACHE_HOME/gren/<hash of DIR>/s<S>_<lungs>``, ``~/.cache`` by default) and reused afterwards.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from pathlib import Path

from gren.core.errors import DataError
from gren.core.paths import user_cache_dir
from gren.data import cache_format as fmt
from gren.data.cache import PreparedCache
from gren.data.prepare import LungsSpec, prepare_cache

log = logging.getLogger(__name__)

CACHE_SUBDIR = ".gren_cache"


def _lungs_tag(spec: LungsSpec) -> str:
    """A folder-name-safe tag of a lungs spec: ``auto``, ``masks``, ``classical``, ``unet`` (the shipped
    model: its hash is in the cache's recorded spec, so a new one re-prepares the same folder),
    ``unet-<hash of PATH>``."""
    if spec.spec.startswith("unet:"):
        return "unet-" + hashlib.sha1(spec.spec.encode()).hexdigest()[:10]
    return re.sub(r"[^A-Za-z0-9_.-]", "-", spec.mode)


def _writable(folder: Path) -> bool:
    target = folder / CACHE_SUBDIR
    try:
        target.mkdir(exist_ok=True)
    except OSError:
        return False
    return os.access(target, os.W_OK | os.X_OK)



def default_cache_dir(data_dir: str | os.PathLike, size: int, lungs: str) -> Path:
    """Where :func:`open_prepared` puts the cache of the raw folder ``data_dir`` (nothing is created
    except, to test writability, ``data_dir/.gren_cache``)."""
    data_dir = Path(data_dir).expanduser().resolve()
    name = f"s{int(size)}_{_lungs_tag(LungsSpec.parse(lungs))}"
    if _writable(data_dir):
        return data_dir / CACHE_SUBDIR / name
    digest = hashlib.sha1(str(data_dir).encode()).hexdigest()[:16]
    return user_cache_dir() / digest / name


def open_prepared(path: str | os.PathLike, size: int | None = 256, lungs: str = "auto",
                  workers: int | None = None) -> PreparedCache:
    """A :class:`PreparedCache` for ``path``.

    * ``path`` is a cache folder: opened as is. ``size`` (pixels) must match the cache's unless it is
      ``None``; a mismatch is a :class:`DataError` saying how to fix it. An interrupted cache is resumed
      from the data folder recorded in it.
    * ``path`` is a raw NIH-layout folder: prepared on first use with ``size`` (256 when ``None``),
      ``lungs`` and ``workers`` (see :func:`gren.data.prepare.prepare_cache`) into
      :func:`default_cache_dir`, then opened; later calls reuse it (a changed folder is re-prepared).
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(f"{path}: no such data or cache folder")
    meta = fmt.read_meta(path) if path.is_dir() else None  # read once; handed to PreparedCache
    if meta is not None:
        if not meta.get("complete"):
            data_dir = meta.get("data_dir")
            params = meta.get("params", {})
            if not data_dir or not Path(data_dir).is_dir():
                PreparedCache(path)  # raises the "incomplete cache: rerun gren prepare" message
            log.info("%s: resuming an interrupted prepare from %s", path, data_dir)
            prepare_cache(data_dir, path, size=params["size"], lungs=params["lungs"], workers=workers)
            meta = None  # rewritten by prepare
        cache = PreparedCache(path, meta=meta)
        if size is not None and cache.size != int(size):
            raise DataError(f"{path}: cache prepared at size {cache.size}, but size {size} was asked for; "
                            f"use size {cache.size} or prepare the data again with --size {size}")
        if lungs not in ("auto", cache.lungs):
            log.warning("%s: cache has lung masks from %r, not %r; using the cache's", path, cache.lungs, lungs)
        return cache
    size = 256 if size is None else int(size)
    cache_dir = default_cache_dir(path, size, lungs)
    if PreparedCache.is_complete(cache_dir):
        log.info("%s: using the prepared cache %s", path, cache_dir)
    else:
        log.info("%s: raw data folder; preparing it once into %s", path, cache_dir)
    # prepare_cache returns at once when the cache is complete and the folder unchanged.
    prepare_cache(path, cache_dir, size=size, lungs=lungs, workers=workers, force=True)
    return PreparedCache(cache_dir)


def _cached_failures(data_dir: Path) -> tuple[set[str], Path] | None:
    """Image ids that a complete cache of ``data_dir``'s current contents could not decode, and that
    cache; ``None`` when there is no such cache (in ``DIR/.gren_cache`` or the user cache)."""
    from gren.data.prepare import source_stamp

    roots = [data_dir / CACHE_SUBDIR,
             user_cache_dir() / hashlib.sha1(str(data_dir).encode()).hexdigest()[:16]]
    candidates = [p for root in roots if root.is_dir() for p in sorted(root.iterdir()) if p.is_dir()]
    complete = []
    for candidate in candidates:
        try:
            if PreparedCache.is_complete(candidate):
                complete.append(candidate)
        except DataError as err:  # a damaged cache is no source of truth; the images are decoded instead
            log.warning("%s", err)
    if not complete:
        return None
    sha = source_stamp(data_dir)["sha256"]
    for cache_dir in complete:
        meta = fmt.read_meta(cache_dir) or {}
        if meta.get("params", {}).get("source_sha256") == sha:
            failures = meta.get("summary", {}).get("failures", [])
            return {str(f["image_id"]) for f in failures}, cache_dir
    return None


def _undecodable(records, progress: bool = True) -> set[str]:
    """Image ids of ``records`` whose file cannot be decoded (what prepare skips), found by decoding each."""
    from gren.core.errors import ImageReadError
    from gren.core.imageio import read_gray
    from gren.core.progress import progress as progress_bar

    bad = set()
    rows = list(zip(records["image_id"].astype(str), records["path"].astype(str)))
    for image_id, path in progress_bar(rows, desc="data split: decoding images", unit="img", disable=not progress,
                                       logger=log):
        try:
            read_gray(path)
        except ImageReadError as err:
            log.warning("left out of the split, as training leaves it out: %s", err)
            bad.add(image_id)
    return bad


def split_records(path: str | os.PathLike, *, strict: bool = False, progress: bool = True):
    """The records (DataFrame: ``image_id``, ``patient_id``, ``annotated``, ...) that training on
    ``path`` uses, so that ``gren data split`` deals out exactly the images ``gren train`` sees.

    * ``path`` is a prepared cache: its records (what training reads from it).
    * ``path`` is a raw folder: the index (images whose header cannot be read left out, as
      ``prepare`` does), minus the images that ``prepare`` could not decode (truncated, corrupt). These
      come from a complete cache of the folder's current contents when there is one (no decoding),
      else by decoding every listed image once.

    Returns ``(records, data_dir)``. Why it matters: the folds are dealt from the list of images, so
    one image more or less moves many others to another role.
    """
    from gren.data.nih import load_index

    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(f"{path}: no such data or cache folder")
    if PreparedCache.is_cache(path):
        cache = PreparedCache(path)
        return cache.records, Path(cache.meta.get("data_dir") or path)
    index = load_index(path, strict=strict, on_bad_image="skip")
    records = index.records
    found = _cached_failures(path.resolve())
    if found is not None:
        failed, cache_dir = found
        log.info("%s: %d undecodable image(s) left out, as recorded by the prepared cache %s", path, len(failed),
                 cache_dir)
    else:
        log.info("%s: decoding the %d images once to leave out those training cannot read "
                 "(a prepared cache of this folder makes this unnecessary)", path, len(records))
        failed = _undecodable(records, progress)
    if strict and failed:
        raise DataError(f"{path}: {len(failed)} undecodable image(s) (strict mode), e.g. {sorted(failed)[0]}")
    if failed:
        log.warning("%d image(s) that cannot be decoded are left out of the split (as training leaves them out)",
                    len(failed))
        records = records[~records["image_id"].astype(str).isin(failed)].reset_index(drop=True)
    return records, Path(index.data_dir)
