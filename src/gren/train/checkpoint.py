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

import os
from pathlib import Path

import torch

from gren.errors import GrenError

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


def save_checkpoint(path: str | os.PathLike, **contents) -> None:
    """``torch.save`` to ``path`` through a temporary file and ``os.replace`` (never a half-written file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"format": CHECKPOINT_FORMAT, **contents}, tmp)
    os.replace(tmp, path)


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


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Read a checkpoint with ``weights_only=True``; a clear error for a missing or foreign file."""
    path = Path(path)
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise GrenError(f"checkpoint {path} not found") from None
    except Exception as err:
        raise GrenError(f"cannot read checkpoint {path}: {err}") from None
    if not isinstance(checkpoint, dict) or "model" not in checkpoint or "config" not in checkpoint:
        raise GrenError(f"{path} is not a gren training checkpoint (no model/config entries)")
    if checkpoint.get("format", 0) > CHECKPOINT_FORMAT:
        raise GrenError(f"{path}: checkpoint format {checkpoint['format']} is newer than this gren understands")
    return checkpoint
