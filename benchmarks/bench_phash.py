"""pHash benchmark: exactness of gren.hashing.phash against imagehash on the real NIH sample, and speed.

Exactness: every image in ``$GREN_SHARED_DATA/nih/images`` (2,220 JPEGs, 512 x 512), plus one random
non-square crop of each (odd sizes, as lung regions are), compared bit for bit with
``imagehash.phash``. Images whose low DCT block ties at the median (margin < 1e-6; flat images) are
counted and left out.

Speed: images/s of ``imagehash.phash`` (one PIL image at a time, as it is used) and of ``phash`` on
a uint8 tensor (batches of 64), timed side by side in alternating rounds on the same pre-decoded
images (decoding is not timed); the ratio is the median of the per-round ratios. Ours is timed with
torch's default intra-op threads and with 1 thread (the machine's other load changes which is faster).
With CUDA available, the GPU throughput is reported too.

Writes benchmarks/results/phash.json and phash.md. Run: ``nice -n 10 python benchmarks/bench_phash.py``.
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
import torch
from PIL import Image
from tqdm import tqdm

from gren.hashing import TIE_MARGIN, phash, phash_with_margin, to_hex
from gren.lungs.regions import lung_hashes
from gren.paths import shared_data_dir

log = logging.getLogger("bench_phash")
RESULTS = Path(__file__).resolve().parent / "results"
BATCH = 64


def exactness(images: list[Image.Image], arrays: np.ndarray, seed: int = 0) -> dict:
    bits, margin = phash_with_margin(torch.from_numpy(arrays))
    ours = to_hex(bits)
    ties = margin.numpy() < TIE_MARGIN
    reference = [str(imagehash.phash(im)) for im in tqdm(images, desc="imagehash", leave=False)]
    equal = np.array([a == b for a, b in zip(ours, reference)])
    rng = np.random.default_rng(seed)
    crops = []
    height, width = arrays.shape[1:]
    for array in arrays:
        y0, x0 = rng.integers(0, height // 3), rng.integers(0, width // 3)
        y1, x1 = rng.integers(height // 2, height + 1), rng.integers(width // 2, width + 1)
        crops.append(np.ascontiguousarray(array[y0:y1, x0:x1]))
    crop_bits, crop_margin = phash_with_margin(crops)
    crop_ties = crop_margin.numpy() < TIE_MARGIN
    crop_equal = np.array(
        [a == str(imagehash.phash(Image.fromarray(c))) for a, c in zip(to_hex(crop_bits), crops)]
    )
    return {
        "images": int(len(images)),
        "ties_left_out": int(ties.sum()),
        "bit_exact": int(equal[~ties].sum()),
        "bit_exact_share": float(equal[~ties].mean()),
        "bit_exact_including_ties": int(equal.sum()),
        "crops": int(len(crops)),
        "crop_sizes_distinct": int(len({c.shape for c in crops})),
        "crop_ties_left_out": int(crop_ties.sum()),
        "crop_bit_exact_share": float(crop_equal[~crop_ties].mean()),
    }


def ours_rate(tensor: torch.Tensor) -> float:
    start = time.perf_counter()
    for first in range(0, len(tensor), BATCH):
        phash(tensor[first : first + BATCH])
    if tensor.device.type == "cuda":
        torch.cuda.synchronize()
    return len(tensor) / (time.perf_counter() - start)


def imagehash_rate(images: list[Image.Image]) -> float:
    start = time.perf_counter()
    for image in images:
        imagehash.phash(image)
    return len(images) / (time.perf_counter() - start)


def speed(images: list[Image.Image], arrays: np.ndarray, rounds: int, per_round: int) -> dict:
    tensor = torch.from_numpy(arrays)
    phash(tensor[:BATCH])  # warm caches (coefficients per size)
    default_threads = torch.get_num_threads()
    rows = []
    for round_index in range(rounds):
        first = (round_index * per_round) % max(1, len(images) - per_round)
        subset = slice(first, first + per_round)
        reference = imagehash_rate(images[subset])
        torch.set_num_threads(default_threads)
        ours_default = ours_rate(tensor[subset])
        torch.set_num_threads(1)
        ours_single = ours_rate(tensor[subset])
        torch.set_num_threads(default_threads)
        rows.append((reference, ours_default, ours_single))
        log.info("round %d: imagehash %.0f/s, ours %.0f/s (%d threads), %.0f/s (1 thread)",
                 round_index, reference, ours_default, default_threads, ours_single)  # fmt: skip
    reference, default, single = (np.array(column) for column in zip(*rows))
    result = {
        "rounds": rounds,
        "images_per_round": per_round,
        "batch": BATCH,
        "imagehash_images_per_s": float(np.median(reference)),
        f"ours_images_per_s_{default_threads}_threads": float(np.median(default)),
        "ours_images_per_s_1_thread": float(np.median(single)),
        f"ratio_{default_threads}_threads": float(statistics.median(default / reference)),
        "ratio_1_thread": float(statistics.median(single / reference)),
        "ratio_best": float(statistics.median(np.maximum(default, single) / reference)),
    }
    # lung crops (many sizes) through lung_hashes, prior-box masks: prepare's hashing step
    masks = np.zeros(arrays[:256].shape, dtype=np.uint8)
    height, width = arrays.shape[1:]
    rng = np.random.default_rng(1)
    for index in range(len(masks)):
        dy, dx = rng.integers(-20, 21, 2)
        masks[index, 80 + dy : 370 + dy, 50 + dx : 230 + dx] = 1
        masks[index, 75 - dy : 375 - dy, 280 - dx : 465 - dx] = 2
    lung_hashes(arrays[:256], masks)  # warm the coefficient cache for these sizes
    start = time.perf_counter()
    lung_hashes(arrays[:256], masks)
    result["lung_hashes_images_per_s"] = 256 / (time.perf_counter() - start)
    if torch.cuda.is_available():
        cuda = tensor.cuda()
        ours_rate(cuda[:BATCH])
        result["cuda_images_per_s"] = float(np.median([ours_rate(cuda) for _ in range(3)]))
        result["cuda_device"] = torch.cuda.get_device_name()
        result["cuda_bit_exact_vs_cpu"] = bool(torch.equal(phash(cuda).cpu(), phash(tensor)))
    return result


def write_markdown(result: dict, path: Path) -> None:
    exact, speed_ = result["exactness"], result["speed"]
    threads = result["torch_threads"]
    lines = [
        "# pHash: gren.hashing.phash vs imagehash.phash",
        "",
        f"{result['date']}, {result['machine']}; Python {result['python']}, torch {result['torch']}, "
        f"Pillow {result['pillow']}, imagehash {result['imagehash']}, scipy {result['scipy']}; "
        f"load average at start {result['load_average']}.",
        "",
        "## Exactness (real NIH images, 512 x 512)",
        "",
        f"* whole images: {exact['bit_exact']} / {exact['images'] - exact['ties_left_out']} bit-exact "
        f"({100 * exact['bit_exact_share']:.2f}%), {exact['ties_left_out']} median ties left out "
        f"({exact['bit_exact_including_ties']} / {exact['images']} including them)",
        f"* random crops ({exact['crop_sizes_distinct']} distinct odd / non-square sizes): "
        f"{100 * exact['crop_bit_exact_share']:.2f}% bit-exact, {exact['crop_ties_left_out']} ties left out",
        "",
        "## Speed (pre-decoded images, same machine, alternating rounds)",
        "",
        "| | images/s |",
        "| --- | --- |",
        f"| imagehash.phash (PIL image, one at a time) | {speed_['imagehash_images_per_s']:.0f} |",
        f"| gren phash, uint8 tensor, batches of {speed_['batch']}, {threads} threads | "
        f"{speed_[f'ours_images_per_s_{threads}_threads']:.0f} |",
        f"| gren phash, same, 1 thread | {speed_['ours_images_per_s_1_thread']:.0f} |",
        f"| gren lung_hashes (2 crops per image, many sizes) | {speed_['lung_hashes_images_per_s']:.0f} |",
    ]
    if "cuda_images_per_s" in speed_:
        lines.append(f"| gren phash on {speed_['cuda_device']} | {speed_['cuda_images_per_s']:.0f} |")
    lines += [
        "",
        f"Ratio ours / imagehash (median of {speed_['rounds']} rounds): {speed_[f'ratio_{threads}_threads']:.1f}x "
        f"with {threads} threads, {speed_['ratio_1_thread']:.1f}x with 1 thread.",
        "",
    ]
    path.write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=None, help="use the first N images only")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--per-round", type=int, default=256)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    folder = shared_data_dir() / "nih" / "images"
    if not folder.is_dir():
        log.error("real images not found at %s (set GREN_SHARED_DATA)", folder)
        return 1
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))[: args.limit]
    images = []
    for path in tqdm(paths, desc="decode", leave=False):
        with Image.open(path) as image:
            images.append(image.convert("L"))
    arrays = np.stack([np.asarray(image) for image in images])
    load = os.getloadavg()
    result = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "torch_threads": torch.get_num_threads(),
        "load_average": [round(v, 2) for v in load],
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "pillow": PIL.__version__,
        "imagehash": imagehash.__version__,
        "scipy": scipy.__version__,
        "exactness": exactness(images, arrays),
        "speed": speed(images, arrays, args.rounds, min(args.per_round, len(images))),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "phash.json").write_text(json.dumps(result, indent=2))
    write_markdown(result, args.out / "phash.md")
    log.info("wrote %s", args.out / "phash.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
