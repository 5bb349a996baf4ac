"""Benchmark: reading a prepared cache vs decoding + resizing per item, and ``gren prepare`` itself.

On a folder of real images (default: the shared NIH sample, ``gren.core.paths.shared_data_dir() / "nih"``)
it measures, in one run and on the same machine:

* ``prepare``: images/s of :func:`gren.data.prepare.prepare_cache` (decode, resize, lung masks, lung
  hashes, all workers), and the cache's bytes per image;
* reading, side by side (rounds alternate between the two, best round kept): items/s of
  :class:`gren.data.cache.CacheDataset` vs :class:`gren.data.dataset.RawDataset` (decode + resize per
  item), single process, and batches through a ``DataLoader`` with worker processes.

Writes ``benchmarks/results/prepare.json`` and ``prepare.md``. The cache goes to a temporary folder
(``--keep`` to keep it); real data is never copied (a ``--limit`` subset is a folder of symlinks).

    python benchmarks/bench_prepare.py [--data DIR] [--size 256] [--workers N] [--limit N]
"""

from __future__ import annotations

import argparse
import datetime
import gzip
import json
import logging
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

import machine_info
from gren.core.imageio import read_gray_resized
from gren.core.paths import shared_data_dir
from gren.data.cache import CacheDataset, PreparedCache
from gren.data.dataset import RawDataset, collate
from gren.data.nih import find_bbox_csv, find_data_entry_csv, find_image_files, load_index
from gren.data.prepare import prepare_cache

log = logging.getLogger("bench_prepare")
RESULTS = Path(__file__).resolve().parent / "results"


def cpu_model() -> str:
    """The CPU's model name (:func:`machine_info.cpu_model`)."""
    return machine_info.cpu_model()


def subset_folder(data_dir: Path, limit: int, into: Path) -> Path:
    """A folder with the first ``limit`` listed images of ``data_dir`` that exist (symlinks), the
    Data_Entry CSV filtered to them and the BBox CSV linked."""
    entry = find_data_entry_csv(data_dir)
    files, _ = find_image_files(data_dir)
    (into / "images").mkdir(parents=True)
    opener = gzip.open if entry.name.endswith(".gz") else open
    with opener(entry, "rt") as source, open(into / "Data_Entry_2017.csv", "w") as target:
        target.write(source.readline())
        kept = 0
        for line in source:
            stem = os.path.splitext(line.split(",", 1)[0].strip())[0]
            if stem in files and kept < limit:
                target.write(line)
                (into / "images" / files[stem].name).symlink_to(files[stem])
                kept += 1
    bbox = find_bbox_csv(data_dir)
    if bbox is not None:
        (into / bbox.name).symlink_to(bbox)
    return into


def items_per_s(dataset, n: int) -> float:
    started = time.perf_counter()
    for i in range(n):
        dataset[i]
    return n / (time.perf_counter() - started)


def loader_items_per_s(dataset, n: int, workers: int, batch_size: int) -> float:
    """Steady-state items/s through a DataLoader: one untimed epoch starts the workers, the next is timed."""
    subset = torch.utils.data.Subset(dataset, range(n))
    loader = DataLoader(subset, batch_size=batch_size, num_workers=workers, collate_fn=collate,
                        persistent_workers=workers > 0)
    for _ in loader:
        pass
    started = time.perf_counter()
    count = 0
    for batch in loader:
        count += len(batch["image_id"])
    rate = count / (time.perf_counter() - started)
    del loader
    return rate


