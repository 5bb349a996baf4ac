"""Device choice, one place for every command: ``auto`` | ``cpu`` | ``cuda`` | ``cuda:N``."""

from __future__ import annotations

import os

import torch

from gren.core.errors import GrenError

DEVICE_CHOICES = "auto, cpu, cuda or cuda:N"


def select_device(spec: str = "auto") -> torch.device:
    """The ``torch.device`` for ``spec``.

    ``auto``: this process's GPU when CUDA is available (``LOCAL_RANK`` under ``torchrun``), else the CPU.
    ``cuda`` without an index also means this process's GPU.

    Raises:
        GrenError: an unknown spec, or CUDA asked for where it is not available.
    """
    spec = str(spec or "auto").strip()
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        return torch.device("cpu")
    try:
        device = torch.device(spec)
    except (RuntimeError, ValueError):
        raise GrenError(f"device {spec!r}: expected {DEVICE_CHOICES}") from None
    if device.type not in ("cpu", "cuda"):
        raise GrenError(f"device {spec!r}: expected {DEVICE_CHOICES}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise GrenError(f"device {spec} asked for but CUDA is not available here; use cpu (or auto)")
    if device.type == "cuda" and device.index is None:  # under torchrun: this process's GPU
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def move_to(batch, device: torch.device, non_blocking: bool = True):
    """``batch`` with every tensor (also inside lists, tuples and dicts) on ``device``; other values as they are."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=non_blocking)
    if isinstance(batch, dict):
        return {key: move_to(value, device, non_blocking) for key, value in batch.items()}
    if isinstance(batch, list):
        return [move_to(value, device, non_blocking) for value in batch]
    if isinstance(batch, tuple):
        return tuple(move_to(value, device, non_blocking) for value in batch)
    return batch
