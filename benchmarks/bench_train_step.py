"""Training step time: ``baseline`` vs each GREN variant on the same batch (target: regularizers <= +5%).

    python benchmarks/bench_train_step.py                 # CPU: resnet18, 256 px, batch 4, stride 16
    python benchmarks/bench_train_step.py --repeats 20 --size 256 --batch 4
    python benchmarks/bench_train_step.py --gpu           # also the GPU mode when CUDA is available

CPU mode: one model per method, built from the same seed, trains on the same synthetic batch (images,
boxes, lung masks and hashes as a prepared cache serves them). Repetitions are interleaved
(baseline, gren, gren-intra, ... then again) so that machine noise hits all methods alike; the
figure is the median step time (forward + losses + backward + SGD step) and its ratio to the
baseline's, plus the regularizer terms alone (their forward + backward from the features). Both the
process CPU time (``time.process_time``, all threads; robust when other jobs share the cores) and the
wall time are recorded; the ratios use CPU time.

GPU mode (``--gpu``, CUDA only): ResNet-50 at 512 px, images/s of a training step for ``baseline``
and ``gren`` with bf16 autocast and channels_last, ``torch.compile`` off and on.

Writes ``benchmarks/results/train_step.json`` and ``train_step.md``.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from gren.methods import build_method
from gren.train.config import resolve_config
from synthetic_items import synthetic_batch

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
METHODS = ("baseline", "gren", "gren-intra", "gren-inter", "gren-cosine")
log = logging.getLogger("bench_train_step")


def _step(method, optimizer, batch, images, amp: bool = False, device_type: str = "cpu") -> None:
    """One training step through the method protocol: ``method(batch)`` is the whole step's losses."""
    with torch.autocast(device_type=device_type, dtype=torch.bfloat16, enabled=amp):
        parts = method({**batch, "image": images})
    optimizer.zero_grad(set_to_none=True)
    parts["total"].backward()
    optimizer.step()


def cpu_mode(args) -> dict:
    config = resolve_config("cpu-small", [f"data.size={args.size}", f"train.batch_size={args.batch}",
                                          f"model.backbone={args.backbone}"])
    batch = synthetic_batch(args.batch, args.size)
    images = batch["image"]
    models, optimizers = {}, {}
    for name in METHODS:
        torch.manual_seed(0)
        models[name] = build_method(name, config).train()
        optimizers[name] = torch.optim.SGD(models[name].parameters(), lr=1e-4, momentum=0.9, nesterov=True)
    for name in METHODS:  # warm-up
        for _ in range(args.warmup):
            _step(models[name], optimizers[name], batch, images)
    times = {name: [] for name in METHODS}  # process CPU seconds
    walls = {name: [] for name in METHODS}
    reg_times = {name: [] for name in METHODS if name != "baseline"}
    for rep in range(args.repeats):
        order = METHODS if rep % 2 == 0 else tuple(reversed(METHODS))
        for name in order:
            wall, cpu = time.perf_counter(), time.process_time()
            _step(models[name], optimizers[name], batch, images)
            times[name].append(time.process_time() - cpu)
            walls[name].append(time.perf_counter() - wall)
            if name != "baseline":
                with torch.no_grad():
                    features = models[name].backbone(images)
                samples = []
                for _ in range(3):
                    leaf = features.clone().requires_grad_(True)
                    cpu = time.process_time()
                    extra = models[name].extra_losses({"features": leaf}, batch)
                    sum(extra.values()).backward()
                    samples.append(time.process_time() - cpu)
                reg_times[name].append(min(samples))
        log.info("repetition %d/%d done", rep + 1, args.repeats)
    base = statistics.median(times["baseline"])
    rows = []
    for name in METHODS:
        median = statistics.median(times[name])
        # per-repetition ratios to the baseline step of the same repetition (paired, noise-robust)
        paired = statistics.median(t / b for t, b in zip(times[name], times["baseline"]))
        regularizer = statistics.median(reg_times[name]) if name in reg_times else 0.0
        rows.append({
            "method": name, "median_step_cpu_s": median, "median_step_wall_s": statistics.median(walls[name]),
            "ratio_to_baseline": median / base, "paired_median_ratio": paired,
            "regularizer_cpu_s": regularizer, "regularizer_share_of_baseline_step": regularizer / base,
            "images_per_s_wall": args.batch / statistics.median(walls[name]),
        })
    return {"backbone": args.backbone, "size": args.size, "batch": args.batch, "output_stride": 16,
            "grid": int(build_method("baseline", config).grid_outputs(images[:1])["logits"].shape[-1]),
            "repeats": args.repeats, "rows": rows}