def stage_ms_per_image(cache: PreparedCache, lungs_segmenter: str, n: int) -> dict[str, float]:
    """Milliseconds per image of prepare's stages (one process, one thread) on the first ``n`` records."""
    from gren.lungs.regions import lung_hashes
    from gren.lungs.segment import load_segmenter

    paths = cache.records["path"].tolist()[:n]
    started = time.perf_counter()
    images = np.stack([read_gray_resized(path, cache.size) for path in paths])
    decoded = time.perf_counter()
    masks, _ = load_segmenter(lungs_segmenter).segment(images)
    segmented = time.perf_counter()
    lung_hashes(images, masks)
    hashed = time.perf_counter()
    return {"decode_resize": round((decoded - started) / n * 1e3, 2),
            "segment": round((segmented - decoded) / n * 1e3, 2),
            "hash": round((hashed - segmented) / n * 1e3, 2)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=shared_data_dir() / "nih")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--lungs", default="auto")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--limit", type=int, default=0, help="prepare only the first N images (0: all)")
    parser.add_argument("--read-n", type=int, default=400, help="items per reading round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--keep", type=Path, default=None, help="write the cache here and keep it")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)-7s %(name)s: %(message)s")
    torch.set_num_threads(1)  # per-item work, as in a DataLoader worker; the same for both sides
    if not args.data.is_dir():
        log.error("%s not found (set GREN_SHARED_DATA or pass --data)", args.data)
        return 2

    scratch = Path(tempfile.mkdtemp(prefix="gren-bench-prepare-"))
    try:
        data_dir = subset_folder(args.data, args.limit, scratch / "data") if args.limit else args.data
        cache_dir = args.keep or scratch / "cache"
        log.info("preparing %s -> %s (size %d, %d workers)", data_dir, cache_dir, args.size, args.workers)
        summary = prepare_cache(data_dir, cache_dir, size=args.size, lungs=args.lungs, workers=args.workers,
                                force=True, progress=False)
        cache = PreparedCache(cache_dir)
        cached = CacheDataset(cache)
        raw = RawDataset(load_index(data_dir, on_bad_image="skip"), args.size, image_ids=cache.image_ids,
                         on_bad_image="skip")
        n = min(args.read_n, len(cache))
        rates: dict[str, list[float]] = {"cache": [], "raw": [], "cache_loader0": [], "cache_loader": [],
                                         "raw_loader": []}
        loader_workers = max(1, min(args.workers, 2))
        items_per_s(cached, min(n, 32)), items_per_s(raw, min(n, 32))  # warm up imports and page cache
        for round_ in range(args.rounds):
            rates["cache"].append(items_per_s(cached, n))
            rates["raw"].append(items_per_s(raw, n))
            rates["cache_loader0"].append(loader_items_per_s(cached, n, 0, args.batch_size))
            rates["cache_loader"].append(loader_items_per_s(cached, n, loader_workers, args.batch_size))
            rates["raw_loader"].append(loader_items_per_s(raw, n, loader_workers, args.batch_size))
            log.info("round %d: %s", round_, {k: round(v[-1], 1) for k, v in rates.items()})
        best = {k: max(v) for k, v in rates.items()}
        stages = stage_ms_per_image(cache, "classical", min(64, len(cache)))
        result = {
            "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "machine": f"{cpu_model()} ({os.cpu_count()} CPUs), {platform.platform()}",
            "versions": {"python": sys.version.split()[0], "torch": torch.__version__},
            "data": str(args.data), "limit": args.limit, "size": args.size, "lungs": summary["lungs"],
            "prepare": {"images": summary["n_images"], "failed": summary["n_failed"], "workers": args.workers,
                        "seconds": summary["seconds"], "images_per_s": summary["images_per_s"],
                        "bytes_per_image": summary["bytes_per_image"], "mask_sources": summary["mask_sources"],
                        "fallback": summary["n_fallback"], "stage_ms_per_image_1_thread": stages},
            "read": {"items_per_round": n, "rounds": args.rounds, "loader_workers": loader_workers,
                     "batch_size": args.batch_size,
                     "items_per_s_best": {k: round(v, 1) for k, v in best.items()},
                     "items_per_s_all": {k: [round(x, 1) for x in v] for k, v in rates.items()},
                     "speedup_single_process": round(best["cache"] / best["raw"], 2),
                     "speedup_dataloader": round(best["cache_loader"] / best["raw_loader"], 2)},
        }
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "prepare.json").write_text(json.dumps(result, indent=1) + "\n")
    read, prep = result["read"], result["prepare"]
    ips = read["items_per_s_best"]
    md = [
        "## `gren prepare`: cached loading vs on-the-fly decoding",
        "",
        f"{result['date']}, {result['machine']}, torch {result['versions']['torch']}, "
        f"Python {result['versions']['python']}.",
        f"Data: {result['data']}{f' (first {args.limit} images)' if args.limit else ''}; S = {args.size}; "
        f"lungs {result['lungs']}.",
        "",
        "| reading | cache items/s | raw decode + resize items/s | speed-up |",
        "| --- | ---: | ---: | ---: |",
        f"| single process | {ips['cache']:.0f} | {ips['raw']:.0f} | {read['speedup_single_process']:.1f}x |",
        f"| DataLoader ({read['loader_workers']} workers, batch {read['batch_size']}) | {ips['cache_loader']:.0f} | "
        f"{ips['raw_loader']:.0f} | {read['speedup_dataloader']:.1f}x |",
        f"| cache via DataLoader, 0 workers (in-process, batch {read['batch_size']}) | {ips['cache_loader0']:.0f} | "
        f"{ips['raw']:.0f} (single process) | {ips['cache_loader0'] / ips['raw']:.1f}x |",
        "",
        f"Best of {read['rounds']} alternating rounds of {read['items_per_round']} items each (DataLoader: "
        "after one untimed epoch that starts its workers).",
        "",
        f"`prepare`: {prep['images']} images in {prep['seconds']:.1f} s with {prep['workers']} workers = "
        f"{prep['images_per_s']:.1f} images/s (decode, resize, lung masks {prep['mask_sources']}, "
        f"{prep['fallback']} prior fallbacks, lung hashes); {prep['bytes_per_image'] / 1e3:.1f} kB per image "
        f"on disk; {prep['failed']} unreadable. Per image, one thread: decode + resize "
        f"{stages['decode_resize']:.1f} ms, classical lung segmentation {stages['segment']:.1f} ms, "
        f"two lung hashes {stages['hash']:.1f} ms.",
        "",
    ]
    (args.out / "prepare.md").write_text("\n".join(md))
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
