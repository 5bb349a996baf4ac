"""Import torchvision (also where its compiled operators cannot load) and timm, in one place.

GREN uses only torchvision's pure-Python model definitions (ResNets) and weight enums, never its
compiled operators (``nms``, ``roi_align``...). A CPU-only PyTorch beside a CUDA-built torchvision
wheel (the x86_64 wheels on PyPI are CUDA builds; the small CPU install in ``requirements-cpu.txt``
pairs them) leaves torchvision's ``_C`` extension unloadable, and ``import torchvision`` then fails
in its fake-kernel registrations with ``operator torchvision::nms does not exist``.

:func:`import_torchvision` checks whether ``_C`` loads; only where it does not, it declares the two
operator schemas torchvision registers fake kernels for unconditionally (``nms``, ``qnms``), so the
import succeeds and the models work. Calling those operators still fails, with torchvision's own
"Couldn't load custom C++ ops" message. Where ``_C`` loads, nothing is changed.

timm imports torchvision, so the same failure hits ``import timm``: :func:`import_timm` is the one
way GREN imports timm; it calls :func:`import_torchvision` first, and turns a missing timm into a
:class:`~gren.core.errors.GrenError` naming the pip command. Neither import touches the network.
"""

from __future__ import annotations

import importlib.util
import logging
import sys
from pathlib import Path
from types import ModuleType

import torch

from gren.core.errors import GrenError

log = logging.getLogger(__name__)

_UNCONDITIONAL_FAKE_OPS = {
    "nms": "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}


def _compiled_ops_load() -> bool:
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return True  # not installed: let the import below raise its own ModuleNotFoundError
    package_dir = Path(next(iter(spec.submodule_search_locations)))
    libraries = [path for path in sorted(package_dir.glob("_C*")) if path.suffix in (".so", ".pyd")]
    if not libraries:
        return False
    try:
        torch.ops.load_library(str(libraries[0]))
    except (OSError, ImportError, RuntimeError) as err:
        log.debug("torchvision's compiled operators do not load here (%s)", err)
        return False
    return True


def import_torchvision() -> ModuleType:
    """``import torchvision``, declaring its operator schemas first if its ``_C`` cannot load."""
    if "torchvision" in sys.modules:
        return sys.modules["torchvision"]
    if not _compiled_ops_load():
        for name, schema in _UNCONDITIONAL_FAKE_OPS.items():
            try:
                torch.library.define(f"torchvision::{name}", schema)
            except RuntimeError:  # already declared, by an earlier attempt
                pass
        log.debug("torchvision imported without its compiled operators (GREN does not use them)")
    import torchvision

    return torchvision


def import_timm() -> ModuleType:
    """``import timm`` after :func:`import_torchvision` (timm imports torchvision).

    Raises:
        GrenError: timm is not installed (it is a dependency of gren; older installs may lack it).
    """
    import_torchvision()
    try:
        import timm
    except ModuleNotFoundError as err:
        if err.name != "timm":
            raise
        raise GrenError(
            "timm backbones (model.backbone=timm:NAME) need the timm package: pip install 'timm>=1.0' "
            "(or reinstall gren: pip install -e .)"
        ) from None
    return timm
