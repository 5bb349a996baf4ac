"""The registry of localization methods (baseline, GREN and its ablations, the peers).

Importing this package registers every method module listed below.
"""

from gren.methods import baseline, gren  # noqa: F401  (registration side effects)
from gren.methods.base import GridMILMethod, LocalizationMethod
from gren.methods.registry import METHODS, build_method, load_run, register_method

__all__ = ["METHODS", "GridMILMethod", "LocalizationMethod", "build_method", "load_run", "register_method"]
