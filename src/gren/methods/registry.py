"""The method registry: one decorator, one place, discovered without a list to edit.

``@register_method("name")`` on a :class:`~gren.methods.protocol.Method` subclass adds it to ``METHODS``
(name -> class). Where methods come from (:func:`discover`, run once on first use of the registry):

* every module of the ``gren.methods`` package (a new method is one file there; nothing else to edit);
* every entry point of the group ``gren.methods`` of the installed distributions, so a method in a
  user's own package appears in every ``gren`` command. In the user's ``pyproject.toml``::

      [project.entry-points."gren.methods"]
      my-cam = "my_package.my_cam"            # a module whose @register_method calls register it
      # or: my-cam = "my_package.my_cam:MyCam"  # a Method subclass, registered under the entry point's name

  A plugin that fails to import is logged as a warning naming it; the other methods still work.

``build_method(name, config)`` builds one; ``method_defaults(name)`` is its config defaults (merged over
the class hierarchy); ``load_run(path)`` rebuilds a trained one from a run directory or checkpoint.
"""

from __future__ import annotations

import copy
import importlib
import logging
import os
import pkgutil
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

from gren.core.errors import GrenError
from gren.methods.protocol import Method, merged_defaults

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "gren.methods"
# Modules of this package that hold shared pieces, not methods (importing them would be harmless).
_NOT_METHODS = frozenset({"protocol", "registry", "losses", "graph", "grid_mil", "maps", "superpixels"})

METHODS: dict[str, type[Method]] = {}
_discovered = False


def register_method(name: str) -> Callable[[type[Method]], type[Method]]:
    """Class decorator: register a :class:`Method` subclass under ``name`` (also usable as ``register_method(n)(cls)``)."""

    def decorate(cls: type[Method]) -> type[Method]:
        if not (isinstance(cls, type) and issubclass(cls, Method)):
            raise TypeError(f"register_method({name!r}) takes a gren.methods.Method subclass, got {cls!r}")
        if name in METHODS and METHODS[name] is not cls:
            raise ValueError(f"method {name!r} registered twice ({METHODS[name].__module__} and {cls.__module__})")
        METHODS[name] = cls
        return cls

    return decorate


def unregister_method(name: str) -> None:
    """Remove ``name`` from the registry (tests, interactive sessions)."""
    METHODS.pop(name, None)


def discover() -> dict[str, type[Method]]:
    """Import every method module of the package and every ``gren.methods`` entry point (once); returns METHODS."""
    global _discovered
    if _discovered:
        return METHODS
    _discovered = True
    import gren.methods as package

    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda i: i.name):
        if info.name.startswith("_") or info.name in _NOT_METHODS:
            continue
        importlib.import_module(f"{package.__name__}.{info.name}")
    load_entry_points()
    return METHODS


def load_entry_points(group: str = ENTRY_POINT_GROUP) -> list[str]:
    """Load the installed plugins of ``group``; returns the names of the entry points that loaded."""
    loaded = []
    for entry in metadata.entry_points(group=group):
        try:
            target = entry.load()
        except Exception as err:  # a broken plugin must not break every command
            log.warning("method plugin %r (%s) failed to load: %s: %s", entry.name, entry.value,
                        type(err).__name__, err)
            continue
        if isinstance(target, type) and issubclass(target, Method) and entry.name not in METHODS:
            register_method(entry.name)(target)
        loaded.append(entry.name)
    return loaded


def method_class(name: str) -> type[Method]:
    """The registered class of ``name``.

    Raises:
        GrenError: unknown name (the message lists the registered ones).
    """
    discover()
    if name not in METHODS:
        raise GrenError(f"unknown method {name!r}; registered: {', '.join(sorted(METHODS))}")
    return METHODS[name]


def method_defaults(name: str) -> dict:
    """The config defaults of method ``name`` (its ``defaults`` merged over its base classes)."""
    return merged_defaults(method_class(name))


def all_method_defaults() -> dict[str, dict]:
    """``{name: method_defaults(name)}`` for every registered method."""
    discover()
    return {name: merged_defaults(cls) for name, cls in METHODS.items()}


def build_method(name: str, config: dict) -> Method:
    """Build method ``name`` from a resolved config (``gren.train.config.resolve_config(..., method=name)``)."""
    method = method_class(name)(config)
    method.name = name
    return method


def load_run(path: str | os.PathLike, map_location: str = "cpu") -> tuple[Method, dict]:
    """``(method, config)`` from a run directory (its ``checkpoints/last.pt``) or a checkpoint file.

    The method is in eval mode on ``map_location``; its backbone is built with ``model.weights=none``
    (the trained weights come from the checkpoint, no download); its ``extra_state`` is restored.
    ``config`` is the run's resolved config (``config["method"]`` the method name,
    ``config["data"]["size"]`` the input side S).

    Raises:
        GrenError: no checkpoint there, an unreadable one, or weights that do not fit the method.
    """
    from gren.core.checkpoint import find_checkpoint, load_checkpoint

    checkpoint_path = find_checkpoint(Path(path))
    checkpoint = load_checkpoint(checkpoint_path, map_location=map_location)
    config = checkpoint["config"]
    build_config = copy.deepcopy(config)
    build_config["model"]["weights"] = "none"
    from gren.models.weights import weights_from_checkpoint

    with weights_from_checkpoint():
        method = build_method(config["method"], build_config)
    try:
        method.load_state_dict(checkpoint["model"])
    except RuntimeError as err:
        raise GrenError(f"{checkpoint_path}: its weights do not fit method {config['method']!r} "
                        f"({str(err).splitlines()[0]})") from None
    method.load_extra_state(checkpoint.get("method_state") or {})
    method.to(map_location)
    method.eval()
    return method, config
