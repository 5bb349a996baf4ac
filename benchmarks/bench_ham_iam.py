"""What HAM and IAM cost: step time and peak memory beside the baseline, and IAM's whole training schedule.

    python benchmarks/bench_ham_iam.py                      # the CPU settings below, a few minutes on 2 cores
    python benchmarks/bench_ham_iam.py --repeats 5 --size 128

Three measurements, each side by side in one run (machine noise hits all rows alike):

1. **Step time** (forward + losses + backward + optimizer step, the method's own ``forward``) on the same
   synthetic batch, interleaved repetitions, median process CPU time and its ratio to the baseline's, in two
   settings: the small CPU variant (``--config cpu-small``: resnet18, output stride 16) for baseline, ham,
   iam round 0, 1 and 2 (the mining rounds after their snapshots); and the published backbones, baseline
   ResNet-50 at stride 32 vs HAM's ResNet-50 at stride 8 (the analytic count says about 9x).
2. **Peak memory**: each method in a fresh subprocess: after a warm-up step the peak resident set size is
   reset (``/proc/self/clear_refs``), then the peak over two steps (``VmHWM``) and its rise over the resident
   size before them (what a step allocates: activations, gradients, optimizer state already there).
3. **IAM's whole schedule**: ``fit`` of baseline and of iam with its default stage plan (round 0 for
   ``train.epochs``, two mining rounds of ``ceil(train.epochs / 3)``) on the same in-memory data, wall time
   of the whole run, and the same total predicted from the step times for the default 9 / 3 / 3 epochs.
   Target: within (rounds + 1) = 3x the baseline's.

Writes ``benchmarks/results/ham_iam.json`` and ``ham_iam.md``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch.utils.data import Dataset

from gren.data.dataset import collate
from gren.methods import TrainContext, build_method
from gren.train.config import resolve_config
from gren.train.engine import TrainingData, build_optimizer, fit
from machine_info import cpu_flags, cpu_model, load_average
from synthetic_items import make_item

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
FLAGS = ("avx", "avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16")
log = logging.getLogger("bench_ham_iam")


def machine() -> dict:
    model, flags, load = cpu_model(), cpu_flags(), load_average()
    return {"cpu": model, "flags": [f for f in FLAGS if f in flags], "cpus": os.cpu_count(), "load_average_1min": load,
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}


class Items(Dataset):
    def __init__(self, n: int, size: int):
        g = torch.Generator().manual_seed(0)
        self.items = [make_item(i, size, g) for i in range(n)]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        return self.items[index]


def config_for(method: str, setting: str, size: int, batch: int, extra=()) -> dict:
    if setting == "small":
        return resolve_config("cpu-small", [f"data.size={size}", f"train.batch_size={batch}", *extra], method=method)
    stride = "8" if method == "ham" else "32"  # the published cuts: HAM's authors' vs the lineage's ResNet-50
    return resolve_config(None, [f"data.size={size}", f"train.batch_size={batch}", "model.backbone=resnet50",
                                 f"model.output_stride={stride}", *extra], method=method)


def prepared(row: str, setting: str, size: int, batch: int):
    """``(method, optimizer)`` for a row name (``iam-round2``: iam after entering its third stage)."""
    name, _, round_text = row.partition("-round")
    config = config_for(name, setting, size, batch)
    torch.manual_seed(0)
    method = build_method(name, config).train()
    if round_text:
        stages = method.stages(config)
        for index in range(1, int(round_text) + 1):
            method.on_stage_start(stages[index], TrainContext(config=config, device=torch.device("cpu"),
                                                              stage=stages[index], stage_index=index))
            with torch.no_grad():  # the next round starts from a changed network
                for p in method.net.parameters():
                    p.add_(torch.randn_like(p) * 1e-3)
    optim_cfg = dict(config["optim"], lr=1e-5)
    return method, build_optimizer(method.param_groups(optim_cfg), optim_cfg)


def forward_flops(size: int) -> dict:
    """Analytic forward FLOPs (``torch.utils.flop_counter``, on the meta device: nothing runs) of one image
    through the published backbones and heads: baseline ResNet-50 stride 32 + grid head, HAM's ResNet-50
    stride 8 + attention + head (the CAM projections, a few MFLOPs, left out)."""
    from torch.utils.flop_counter import FlopCounterMode

    out = {}
    for name in ("baseline", "ham"):
        with torch.device("meta"):
            method = build_method(name, config_for(name, "published", size, 1)).eval()
        images = torch.zeros(1, 1, size, size, device="meta")
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            method.head(method.backbone(images)) if name == "baseline" else method.features(images)
        out[name] = counter.get_total_flops()
    return {"size": size, "baseline_gflops": out["baseline"] / 1e9, "ham_gflops": out["ham"] / 1e9,
            "ratio": out["ham"] / out["baseline"]}


def step(method, optimizer, batch) -> None:
    parts = method(batch)
    optimizer.zero_grad(set_to_none=True)
    parts["total"].backward()
    optimizer.step()


def step_times(rows, setting: str, size: int, batch_size: int, repeats: int) -> list[dict]:
    batch = collate(Items(batch_size, size).items)
    built = {row: prepared(row, setting, size, batch_size) for row in rows}
    for row in rows:
        step(*built[row], batch)  # warm-up
    cpu = {row: [] for row in rows}
    wall = {row: [] for row in rows}
    for rep in range(repeats):
        for row in (rows if rep % 2 == 0 else tuple(reversed(rows))):
            w, c = time.perf_counter(), time.process_time()
            step(*built[row], batch)
            cpu[row].append(time.process_time() - c)
            wall[row].append(time.perf_counter() - w)
        log.info("%s: repetition %d/%d", setting, rep + 1, repeats)
    base = rows[0]
    out = []
    for row in rows:
        paired = statistics.median(t / b for t, b in zip(cpu[row], cpu[base]))
        out.append({"row": row, "cpu_s": statistics.median(cpu[row]), "wall_s": statistics.median(wall[row]),
                    "ratio": statistics.median(cpu[row]) / statistics.median(cpu[base]), "paired_ratio": paired})
    return out


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def child(row: str, setting: str, size: int, batch_size: int) -> None:
    """Subprocess body: build, one warm-up step, reset the peak (``/proc/self/clear_refs``), two steps; print
    the peak resident set size over those steps (MiB) and its rise over the resident size before them."""
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    batch = collate(Items(batch_size, size).items)
    method, optimizer = prepared(row, setting, size, batch_size)
    step(method, optimizer, batch)
    before = _status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux)
    for _ in range(2):
        step(method, optimizer, batch)
    peak = _status_kib("VmHWM")
    print(json.dumps({"peak_rss_mib": peak / 1024, "step_growth_mib": (peak - before) / 1024,
                      "lifetime_peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def peak_memory(rows, setting: str, size: int, batch_size: int) -> dict:
    out = {}
    for row in rows:
        result = subprocess.run([sys.executable, __file__, "--child", row, "--child-setting", setting,
                                 "--size", str(size), "--batch", str(batch_size)],
                                capture_output=True, text=True, check=True, env=dict(os.environ, BENCH_THREADS=str(
                                    torch.get_num_threads())))
        out[row] = json.loads(result.stdout.strip().splitlines()[-1])
        log.info("%s %s: %s", setting, row, out[row])
    return out


def whole_schedule(size: int, batch_size: int, epochs: int, steps: int) -> dict:
    """Wall time of ``fit`` for baseline and iam (default stage plan) on the same in-memory data."""
    dataset = Items(24, size)
    data = TrainingData(dataset, list(range(0, 24, 2)), list(range(1, 24, 2)))
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("baseline", "iam"):
            config = resolve_config("cpu-small", [f"data.size={size}", f"train.batch_size={batch_size}",
                                                  f"train.epochs={epochs}", f"train.max_steps_per_epoch={steps}",
                                                  "data.workers=0", "device.device=cpu", "train.log_every=1000"],
                                    method=name)
            start = time.perf_counter()
            history = fit(config, Path(tmp) / name, data)
            out[name] = {"wall_s": time.perf_counter() - start, "epochs": len(history),
                         "steps": sum(line["steps"] for line in history),
                         "epoch_time_s": sum(line["time_s"] for line in history),
                         "stages": [line["stage"] for line in history]}
            log.info("schedule %s: %s", name, out[name])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--big-size", type=int, default=128, help="input side for the ResNet-50 rows")
    parser.add_argument("--big-batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--schedule-epochs", type=int, default=3)
    parser.add_argument("--schedule-steps", type=int, default=3)
    parser.add_argument("--child")
    parser.add_argument("--child-setting")
    args = parser.parse_args()
    if args.child:
        child(args.child, args.child_setting, args.size, args.batch)
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("gren").setLevel(logging.WARNING)
    torch.set_num_threads(args.threads)
    small_rows = ("baseline", "ham", "iam", "iam-round1", "iam-round2")
    big_rows = ("baseline", "ham")
    result = {"machine": machine(), "settings": {
        "small": {"config": "cpu-small (resnet18, output stride 16)", "size": args.size, "batch": args.batch},
        "published": {"config": "ResNet-50: baseline at stride 32, ham at stride 8", "size": args.big_size,
                      "batch": args.big_batch}}, "repeats": args.repeats}
    result["steps_small"] = step_times(small_rows, "small", args.size, args.batch, args.repeats)
    result["steps_published"] = step_times(big_rows, "published", args.big_size, args.big_batch, max(2, args.repeats // 2))
    result["memory_small"] = peak_memory(small_rows, "small", args.size, args.batch)
    result["memory_published"] = peak_memory(big_rows, "published", args.big_size, args.big_batch)
    result["flops"] = [forward_flops(size) for size in (args.big_size, 512)]
    result["schedule"] = whole_schedule(args.size, args.batch, args.schedule_epochs, args.schedule_steps)
    times = {r["row"]: r["cpu_s"] for r in result["steps_small"]}
    epochs, rounds = 9, math.ceil(9 / 3)
    predicted = (epochs * times["iam"] + rounds * (times["iam-round1"] + times["iam-round2"])) / (epochs * times["baseline"])
    result["iam_default_schedule_ratio_predicted"] = predicted
    result["load_average_1min_at_end"] = Path("/proc/loadavg").read_text().split()[0] if Path("/proc/loadavg").is_file() else "n/a"
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "ham_iam.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / "ham_iam.md").write_text(report(result))
    log.info("wrote %s", RESULTS / "ham_iam.md")


def report(result: dict) -> str:
    m = result["machine"]
    small, big = result["settings"]["small"], result["settings"]["published"]
    lines = ["# HAM and IAM: cost beside the baseline\n",
             f"Machine: {m['cpu']}, flags {' '.join(m['flags'])}, {m['cpus']} CPUs, {m['torch_threads']} torch threads, "
             f"torch {m['torch']}, {m['date']}; load average (1 min, other jobs share the machine) {m['load_average_1min']} at the "
             f"start, {result.get('load_average_1min_at_end', 'n/a')} at the end. Written by `benchmarks/bench_ham_iam.py`; "
             "everything below in one run.\n",
             "## Step time on the same batch\n",
             "One training step (the method's forward with all its losses, backward, optimizer step); "
             f"{result['repeats']} interleaved repetitions, medians of process CPU time; 'paired' is the median of "
             "per-repetition ratios to the baseline step. `iam-roundT`: a mining round after its snapshots "
             "(T frozen forwards + the student on erased and original films).\n"]
    for key, setting in (("steps_small", small), ("steps_published", big)):
        lines += [f"**{setting['config']}**, {setting['size']} px, batch {setting['batch']}:\n",
                  "| method | step CPU (s) | step wall (s) | ratio to baseline | paired ratio | peak RSS in steps (MiB) | step peak over resident (MiB) |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        memory = result["memory_small" if key == "steps_small" else "memory_published"]
        for row in result[key]:
            mem = memory.get(row["row"], {})
            lines.append(f"| {row['row']} | {row['cpu_s']:.3f} | {row['wall_s']:.3f} | {row['ratio']:.2f} | "
                         f"{row['paired_ratio']:.2f} | {mem.get('peak_rss_mib', float('nan')):.0f} | "
                         f"{mem.get('step_growth_mib', float('nan')):.0f} |")
        lines.append("")
    lines += ["Analytic forward FLOPs per image (`torch.utils.flop_counter` on the meta device), the published "
              "backbones: " + "; ".join(f"{f['size']} px: baseline {f['baseline_gflops']:.1f} GFLOPs, ham "
                                         f"{f['ham_gflops']:.1f} GFLOPs, **{f['ratio']:.1f}x**" for f in result["flops"])
              + ". The measured CPU ratio is lower at small inputs, where the stride-32 network's late stages run "
              "on a few cells and the stem and memory-bound layers weigh more.", ""]
    s = result["schedule"]
    ratio = s["iam"]["epoch_time_s"] / s["baseline"]["epoch_time_s"]
    lines += ["## IAM's whole schedule\n",
              f"`fit` on the same in-memory data (cpu-small, {small['size']} px, batch {small['batch']}, "
              f"{s['baseline']['steps'] // max(1, s['baseline']['epochs'])} steps per epoch): baseline "
              f"{s['baseline']['epochs']} epochs, iam {s['iam']['epochs']} epochs ({', '.join(s['iam']['stages'])}).\n",
              "| method | epochs | steps | training time (s, epochs only) | whole fit wall (s) |",
              "| --- | --- | --- | --- | --- |"]
    for name in ("baseline", "iam"):
        lines.append(f"| {name} | {s[name]['epochs']} | {s[name]['steps']} | {s[name]['epoch_time_s']:.1f} | "
                     f"{s[name]['wall_s']:.1f} |")
    lines += ["", f"IAM / baseline training time: **{ratio:.2f}x** (measured, this short schedule); "
              f"for the default 9 / 3 / 3 epochs predicted from the step times above: "
              f"**{result['iam_default_schedule_ratio_predicted']:.2f}x** the baseline's 9 epochs "
              "(target: within rounds + 1 = 3x).", ""]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
