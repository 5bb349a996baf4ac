"""The ChestX-ray14 label set.

``LABELS`` is the fixed order of the 14 findings: label vectors, model output channels (K = 14) and
AUC tables all use it. ``BOX_CLASSES`` are the 8 findings that BBox_List_2017 has boxes for.
"""

from __future__ import annotations

LABELS: tuple[str, ...] = (
    "Atelectasis",
    "Cardiomegaly",
    "Effusion",
    "Infiltration",
    "Mass",
    "Nodule",
    "Pneumonia",
    "Pneumothorax",
    "Consolidation",
    "Edema",
    "Emphysema",
    "Fibrosis",
    "Pleural_Thickening",
    "Hernia",
)
NO_FINDING = "No Finding"

BOX_CLASSES: tuple[str, ...] = (
    "Atelectasis",
    "Cardiomegaly",
    "Effusion",
    "Infiltration",
    "Mass",
    "Nodule",
    "Pneumonia",
    "Pneumothorax",
)

LABEL_INDEX: dict[str, int] = {name: i for i, name in enumerate(LABELS)}
BOX_CLASS_LABEL_INDEX: tuple[int, ...] = tuple(LABEL_INDEX[c] for c in BOX_CLASSES)

# Spellings seen in the wild, mapped to the canonical name (compared case-insensitively, with
# spaces and underscores treated alike).
_ALIASES = {
    "infiltrate": "Infiltration",
    "pleural thickening": "Pleural_Thickening",
    "pleural_thickening": "Pleural_Thickening",
    "no finding": NO_FINDING,
}


def canonical_label(name: str) -> str | None:
    """The canonical spelling of a finding name, or ``None`` when it is not one of the 14 (nor No Finding).

    >>> canonical_label("Infiltrate"), canonical_label("pleural thickening"), canonical_label("Foo")
    ('Infiltration', 'Pleural_Thickening', None)
    """
    key = name.strip().lower().replace("_", " ")
    if key in _ALIASES:
        return _ALIASES[key]
    for label in LABELS:
        if label.lower().replace("_", " ") == key:
            return label
    return None
