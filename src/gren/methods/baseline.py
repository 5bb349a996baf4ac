"""``baseline``: Li et al. 2018 ("B"): ResNet grid head trained with the box loss and the MIL loss."""

from __future__ import annotations

from gren.methods.base import GridMILMethod
from gren.methods.registry import register_method


@register_method("baseline")
def build_baseline(config: dict) -> GridMILMethod:
    return GridMILMethod(config)
