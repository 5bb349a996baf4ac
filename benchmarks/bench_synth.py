"""Synthetic data generator: speed on one core, box statistics against the real BBox_List_2017, and
how a training-free lung segmentation does on the synthetic films.

    python benchmarks/bench_synth.py [--n 300] [--stats-n 1200] [--quick]

1. Speed: ``synthesize`` end to end (render + PNG encoding + CSVs) with one worker at S = 128, 256,
   512, reporting images per second of process CPU time (the "one core" figure, robust to other
   jobs on the machine) and of wall time; the same at S = 256 with two workers (wall), and a
   breakdown of one film at S = 256 into rendering and PNG encoding.
2. Fidelity: per class, mean centre distance from the midline, centre row, width and height of the
   synthetic boxes (in 1024 space) next to the real ones (the constants in
   ``gren.data.synth.stats``, measured on the real file).
3. Lung masks: Dice of ``gren.lungs`` classical segmentation against the generator's masks.

Writes benchmarks/results/synth.json and synth.md.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import math
import platform
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from gren.core.labels import BOX_CLASSES
from gren.data.synth import make_plan, render_case, synthesize
from gren.data.synth.plan import IMAGE_STREAM, PATIENT_STREAM
from gren.data.synth.stats import BOX_STATS
from gren.data.synth.writer import PNG_COMPRESS_LEVEL

RESULTS = Path(__file__).resolve().parent / "results"
log = logging.getLogger("bench_synth")


def time_synthesize(n: int, size: int, workers: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        wall0, cpu0 = time.perf_counter(), time.process_time()
        synthesize(Path(tmp) / "data", n, size=size, seed=0, workers=workers, progress=False)
        wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    row = {"n": n, "size": size, "workers": workers, "wall_s": round(wall, 3),
           "images_per_s_wall": round(n / wall, 1)}
    if workers == 1:  # with workers the CPU time is spent in other processes
        row.update(cpu_s=round(cpu, 3), images_per_s_cpu=round(n / cpu, 1))
    return row


def breakdown(size: int, count: int = 60) -> dict:
    plans = make_plan(count, seed=0)
    render_s = encode_s = 0.0
    for plan in plans:
        start = time.process_time()
        case = render_case(np.random.default_rng([0, IMAGE_STREAM, plan.index]), size, plan.spec,
                           patient_rng=np.random.default_rng([0, PATIENT_STREAM, plan.patient_id]))
        mid = time.process_time()
        for array in (case.image, case.lung_mask):
            Image.fromarray(array).save(io.BytesIO(), format="PNG", compress_level=PNG_COMPRESS_LEVEL)
        encode_s += time.process_time() - mid
        render_s += mid - start
    return {"size": size, "render_ms": round(1000 * render_s / count, 2), "png_ms": round(1000 * encode_s / count, 2)}


def box_statistics(n: int, size: int = 128) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "data"
        synthesize(out, n, size=size, seed=1, progress=False)
        boxes = pd.read_csv(out / "BBox_List_2017.csv").iloc[:, :6]
    boxes.columns = ["image", "label", "x", "y", "w", "h"]
    boxes["label"] = boxes["label"].replace({"Infiltrate": "Infiltration"})
    rows = {}
    for label in BOX_CLASSES:
        b = boxes[boxes["label"] == label]
        real = BOX_STATS[label]
        rows[label] = {
            "n": int(len(b)),
            "dx": [round(float((b.x + b.w / 2 - 512).abs().mean()), 0), real.dx[0]],
            "cy": [round(float((b.y + b.h / 2).mean()), 0), real.cy[0]],
            "w": [round(float(b.w.mean()), 0), round(math.exp(real.log_w[0] + real.log_w[1] ** 2 / 2), 0)],
            "h": [round(float(b.h.mean()), 0), round(math.exp(real.log_h[0] + real.log_h[1] ** 2 / 2), 0)],
        }
    return rows


def lung_dice(count: int = 100, size: int = 256) -> dict | None:
    try:
        from gren.lungs.dice import lung_dice as dice
        from gren.lungs.segment import segment_lungs
    except ImportError:
        return None
    plans = make_plan(count, seed=2)
    cases = [render_case(np.random.default_rng([2, IMAGE_STREAM, p.index]), size, p.spec,
                         patient_rng=np.random.default_rng([2, PATIENT_STREAM, p.patient_id])) for p in plans]
    images = np.stack([c.image for c in cases])
    truth = np.stack([c.lung_mask for c in cases])
    predicted, fallback = segment_lungs(images, "classical")
    scores = np.array([dice(p, t) for p, t in zip(predicted, truth)])
    return {"films": count, "size": size, "dice_right_mean": round(float(scores[:, 0].mean()), 3),
            "dice_left_mean": round(float(scores[:, 1].mean()), 3),
            "dice_min": round(float(scores.min()), 3), "fallback_share": round(float(np.mean(fallback)), 3)}


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=300, help="films per speed run")
    parser.add_argument("--stats-n", type=int, default=1200, help="films for the box statistics")
    parser.add_argument("--quick", action="store_true", help="small runs (a smoke test of this script)")
    parser.add_argument("--parts", default="speed,stats,dice",
                        help="parts to measure now (speed needs a quiet machine); the others keep their last figures")
    args = parser.parse_args()
    n, stats_n = (30, 120) if args.quick else (args.n, args.stats_n)
    wanted = {part.strip() for part in args.parts.split(",") if part.strip()}
    json_path = RESULTS / "synth.json"
    payload = json.loads(json_path.read_text()) if json_path.is_file() and wanted != {"speed", "stats", "dice"} else {}

    if "speed" in wanted:
        speed = [time_synthesize(n, size, 1) for size in (128, 256, 512)]
        speed.append(time_synthesize(n, 256, 2))
        payload.update(speed=speed, breakdown_256=breakdown(256), speed_films=n)
        log.info("speed: %s; breakdown %s", speed, payload["breakdown_256"])
    if "stats" in wanted:
        payload.update(box_statistics=box_statistics(stats_n), stats_films=stats_n)
    if "dice" in wanted:
        payload["lung_dice_classical"] = lung_dice(30 if args.quick else 100)
        log.info("lung dice: %s", payload["lung_dice_classical"])
    missing = [key for key in ("speed", "breakdown_256", "box_statistics") if key not in payload]
    if missing:
        parser.error(f"no earlier figures for {missing} in {json_path}; run with --parts speed,stats,dice")
    payload.update(date=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                   machine={"platform": platform.platform(), "processor": platform.processor()})
    RESULTS.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(payload, indent=2) + "\n")
    speed, parts, stats = payload["speed"], payload["breakdown_256"], payload["box_statistics"]
    dice = payload.get("lung_dice_classical")
    n, stats_n = payload.get("speed_films", n), payload.get("stats_films", stats_n)

    lines = [
        f"`synthesize` end to end (render, PNG encoding of image and mask, CSVs), {n} films. CPU img/s is",
        "films per second of the process's CPU time with one worker: the single-core rate, unaffected by other",
        "jobs sharing the machine; wall img/s is what the user saw in this run.",
        "",
        "| size | workers | CPU img/s (1 core) | wall img/s |",
        "| --- | --- | --- | --- |",
    ]
    for row in speed:
        lines.append(f"| {row['size']} | {row['workers']} | {row.get('images_per_s_cpu', '-')} | {row['images_per_s_wall']} |")
    lines += [
        "",
        f"One film at S = 256: rendering {parts['render_ms']} ms, PNG encoding (image + mask) {parts['png_ms']} ms (CPU).",
        "",
        f"Box statistics of {stats_n} synthetic films (seed 1) against the real BBox_List_2017 (synthetic / real;",
        "1024-space pixels; dx = centre distance from the midline; real w, h = mean of the fitted log-normal):",
        "",
        "| class | boxes | dx | centre row | width | height |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for label, row in stats.items():
        lines.append(f"| {label} | {row['n']} | {row['dx'][0]:.0f} / {row['dx'][1]:.0f} | {row['cy'][0]:.0f} / "
                     f"{row['cy'][1]:.0f} | {row['w'][0]:.0f} / {row['w'][1]:.0f} | {row['h'][0]:.0f} / {row['h'][1]:.0f} |")
    if dice:
        lines += ["", f"Classical lung segmentation (`gren.lungs`, training-free) on {dice['films']} synthetic films at "
                      f"{dice['size']} px: Dice right {dice['dice_right_mean']}, left {dice['dice_left_mean']} "
                      f"(worst lung {dice['dice_min']}), fallback to the prior on {dice['fallback_share']:.0%}."]
    (RESULTS / "synth.md").write_text("\n".join(lines) + "\n")
    log.info("wrote %s", RESULTS / "synth.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
