"""Synthetic chest X-rays in the NIH ChestX-ray14 layout: the project's built-in default dataset.

``synthesize(out_dir, n, size=256, seed=0, workers=1, preview=False)`` writes a whole dataset
(see :mod:`.writer`); ``render_case(rng, size, spec)`` renders one film and returns its image,
lung mask and findings with boxes (see :mod:`.render`). docs/synth.md describes what is drawn and
which real statistics it follows.

Modules: :mod:`.stats` (real BBox/label statistics), :mod:`.raster` (drawing helpers),
:mod:`.anatomy` (normal chest), :mod:`.lesions` (the 14 findings), :mod:`.render` (one film),
:mod:`.plan` (what each film shows), :mod:`.writer` (files), :mod:`.preview` (contact sheet).
"""

from gren.data.synth.plan import ImagePlan, Mix, make_plan
from gren.data.synth.render import (
    CaseSpec,
    FindingSpec,
    RenderedCase,
    RenderedFinding,
    random_spec,
    render_case,
)
from gren.data.synth.writer import GENERATOR_VERSION, is_synth_output, synthesize

__all__ = [
    "GENERATOR_VERSION",
    "CaseSpec",
    "FindingSpec",
    "ImagePlan",
    "Mix",
    "RenderedCase",
    "RenderedFinding",
    "is_synth_output",
    "make_plan",
    "random_spec",
    "render_case",
    "synthesize",
]
