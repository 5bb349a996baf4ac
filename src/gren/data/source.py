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

from gren.data import cache_format as fmt
from gren.data.cache import PreparedCache
from gren.data.prepare import LungsSpec, prepare_cache
from gren.errors import DataError

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


def user_cache_root() -> Path:
    """``$XDG_CACHE_HOME/gren`` (``~/.cache/gren`` when unset): where caches of read-only folders go."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "gren"


def default_cache_dir(data_dir: str | os.PathLike, size: int, lungs: str) -> Path:
    """Where :func:`open_prepared` puts the cache of the raw folder ``data_dir`` (nothing is created
    except, to test writability, ``data_dir/.gren_cache``)."""
    data_dir = Path(data_dir).expanduser().resolve()
    name = f"s{int(size)}_{_lungs_tag(LungsSpec.parse(lungs))}"
    if _writable(data_dir):
        return data_dir / CACHE_SUBDIR / name
    digest = hashlib.sha1(str(data_dir).encode()).hexdigest()[:16]
    return user_cache_root() / digest / name


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
    if PreparedCache.is_cache(path):
        meta = fmt.read_meta(path) or {}
        if not meta.get("complete"):
            data_dir = meta.get("data_dir")
            params = meta.get("params", {})
            if not data_dir or not Path(data_dir).is_dir():
                PreparedCache(path)  # raises the "incomplete cache: rerun gren prepare" message
            log.info("%s: resuming an interrupted prepare from %s", path, data_dir)
            prepare_cache(data_dir, path, size=params["size"], lungs=params["lungs"], workers=workers)
        cache = PreparedCache(path)
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