def gpu_mode(args) -> dict:
    device = torch.device("cuda")
    config = resolve_config(None, [f"data.size={args.gpu_size}"])
    batch = synthetic_batch(args.gpu_batch, args.gpu_size)
    batch_gpu = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
    images = batch_gpu["image"].contiguous(memory_format=torch.channels_last)
    rows = []
    for compile_flag in (False, True):
        for name in ("baseline", "gren"):
            torch.manual_seed(0)
            method = build_method(name, config).to(device).to(memory_format=torch.channels_last).train()
            optimizer = torch.optim.SGD(method.parameters(), lr=1e-4, momentum=0.9, nesterov=True)
            runner = torch.compile(method) if compile_flag else method
            for _ in range(args.warmup + (3 if compile_flag else 0)):
                _step(runner, optimizer, batch_gpu, images, amp=True, device_type="cuda")
            torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(args.gpu_steps):
                _step(runner, optimizer, batch_gpu, images, amp=True, device_type="cuda")
            torch.cuda.synchronize()
            seconds = time.perf_counter() - start
            rows.append({"method": name, "compile": compile_flag, "step_s": seconds / args.gpu_steps,
                         "images_per_s": args.gpu_batch * args.gpu_steps / seconds})
            del method, optimizer, runner
            torch.cuda.empty_cache()
    return {"device": torch.cuda.get_device_name(), "backbone": "resnet50", "size": args.gpu_size,
            "batch": args.gpu_batch, "amp": "bf16", "channels_last": True, "rows": rows}


def write(payload: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "train_step.json").write_text(json.dumps(payload, indent=2) + "\n")
    cpu = payload["cpu"]
    lines = [
        f"One training step (forward, losses, backward, SGD step) on the same batch: {cpu['backbone']}, "
        f"{cpu['size']} px, batch {cpu['batch']}, output stride {cpu['output_stride']} ({cpu['grid']} x {cpu['grid']} "
        f"cells), {payload['machine']['torch_threads']} torch threads; {cpu['repeats']} interleaved repetitions, "
        "medians of process CPU time (all threads; robust to other jobs on the machine), wall time alongside. "
        "'paired' is the median of per-repetition ratios to the baseline step of the same repetition; "
        "'regularizers' times the graph terms alone (forward + backward from the features, best of 3 per "
        "repetition), as a share of the baseline step.",
        "",
        "| method | step CPU (s) | step wall (s) | ratio to baseline | paired ratio | regularizers CPU (ms) | "
        "regularizers / baseline step |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in cpu["rows"]:
        lines.append(f"| {row['method']} | {row['median_step_cpu_s']:.3f} | {row['median_step_wall_s']:.3f} | "
                     f"{row['ratio_to_baseline']:.3f} | {row['paired_median_ratio']:.3f} | "
                     f"{1000 * row['regularizer_cpu_s']:.1f} | {100 * row['regularizer_share_of_baseline_step']:.2f}% |")
    if payload.get("gpu"):
        gpu = payload["gpu"]
        lines += ["", f"GPU ({gpu['device']}): {gpu['backbone']}, {gpu['size']} px, batch {gpu['batch']}, bf16 autocast, "
                  "channels_last.", "", "| method | torch.compile | step (ms) | images/s |", "| --- | --- | --- | --- |"]
        for row in gpu["rows"]:
            lines.append(f"| {row['method']} | {'on' if row['compile'] else 'off'} | {1000 * row['step_s']:.1f} | "
                         f"{row['images_per_s']:.0f} |")
    else:
        lines += ["", "GPU mode not measured here (no CUDA device); run with `--gpu` on a GPU machine."]
    (RESULTS / "train_step.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (1: no OpenMP spin-waiting in the CPU times on a shared machine)")
    parser.add_argument("--gpu", action="store_true", help="also the GPU mode (CUDA only)")
    parser.add_argument("--gpu-size", type=int, default=512)
    parser.add_argument("--gpu-batch", type=int, default=32)
    parser.add_argument("--gpu-steps", type=int, default=20)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    payload = {"name": "train_step", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
               "machine": {"platform": platform.platform(), "processor": platform.processor(),
                           "torch_threads": torch.get_num_threads()},
               "cpu": cpu_mode(args)}
    if args.gpu and torch.cuda.is_available():
        payload["gpu"] = gpu_mode(args)
    elif args.gpu:
        log.warning("--gpu: CUDA is not available; GPU mode skipped")
    write(payload)
    for row in payload["cpu"]["rows"]:
        log.info("%-12s %.3f CPU s/step  x%.3f (paired x%.3f)  regularizers %.1f CPU ms", row["method"],
                 row["median_step_cpu_s"], row["ratio_to_baseline"], row["paired_median_ratio"],
                 1000 * row["regularizer_cpu_s"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
