"""The method registry: one decorator, one place.

``@register_method("name")`` on a factory ``(config: dict) -> LocalizationMethod`` adds it to
``METHODS``; ``build_method(name, config)`` builds one; ``load_run(path)`` rebuilds a trained one.
A new method is one module in ``gren/methods/`` (imported by ``gren/methods/__init__.py``); the
tests in ``tests/test_methods.py`` are parametrised over ``METHODS``, so it gets them for free.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from gren.errors import GrenError

if TYPE_CHECKING:
    from gren.methods.base import LocalizationMethod

MethodFactory = Callable[[dict], "LocalizationMethod"]
METHODS: dict[str, MethodFactory] = {}


def register_method(name: str) -> Callable[[MethodFactory], MethodFactory]:
    """Decorator: register ``factory(config) -> LocalizationMethod`` under ``name``."""

    def decorate(factory: MethodFactory) -> MethodFactory:
        if name in METHODS and METHODS[name] is not factory:
            raise ValueError(f"method {name!r} registered twice ({METHODS[name].__module__} and {factory.__module__})")
        METHODS[name] = factory
        return factory

    return decorate


def build_method(name: str, config: dict) -> LocalizationMethod:
    """Build method ``name`` from a resolved config (see ``gren/configs/default.yaml``).

    Raises:
        GrenError: unknown name (the message lists the registered ones).
    """
    if name not in METHODS:
        raise GrenError(f"unknown method {name!r}; registered: {', '.join(sorted(METHODS))}")
    method = METHODS[name](config)
    method.name = name
    return method


def load_run(path: str | os.PathLike, map_location: str = "cpu") -> tuple[LocalizationMethod, dict]:
    """``(method, config)`` from a run directory (its ``checkpoints/last.pt``) or a checkpoint file.

    The method is in eval mode on ``map_location``; its backbone is built with ``model.weights=none``
    (the trained weights come from the checkpoint, no download). ``config`` is the run's resolved config
    (``config["method"]`` the method name, ``config["data"]["size"]`` the input side S).

    Raises:
        GrenError: no checkpoint there, or an unreadable one.
    """
    from gren.train.checkpoint import find_checkpoint, load_checkpoint

    checkpoint = load_checkpoint(find_checkpoint(Path(path)), map_location=map_location)
    config = checkpoint["config"]
    build_config = copy.deepcopy(config)
    build_config["model"]["weights"] = "none"
    method = build_method(config["method"], build_config)
    method.load_state_dict(checkpoint["model"])
    method.to(map_location)
    method.eval()
    return method, config
