"""Training step cost of CCG (``ccg``, ``ccg-kr``) and B+Attention (``b-attention``) against ``baseline``,
and ``prepare``'s extra time per film for CCG's superpixel fields.

    python benchmarks/bench_method_steps.py                        # resnet18, stride 16, 128 px, batch 4
    python benchmarks/bench_method_steps.py --size 256 --batch 2 --repeats 30 --threads 2

Step: one model per method, built from the same seed, trains on the same batch (fake films with lung masks,
lung hashes and the superpixel fields as a prepared cache serves them). Repetitions are interleaved
(baseline, ccg, ccg-kr, b-attention, then reversed) so machine noise hits all alike; figures are medians of
the process CPU time of a step (forward + losses + backward + SGD step; all threads) and the median of
per-repetition ratios to the baseline step of the same repetition ("paired"). Target: at most 1.3x.

Prepare: the two cache fields' compute functions (SLIC + per-superpixel pHash) timed on real NIH films from
``../shared/data/nih`` (resized to each side) when present, else on synthetic films; per film, CPU seconds.

Writes ``benchmarks/results/method_steps.json`` and ``method_steps.md``.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bench_phash import machine
from gren.methods import build_method
from gren.methods.superpixels import compute_superpixel_hashes, compute_superpixels
from gren.train.config import resolve_config
from synthetic_items import synthetic_batch

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
METHODS = ("baseline", "ccg", "ccg-kr", "b-attention")
log = logging.getLogger("bench_method_steps")


def step_costs(args) -> dict:
    overrides = [f"data.size={args.size}", f"train.batch_size={args.batch}", f"model.backbone={args.backbone}",
                 "model.output_stride=16", "model.weights=none", "device.device=cpu"]
    batch = synthetic_batch(args.batch, args.size, fields=("superpixels", "superpixel_hashes"))
    models, optimizers = {}, {}
    for name in METHODS:
        torch.manual_seed(0)
        models[name] = build_method(name, resolve_config("cpu-small", overrides, method=name)).train()
        optimizers[name] = torch.optim.SGD(models[name].parameters(), lr=1e-4, momentum=0.9, nesterov=True)

    def step(name: str) -> None:
        parts = models[name](batch)
        optimizers[name].zero_grad(set_to_none=True)
        parts["total"].backward()
        optimizers[name].step()

    for name in METHODS:
        for _ in range(args.warmup):
            step(name)
    cpu = {name: [] for name in METHODS}
    wall = {name: [] for name in METHODS}
    for rep in range(args.repeats):
        for name in (METHODS if rep % 2 == 0 else tuple(reversed(METHODS))):
            w, c = time.perf_counter(), time.process_time()
            step(name)
            cpu[name].append(time.process_time() - c)
            wall[name].append(time.perf_counter() - w)
    with torch.no_grad():
        grid = int(models["baseline"].backbone(batch["image"][:1]).shape[-1])
    rows = []
    for name in METHODS:
        rows.append({"method": name, "median_step_cpu_s": statistics.median(cpu[name]),
                     "median_step_wall_s": statistics.median(wall[name]),
                     "ratio_to_baseline": statistics.median(cpu[name]) / statistics.median(cpu["baseline"]),
                     "paired_median_ratio": statistics.median(t / b for t, b in zip(cpu[name], cpu["baseline"]))})
    return {"backbone": args.backbone, "size": args.size, "batch": args.batch, "output_stride": 16, "grid": grid,
            "repeats": args.repeats, "rows": rows}


def films(n: int) -> tuple[list[np.ndarray], str]:
    from gren.core.imageio import read_gray
    from gren.core.paths import shared_data_dir

    shared = shared_data_dir()
    folder = shared / "nih" / "images" if shared else None
    if folder and folder.is_dir():
        paths = sorted(folder.iterdir())[:n]
        return [read_gray(p) for p in paths], f"real NIH films ({folder})"
    import tempfile

    from gren.data.synth import synthesize

    with tempfile.TemporaryDirectory() as tmp:
        synthesize(Path(tmp) / "data", n, size=512, seed=0, progress=False)
        return ([read_gray(p) for p in sorted((Path(tmp) / "data" / "images").iterdir())[:n]],
                "synthetic films (gren data synth, 512 px)")


def prepare_costs(args) -> dict:
    images, source = films(args.films)
    rows = []
    for side in args.sides:
        batch = np.stack([np.asarray(Image.fromarray(im).resize((side, side), Image.Resampling.BILINEAR))
                          for im in images])
        compute_superpixel_hashes(batch[:2], None)  # warm-up (pHash path calibration)
        timings = {}
        for name, fn in (("superpixels", compute_superpixels), ("superpixel_hashes", compute_superpixel_hashes)):
            c = time.process_time()
            out = fn(batch, None)
            timings[name] = (time.process_time() - c) / len(batch)
        counts = [int(m.max()) + 1 for m in compute_superpixels(batch, None)]
        rows.append({"side": side, "films": len(batch), "superpixels_ms_per_film": 1000 * timings["superpixels"],
                     "hashes_ms_per_film": 1000 * timings["superpixel_hashes"],
                     "total_ms_per_film": 1000 * sum(timings.values()),
                     "segments_mean": float(np.mean(counts)), "segments_min": min(counts),
                     "segments_max": max(counts), "hash_rows": int(sum(len(h) for h in out))})
    return {"source": source, "rows": rows}


def write(payload: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "method_steps.json").write_text(json.dumps(payload, indent=2) + "\n")
    s = payload["steps"]
    lines = [
        "# CCG and B+Attention: training step cost and prepare cost", "",
        f"Machine: {payload['machine_line']}; {payload['machine']['torch_threads']} torch threads; "
        f"{payload['date']}.", "",
        f"One training step (forward, losses, backward, SGD step) on the same batch: {s['backbone']}, {s['size']} px, "
        f"batch {s['batch']}, output stride {s['output_stride']} ({s['grid']} x {s['grid']} cells), random init; "
        f"{s['repeats']} interleaved repetitions; medians of process CPU time (all threads), wall time alongside; "
        "'paired' is the median of per-repetition ratios to the baseline step of the same repetition. "
        "Target: at most 1.3x.", "",
        "| method | step CPU (s) | step wall (s) | ratio to baseline | paired ratio |",
        "| --- | --- | --- | --- | --- |",
    ]
    for row in s["rows"]:
        lines.append(f"| {row['method']} | {row['median_step_cpu_s']:.3f} | {row['median_step_wall_s']:.3f} | "
                     f"{row['ratio_to_baseline']:.3f} | {row['paired_median_ratio']:.3f} |")
    p = payload["prepare"]
    lines += ["", f"`gren prepare`'s extra time per film for CCG's fields (SLIC at <= 128 px, labels back to the "
              f"cache side, one pHash per superpixel crop), CPU time per film, on {p['source']}:", "",
              "| cache side | films | superpixels (ms/film) | superpixel_hashes (ms/film) | both (ms/film) | "
              "segments mean (min-max) |", "| --- | --- | --- | --- | --- | --- |"]
    for row in p["rows"]:
        lines.append(f"| {row['side']} | {row['films']} | {row['superpixels_ms_per_film']:.1f} | "
                     f"{row['hashes_ms_per_film']:.1f} | {row['total_ms_per_film']:.1f} | "
                     f"{row['segments_mean']:.1f} ({row['segments_min']}-{row['segments_max']}) |")
    lines += ["", "`ccg` needs only `superpixel_hashes`; `ccg-kr` needs both (the hashes field reruns SLIC: each "
              "field is computed on its own). For scale, prepare's own per-film work (decode, resize, lung "
              "segmentation, lung hashes) is in `prepare.md`."]
    (RESULTS / "method_steps.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: CPU time is not inflated by spinning threads on a shared machine)")
    parser.add_argument("--films", type=int, default=32)
    parser.add_argument("--sides", type=int, nargs="+", default=[128, 256, 512])
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    line, info = machine()
    payload = {"machine_line": line, "machine": info, "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
               "steps": step_costs(args), "prepare": prepare_costs(args)}
    write(payload)
    log.info("%s", (RESULTS / "method_steps.md").read_text())


if __name__ == "__main__":
    main()
