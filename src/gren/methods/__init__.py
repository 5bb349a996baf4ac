"""The localization methods: the protocol (:mod:`gren.methods.protocol`), the registry and one file per method.

Importing this package discovers every method: each module of this package registers itself with
``@register_method``, and installed plugins register through the ``gren.methods`` entry-point group
(:mod:`gren.methods.registry`). Nothing needs editing to add one.
"""

from gren.methods.grid_mil import GridMILMethod
from gren.methods.protocol import Localization, Method, Stage, TrainContext
from gren.methods.registry import (
    METHODS,
    build_method,
    discover,
    load_run,
    method_class,
    method_defaults,
    register_method,
    unregister_method,
)

discover()

__all__ = ["METHODS", "GridMILMethod", "Localization", "Method", "Stage", "TrainContext", "build_method",
           "discover", "load_run", "method_class", "method_defaults", "register_method", "unregister_method"]
