"""``baseline``: Li et al. 2018 ("B"): ResNet grid head trained with the box loss and the MIL loss."""

from __future__ import annotations

from gren.methods.grid_mil import GridMILMethod
from gren.methods.registry import register_method


@register_method("baseline")
class Baseline(GridMILMethod):
    """Li et al. 2018 (B): backbone + grid head, box loss where boxes exist, MIL loss elsewhere."""
