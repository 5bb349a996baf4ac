"""Output folders that never lose data: run markers, run locks and manifests of what gren wrote.

Three tools, used by every command that writes into a folder the user names (docs/training.md, "The run
folder"; docs/evaluation.md, "Output folders"):

* **Run marker** ``RUN/.gren-run`` (JSON: ``gren_run`` version, ``method``, ``created`` (UTC ISO time),
  ``pid``, ``host``, later ``data``: where the training data came from). ``gren train`` writes it first
  into a new run folder; a non-empty ``--out`` without it (and without the files of a run made before
  markers existed) is refused, so a training never overwrites, appends to or prunes files it did not
  write. :func:`check_run_folder`, :func:`write_run_marker`, :func:`read_run_marker`.
* **Run lock** ``RUN/.lock``: ``fcntl.flock`` held for the whole training (:class:`RunLock`); a second
  ``gren train`` into the same folder gets an error naming the process that holds it. The lock file
  holds the holder's PID (for the message only; the lock is the ``flock``, released by the kernel when
  the holder exits, so a stale file never blocks). Under DDP only rank 0 takes it.
* **Output manifest** ``DIR/.gren-outputs.json`` (:class:`OutputFolder`): the names of the files gren
  commands wrote in ``DIR`` (and which command). Before writing, a command checks every file it is about
  to write: a symbolic link is refused (gren never writes through one), a file listed in the manifest is
  replaced, a file that a command of gren recognises as its own (``recognise(path)``, for folders written
  before manifests existed) is replaced with a warning, and any other existing file is refused with one
  message naming it (it may be the user's data). The names are claimed in the manifest *before* the files
  are written, so an interrupted command can be rerun.

Writes themselves go through :mod:`gren.core.atomic` (a unique temporary file, then ``os.replace``, which
replaces a symbolic link planted at the target instead of following it).
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import socket
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from gren.core.atomic import write_json_atomic
from gren.core.errors import GrenError

log = logging.getLogger(__name__)

RUN_MARKER = ".gren-run"
RUN_LOCK = ".lock"
OUTPUTS_MANIFEST = ".gren-outputs.json"
RUN_MARKER_VERSION = 1
# What a run folder written before markers existed holds (config.yaml plus one of these).
LEGACY_RUN_FILES = ("split.csv", "metrics.jsonl", "checkpoints")


def _utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def folder_entries(folder: Path, ignore: Iterable[str] = ()) -> list[str]:
    """Names in ``folder`` (sorted), without ``ignore``; ``[]`` when it does not exist."""
    if not folder.is_dir():
        return []
    skip = set(ignore)
    return sorted(name for name in os.listdir(folder) if name not in skip)


def read_run_marker(run_dir: str | os.PathLike) -> dict | None:
    """``RUN/.gren-run`` as a dict, ``None`` when absent; an unreadable marker is an error naming it."""
    path = Path(run_dir) / RUN_MARKER
    if path.is_symlink():
        raise GrenError(f"{path}: is a symbolic link; a run marker is a plain file written by gren train")
    if not path.is_file():
        return None
    try:
        marker = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise GrenError(f"{path}: not a gren run marker ({err})") from None
    if not isinstance(marker, dict) or "gren_run" not in marker:
        raise GrenError(f"{path}: not a gren run marker (no 'gren_run' key)")
    return marker


def is_legacy_run(run_dir: Path) -> bool:
    """A run folder made before markers existed: ``config.yaml`` plus a split, metrics or checkpoints."""
    return (run_dir / "config.yaml").is_file() and any((run_dir / name).exists() for name in LEGACY_RUN_FILES)


def check_run_folder(run_dir: str | os.PathLike) -> str:
    """What ``run_dir`` is for ``gren train --out``: ``"new"`` (absent or empty), ``"run"`` (has a marker) or
    ``"legacy"`` (a run from before markers).

    Raises:
        GrenError: ``run_dir`` is a file, a symbolic link to nothing, or a non-empty folder that is not a
            gren run (its files would be overwritten, appended to or pruned).
    """
    run_dir = Path(run_dir)
    if run_dir.is_symlink() and not run_dir.exists():
        raise GrenError(f"--out {run_dir}: a dangling symbolic link; choose a folder")
    if run_dir.exists() and not run_dir.is_dir():
        raise GrenError(f"--out {run_dir}: exists and is not a folder; choose a folder for the run")
    if read_run_marker(run_dir) is not None:
        return "run"
    entries = folder_entries(run_dir, ignore=(RUN_LOCK,))
    if not entries:
        return "new"
    if is_legacy_run(run_dir):
        return "legacy"
    shown = ", ".join(entries[:3]) + (f" and {len(entries) - 3} more" if len(entries) > 3 else "")
    raise GrenError(f"--out {run_dir}: not empty ({shown}) and not a gren run (no {RUN_MARKER}); training there "
                    "would overwrite or delete those files; choose a new or empty folder")


def write_run_marker(run_dir: str | os.PathLike, method: str, **extra) -> dict:
    """Write (or update, keeping ``created``) ``RUN/.gren-run``; returns what was written."""
    run_dir = Path(run_dir)
    previous = read_run_marker(run_dir) or {}
    marker = {"gren_run": RUN_MARKER_VERSION, "method": method, "created": previous.get("created", _utc_now()),
              "pid": os.getpid(), "host": socket.gethostname(), **{k: v for k, v in previous.items()
                                                                 if k not in ("gren_run", "method", "pid", "host")}}
    marker.update(extra)
    write_json_atomic(run_dir / RUN_MARKER, marker)
    return marker


class RunLock:
    """An exclusive ``fcntl.flock`` on ``RUN/.lock`` (context manager; ``acquire()`` / ``release()``).

    Raises:
        GrenError: from :meth:`acquire` when another process holds the lock (its PID named), or when the lock
            file is a symbolic link or cannot be opened.
    """

    def __init__(self, run_dir: str | os.PathLike, what: str = "training"):
        self.path = Path(run_dir) / RUN_LOCK
        self.what = what
        self._fd: int | None = None

    def holder(self) -> str:
        """The PID recorded by the holder ("unknown" when unreadable)."""
        try:
            text = self.path.read_text().strip()
        except OSError:
            return "unknown"
        return text.split()[0] if text else "unknown"

    def acquire(self) -> RunLock:
        import fcntl

        flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
        try:
            fd = os.open(self.path, flags, 0o644)
        except OSError as err:
            if err.errno == errno.ELOOP:
                raise GrenError(f"{self.path}: is a symbolic link; remove it (gren never writes through links)") \
                    from None
            raise GrenError(f"{self.path}: cannot open the run lock ({err.strerror})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise GrenError(f"{self.path.parent}: another process (PID {self.holder()}) is {self.what} this run "
                            "and holds its lock; wait for it to finish or choose another --out") from None
        except OSError as err:  # e.g. a file system without flock
            os.close(fd)
            raise GrenError(f"{self.path}: cannot lock the run folder ({err.strerror})") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} {socket.gethostname()} {_utc_now()}\n".encode())
        os.fsync(fd)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        import fcntl

        with contextlib.suppress(OSError):
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None

    def is_held_elsewhere(self) -> bool:
        """True when another process holds the lock now (tests it without keeping it)."""
        import fcntl

        if not self.path.is_file() or self.path.is_symlink():
            return False
        try:
            fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except OSError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        except OSError:
            return False
        finally:
            os.close(fd)
        return False

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


class OutputFolder:
    """A folder a command writes named files into, with a manifest of what gren wrote there (module docstring).

    ``tool`` names the command (``"gren predict"``) in the manifest and in messages.
    """

    def __init__(self, folder: str | os.PathLike, tool: str):
        self.folder = Path(folder)
        self.tool = tool
        self.manifest_path = self.folder / OUTPUTS_MANIFEST

    def manifest(self) -> dict[str, str]:
        """``{file name: tool that wrote it}`` (empty when there is no manifest)."""
        if self.manifest_path.is_symlink():
            raise GrenError(f"{self.manifest_path}: is a symbolic link; gren's manifest is a plain file")
        if not self.manifest_path.is_file():
            return {}
        try:
            data = json.loads(self.manifest_path.read_text())
            files = data["files"]
            if not isinstance(files, dict):
                raise TypeError("files is not a mapping")
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as err:
            raise GrenError(f"{self.manifest_path}: not a gren output manifest ({err}); move it away or choose "
                            "another output folder") from None
        return {str(k): str(v) for k, v in files.items()}

    def prepare(self, names: Iterable[str], recognise: Callable[[Path], bool] | None = None,
                claim: bool = True) -> list[str]:
        """Check that writing ``names`` in the folder loses nothing, then (``claim``) create the folder and
        claim the names in the manifest (``claim=False``: check only; call :meth:`claim` later).

        Returns the names that already existed (and will be replaced). Nothing is written when a check
        fails.

        Raises:
            GrenError: the folder is a file; a target is a symbolic link, a folder, or an existing file that
                gren did not write (not in the manifest, not recognised).
        """
        names = list(dict.fromkeys(names))
        if self.folder.exists() and not self.folder.is_dir():
            raise GrenError(f"--out {self.folder}: exists and is not a folder")
        manifest = self.manifest()
        replaced, foreign, links = [], [], []
        for name in names:
            path = self.folder / name
            if path.is_symlink():
                links.append(name)
            elif path.is_dir():
                foreign.append(name + "/")
            elif path.exists():
                if name in manifest:
                    replaced.append(name)
                elif recognise is not None and _safe_recognise(recognise, path):
                    log.warning("%s: replacing %s, written by gren before output manifests existed", self.folder,
                                name)
                    replaced.append(name)
                else:
                    foreign.append(name)
        if links:
            raise GrenError(f"{self.folder}: {_listed(links)} {'is a symbolic link' if len(links) == 1 else 'are symbolic links'}; "
                            f"{self.tool} never writes through links; remove {'it' if len(links) == 1 else 'them'} "
                            "or choose another output folder")
        if foreign:
            raise GrenError(f"{self.folder}: {self.tool} would replace {_listed(foreign)}, which gren did not write "
                            f"(not in {OUTPUTS_MANIFEST}); move {'it' if len(foreign) == 1 else 'them'} away or choose "
                            "another output folder")
        if replaced:
            log.info("%s: replacing %d file(s) written by gren earlier (%s)", self.folder, len(replaced),
                     _listed(replaced))
        if claim:
            self.claim(names, manifest)
        return replaced

    def claim(self, names: Iterable[str], manifest: dict[str, str] | None = None) -> None:
        """Record ``names`` as written by this tool (creating the folder)."""
        manifest = dict(self.manifest() if manifest is None else manifest)
        manifest.update({name: self.tool for name in names})
        self.folder.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.manifest_path, {"gren_outputs": 1, "files": dict(sorted(manifest.items()))})


def _safe_recognise(recognise: Callable[[Path], bool], path: Path) -> bool:
    try:
        return bool(recognise(path))
    except Exception:  # a file the recogniser cannot parse is not ours
        return False


def _listed(names: list[str], limit: int = 3) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def is_within(path: str | os.PathLike, folder: str | os.PathLike) -> bool:
    """True when ``path`` (resolved) lies directly in ``folder`` (resolved)."""
    return Path(path).resolve().parent == Path(folder).resolve()
