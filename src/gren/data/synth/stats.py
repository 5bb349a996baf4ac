"""Real-data statistics the generator is calibrated on, embedded as constants.

How the numbers were derived (kept here so they can be re-derived)::

    b = pandas.read_csv("nih/BBox_List_2017.csv").iloc[:, :6]    # 984 boxes, 1024 x 1024 space
    b.columns = ["id", "cls", "x", "y", "w", "h"]
    cx, cy = b.x + b.w / 2, b.y + b.h / 2
    per class: dx = |cx - 512| (mean, std), cy (mean, std), log(w), log(h) (mean, std),
               corr(log w, log h), share of boxes with cx >= 512 (image right = patient's left)

    d = pandas.read_csv("nih/Data_Entry_2017_v2020.csv.gz")       # 112,120 images
    label prevalence = share of images carrying each label; View Position PA 60 % / AP 40 %;
    Patient Gender M 56 %; Patient Age mean 46.6, std 16.6.

All lengths are pixels of the 1024 x 1024 image (the space of BBox_List_2017).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class BoxStats:
    """Per-class statistics of the real boxes (1024-space pixels).

    ``dx``: distance of the box centre from the image's vertical midline (mean, std);
    ``cy``: box centre row (mean, std); ``log_w``/``log_h``: natural log of the box width/height
    (mean, std); ``rho``: correlation of log w and log h; ``right_of_midline``: share of boxes whose
    centre is on the image-right half (the patient's left lung); ``n``: number of real boxes.
    """

    n: int
    dx: tuple[float, float]
    cy: tuple[float, float]
    log_w: tuple[float, float]
    log_h: tuple[float, float]
    rho: float
    right_of_midline: float


# Measured on BBox_List_2017.csv (all 984 boxes) with the recipe in the module docstring.
BOX_STATS: dict[str, BoxStats] = {
    "Atelectasis": BoxStats(180, (200, 87), (582, 118), (5.22, 0.55), (4.81, 0.51), 0.33, 0.50),
    "Cardiomegaly": BoxStats(146, (80, 43), (583, 66), (6.17, 0.11), (5.93, 0.15), 0.48, 0.95),
    "Effusion": BoxStats(153, (273, 79), (575, 122), (5.27, 0.54), (5.54, 0.73), 0.24, 0.49),
    "Infiltration": BoxStats(123, (163, 81), (538, 119), (5.54, 0.49), (5.59, 0.47), 0.55, 0.56),
    "Mass": BoxStats(85, (190, 87), (462, 119), (4.94, 0.58), (5.05, 0.60), 0.84, 0.47),
    "Nodule": BoxStats(79, (242, 84), (494, 158), (4.23, 0.31), (4.20, 0.33), 0.86, 0.52),
    "Pneumonia": BoxStats(120, (179, 71), (569, 107), (5.51, 0.44), (5.62, 0.46), 0.63, 0.53),
    "Pneumothorax": BoxStats(98, (218, 70), (332, 192), (5.18, 0.53), (5.26, 0.74), 0.46, 0.43),
}
# Cardiomegaly boxes are centred at x = 588 +- 50 (the heart sits left of the patient's midline).
CARDIOMEGALY_CX = (588.0, 50.0)

# Share of the 112,120 NIH images carrying each label (Data_Entry_2017_v2020).
LABEL_PREVALENCE: dict[str, float] = {
    "Infiltration": 0.1774,
    "Effusion": 0.1188,
    "Atelectasis": 0.1031,
    "Nodule": 0.0565,
    "Mass": 0.0516,
    "Pneumothorax": 0.0473,
    "Consolidation": 0.0416,
    "Pleural_Thickening": 0.0302,
    "Cardiomegaly": 0.0248,
    "Emphysema": 0.0224,
    "Edema": 0.0205,
    "Fibrosis": 0.0150,
    "Pneumonia": 0.0128,
    "Hernia": 0.0020,
}
VIEW_PA_SHARE = 0.60
MALE_SHARE = 0.56
AGE_MEAN_STD = (46.6, 16.6)

# The nominal lung geometry of a real NIH film in the 1024 space (what the box statistics are read
# against): lung fields from 60 px to 400 px either side of the midline, apex at row 130, lateral
# costophrenic angle at row 820. Box centres are mapped into each synthetic image's own lungs through
# the normalised coordinates u = (dx - 60) / 340 (medial 0 -> lateral 1), v = (cy - 130) / 690.
NOMINAL_LUNG = {"medial": 60.0, "lateral": 400.0, "apex": 130.0, "base": 820.0}


# Calibration of the drawn boxes against the real ones. A lesion is clipped to the visible lung (the
# heart and the diaphragm cut into the lower, medial field), so the drawn footprints come out higher,
# more lateral and smaller than the sampled targets. These offsets of the target centre (in normalised
# lung coordinates u, v) and factors on its width and height were read off benchmarks/bench_synth.py
# (1,500 films, synthetic vs real means) so that the *drawn* boxes' means match BOX_STATS.
# Effusion and Pneumothorax are shaped by the lung outline (meniscus, collapsed lung) and are sized
# inside their renderers; Cardiomegaly is the heart itself.
PLACEMENT_CALIBRATION: dict[str, tuple[float, float, float, float]] = {  # du, dv, width x, height x
    "Atelectasis": (-0.17, 0.2, 1.45, 1.2),
    "Infiltration": (-0.2, 0.2, 1.7, 1.35),
    "Mass": (-0.08, 0.03, 1.15, 1.1),
    "Nodule": (0.0, 0.10, 0.8, 0.8),
    "Pneumonia": (-0.17, 0.2, 1.4, 1.3),
}


def sample_box_size(rng: np.random.Generator, stats: BoxStats, scale: float = 1.0) -> tuple[float, float]:
    """A (width, height) in 1024-space pixels from the class's log-normal size model.

    Clipped to the 2.5 %..97.5 % range of the fitted model so a single draw cannot cover the chest.
    """
    z1, z2 = rng.standard_normal(2)
    z2 = stats.rho * z1 + np.sqrt(max(1.0 - stats.rho**2, 0.0)) * z2
    z1, z2 = np.clip([z1, z2], -1.96, 1.96)
    width = np.exp(stats.log_w[0] + stats.log_w[1] * z1) * scale
    height = np.exp(stats.log_h[0] + stats.log_h[1] * z2) * scale
    return float(width), float(height)


def sample_box_centre_uv(rng: np.random.Generator, stats: BoxStats) -> tuple[float, float]:
    """A box centre in normalised lung coordinates ``(u, v)`` (see :data:`NOMINAL_LUNG`).

    ``u``: 0 at the medial lung edge, 1 at the lateral; ``v``: 0 at the apex, 1 at the costophrenic
    angle. Drawn from the class's real centre distribution, clipped to the lung's interior.
    """
    dx = rng.normal(*stats.dx)
    cy = rng.normal(*stats.cy)
    nominal = NOMINAL_LUNG
    u = (dx - nominal["medial"]) / (nominal["lateral"] - nominal["medial"])
    v = (cy - nominal["apex"]) / (nominal["base"] - nominal["apex"])
    return float(np.clip(u, 0.1, 0.9)), float(np.clip(v, 0.08, 0.92))
