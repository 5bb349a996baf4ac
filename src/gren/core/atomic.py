"""Atomic file writes, one helper for every writer: a temporary file with a unique name beside the
target, flushed and fsync'ed, then ``os.replace`` -- a reader sees the old file or the new one, never
half of one, and two writers never share a temporary file.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a unique temporary path beside ``path``; on success it replaces ``path``, on error it is removed.

    For writers that want a path (``torch.save``, ``np.save``, ``PIL.Image.save``). The parent folder is
    created when missing.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(handle)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as done:
            os.fsync(done.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def unique_temp_path(path: str | os.PathLike, suffix: str = ".tmp") -> Path:
    """A new, empty temporary file beside ``path`` with a unique name (for writers that manage the replace)."""
    path = Path(path)
    handle, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(handle)
    return Path(tmp_name)


def atomic_write(path: str | os.PathLike, write: Callable[[IO], Any], mode: str = "w",
                 encoding: str | None = "utf-8") -> Path:
    """Call ``write(handle)`` on a temporary file and move it to ``path`` atomically; returns ``path``."""
    path = Path(path)
    with atomic_path(path) as tmp:
        with open(tmp, mode, encoding=None if "b" in mode else encoding) as handle:
            write(handle)
    return path


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return atomic_write(path, lambda handle: handle.write(text))


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically."""
    return atomic_write(path, lambda handle: handle.write(data), mode="wb")


def write_json_atomic(path: str | os.PathLike, payload: Any, indent: int | None = 2, sort_keys: bool = False) -> Path:
    """Write ``payload`` as JSON (one trailing newline) to ``path`` atomically."""
    return write_text_atomic(path, json.dumps(payload, indent=indent, sort_keys=sort_keys) + "\n")
