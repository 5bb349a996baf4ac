"""Checkpoints: tensors and plain data only, written atomically, read with ``weights_only=True``.

A checkpoint is a dict:

* ``model``: the method's ``state_dict`` (unwrapped from DDP / ``torch.compile``);
* ``optimizer``, ``scheduler``: their ``state_dict`` s;
* ``rng``: ``{"torch": uint8 tensor, "cuda": [uint8 tensor, ...]}`` (the global generators);
* ``epoch``: the number of completed epochs; ``config``: the resolved config dict;
* ``format``: an int, bumped on incompatible changes.

``RUN/checkpoints/last.pt`` after each epoch (the full training state) and ``epoch_NNN.pt`` (NNN =
completed epochs; the weights, epoch and config only; the newest ``train.keep_epochs`` are kept).
"""

from __future__ import annotations

import errno
import os
import shutil
import zipfile
from pathlib import Path

import torch

from gren.core.atomic import unique_temp_path
from gren.core.errors import GrenError

CHECKPOINT_FORMAT = 1


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and state.get("cuda"):
        torch.cuda.set_rng_state_all(state["cuda"])


def _free_text(folder: Path) -> str:
    try:
        return f"{shutil.disk_usage(folder).free / 1e6:.1f} MB free in {folder}"
    except OSError:
        return f"free space in {folder} unknown"


_FREE_MARGIN = 1 << 20  # bytes


def _payload_bytes(value) -> int:
    """Bytes of the tensors in a (nested) checkpoint dict: what ``torch.save`` will write, roughly."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(_payload_bytes(v) for v in value.values())
    if isinstance(value, list | tuple):
        return sum(_payload_bytes(v) for v in value)
    return 0


def _free_bytes(folder: Path) -> int | None:
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def _looks_like_no_space(err: BaseException, free: int | None, partial: int, needed: int) -> bool:
    """ENOSPC / EDQUOT, also behind torch's RuntimeErrors (``file write failed``, ``unexpected pos``),
    which carry no errno: then judged from the free space left when the write failed (``free`` bytes,
    the partial file ``partial`` bytes, the payload ``needed`` bytes)."""
    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        seen = seen.__cause__ or seen.__context__
    text = str(err).lower()
    if "no space left" in text:
        return True
    return free is not None and (free < _FREE_MARGIN or free + partial < needed)


def save_checkpoint(path: str | os.PathLike, **contents) -> None:
    """``torch.save`` to ``path`` through a temporary file and ``os.replace`` (never a half-written file).

    A write that fails (a full disk, a read-only folder) raises :class:`GrenError` naming ``path``
    (``PATH: cannot write checkpoint: no space left on device (N MB free in FOLDER)``); the temporary
    file is removed and an existing checkpoint at ``path`` is left as it was.
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")  # replaced by a unique name once the folder exists
    needed = _payload_bytes(contents)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = unique_temp_path(path)
        torch.save({"format": CHECKPOINT_FORMAT, **contents}, tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as err:
        free = _free_bytes(path.parent) if path.parent.is_dir() else None  # before the partial file goes
        try:
            partial = tmp.stat().st_size
            tmp.unlink()
        except OSError:
            partial = 0
        if _looks_like_no_space(err, free, partial, needed):
            raise GrenError(f"{path}: cannot write checkpoint: no space left on device "
                            f"({_free_text(path.parent if path.parent.is_dir() else Path('.'))}); free some space "
                            "or choose another --out; the previous checkpoint, if any, is intact") from err
        reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err).splitlines()[0][:200]
        raise GrenError(f"{path}: cannot write checkpoint ({reason})") from err


def find_checkpoint(path: Path) -> Path:
    """A checkpoint file as given, or ``RUN/checkpoints/last.pt`` of a run directory."""
    if path.is_file():
        return path
    if path.is_dir():
        for candidate in (path / "checkpoints" / "last.pt", path / "last.pt"):
            if candidate.is_file():
                return candidate
        raise GrenError(f"{path}: no checkpoint (expected {path / 'checkpoints' / 'last.pt'}); was the run trained?")
    raise GrenError(f"{path}: no such run directory or checkpoint file")


def _not_a_checkpoint_reason(path: Path) -> str | None:
    """Why ``path`` cannot be a torch checkpoint, judged from its first bytes; ``None`` when it may be one."""
    size = path.stat().st_size
    if size == 0:
        return "empty file"
    with open(path, "rb") as handle:
        head = handle.read(512)
    if head.startswith(b"PK"):
        return None if zipfile.is_zipfile(path) else "a damaged or truncated torch file (broken zip archive)"
    if head[:1] == b"\x80":  # a pickle: torch's legacy format, which weights_only reads too
        return None
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return f"not a torch file (starts with {head[:8]!r})"
    if text.lstrip().startswith(("{", "[")):
        return "a JSON/text file, not a torch file"
    return "a text file, not a torch file" if text.isprintable() or "\n" in text else "not a torch file"


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Read a checkpoint with ``weights_only=True``.

    Raises :class:`GrenError` with ``PATH: not a GREN checkpoint (REASON)`` for a file that is not
    one -- ``empty file``, ``a text file, not a torch file``, ``a damaged or truncated torch file``,
    ``a torch file without model/config entries`` ... -- and ``PATH: checkpoint not found``.
    """
    path = Path(path)
    if path.is_dir():
        raise GrenError(f"{path}: not a GREN checkpoint (a folder; give the run folder as --run, "
                        "or a .pt file as --checkpoint)")
    try:
        reason = _not_a_checkpoint_reason(path)
    except FileNotFoundError:
        raise GrenError(f"{path}: checkpoint not found") from None
    except OSError as err:
        raise GrenError(f"{path}: cannot read checkpoint ({err.strerror or err})") from None
    if reason is not None:
        raise GrenError(f"{path}: not a GREN checkpoint ({reason})")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise GrenError(f"{path}: checkpoint not found") from None
    except Exception as err:  # noqa: BLE001 - torch/pickle raise many types for foreign files
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise GrenError(f"{path}: not a GREN checkpoint (unreadable torch file: {type(err).__name__}: {first})") \
            from None
    if not isinstance(checkpoint, dict) or "model" not in checkpoint or "config" not in checkpoint:
        what = "dict" if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise GrenError(f"{path}: not a GREN checkpoint (a torch file holding a {what} without model/config "
                        "entries)")
    if checkpoint.get("format", 0) > CHECKPOINT_FORMAT:
        raise GrenError(f"{path}: checkpoint format {checkpoint['format']} is newer than this gren understands")
    return checkpoint
