"""pHash benchmark: each CPU path of gren.hashing.phash against imagehash.phash on the real NIH sample,
exactness and speed, side by side in one run, with the machine named.

Paths (``gren.hashing.CPU_PATHS``): ``int8`` (int8 GEMMs; exact only where the CPU has VNNI, refused
elsewhere), ``int8_7bit`` (int8 GEMMs with 7-bit weight digits: exact without VNNI too), ``pillow`` (Pillow's own resize per image + one batched scipy DCT), ``float64`` (float64
GEMMs, the CUDA path run on the CPU), and ``auto`` (what ``phash`` uses by default: the calibrated
choice, ``gren.hashing.calibrate``).

Exactness, per path: every image in ``$GREN_SHARED_DATA/nih/images`` (2,220 JPEGs, 512 x 512), one
random non-square crop of each (odd sizes, as lung regions are) and the ``originals/`` (lossless
1024 x 1024 PNGs, some RGBA, given as PIL images), compared bit for bit with ``imagehash.phash``.
Which images count as median ties (margin < 1e-6) is decided by the reference (Pillow's resize and
scipy's DCT), not by gren. An int8 path that the CPU refuses is still run through the internal
functions, to count how many hashes it would get wrong.

Speed: images/s of ``imagehash.phash`` (one PIL image at a time, as it is used) and of every path on
a uint8 tensor (batches of 64), timed in alternating rounds on the same pre-decoded images (decoding
is not timed); ratios are medians of per-round ratios. ``auto`` is also timed with 1 torch thread.
``lung_hashes`` (prepare's hash stage: 2 crops of many sizes per image) is timed per path via
``$GREN_PHASH_PATH``. With CUDA available, the GPU throughput is reported too.

Writes benchmarks/results/phash.json and phash.md (``--name`` changes the stem). Run:
``nice -n 10 python benchmarks/bench_phash.py`` (``--limit 300`` for a quick run). To see what a CPU
without VNNI gets from oneDNN's int8 kernels: ``ONEDNN_MAX_CPU_ISA=AVX2 python benchmarks/bench_phash.py
--name phash_onednn_avx2`` (limits oneDNN only; Pillow, scipy and MKL keep the real CPU's speed).
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import imagehash
import numpy as np
import PIL
import scipy
import scipy.fftpack
import torch
from PIL import Image
from tqdm import tqdm

import gren.hashing as hashing
import machine_info
from gren.core.paths import shared_data_dir
from gren.hashing import CPU_PATHS, PHASH_PATH_ENV, TIE_MARGIN, calibrate, phash, to_hex
from gren.lungs.regions import lung_hashes
from machine_info import cpu_model

log = logging.getLogger("bench_phash")
RESULTS = Path(__file__).resolve().parent / "results"
BATCH = 64
FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8")
ISA_LIMITS = ("ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS", "ATEN_CPU_CAPABILITY")  # recorded when set


def cpu_flags() -> dict[str, bool]:
    """Presence of the instruction-set flags that decide which path wins (from /proc/cpuinfo)."""
    present = machine_info.cpu_flags()
    return {flag: flag in present for flag in FLAGS} if present else {}


def machine() -> tuple[str, dict]:
    """One line naming the CPU, its cores and flags (what BENCHMARKS.md shows), and the same as a dict."""
    flags = cpu_flags()
    shown = ", ".join(f"{flag} {'yes' if on else 'no'}" for flag, on in flags.items())
    summary = f"{cpu_model()} ({platform.machine()}, {os.cpu_count()} cores; {shown or 'flags unknown'})"
    limits = {name: os.environ[name] for name in ISA_LIMITS if name in os.environ}
    if limits:
        summary += " with " + ", ".join(f"{name}={value}" for name, value in limits.items())
    return summary, {"isa_limits": limits, "model": cpu_model(), "cores": os.cpu_count(), "flags": flags,
                     "torch_threads": torch.get_num_threads(), "platform": platform.platform()}  # fmt: skip


# --------------------------------------------------------------------------------------------
# Exactness
# --------------------------------------------------------------------------------------------


def reference(image: Image.Image) -> tuple[str, float]:
    """imagehash's hex digest and, computed as imagehash computes the block, the tie margin."""
    pixels = np.asarray(image.convert("L").resize((32, 32), Image.Resampling.LANCZOS), dtype=np.float64)
    low = scipy.fftpack.dct(scipy.fftpack.dct(pixels, axis=0), axis=1)[:8, :8].reshape(-1)
    return str(imagehash.phash(image)), float(np.abs(low - np.median(low)).min())


