"""The dataset plan: which film shows what, for which patient, decided before any pixel is drawn.

The plan is drawn in one process from ``(seed, PLAN_STREAM)``; each film is then rendered from its
own generator ``(seed, IMAGE_STREAM, index)`` and its patient's ``(seed, PATIENT_STREAM, patient)``,
so the output does not depend on the number of workers or the order they finish in.

The mix (defaults in :class:`Mix`): a third of the films carry boxes (the annotated set), a third
carry labels but no box (the weakly-labelled pool; the findings are still drawn), a third are
"No Finding". Box classes of the annotated set follow the real BBox_List_2017 class counts;
labels of the weak pool follow the real label prevalence of Data_Entry_2017 (rare labels floored
so every label appears). Quotas are apportioned exactly and shuffled, so even a small dataset has
every class. Some patients have several films (follow-ups share the patient's build), so
patient-level splits matter.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from gren.core.labels import BOX_CLASSES
from gren.data.synth.render import CaseSpec, FindingSpec, random_finding
from gren.data.synth.stats import AGE_MEAN_STD, BOX_STATS, LABEL_PREVALENCE, MALE_SHARE, VIEW_PA_SHARE

PLAN_STREAM, IMAGE_STREAM, PATIENT_STREAM = 101, 202, 303


@dataclass(frozen=True)
class Mix:
    """Shares of the three kinds of film and of co-occurring findings."""

    annotated: float = 1 / 3
    no_finding: float = 1 / 3
    second_box: float = 0.10  # annotated films with a second boxed finding (NIH: 83 of 880 have 2 boxes)
    extra_label: float = 0.25  # annotated films with one more label that has no box
    weak_second: float = 0.30  # weak-pool films with a second label ...
    weak_third: float = 0.05  # ... and a third
    label_floor: float = 0.03  # least share of any label in the weak pool


@dataclass(frozen=True)
class ImagePlan:
    """One film to render. ``kind``: ``annotated`` (boxes), ``weak`` (labels only) or ``normal``."""

    index: int
    image_id: str
    patient_id: int
    followup: int
    age: int
    sex: str
    view: str
    kind: str
    spec: CaseSpec


def apportion(total: int, weights: dict[str, float], rng: np.random.Generator) -> list[str]:
    """``total`` keys in proportion to ``weights`` (largest remainder), in random order."""
    keys = list(weights)
    share = np.array([weights[k] for k in keys], dtype=float)
    share = share / share.sum() * total
    counts = np.floor(share).astype(int)
    for i in np.argsort(-(share - counts), kind="stable")[: total - counts.sum()]:
        counts[i] += 1
    out = [k for k, c in zip(keys, counts) for _ in range(c)]
    rng.shuffle(out)
    return out


def _weighted_choice(rng: np.random.Generator, weights: dict[str, float], exclude: set[str]) -> str:
    keys = [k for k in weights if k not in exclude]
    p = np.array([weights[k] for k in keys], dtype=float)
    return keys[int(rng.choice(len(keys), p=p / p.sum()))]


def make_plan(n: int, seed: int = 0, mix: Mix = Mix()) -> list[ImagePlan]:
    """The plan of ``n`` films for ``seed`` (deterministic)."""
    rng = np.random.default_rng([seed, PLAN_STREAM])
    n_annotated = int(round(n * mix.annotated))
    n_normal = min(int(round(n * mix.no_finding)), n - n_annotated)
    kinds = ["annotated"] * n_annotated + ["normal"] * n_normal + ["weak"] * (n - n_annotated - n_normal)
    rng.shuffle(kinds)

    box_weights = {c: float(BOX_STATS[c].n) for c in BOX_CLASSES}
    label_weights = {k: max(v, mix.label_floor) for k, v in LABEL_PREVALENCE.items()}
    box_quota = iter(apportion(n_annotated, box_weights, rng))
    weak_quota = iter(apportion(kinds.count("weak"), label_weights, rng))

    plans: list[ImagePlan] = []
    patient = 0
    while len(plans) < n:
        patient += 1
        films = min(int(rng.geometric(0.55)), 8)
        sex = "M" if rng.random() < MALE_SHARE else "F"
        age0 = int(np.clip(round(rng.normal(*AGE_MEAN_STD)), 1, 92))
        for followup in range(films):
            if len(plans) == n:
                break
            index = len(plans)
            kind = kinds[index]
            findings: list[FindingSpec] = []
            if kind == "annotated":
                first = next(box_quota)
                findings.append(random_finding(rng, first, boxed=True))
                if rng.random() < mix.second_box:
                    findings.append(random_finding(rng, _weighted_choice(rng, box_weights, {first}), boxed=True))
                if rng.random() < mix.extra_label:
                    extra = _weighted_choice(rng, label_weights, {f.label for f in findings})
                    findings.append(random_finding(rng, extra, boxed=False))
            elif kind == "weak":
                findings.append(random_finding(rng, next(weak_quota), boxed=False))
                for share in (mix.weak_second, mix.weak_third):
                    if rng.random() < share:
                        extra = _weighted_choice(rng, label_weights, {f.label for f in findings})
                        findings.append(random_finding(rng, extra, boxed=False))
            view = "PA" if rng.random() < VIEW_PA_SHARE else "AP"
            plans.append(ImagePlan(
                index=index,
                image_id=f"{patient:08d}_{followup:03d}",
                patient_id=patient,
                followup=followup,
                age=min(age0 + followup // 2, 95),
                sex=sex,
                view=view,
                kind=kind,
                spec=CaseSpec(tuple(findings), view, sex),
            ))
    return plans


def csv_labels(spec: CaseSpec) -> str:
    """The ``Finding Labels`` cell: labels sorted alphabetically and ``|``-joined, or ``No Finding``."""
    labels = sorted(spec.labels)
    return "|".join(labels) if labels else "No Finding"
