"""Where things are: the shared real-data folder used by tests and benchmarks."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[3]


def shared_data_dir() -> Path:
    """``$GREN_SHARED_DATA`` when set, else ``../shared/data`` beside the repository root.

    The returned path may not exist (a user's machine); callers check.
    """
    env = os.environ.get("GREN_SHARED_DATA")
    if env:
        return Path(env)
    return REPO_ROOT.parent / "shared" / "data"


def user_cache_dir() -> Path:
    """The user's gren cache folder: ``$GREN_CACHE_DIR`` when set, else ``$XDG_CACHE_HOME/gren``
    (``~/.cache/gren``). Prepared caches of read-only folders and converted weights go below it."""
    root = os.environ.get("GREN_CACHE_DIR")
    if root:
        return Path(root).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "gren"