def refused(path: str) -> bool:
    return path in CPU_PATHS and not hashing.path_usable(path)


def hashes_with(path: str, x) -> list[str]:
    """Hex digests through one path; an int8 path the CPU refuses runs through the internals."""
    if refused(path):
        if isinstance(x, torch.Tensor):
            thumbnails = hashing._resize_cpu(x, path)
        else:
            items = [hashing._to_gray_tensor(item) for item in x]
            thumbnails = torch.cat([hashing._resize_varied([item], path) for item in items])
        return to_hex(hashing._bits_from_low(hashing._low_dct(thumbnails))[0])
    return to_hex(phash(x, path=path))


def count(ours: list[str], expected: list[tuple[str, float]]) -> dict:
    equal = np.array([a == b for a, (b, _) in zip(ours, expected)])
    ties = np.array([margin < TIE_MARGIN for _, margin in expected])
    return {"images": len(ours), "ties_left_out": int(ties.sum()), "bit_exact": int(equal[~ties].sum()),
            "compared": int((~ties).sum()), "bit_exact_including_ties": int(equal.sum())}  # fmt: skip


def exactness(images: list[Image.Image], arrays: np.ndarray, originals: list[Image.Image], seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    height, width = arrays.shape[1:]
    crops = []
    for array in arrays:
        y0, x0 = rng.integers(0, height // 3), rng.integers(0, width // 3)
        y1, x1 = rng.integers(height // 2, height + 1), rng.integers(width // 2, width + 1)
        crops.append(np.ascontiguousarray(array[y0:y1, x0:x1]))
    expected = {
        "nih_512": [reference(im) for im in tqdm(images, desc="imagehash", leave=False)],
        "crops": [reference(Image.fromarray(c)) for c in tqdm(crops, desc="imagehash crops", leave=False)],
        "originals_1024": [reference(im) for im in originals],
    }
    inputs = {"nih_512": torch.from_numpy(arrays), "crops": crops, "originals_1024": originals}
    result = {"crop_sizes_distinct": len({c.shape for c in crops})}
    for path in (*CPU_PATHS, "auto"):
        result[path] = {name: count(hashes_with(path, inputs[name]), expected[name]) for name in inputs}
        log.info("exactness %s: %s", path, {k: f"{v['bit_exact']}/{v['compared']}" for k, v in result[path].items()})
    return result


# --------------------------------------------------------------------------------------------
# Speed
# --------------------------------------------------------------------------------------------


def path_rate(tensor: torch.Tensor, path: str) -> float:
    if refused(path):
        run = lambda batch: hashing._bits_from_low(hashing._low_dct(hashing._resize_cpu(batch, path)))  # noqa: E731
    else:
        run = lambda batch: phash(batch, path=path)  # noqa: E731
    start = time.perf_counter()
    for first in range(0, len(tensor), BATCH):
        run(tensor[first : first + BATCH])
    if tensor.device.type == "cuda":
        torch.cuda.synchronize()
    return len(tensor) / (time.perf_counter() - start)


def imagehash_rate(images: list[Image.Image]) -> float:
    start = time.perf_counter()
    for image in images:
        imagehash.phash(image)
    return len(images) / (time.perf_counter() - start)


def lung_rates(arrays: np.ndarray) -> dict[str, float]:
    """images/s of lung_hashes (2 crops per image from prior-like boxes of many sizes), per path."""
    masks = np.zeros(arrays.shape, dtype=np.uint8)
    rng = np.random.default_rng(1)
    for index in range(len(masks)):
        dy, dx = rng.integers(-20, 21, 2)
        masks[index, 80 + dy : 370 + dy, 50 + dx : 230 + dx] = 1
        masks[index, 75 - dy : 375 - dy, 280 - dx : 465 - dx] = 2
    rates = {}
    saved = os.environ.get(PHASH_PATH_ENV)
    try:
        for path in (*[p for p in CPU_PATHS if not refused(p)], "auto"):
            os.environ[PHASH_PATH_ENV] = path
            lung_hashes(arrays, masks)  # warm the coefficient cache for these sizes
            start = time.perf_counter()
            lung_hashes(arrays, masks)
            rates[path] = len(arrays) / (time.perf_counter() - start)
    finally:
        if saved is None:
            os.environ.pop(PHASH_PATH_ENV, None)
        else:
            os.environ[PHASH_PATH_ENV] = saved
    return rates


def speed(images: list[Image.Image], arrays: np.ndarray, rounds: int, per_round: int) -> dict:
    tensor = torch.from_numpy(arrays)
    columns = [*CPU_PATHS, "auto"]
    for path in columns:
        path_rate(tensor[:BATCH], path)  # warm caches (coefficients per size, worker threads)
    threads = torch.get_num_threads()
    rows = []
    for round_index in range(rounds):
        first = (round_index * per_round) % max(1, len(images) - per_round + 1)
        subset = slice(first, first + per_round)
        row = {"imagehash": imagehash_rate(images[subset])}
        for path in columns:
            row[path] = path_rate(tensor[subset], path)
        torch.set_num_threads(1)
        row["auto_1_thread"] = path_rate(tensor[subset], "auto")
        torch.set_num_threads(threads)
        rows.append(row)
        log.info("round %d: %s", round_index, ", ".join(f"{k} {v:.0f}/s" for k, v in row.items()))
    names = list(rows[0])
    result = {
        "rounds": rounds, "images_per_round": per_round, "batch": BATCH, "torch_threads": threads,
        "images_per_s": {name: float(np.median([row[name] for row in rows])) for name in names},
        "ratio_to_imagehash": {name: float(statistics.median(row[name] / row["imagehash"] for row in rows))
                               for name in names if name != "imagehash"},
        "lung_hashes_images": min(256, len(arrays)),
        "lung_hashes_images_per_s": lung_rates(arrays[:256]),
    }  # fmt: skip
    if torch.cuda.is_available():
        cuda = tensor.cuda()
        path_rate(cuda[:BATCH], "auto")
        result["cuda_images_per_s"] = float(np.median([path_rate(cuda, "auto") for _ in range(3)]))
        result["cuda_device"] = torch.cuda.get_device_name()
        result["cuda_bit_exact_vs_cpu"] = bool(torch.equal(phash(cuda).cpu(), phash(tensor)))
    return result


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------

LABELS = {
    "int8": "int8 GEMMs",
    "int8_7bit": "int8 GEMMs, 7-bit weight digits",
    "pillow": "Pillow resize per image + batched DCT",
    "float64": "float64 GEMMs",
    "auto": "auto (calibrated choice)",
    "auto_1_thread": "auto, 1 torch thread",
}


def write_markdown(result: dict, path: Path) -> None:
    exact, speed_, calibration = result["exactness"], result["speed"], result["calibration"]
    rates, ratios = speed_["images_per_s"], speed_["ratio_to_imagehash"]
    refusals = [name for name, ok in calibration["usable"].items() if not ok]  # as measured, not as now
    int8_note = f"; {', '.join(refusals)} not exact on this CPU, refused" if refusals else ""
    lines = [
        "# pHash: gren.hashing.phash vs imagehash.phash",
        "",
        f"{result['date']}, {result['machine']}; Python {result['python']}, torch {result['torch']}, "
        f"Pillow {result['pillow']}, imagehash {result['imagehash']}, scipy {result['scipy']}; "
        f"load average at start {result['load_average']}.",
        "",
        f"**auto / imagehash: {ratios['auto']:.1f}x** (auto chose `{calibration['choice']}` here{int8_note}).",
        "",
        "## Exactness (bit-exact / compared; median ties, decided by the reference, left out)",
        "",
        f"| path | NIH 512 x 512 JPEG | random crops ({exact['crop_sizes_distinct']} sizes) | NIH 1024 PNG originals |",
        "| --- | --- | --- | --- |",
    ]
    for name in (*CPU_PATHS, "auto"):
        cells = [f"{c['bit_exact']} / {c['compared']} ({c['ties_left_out']} ties)" for c in exact[name].values()]
        note = " (refused here)" if name in refusals else ""
        lines.append(f"| {LABELS[name]}{note} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"## Speed (pre-decoded images, batches of {speed_['batch']}, {speed_['torch_threads']} torch threads, "
        f"alternating rounds: median of {speed_['rounds']} x {speed_['images_per_round']} images)",
        "",
        "| | images/s | / imagehash |",
        "| --- | --- | --- |",
        f"| imagehash.phash (PIL image, one at a time) | {rates['imagehash']:.0f} | 1.0x |",
    ]
    for name in (*CPU_PATHS, "auto", "auto_1_thread"):
        note = " (refused here: inexact)" if name in refusals else ""
        lines.append(f"| gren phash, {LABELS[name]}{note} | {rates[name]:.0f} | {ratios[name]:.1f}x |")
    if "cuda_images_per_s" in speed_:
        lines.append(f"| gren phash on {speed_['cuda_device']} | {speed_['cuda_images_per_s']:.0f} | |")
    lung = speed_["lung_hashes_images_per_s"]
    lines += [
        "",
        f"`lung_hashes` (prepare's hash stage: 2 crops of many sizes per image, {speed_['lung_hashes_images']} "
        "images), images/s: "
        + ", ".join(f"{name} {rate:.0f}" for name, rate in lung.items()) + ".",
        "",
        "Calibration (16 noise images of 512 x 512, once per process; images per CPU-second of this process): "
        + ", ".join(f"{name} {rate:.0f}" for name, rate in calibration["images_per_s"].items())
        + f" -> `{calibration['choice']}`.",
        "",
    ]
    path.write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=None, help="use the first N images only")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--per-round", type=int, default=256)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--markdown-only", action="store_true", help="rewrite NAME.md from NAME.json")
    parser.add_argument("--name", default="phash", help="result file stem (e.g. phash_onednn_avx2 for a run "
                        "with ONEDNN_MAX_CPU_ISA=AVX2, standing in for a CPU without VNNI)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.markdown_only:
        write_markdown(json.loads((args.out / f"{args.name}.json").read_text()), args.out / f"{args.name}.md")
        return 0
    folder = shared_data_dir() / "nih" / "images"
    if not folder.is_dir():
        log.error("real images not found at %s (set GREN_SHARED_DATA)", folder)
        return 1
    if os.environ.get(PHASH_PATH_ENV, "auto").strip().lower() != "auto":
        log.warning("$%s is set: 'auto' below is that path, not the calibrated choice", PHASH_PATH_ENV)
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))[: args.limit]
    images = []
    for path in tqdm(paths, desc="decode", leave=False):
        with Image.open(path) as image:
            images.append(image.convert("L"))
    arrays = np.stack([np.asarray(image) for image in images])
    originals = []
    for path in sorted((folder.parent / "originals").glob("*.png")):
        with Image.open(path) as image:
            image.load()
            originals.append(image.copy())
    load = os.getloadavg()
    summary, cpu = machine()
    result = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": summary,
        "cpu": cpu,
        "load_average": [round(v, 2) for v in load],
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "pillow": PIL.__version__,
        "imagehash": imagehash.__version__,
        "scipy": scipy.__version__,
        "numpy": np.__version__,
        "calibration": calibrate(),
        "exactness": exactness(images, arrays, originals),
        "speed": speed(images, arrays, args.rounds, min(args.per_round, len(images))),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(result, indent=2))
    write_markdown(result, args.out / f"{args.name}.md")
    log.info("wrote %s", args.out / f"{args.name}.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
