"""Render one synthetic film: anatomy + findings -> image, lung mask, findings with boxes.

The film is built as an attenuation map (sum of soft density layers: body, air in the lungs,
heart and mediastinum, bones, vessels, lesions), turned into brightness the way a radiograph is
(``1 - exp(-k * attenuation)``: dense = bright), given the view's contrast, a slow exposure drift
and quantum noise, and quantised to 8 bits.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from gren.core.labels import BOX_CLASSES, LABELS
from gren.data.synth.anatomy import SIDES, draw_anatomy, sample_film, sample_patient_anatomy
from gren.data.synth.lesions import MODIFIERS, RENDERERS, LesionContext
from gren.data.synth.raster import Canvas, smooth_noise

ATTENUATION_GAIN = 1.8


@dataclass(frozen=True)
class FindingSpec:
    """One finding to draw. ``side``: ``"right"``/``"left"`` (patient's), ``"both"`` or ``"center"``
    (heart, mediastinum); ``boxed``: its boxes go to BBox_List; ``hard``: faint and small."""

    label: str
    side: str = "right"
    boxed: bool = False
    hard: bool = False


@dataclass(frozen=True)
class CaseSpec:
    """What one film shows: findings (empty = No Finding), view (``PA``/``AP``) and sex (``M``/``F``)."""

    findings: tuple[FindingSpec, ...] = ()
    view: str = "PA"
    sex: str = "M"

    @property
    def labels(self) -> list[str]:
        """The finding labels in LABELS order, without repeats."""
        present = {f.label for f in self.findings}
        return [label for label in LABELS if label in present]


@dataclass
class RenderedFinding:
    """A drawn finding: ``boxes`` are (x1, y1, x2, y2) in 1024-space pixels, one per drawn lesion
    (two for a bilateral one) for box classes, empty for the other labels."""

    label: str
    side: str
    boxed: bool
    hard: bool
    boxes: list[tuple[float, float, float, float]] = field(default_factory=list)


@dataclass
class RenderedCase:
    """``image``: uint8 (S, S) grayscale; ``lung_mask``: uint8 (S, S), 0 background, 1 patient's right
    lung (image left), 2 patient's left lung (image right); ``findings``: what was drawn."""

    image: np.ndarray
    lung_mask: np.ndarray
    findings: list[RenderedFinding]


def lesion_sides(finding: FindingSpec) -> tuple[str, ...]:
    if finding.side == "both":
        return SIDES
    if finding.side in SIDES:
        return (finding.side,)
    return ("right",)  # central findings (heart, mediastinum) ignore the side


def render_case(rng: np.random.Generator, size: int = 256, spec: CaseSpec | None = None,
                patient_rng: np.random.Generator | None = None) -> RenderedCase:
    """Render one film at ``size x size`` pixels.

    ``rng`` drives everything specific to this film (pose, exposure, vessels, lesion placement);
    ``patient_rng`` (default: ``rng``) draws the patient's build, so films of one patient share it.
    ``spec`` defaults to a random case (:func:`random_spec`). Deterministic given the generators' states.
    """
    if spec is None:
        spec = random_spec(rng)
    patient = sample_patient_anatomy(patient_rng if patient_rng is not None else rng, spec.sex)
    anatomy = sample_film(patient, rng, spec.view)
    for finding in spec.findings:
        modify = MODIFIERS.get(finding.label)
        if modify is not None:
            for side in lesion_sides(finding):
                modify(anatomy, side, rng)

    angle, zoom, shift_x, shift_y = anatomy.pose
    canvas = Canvas(size, angle, zoom, (shift_x, shift_y))
    layers = draw_anatomy(canvas, anatomy, rng)
    context = LesionContext(canvas, anatomy, layers, rng)

    attenuation_extra = np.zeros((size, size), dtype=np.float32)
    vessel_visibility = np.ones((size, size), dtype=np.float32)
    drawn: list[RenderedFinding] = []
    for finding in spec.findings:
        result = RenderedFinding(finding.label, finding.side, finding.boxed, finding.hard)
        render = RENDERERS.get(finding.label)
        if render is not None:
            sides = SIDES[:1] if finding.label in ("Edema", "Fibrosis", "Cardiomegaly", "Hernia") else lesion_sides(finding)
            for side in sides:
                for k, patch in enumerate(render(context, side, finding.hard)):
                    if patch.alpha is not None and patch.density != 0.0:
                        attenuation_extra += np.float32(patch.density) * patch.alpha
                        if patch.clears_vessels:
                            vessel_visibility -= patch.alpha
                    if k == 0 and patch.box is not None and finding.label in BOX_CLASSES:
                        result.boxes.append(tuple(round(float(c), 2) for c in patch.box))
        drawn.append(result)

    image = compose(anatomy, layers, attenuation_extra, np.clip(vessel_visibility, 0.0, 1.0), canvas, rng)
    return RenderedCase(image, layers.lung_mask, drawn)


def compose(anatomy, layers, attenuation_extra, vessel_visibility, canvas: Canvas,
            rng: np.random.Generator) -> np.ndarray:
    """Attenuation layers -> uint8 film (S, S).

    Whole-image arithmetic runs in place on float32 buffers (a film at 256 px is ~3 ms of it).
    """
    size = canvas.size
    f32 = np.float32
    cols = (np.arange(size, dtype=np.float32) + f32(0.5)) * f32(1024.0 / size)  # (S,) 1024-space
    centre_x = canvas.to_image([(anatomy.midline, 512.0)])[0, 0]
    thickness = 1.0 - 0.22 * np.square((cols - f32(centre_x)) * f32(1.0 / 560.0))  # (S,) per column
    air = layers.lungs * f32(anatomy.lung_air)  # (S, S)
    attenuation = layers.body * thickness  # (S, S), broadcast over rows
    attenuation -= air
    # The heart and mediastinum displace lung: they cancel the air where they overlap the fields.
    tmp = air + f32(0.05)
    tmp *= layers.cardio
    attenuation += tmp
    # Bones: brighter where they cross aerated lung.
    np.multiply(layers.lungs, f32(0.7 * 0.13), out=tmp)
    tmp += f32(0.3 * 0.13)
    tmp *= layers.bones
    tmp *= layers.body
    attenuation += tmp
    # Vessel markings and fine interstitial texture, hidden where a lesion clears them.
    markings = smooth_noise(rng, size, 22.0)
    np.clip(markings, -1.5, 1.5, out=markings)
    markings *= f32(0.25)
    markings += layers.vessels
    markings *= layers.lungs
    markings *= vessel_visibility
    markings *= f32(0.1 * anatomy.vessel_density)
    attenuation += markings
    attenuation += attenuation_extra
    # Film response 1 - exp(-k x^1.5): dark air, grey soft tissue, near-white mediastinum and bone.
    attenuation -= f32(0.04)
    x = np.maximum(attenuation, f32(0.0), out=attenuation)
    np.sqrt(x, out=tmp)
    tmp *= x
    tmp *= f32(-ATTENUATION_GAIN)
    brightness = np.exp(tmp, out=tmp)
    # brightness = 0.5 + (1 - e - 0.5) * contrast + offset  ==  (0.5 + 0.5 c + offset) - c * e
    brightness *= f32(-anatomy.contrast)
    brightness += f32(0.5 + 0.5 * anatomy.contrast + anatomy.brightness)
    drift = smooth_noise(rng, size, 300.0)
    np.clip(drift, -2.0, 2.0, out=drift)
    drift *= f32(0.04)
    drift += f32(1.0)
    brightness *= drift
    # Quantum noise, uniform with the given std (cheaper to draw than normal; indistinguishable here),
    # stronger in bright (dense) regions: brightness += sigma * sqrt(12) * (0.5 + 0.5 b) * (u - 0.5).
    noise = rng.random(brightness.shape, dtype=np.float32)
    noise -= f32(0.5)
    scale = f32(anatomy.noise_sigma * np.sqrt(12.0))
    np.multiply(brightness, f32(0.5) * scale, out=x)
    x += f32(0.5) * scale
    x *= noise
    brightness += x
    brightness *= f32(255.0)
    brightness += f32(0.5)
    np.clip(brightness, 0.0, 255.0, out=brightness)
    return brightness.astype(np.uint8)


# --- random cases --------------------------------------------------------------------------------

BILATERAL_SHARE = {
    "Effusion": 0.3, "Infiltration": 0.2, "Pneumonia": 0.12, "Atelectasis": 0.1,
    "Nodule": 0.1, "Mass": 0.04, "Pneumothorax": 0.03, "Consolidation": 0.1,
}
HARD_SHARE = 0.05


def random_finding(rng: np.random.Generator, label: str, boxed: bool) -> FindingSpec:
    """A finding of ``label`` with a random side (mostly one lung) and a small chance of being hard."""
    if label == "Cardiomegaly" or label == "Hernia":
        side = "center"
    elif label in ("Edema", "Emphysema", "Fibrosis"):
        side = "both"
    elif rng.random() < BILATERAL_SHARE.get(label, 0.0):
        side = "both"
    else:
        side = SIDES[int(rng.integers(2))]
    hard = label in BOX_CLASSES and label != "Cardiomegaly" and rng.random() < HARD_SHARE
    return FindingSpec(label, side, boxed, hard)


def random_spec(rng: np.random.Generator) -> CaseSpec:
    """A random case: a third No Finding, otherwise one or two findings; PA/AP and sex as in NIH."""
    from gren.data.synth.stats import MALE_SHARE, VIEW_PA_SHARE

    view = "PA" if rng.random() < VIEW_PA_SHARE else "AP"
    sex = "M" if rng.random() < MALE_SHARE else "F"
    if rng.random() < 1 / 3:
        return CaseSpec((), view, sex)
    count = 1 if rng.random() < 0.8 else 2
    labels = rng.choice(np.array(LABELS), size=count, replace=False)
    findings = tuple(random_finding(rng, str(label), str(label) in BOX_CLASSES) for label in labels)
    return CaseSpec(findings, view, sex)
